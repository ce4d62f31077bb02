"""Ollama Cloud: `/api/generate` with the chat flattened into `system` and `prompt`.

As chatd did: reasoning off, `num_predict` at least 400 (cloud reasoning models need the
headroom), temperature 0.3 unless given (an explicit 0 is kept: Go could not tell 0
from unset, we can), bearer key. Both `ollama_cloud/<m>` and
`<m>:cloud` land here; the registry strips the prefix, the suffix stays (it is the
model's canonical name on ollama.com).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import msgspec

from gateway.errors import DECODE_ERRORS, UpstreamProtocol
from gateway.providers.base import ChatRequest, ChatResult, Delta, Message, finish_reason
from gateway.providers.http import ProviderHTTP
from gateway.record import RequestRecord
from gateway.target.ndjson import NdjsonSplitter
from gateway.target.wire import GenerateChunk

NUM_PREDICT_FLOOR = 400
DEFAULT_TEMPERATURE = 0.3

_generate = msgspec.json.Decoder(GenerateChunk)
_encode = msgspec.json.Encoder().encode


def flatten_messages(messages: list[Message]) -> tuple[str, str]:
    """System messages joined into `system`; the rest into a `User:`/`Assistant:` prompt."""
    system = [m.content for m in messages if m.role == "system"]
    prompt = [
        f"Assistant: {m.content}" if m.role == "assistant" else f"User: {m.content}"
        for m in messages
        if m.role != "system"
    ]
    return "\n\n".join(system), "\n\n".join(prompt)


def generate_body(request: ChatRequest, model: str, *, stream: bool) -> dict[str, Any]:
    system, prompt = flatten_messages(request.messages)
    body: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "stream": stream,
        "think": False,
        "options": {
            "num_predict": max(request.max_tokens or 0, NUM_PREDICT_FLOOR),
            "temperature": (
                DEFAULT_TEMPERATURE if request.temperature is None else request.temperature
            ),
        },
    }
    if system:
        body["system"] = system
    if request.format == "json":
        body["format"] = "json"
    return body


class OllamaCloud:
    name = "ollama_cloud"

    def __init__(self, http: ProviderHTTP) -> None:
        self._http = http
        self.base_url = http.base_url

    def admit(self) -> None:
        return None

    def _decode(self, line: bytes) -> GenerateChunk:
        try:
            chunk = _generate.decode(line)
        except DECODE_ERRORS as exc:
            raise UpstreamProtocol(f"{self.name} sent an answer that is not valid: {exc}") from None
        if isinstance(chunk.error, str):
            raise UpstreamProtocol(f"{self.name} failed: {self._http.scrub(chunk.error)}")
        return chunk

    def _result(self, chunk: GenerateChunk, model: str, content: str) -> ChatResult:
        return ChatResult(
            model=model,
            provider=self.name,
            content=content,
            input_tokens=chunk.prompt_eval_count,
            output_tokens=chunk.eval_count,
            finish_reason=finish_reason(chunk.done_reason, chunk.done),
        )

    async def chat(self, request: ChatRequest, model: str, record: RequestRecord) -> ChatResult:
        answer = await self._http.post("/api/generate", generate_body(request, model, stream=False))
        if answer.status >= 400:
            raise self._http.status_error(answer)
        chunk = self._decode(answer.body)
        return self._result(chunk, model, chunk.response)

    async def stream(
        self, request: ChatRequest, model: str, record: RequestRecord
    ) -> AsyncGenerator[Delta, None]:
        body = _encode(generate_body(request, model, stream=True))
        async with self._http.stream("/api/generate", body) as answer:
            if answer.status >= 400:
                raise self._http.status_error(await answer.read())
            splitter = NdjsonSplitter()
            async for data in answer:
                for line in splitter.feed(data):
                    chunk = self._decode(line)
                    if chunk.done:
                        yield Delta(
                            content=chunk.response,
                            finish_reason=finish_reason(chunk.done_reason, True),
                            input_tokens=chunk.prompt_eval_count,
                            output_tokens=chunk.eval_count,
                        )
                        return
                    if chunk.response:
                        yield Delta(content=chunk.response)
        raise UpstreamProtocol(f"{self.name} ended the answer without a final frame")
