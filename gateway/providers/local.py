"""The local Ollama target as a router provider: `/api/chat`, through the chat gate
(pinned load options applied, ADR 0017).

It shares the target client and the gate with the Ollama passthrough, so a `/v1/chat`
call waits behind an `/api/chat` stream like any other generation. Reasoning is off by
default (`think: false`), so low-budget callers get an answer, not an empty thought.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from gateway.errors import UpstreamError
from gateway.gate import ChatGate
from gateway.pinning import Pins, pin_for, pin_request
from gateway.providers.base import ChatRequest, ChatResult, Delta, finish_reason
from gateway.record import RequestRecord
from gateway.target.client import TargetClient
from gateway.target.inventory import Inventory


def ollama_chat_body(request: ChatRequest, model: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if request.max_tokens is not None:
        options["num_predict"] = request.max_tokens
    if request.temperature is not None:
        options["temperature"] = request.temperature
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": m.role, "content": m.content} for m in request.messages],
        "think": False,
    }
    if options:
        body["options"] = options
    if request.format == "json":
        body["format"] = "json"
    return body


class LocalOllama:
    name = "ollama"

    def __init__(
        self, target: TargetClient, inventory: Inventory, gate: ChatGate, pins: Pins | None = None
    ) -> None:
        self._target = target
        self._inventory = inventory
        self._gate = gate
        self._pins = pins or {}
        self.base_url = target.url

    def _body(self, request: ChatRequest, model: str) -> dict[str, Any]:
        body = ollama_chat_body(request, model)
        pin = pin_for(self._pins, model)
        return body if pin is None else pin_request(body, pin)

    def admit(self) -> None:
        self._inventory.require_reachable()
        self._gate.check_admission()

    async def chat(self, request: ChatRequest, model: str, record: RequestRecord) -> ChatResult:
        self.admit()
        async with self._gate.serve(record, model):
            try:
                answer = await self._target.chat(self._body(request, model))
                record.load_s = answer.load_duration / 1e9 if answer.load_duration else None
            except UpstreamError as exc:
                raise self._inventory.note_failure(exc) from exc
        return ChatResult(
            model=model,
            provider=self.name,
            content=answer.message.content,
            input_tokens=answer.prompt_eval_count,
            output_tokens=answer.eval_count,
            finish_reason=finish_reason(answer.done_reason, answer.done),
        )

    async def stream(
        self, request: ChatRequest, model: str, record: RequestRecord
    ) -> AsyncGenerator[Delta, None]:
        self.admit()
        async with self._gate.serve(record, model):
            try:
                async with aclosing(self._target.chat_stream(self._body(request, model))) as chunks:
                    async for chunk in chunks:
                        if chunk.done:
                            if chunk.load_duration:
                                record.load_s = chunk.load_duration / 1e9
                            yield Delta(
                                content=chunk.message.content,
                                finish_reason=finish_reason(chunk.done_reason, True),
                                input_tokens=chunk.prompt_eval_count,
                                output_tokens=chunk.eval_count,
                            )
                        elif chunk.message.content:
                            yield Delta(content=chunk.message.content)
            except UpstreamError as exc:
                raise self._inventory.note_failure(exc) from exc
