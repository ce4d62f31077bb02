"""The OpenAI Chat Completions family: OpenRouter, OpenCode, Kimi For Coding.

One implementation, three configurations. `chat` and `stream` speak the router's shapes;
`forward` hands an OpenAI-shaped body straight through (the OpenAI front door), with
only `model` rewritten, so every field a client sends reaches the provider.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import AbstractAsyncContextManager, aclosing
from typing import Any

import msgspec

from gateway.errors import DECODE_ERRORS, UpstreamProtocol
from gateway.providers.base import ChatRequest, ChatResult, Delta
from gateway.providers.http import ProviderHTTP, StreamAnswer
from gateway.providers.sse import SseSplitter
from gateway.record import RequestRecord


class _Message(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    message: _Message | None = None
    delta: _Message | None = None
    finish_reason: str | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Completion(msgspec.Struct):
    choices: list[_Choice] = msgspec.field(default_factory=list)
    usage: _Usage | None = None
    error: Any = None


_completion = msgspec.json.Decoder(_Completion)
_encode = msgspec.json.Encoder().encode


def openai_body(request: ChatRequest, model: str, *, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": m.role, "content": m.content} for m in request.messages],
        "stream": stream,
    }
    if request.max_tokens is not None:
        body["max_tokens"] = request.max_tokens
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.format == "json":
        body["response_format"] = {"type": "json_object"}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


class OpenAICompatible:
    def __init__(self, http: ProviderHTTP) -> None:
        self.http = http
        self._http = http
        self.name = http.name
        self.base_url = http.base_url

    def admit(self) -> None:
        return None

    def check_completion(self, body: bytes) -> _Completion:
        """A whole answer must decode and hold a choice: zero choices is the upstream's
        failure, not something to hand a client that will read `choices[0]`."""
        try:
            completion = _completion.decode(body)
        except DECODE_ERRORS as exc:
            raise UpstreamProtocol(f"{self.name} sent an answer that is not valid: {exc}") from None
        if not completion.choices or completion.choices[0].message is None:
            raise UpstreamProtocol(f"{self.name} answered with no choices")
        return completion

    async def chat(self, request: ChatRequest, model: str, record: RequestRecord) -> ChatResult:
        answer = await self._http.post(
            "/chat/completions", openai_body(request, model, stream=False)
        )
        if answer.status >= 400:
            raise self._http.status_error(answer)
        completion = self.check_completion(answer.body)
        choice = completion.choices[0]
        usage = completion.usage or _Usage()
        return ChatResult(
            model=model,
            provider=self.name,
            content=(choice.message.content if choice.message else None) or "",
            input_tokens=usage.prompt_tokens,
            output_tokens=usage.completion_tokens,
            finish_reason=choice.finish_reason or "stop",
        )

    async def stream(
        self, request: ChatRequest, model: str, record: RequestRecord
    ) -> AsyncGenerator[Delta, None]:
        body = _encode(openai_body(request, model, stream=True))
        async with self._http.stream("/chat/completions", body) as answer:
            if answer.status >= 400:
                raise self._http.status_error(await answer.read())
            splitter = SseSplitter()
            finish: str | None = None
            usage = _Usage()
            async with aclosing(_events(answer, splitter)) as events:
                async for data in events:
                    if data == b"[DONE]":
                        break
                    try:
                        chunk = _completion.decode(data)
                    except DECODE_ERRORS as exc:
                        raise UpstreamProtocol(
                            f"{self.name} sent an event that is not JSON: {exc}"
                        ) from None
                    if chunk.error is not None:
                        raise UpstreamProtocol(
                            f"{self.name} failed mid-answer: {self._http.scrub(str(chunk.error))}"
                        )
                    usage = chunk.usage or usage
                    for choice in chunk.choices:
                        finish = choice.finish_reason or finish
                        if choice.delta and choice.delta.content:
                            yield Delta(content=choice.delta.content)
            yield Delta(
                finish_reason=finish or "stop",
                input_tokens=usage.prompt_tokens,
                output_tokens=usage.completion_tokens,
            )

    def forward(
        self, body: dict[str, Any], model: str
    ) -> AbstractAsyncContextManager[StreamAnswer]:
        """Send a client's OpenAI body on, with the provider's model name, answer unread."""
        return self._http.stream("/chat/completions", _encode({**body, "model": model}))


class UsageWatch:
    """Reads `usage` from an SSE stream that is forwarded untouched: only events that
    mention it are decoded, so passing content through costs a substring search."""

    def __init__(self) -> None:
        self._splitter = SseSplitter()
        self.tokens_in = 0
        self.tokens_out = 0

    def feed(self, chunk: bytes) -> None:
        try:
            events = self._splitter.feed(chunk)
        except ValueError:
            return  # telemetry only: an odd stream is the client's to judge
        for data in events:
            if b'"usage"' not in data:
                continue
            try:
                usage = _completion.decode(data).usage
            except DECODE_ERRORS:
                continue
            if usage is not None:
                self.tokens_in, self.tokens_out = usage.prompt_tokens, usage.completion_tokens


async def _events(answer: StreamAnswer, splitter: SseSplitter) -> AsyncGenerator[bytes, None]:
    async for chunk in answer:
        for data in splitter.feed(chunk):
            yield data
