"""What every chat provider speaks: one request shape, one answer shape, one interface."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Protocol

import msgspec

from gateway.record import RequestRecord


class Message(msgspec.Struct, frozen=True):
    role: str
    content: str


class ChatRequest(msgspec.Struct, kw_only=True, frozen=True):
    """The router's request, as `/v1/chat` takes it and the OpenAI front door maps it."""

    model: str
    messages: list[Message]
    max_tokens: int | None = None
    temperature: float | None = None
    format: str | None = None  # "json" asks for a JSON answer


class ChatResult(msgspec.Struct, kw_only=True):
    model: str
    provider: str
    content: str
    input_tokens: int
    output_tokens: int
    finish_reason: str
    latency_ms: int = 0


class Delta(msgspec.Struct, kw_only=True):
    """One piece of a streamed answer; the last one carries the finish reason and counts."""

    content: str = ""
    finish_reason: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0


class Provider(Protocol):
    """A place that answers chats. `admit` runs before the response starts (fast
    refusals: gate full, target down), `chat` answers whole, `stream` piece by piece.
    Both note what they learn (gate wait, upstream timings) in the request's record."""

    name: str
    base_url: str

    def admit(self) -> None: ...

    async def chat(self, request: ChatRequest, model: str, record: RequestRecord) -> ChatResult: ...

    def stream(
        self, request: ChatRequest, model: str, record: RequestRecord
    ) -> AsyncGenerator[Delta, None]: ...


def finish_reason(done_reason: str, done: bool) -> str:
    """Ollama's `done_reason` first; else what `done` implies, as chatd did."""
    if done_reason:
        return done_reason
    return "stop" if done else "length"
