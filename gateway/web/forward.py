"""One request's upstream work on a GPU host, shared by the Ollama routes and the client
API passthroughs (ADR 0004, 0018): send the body as received (or pinned), relay the answer
byte for byte as it arrives, NDJSON or SSE, noting counts and timings in the record, with
or without the host's gate, and the listing variants (a union over hosts, cloud tags).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from gateway.errors import GatewayError, RouteMissing, UpstreamError, UpstreamUnavailable
from gateway.hosts import Host
from gateway.providers.protocols import Protocol, UsageTally
from gateway.providers.sse import SseWatch
from gateway.record import RequestRecord
from gateway.services import Services
from gateway.target.client import RawResponse
from gateway.target.ndjson import FrameWatch
from gateway.web.asgi import Headers, Responder
from gateway.web.cloud_tags import CloudTags, merged
from gateway.web.listings import serve_union

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

_KEEP_BYTES = 1024 * 1024


def _forwarded_headers(upstream: RawResponse) -> Headers:
    return [(name, value) for name, value in upstream.headers if name not in _DROPPED]


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
