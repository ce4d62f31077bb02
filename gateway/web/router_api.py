"""The router's own API (chatd's): `POST /v1/chat` and `GET /v1/chat/providers`."""

from __future__ import annotations

import base64
import struct
from typing import Any, Literal

import msgspec
import trio
from quart import Quart, Response, request

from gateway.errors import BadRequest, GatewayError, ShuttingDown
from gateway.providers.base import ChatRequest, ChatResult
from gateway.record import RequestRecord, record_of
from gateway.services import Services
from gateway.web.bodies import decode_body, request_body

_encode = msgspec.json.Encoder().encode
_chat_request = msgspec.json.Decoder(ChatRequest)


class _EmbeddingsRequest(msgspec.Struct):
    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"


def _vector(vector: list[float], request: _EmbeddingsRequest) -> list[float] | str:
    """OpenAI's `base64` format: little-endian float32s, base64-encoded."""
    if request.encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


_embeddings_request = msgspec.json.Decoder(_EmbeddingsRequest)


def json_response(value: Any, status: int = 200) -> Response:
    return Response(_encode(value), status=status, content_type="application/json")


async def run_chat(services: Services, chat: ChatRequest, record: RequestRecord) -> ChatResult:
    """Route one chat, under the drain, and time it."""
    provider, model = services.registry.route(chat.model)
    record.provider, record.model = provider.name, model
    provider.admit()
    services.budgets.admit(record.who, provider.name)
    started = trio.current_time()
    with services.drain.track() as activity:
        with activity.scope:
            result = await provider.chat(chat, model, record)
        if activity.ended_by_shutdown:
            raise ShuttingDown("the gateway is shutting down; retry shortly")
    elapsed = trio.current_time() - started
    result.latency_ms = round(elapsed * 1000)
    record.upstream_s = elapsed - (record.gate_wait_s or 0.0)
    record.tokens_in, record.tokens_out = result.input_tokens, result.output_tokens
    return result


def check_messages(chat: ChatRequest) -> None:
    if not chat.messages:
        raise BadRequest("messages must hold at least one message")


def register(app: Quart, services: Services) -> None:
    @app.post("/v1/chat")
    async def chat() -> Response:
        data = await request_body(request, services.config.max_body_bytes)
        body = decode_body(data, _chat_request)
        check_messages(body)
        return json_response(await run_chat(services, body, record_of(request.scope)))

    @app.get("/v1/chat/providers")
    async def providers() -> Response:
        return json_response({"providers": services.registry.listing()})


__all__ = ["GatewayError", "register", "run_chat"]
