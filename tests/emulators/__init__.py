"""Faithful upstream emulators (Ollama, OpenAI Chat Completions) for gateway tests."""

from .http import EmulatorBase, Exchange, Faults, RecordedRequest
from .ollama import OllamaEmulator
from .openai import OpenAIEmulator

__all__ = [
    "EmulatorBase",
    "Exchange",
    "Faults",
    "OllamaEmulator",
    "OpenAIEmulator",
    "RecordedRequest",
]
