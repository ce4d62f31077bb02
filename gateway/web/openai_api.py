"""`POST /v1/chat/completions`: the OpenAI-compatible front door, over the router.

OpenAI-compatible providers get the client's body as sent (only `model` rewritten) and
their answer, SSE or JSON, comes back as it arrives. Local Ollama and Ollama Cloud answers
are converted: NDJSON chunk by chunk into `chat.completion.chunk` events. Errors use
OpenAI's shape so SDKs raise their typed exceptions; an error after the first byte is an
SSE error event followed by `[DONE]`, so clients never hang. Raw ASGI like the Ollama
routes (ADR 0005): the status of an upstream failure before the first byte is kept, and
the chat gate is held inside the work that a disconnect cancels.
"""

from __future__ import annotations

import secrets
import time
from contextlib import aclosing
from typing import Any

import msgspec
import trio

from gateway.errors import BadRequest, GatewayError, UpstreamError
from gateway.providers.base import ChatRequest, Message, Provider
from gateway.providers.openai_compat import OpenAICompatible, UsageWatch
from gateway.providers.sse import DONE, sse_event
from gateway.record import RequestRecord, record_of
from gateway.services import Services
from gateway.web.asgi import (
    JSON,
    ClientGone,
    Receive,
    Responder,
    Scope,
    Send,
    read_body,
    run_tracked,
)
from gateway.web.bodies import decode_body

_encode = msgspec.json.Encoder().encode
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


class _Part(msgspec.Struct):
    type: str = "text"
    text: str = ""


class _Message(msgspec.Struct):
    role: str
    content: str | list[_Part] | None = None


class _ResponseFormat(msgspec.Struct):
    type: str = "text"


class _StreamOptions(msgspec.Struct):
    include_usage: bool = False


class CompletionRequest(msgspec.Struct, kw_only=True):
    """The fields of an OpenAI chat request that the gateway reads; others ride along."""

    model: str
    messages: list[_Message]
    stream: bool = False
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    response_format: _ResponseFormat | None = None
    stream_options: _StreamOptions | None = None

    def as_chat(self) -> ChatRequest:
        def text(content: str | list[_Part] | None) -> str:
            if isinstance(content, list):
                return "".join(part.text for part in content if part.type == "text")
            return content or ""

        json_asked = self.response_format is not None and self.response_format.type in (
            "json_object",
            "json_schema",
        )
        return ChatRequest(
            model=self.model,
            messages=[Message(m.role, text(m.content)) for m in self.messages],
            max_tokens=self.max_completion_tokens or self.max_tokens,
            temperature=self.temperature,
            format="json" if json_asked else None,
        )


_request = msgspec.json.Decoder(CompletionRequest)
_raw_request = msgspec.json.Decoder(dict[str, Any])


def openai_error(error: GatewayError) -> bytes:
    kind = _ERROR_TYPES.get(error.status, "api_error")
    code = "model_not_found" if error.status == 404 else None
    return _encode({"error": {"message": error.message, "type": kind, "param": None, "code": code}})


def sse_error_tail(error: GatewayError, mid_line: bool) -> bytes:
    return (b"\n\n" if mid_line else b"") + sse_event(openai_error(error)) + DONE


def parse_request(body: bytes) -> CompletionRequest:
    request = decode_body(body, _request)
    if not request.messages:
        raise BadRequest("messages must hold at least one message")
    return request


class _Chunks:
    """Builds `chat.completion.chunk` events for one answer."""

    def __init__(self, model: str) -> None:
        self.id = f"chatcmpl-{secrets.token_hex(12)}"
        self.created = int(time.time())
        self.model = model

    def event(
        self,
        delta: dict[str, Any],
        finish_reason: str | None = None,
        usage: dict[str, int] | None = None,
    ) -> bytes:
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }
        if usage is not None:
            body["choices"] = []
            body["usage"] = usage
        return sse_event(_encode(body))


def _usage(input_tokens: int, output_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": input_tokens,
        "completion_tokens": output_tokens,
        "total_tokens": input_tokens + output_tokens,
    }


class OpenAIFrontDoor:
    """The ASGI endpoint for `POST /v1/chat/completions`."""

    path = "/v1/chat/completions"

    def __init__(self, services: Services) -> None:
        self._s = services

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        responder = Responder(
            send, error_body=openai_error, stream_tail=sse_error_tail, record=record_of(scope)
        )
        try:
            if scope["method"] != "POST":
                raise BadRequest(f"{scope['method']} is not allowed on {self.path}; use POST")
            body = await read_body(scope, receive, self._s.config.max_body_bytes)
            request = parse_request(body)
            provider, model = self._s.registry.route(request.model)
            record = record_of(scope)
            record.provider, record.model = provider.name, model
            provider.admit()
            self._s.budgets.admit(record.who, provider.name)
            await run_tracked(
                self._s.drain,
                scope,
                receive,
                responder,
                lambda: self._answer(responder, provider, model, request, body, record),
            )
        except ClientGone:
            return
        except GatewayError as exc:
            await responder.fail(exc)

    async def _answer(
        self,
        responder: Responder,
        provider: Provider,
        model: str,
        request: CompletionRequest,
        body: bytes,
        record: RequestRecord,
    ) -> None:
        sent = trio.current_time()
        try:
            if isinstance(provider, OpenAICompatible):
                await self._forward(responder, provider, model, request, body, record)
            elif request.stream:
                await self._stream(responder, provider, model, request, record)
            else:
                await self._complete(responder, provider, model, request, record)
        finally:
            # The upstream's own time: a local call's wait for the gate is not part of it.
            record.upstream_s = trio.current_time() - sent - (record.gate_wait_s or 0.0)

    async def _complete(
        self,
        responder: Responder,
        provider: Provider,
        model: str,
        request: CompletionRequest,
        record: RequestRecord,
    ) -> None:
        result = await provider.chat(request.as_chat(), model, record)
        record.tokens_in, record.tokens_out = result.input_tokens, result.output_tokens
        completion = {
            "id": f"chatcmpl-{secrets.token_hex(12)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.content},
                    "finish_reason": result.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": _usage(result.input_tokens, result.output_tokens),
        }
        await responder.full(200, _encode(completion), [(b"content-type", JSON)])

    async def _stream(
        self,
        responder: Responder,
        provider: Provider,
        model: str,
        request: CompletionRequest,
        record: RequestRecord,
    ) -> None:
        chunks = _Chunks(request.model)
        include_usage = request.stream_options is not None and request.stream_options.include_usage
        deltas = provider.stream(request.as_chat(), model, record)
        async with aclosing(deltas):
            # The first piece comes before the status: a refusal or an upstream error
            # up to here keeps its own status.
            first = await anext(deltas, None)
            await responder.start(200, list(SSE_HEADERS))
            await responder.chunk(chunks.event({"role": "assistant", "content": ""}))
            # A failure from here on reaches `work`, which ends the stream in-band.
            delta = first
            while delta is not None:
                if delta.content:
                    await responder.chunk(chunks.event({"content": delta.content}))
                if delta.finish_reason is not None:
                    record.tokens_in, record.tokens_out = delta.input_tokens, delta.output_tokens
                    await responder.chunk(chunks.event({}, delta.finish_reason))
                    if include_usage:
                        usage = _usage(delta.input_tokens, delta.output_tokens)
                        await responder.chunk(chunks.event({}, usage=usage))
                delta = await anext(deltas, None)
        await responder.end(DONE)

    async def _forward(
        self,
        responder: Responder,
        provider: OpenAICompatible,
        model: str,
        request: CompletionRequest,
        body: bytes,
        record: RequestRecord,
    ) -> None:
        raw = decode_body(body, _raw_request)
        async with provider.forward(raw, model) as answer:
            if answer.status >= 400 or not request.stream:
                whole = await answer.read()
                if whole.status >= 400:
                    raise provider.http.status_error(whole, body_is_clients=True)
                usage = provider.check_completion(whole.body).usage
                if usage is not None:
                    record.tokens_in, record.tokens_out = (
                        usage.prompt_tokens,
                        usage.completion_tokens,
                    )
                content_type = whole.headers.get("content-type", "application/json")
                await responder.full(200, whole.body, [(b"content-type", content_type.encode())])
                return
            content_type = answer.headers.get("content-type", "text/event-stream")
            await responder.start(200, [(b"content-type", content_type.encode())])
            ended_mid_event = False
            watch = UsageWatch()
            try:
                async for chunk in answer:
                    ended_mid_event = not chunk.endswith(b"\n\n")
                    watch.feed(chunk)
                    await responder.chunk(chunk)
            except UpstreamError as exc:
                await responder.fail(exc, mid_line=ended_mid_event)
                return
            finally:
                record.tokens_in, record.tokens_out = watch.tokens_in, watch.tokens_out
            await responder.end()
