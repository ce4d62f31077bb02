"""Ollama wire models: only the fields the gateway reads.

Every Struct ignores unknown fields (msgspec's default), so new Ollama fields never break
decoding; nothing that is forwarded is re-encoded from these, so nothing is lost either.
Each answer models Ollama's `error` field, so an error line decodes instead of failing.
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import UNSET, UnsetType


class Wire(msgspec.Struct, kw_only=True):
    """Base for decoded Ollama frames; unknown fields are ignored on purpose (see module)."""


class Routing(Wire):
    """What the gateway needs from a client's request body to route it; the rest stays bytes."""

    model: str | UnsetType = UNSET
    name: str | UnsetType = UNSET  # /api/show and the management routes still accept `name`
    stream: bool | UnsetType | None = UNSET

    @property
    def model_name(self) -> str:
        if isinstance(self.model, str) and self.model:
            return self.model
        return self.name if isinstance(self.name, str) else ""

    @property
    def streaming(self) -> bool:
        # Ollama streams unless told `"stream": false`; `null` means the default.
        return self.stream is not False


class Message(Wire):
    role: str = "assistant"
    content: str = ""
    thinking: str | UnsetType = UNSET
    tool_calls: msgspec.Raw | UnsetType = UNSET


class Final(Wire):
    """Fields of a chat or generate answer, streamed chunk or final frame alike."""

    model: str = ""
    done: bool = False
    done_reason: str = ""
    error: str | UnsetType = UNSET
    total_duration: int = 0
    load_duration: int = 0
    prompt_eval_count: int = 0
    prompt_eval_duration: int = 0
    eval_count: int = 0
    eval_duration: int = 0


class ChatChunk(Final):
    message: Message = msgspec.field(default_factory=Message)


class GenerateChunk(Final):
    response: str = ""
    thinking: str | UnsetType = UNSET


class ModelDetails(Wire):
    family: str = ""
    parameter_size: str = ""
    quantization_level: str = ""


class ModelEntry(Wire):
    name: str = ""
    model: str = ""
    modified_at: str = ""
    size: int = 0
    digest: str = ""
    details: ModelDetails = msgspec.field(default_factory=ModelDetails)
    expires_at: str = ""  # /api/ps only
    size_vram: int = 0  # /api/ps only


class ModelList(Wire):
    """The answer of `/api/tags` and of `/api/ps`."""

    models: list[ModelEntry] = msgspec.field(default_factory=list)
    error: str | UnsetType = UNSET


class EmbedResponse(Wire):
    model: str = ""
    embeddings: list[list[float]] = msgspec.field(default_factory=list)
    error: str | UnsetType = UNSET
    total_duration: int = 0
    load_duration: int = 0
    prompt_eval_count: int = 0


class VersionResponse(Wire):
    version: str = ""


class ShowResponse(Wire):
    modelfile: str = ""
    parameters: str = ""
    template: str = ""
    details: ModelDetails = msgspec.field(default_factory=ModelDetails)
    capabilities: list[str] = msgspec.field(default_factory=list)
    model_info: dict[str, Any] = msgspec.field(default_factory=dict)


def canonical_model(name: str) -> str:
    """Ollama's model identity: `llama3` and `llama3:latest` are the same model."""
    base = name.rsplit("/", 1)[-1]
    return name if ":" in base else f"{name}:latest"
