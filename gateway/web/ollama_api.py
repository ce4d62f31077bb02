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
import trio

from gateway.errors import (
    BadRequest,
    Forbidden,
    GatewayError,
    MethodNotAllowed,
    RouteMissing,
    UpstreamError,
    UpstreamUnavailable,
)
from gateway.hosts import Host
from gateway.hosts.listing import host_param
from gateway.pinning import pin_body, pin_for, pins_of
from gateway.providers.client_api import OLLAMA_CLOUD, ClientAPI
from gateway.providers.protocols import Protocol, UsageTally, strip_cloud_tag, with_model
from gateway.providers.sse import SseWatch
from gateway.record import RequestRecord, record_of
from gateway.services import Services
from gateway.target.client import RawResponse
from gateway.target.ndjson import FrameWatch
from gateway.target.wire import Routing
from gateway.web.asgi import (
    ClientGone,
    Headers,
    Receive,
    Responder,
    Scope,
    Send,
    header,
    run_tracked,
)
from gateway.web.bodies import decode_body
from gateway.web.cloud_relay import relay_cloud
from gateway.web.cloud_tags import CloudTags, merged
from gateway.web.content_coding import read_plain_body
from gateway.web.listings import serve_union


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

# Hop-by-hop headers, and the ones hypercorn writes itself.
_DROPPED = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-authenticate",
        b"date",
        b"server",
        b"content-length",
    }
)

_routing = msgspec.json.Decoder(Routing)
_CLOUD_PREFIX = OLLAMA_CLOUD + "/"
_KEEP_BYTES = 1024 * 1024


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


def _forwarded_headers(upstream: RawResponse) -> Headers:
    return [(name, value) for name, value in upstream.headers if name not in _DROPPED]


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


class Forward:
    """One request's upstream work, in the variants the routes need."""

    def __init__(
        self,
        services: Services,
        method: str,
        path: str,
        body: bytes | None,
        content_type: bytes,
        responder: Responder,
        record: RequestRecord,
        *,
        protocol: Protocol | None = None,
    ) -> None:
        self._s = services
        self._record = record
        self._sent = 0.0
        self._method = method
        self.path = path
        self.host = services.hosts.first  # where `plain` goes: routes choose another
        self.body = body  # what goes upstream: as received, or with pinned load options
        self._content_type = content_type
        self.responder = responder
        self.frames = FrameWatch()
        # A client-API route (OpenAI, Responses, Anthropic): counts come from the
        # protocol's usage objects, and a target older than the route is named.
        self._protocol = protocol

    async def plain(self) -> None:
        await self._send(self.host, retry=False)

    async def _send(self, host: Host, *, retry: bool) -> None:
        """Send to `host` and relay its answer. With `retry`, a connection the host refused
        (nothing of the request reached it) is raised as is, for the hosts layer to try
        another host; any other failure is this host's, said to the client."""
        self.host = host
        record = self._record
        record.host = host.name
        sent = self._sent = trio.current_time()
        try:
            async with host.target.raw(
                self._method, self.path, self.body, content_type=self._content_type
            ) as upstream:
                record.upstream_headers_s = trio.current_time() - sent
                await self._relay(upstream)
        except UpstreamUnavailable as exc:
            if retry and not self.responder.started:
                raise
            raise host.inventory.note_failure(exc) from exc
        except UpstreamError as exc:
            raise host.inventory.note_failure(exc) from exc
        finally:
            if record.upstream_s is None and record.upstream_headers_s is not None:
                record.upstream_s = trio.current_time() - sent

    def gated(self, model: str) -> Callable[[], Awaitable[None]]:
        """The work under a GPU host's gate: every generation route holds one here, on the
        host placement binds it to (ADR 0020)."""

        async def on(host: Host) -> None:
            await self._send(host, retry=True)

        async def run() -> None:
            await self._s.hosts.generate(self._record, model, on)

        return run

    def embedding(self, model: str) -> Callable[[], Awaitable[None]]:
        """An embedding, never gated, on a host with the model resident if any."""

        async def on(host: Host) -> None:
            await self._send(host, retry=True)

        async def run() -> None:
            await self._s.hosts.embed(self._record, model, on)

        return run

    def union(self, path: str) -> Callable[[], Awaitable[None]]:
        """`/api/tags` or `/api/ps` with several hosts (`web.listings`)."""

        async def run() -> None:
            await serve_union(self._s.hosts, path, self._method, self.responder)

        return run

    def listing(self, path: str) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            inventory = self.host.inventory
            if not inventory.degraded:
                try:
                    await self.plain()
                    return
                except GatewayError:
                    if self.responder.started or not inventory.degraded:
                        raise
            snapshot = inventory.snapshot
            body = snapshot.tags_body if path == "/api/tags" else snapshot.ps_body
            age = inventory.age_s()
            await self.responder.full(
                200,
                body if self._method == "GET" else b"",
                [
                    (b"x-gateway-inventory", b"cached"),
                    (b"x-gateway-inventory-age-s", b"never" if age is None else b"%.0f" % age),
                ],
            )

        return run

    def with_cloud_tags(self, cloud: CloudTags) -> Callable[[], Awaitable[None]]:
        """`/api/tags` with Ollama Cloud's models after the local ones (`list_in_tags`)."""

        async def run() -> None:
            if not self._s.hosts.single:
                await serve_union(self._s.hosts, "/api/tags", self._method, self.responder, cloud)
                return
            inventory = self.host.inventory
            local = inventory.snapshot.tags_body
            if not inventory.degraded:
                try:
                    async with self.host.target.raw("GET", "/api/tags") as upstream:
                        data = await upstream.read()
                        if upstream.status != 200:
                            await self._relay_read(upstream, data)
                            return
                        local = data
                except UpstreamError as exc:
                    error = inventory.note_failure(exc)
                    if not inventory.degraded:
                        raise error from exc
            body = merged(local, await cloud.entries())
            await self.responder.full(
                200,
                body if self._method == "GET" else b"",
                [(b"content-type", b"application/json; charset=utf-8")],
            )

        return run

    async def _relay_read(self, upstream: RawResponse, data: bytes) -> None:
        headers = _forwarded_headers(upstream)
        headers.append((b"content-length", b"%d" % len(data)))
        await self.responder.start(upstream.status, headers)
        await self.responder.end(data)

    async def _relay(self, upstream: RawResponse) -> None:
        headers = _forwarded_headers(upstream)
        length = upstream.header(b"content-length")
        if length is not None:
            # A complete answer: read it whole, so a short read can still be a clean 502.
            # HEAD has no body but keeps the length a GET would have.
            data = await upstream.read()
            self._record.upstream_s = trio.current_time() - self._sent
            if upstream.status >= 400 and self._protocol is not None:
                if upstream.status == 404:
                    self._check_route(upstream, data)
                # An error a client-API SDK shows its user: never with the target's token.
                scrubbed = self.host.target.scrub(data.decode("utf-8", "surrogateescape"))
                data = scrubbed.encode("utf-8", "surrogateescape")
                length = b"%d" % len(data)
            if self._record.model and upstream.status == 200:
                self._note_whole(data)
            headers.append((b"content-length", b"%d" % len(data) if data else length))
            await self.responder.start(upstream.status, headers)
            await self.responder.end(data)
            return
        content_type = upstream.header(b"content-type") or b""
        if self._protocol is not None and content_type.startswith(b"text/event-stream"):
            await self._relay_sse(upstream, headers)
            return
        await self.responder.start(upstream.status, headers)
        # NDJSON is watched line by line (bound, last frame). Any other body sent without
        # a length (Go chunks large JSON answers) passes as is; for telemetry, a
        # generation's JSON answer is kept up to `_KEEP_BYTES`.
        ndjson = content_type.startswith(b"application/x-ndjson")
        frames = self.frames
        record = self._record
        kept: list[bytes] | None = [] if record.model and not ndjson else None
        kept_bytes = 0
        try:
            async for chunk in upstream:
                if ndjson:
                    frames.feed(chunk)
                    record.frames_out = frames.lines  # live, for the status page
                elif kept is not None and kept_bytes <= _KEEP_BYTES:
                    kept.append(chunk)
                    kept_bytes += len(chunk)
                await self.responder.chunk(chunk)
        except UpstreamError as exc:
            self.host.inventory.note_failure(exc)
            await self.responder.fail(exc, mid_line=frames.mid_line)
            return
        if ndjson and self._record.model:
            self._record.note_final_frame(frames.last_line)
        elif kept and kept_bytes <= _KEEP_BYTES and upstream.status == 200:
            self._note_whole(b"".join(kept))
        await self.responder.end()

    async def _relay_sse(self, upstream: RawResponse, headers: Headers) -> None:
        """An SSE answer of a client-API route, event bytes as they arrive; counts from
        the events that carry `usage`; a failure ends it with the protocol's error event."""
        await self.responder.start(upstream.status, headers)
        watch = SseWatch()
        try:
            async for chunk in upstream:
                watch.feed(chunk)
                # Live, for the status page: events so far (a C-speed scan of the chunk).
                self._record.frames_out += chunk.count(b"\n\n")
                await self.responder.chunk(chunk)
        except UpstreamError as exc:
            self.host.inventory.note_failure(exc)
            await self.responder.fail(exc, mid_line=watch.mid_event)
            return
        finally:
            self._record.tokens_in = watch.usage.tokens_in
            self._record.tokens_out = watch.usage.tokens_out
        await self.responder.end()

    def _note_whole(self, data: bytes) -> None:
        if self._protocol is None:
            self._record.note_final_frame(data)
            return
        usage = UsageTally()
        usage.feed(data)
        self._record.tokens_in, self._record.tokens_out = usage.tokens_in, usage.tokens_out

    def _check_route(self, upstream: RawResponse, data: bytes) -> None:
        """Ollama answers a route it does not have with gin's plain-text 404."""
        assert self._protocol is not None
        if data.strip() == b"404 page not found" and not (
            upstream.header(b"content-type") or b""
        ).startswith(b"application/json"):
            raise RouteMissing(
                f"the Ollama target has no {self._protocol.path} route: the"
                f" {self._protocol.title} API came with Ollama {self._protocol.ollama_since};"
                " upgrade Ollama on the GPU host"
            )
