"""Ollama's API, passed through byte for byte, as raw ASGI.

Request bodies go upstream exactly as received (only `model` and `stream` are decoded, to
route); answers come back exactly as sent, status and content type kept, streams
forwarded chunk by chunk as they arrive. Generation routes queue on the chat gate;
embeddings and everything else never do. These routes bypass Quart on purpose: they
never need its request parsing, and they must control flushing, disconnects and the
gate precisely (ADR 0005).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import msgspec

from gateway.errors import (
    BadRequest,
    Forbidden,
    GatewayError,
    MethodNotAllowed,
)
from gateway.hosts.listing import host_param
from gateway.pinning import pin_body, pin_for, pins_of
from gateway.providers.client_api import OLLAMA_CLOUD, ClientAPI
from gateway.providers.protocols import strip_cloud_tag, with_model
from gateway.record import RequestRecord, record_of
from gateway.services import Services
from gateway.target.wire import Routing
from gateway.web.asgi import (
    ClientGone,
    Receive,
    Responder,
    Scope,
    Send,
    header,
    run_tracked,
)
from gateway.web.bodies import decode_body
from gateway.web.cloud_relay import relay_cloud
from gateway.web.cloud_tags import CloudTags
from gateway.web.content_coding import read_plain_body
from gateway.web.forward import Forward


class Kind(enum.Enum):
    INFO = "info"  # `/`, `/api/version`: plain passthrough
    LISTING = "listing"  # `/api/tags`, `/api/ps`: served from the inventory when degraded
    SHOW = "show"
    GENERATE = "generate"  # gated
    EMBED = "embed"  # never gated
    MANAGE = "manage"  # refused unless `ollama.allow_management`


@dataclass(frozen=True, slots=True)
class Route:
    kind: Kind
    methods: frozenset[str]


def _route(kind: Kind, *methods: str) -> Route:
    return Route(kind, frozenset(methods))


ROUTES: dict[str, Route] = {
    "/": _route(Kind.INFO, "GET", "HEAD"),
    "/api/version": _route(Kind.INFO, "GET", "HEAD"),
    "/api/tags": _route(Kind.LISTING, "GET", "HEAD"),
    "/api/ps": _route(Kind.LISTING, "GET", "HEAD"),
    "/api/show": _route(Kind.SHOW, "POST"),
    "/api/chat": _route(Kind.GENERATE, "POST"),
    "/api/generate": _route(Kind.GENERATE, "POST"),
    "/api/embed": _route(Kind.EMBED, "POST"),
    "/api/embeddings": _route(Kind.EMBED, "POST"),
    "/api/pull": _route(Kind.MANAGE, "POST"),
    "/api/push": _route(Kind.MANAGE, "POST"),
    "/api/create": _route(Kind.MANAGE, "POST"),
    "/api/copy": _route(Kind.MANAGE, "POST"),
    "/api/delete": _route(Kind.MANAGE, "DELETE"),
}
_BLOBS = _route(Kind.MANAGE, "HEAD", "POST")


_routing = msgspec.json.Decoder(Routing)
_CLOUD_PREFIX = OLLAMA_CLOUD + "/"


# A blob is named by its digest; anything else (dot segments, escapes) never goes upstream.
_BLOB_PATH = re.compile(r"/api/blobs/sha256[:-][0-9a-fA-F]{64}")


def route_for(path: str) -> Route | None:
    route = ROUTES.get(path)
    if route is None and path.startswith("/api/blobs/"):
        return _BLOBS
    return route


def parse_routing(body: bytes) -> Routing:
    """Decode only what routing needs; the body itself is forwarded untouched."""
    return decode_body(body, _routing)


class OllamaProxy:
    """The ASGI endpoint for every Ollama route."""

    def __init__(self, services: Services) -> None:
        self._s = services
        self._max_body = services.config.max_body_bytes
        self._pins = pins_of(services.config.models)
        cloud = services.registry.find_client_api(OLLAMA_CLOUD)
        listed = services.config.providers.ollama_cloud.list_in_tags
        self._cloud_tags = CloudTags(cloud) if cloud is not None and listed else None

    @staticmethod
    def handles(path: str) -> bool:
        return route_for(path) is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        responder = Responder(send, record=record_of(scope))
        try:
            await self._handle(scope, receive, responder)
        except ClientGone:
            return
        except GatewayError as exc:
            await responder.fail(exc)

    async def _handle(self, scope: Scope, receive: Receive, responder: Responder) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        route = route_for(path)
        assert route is not None  # the dispatcher only sends routes that `handles`
        if method not in route.methods:
            allowed = ", ".join(sorted(route.methods))
            raise MethodNotAllowed(f"{method} is not allowed on {path}; use {allowed}")
        body = await read_plain_body(scope, receive, self._max_body)
        upstream_path = path + (
            f"?{scope['query_string'].decode('latin-1')}" if scope.get("query_string") else ""
        )
        # Bytes as received: the target client sends bytes header values untouched (any
        # octet a client may put there), where a str would have to be ASCII.
        content_type = header(scope, b"content-type") or b"application/json"
        record = record_of(scope)
        record.provider = "ollama"
        forward = Forward(
            self._s, method, upstream_path, body or None, content_type, responder, record
        )

        if route.kind in (Kind.GENERATE, Kind.SHOW):
            cloud = self._cloud_model(body)
            if cloud is not None:
                api, model = cloud
                record.provider, record.model = api.name, model
                self._s.budgets.admit(record.who, api.name)
                cloud_body = with_model(body, model)

                async def to_cloud() -> None:
                    await relay_cloud(api, path, cloud_body, responder, record)

                await self._run(scope, receive, responder, to_cloud)
                return

        match route.kind:
            case Kind.GENERATE:
                model = await self._known_model(body, record)
                pin = pin_for(self._pins, model)
                if pin is not None:
                    forward.body = pin_body(body, pin)
                self._s.hosts.check_admission(model)
                await self._run(scope, receive, responder, forward.gated(model))
            case Kind.EMBED:
                model = await self._known_model(body, record)
                await self._run(scope, receive, responder, forward.embedding(model))
            case Kind.SHOW:
                forward.host = self._s.hosts.for_model(parse_routing(body).model_name)
                await self._run(scope, receive, responder, forward.plain)
            case Kind.LISTING:
                work = forward.listing(path)
                if path == "/api/tags" and self._cloud_tags is not None:
                    work = forward.with_cloud_tags(self._cloud_tags)
                elif not self._s.hosts.single:
                    work = forward.union(path)
                await self._run(scope, receive, responder, work)
            case Kind.MANAGE:
                if not self._s.config.ollama.allow_management:
                    raise Forbidden(
                        f"{path} changes the models on the GPU host and is disabled on this"
                        " gateway (set ollama.allow_management = true to enable it)"
                    )
                if route is _BLOBS and not _BLOB_PATH.fullmatch(path):
                    raise BadRequest(
                        f"{path!r} is not a blob: expected /api/blobs/sha256:<64 hex digits>"
                    )
                name, rest = host_param(scope.get("query_string") or b"")
                forward.host = self._s.hosts.named(name, path)
                if name is not None:
                    forward.path = path + (f"?{rest}" if rest else "")
                await self._run(scope, receive, responder, forward.plain)
            case Kind.INFO:
                forward.host = self._s.hosts.any_host()
                await self._run(scope, receive, responder, forward.plain)

    def _cloud_model(self, body: bytes) -> tuple[ClientAPI, str] | None:
        """Ollama Cloud and the model's base name, for `ollama_cloud/<m>` or a cloud-tagged
        name when that provider is registered; else None (the local host answers, and an
        Ollama signed in to ollama.com proxies cloud models itself)."""
        name = parse_routing(body).model_name
        lowered = name.lower()
        if lowered.startswith(_CLOUD_PREFIX):
            name = name[len(_CLOUD_PREFIX) :]
        elif not strip_cloud_tag(name):
            return None
        api = self._s.registry.find_client_api(OLLAMA_CLOUD)
        if api is None or not name.strip():
            return None
        return api, api.upstream_model(name)

    async def _known_model(self, body: bytes, record: RequestRecord) -> str:
        """The request's model, checked against the inventory (Ollama's 404 if unknown)."""
        model = parse_routing(body).model_name
        if not model:
            raise BadRequest("model is required")
        record.model = model
        await self._s.hosts.require_model(model)
        return model

    async def _run(
        self,
        scope: Scope,
        receive: Receive,
        responder: Responder,
        work: Callable[[], Awaitable[None]],
    ) -> None:
        await run_tracked(self._s.drain, scope, receive, responder, work)
