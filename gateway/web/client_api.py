"""Every client's API, passed through: OpenAI `POST /v1/chat/completions`,
`/v1/completions`, `/v1/embeddings`, OpenAI Responses `/v1/responses` and Anthropic
Messages `/v1/messages`, as raw ASGI (ADR 0005, 0018).

The model name routes as on `/v1/chat` (`providers.registry.resolve`). A local model is
checked against the inventory (404 in the route's own shape), then the body goes to the
same path on the Ollama host as received, under the chat gate for generation, through
the Ollama passthrough's `Forward`; a cloud model goes to its provider's endpoint for
that protocol with the provider's key, never through the gate. The one rewrite is
`model`, when the name carried a prefix or a cloud tag the upstream does not know.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from gateway.errors import BadRequest, GatewayError, MethodNotAllowed
from gateway.providers.client_api import ClientAPI
from gateway.providers.protocols import MESSAGES, PROTOCOLS, Protocol, with_model
from gateway.providers.registry import LOCAL, resolve
from gateway.record import RequestRecord, record_of
from gateway.services import Services
from gateway.web.asgi import (
    ClientGone,
    Receive,
    Responder,
    Scope,
    Send,
    header,
    run_tracked,
)
from gateway.web.cloud_relay import relay_cloud
from gateway.web.content_coding import read_plain_body
from gateway.web.forward import Forward
from gateway.web.ollama_api import parse_routing
from gateway.web.shapes import responder_for

# The client's headers a protocol needs upstream (never its credentials).
_ANTHROPIC_HEADERS = (b"anthropic-version", b"anthropic-beta")


def _query(scope: Scope) -> str:
    query: bytes = scope.get("query_string") or b""
    return f"?{query.decode('latin-1')}" if query else ""


class ClientAPIRoutes:
    """The ASGI endpoint for the POST routes in `providers.protocols.PROTOCOLS`."""

    def __init__(self, services: Services) -> None:
        self._s = services

    @staticmethod
    def handles(path: str) -> bool:
        return path in PROTOCOLS

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        protocol = PROTOCOLS[scope["path"]]
        responder = responder_for(protocol, send, record_of(scope))
        try:
            await self._handle(scope, receive, protocol, responder)
        except ClientGone:
            return
        except GatewayError as exc:
            await responder.fail(exc)

    async def _handle(
        self, scope: Scope, receive: Receive, protocol: Protocol, responder: Responder
    ) -> None:
        if scope["method"] != "POST":
            raise MethodNotAllowed(f"{scope['method']} is not allowed on {protocol.path}; use POST")
        body = await read_plain_body(scope, receive, self._s.config.max_body_bytes)
        name = parse_routing(body).model_name
        if not name:
            raise BadRequest("model is required")
        resolved = resolve(name)
        record = record_of(scope)
        work: Callable[[], Awaitable[None]]
        if resolved.provider == LOCAL:
            work = await self._local(scope, protocol, body, name, resolved.model, responder, record)
        else:
            api = self._s.registry.client_api(resolved.provider, name)
            work = self._cloud(scope, protocol, api, body, name, resolved.model, responder, record)
        await run_tracked(self._s.drain, scope, receive, responder, work)

    async def _local(
        self,
        scope: Scope,
        protocol: Protocol,
        body: bytes,
        name: str,
        model: str,
        responder: Responder,
        record: RequestRecord,
    ) -> Callable[[], Awaitable[None]]:
        record.provider, record.model = LOCAL, model
        await self._s.hosts.require_model(model)
        if model != name:
            body = with_model(body, model)
        forward = Forward(
            self._s,
            "POST",
            protocol.path + _query(scope),
            body,
            header(scope, b"content-type") or b"application/json",
            responder,
            record,
            protocol=protocol,
        )
        if not protocol.gated:
            return forward.embedding(model)
        self._s.hosts.check_admission(model)
        return forward.gated(model)

    def _cloud(
        self,
        scope: Scope,
        protocol: Protocol,
        api: ClientAPI,
        body: bytes,
        name: str,
        model: str,
        responder: Responder,
        record: RequestRecord,
    ) -> Callable[[], Awaitable[None]]:
        path = api.path_for(protocol) + _query(scope)
        model = api.upstream_model(model)
        record.provider, record.model = api.name, model
        self._s.budgets.admit(record.who, api.name)
        if model != name:
            body = with_model(body, model)
        headers: list[tuple[bytes, bytes]] = []
        if protocol is MESSAGES:
            for wanted in _ANTHROPIC_HEADERS:
                value = header(scope, wanted)
                if value is not None:
                    headers.append((wanted, value))

        async def work() -> None:
            await relay_cloud(
                api,
                path,
                body,
                responder,
                record,
                headers=headers,
                key_header=protocol is MESSAGES,
            )

        return work
