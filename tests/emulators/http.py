"""The small HTTP/1.1 server core shared by the upstream emulators.

Built directly on trio sockets and h11 (not an ASGI server) so that tests can
inject faults at the socket level: resets, half-written streams, hangs.

One task per connection, keep-alive, one request at a time per connection.
While a response is being produced a watcher task reads the socket, so a
client hanging up is noticed at once (the handler is cancelled) even when the
handler is idle (held, hanging, or waiting on a delay).
"""

from __future__ import annotations

import email.utils
import json
import struct
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, NoReturn

import h11
import trio

MAX_RECV = 65536
STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)

Header = tuple[str, str]


@dataclass
class Faults:
    """Faults to inject; mutable, read at the moment each request needs them."""

    hang_before_headers: bool = False
    reset_before_headers: bool = False
    close_before_headers: bool = False
    die_mid_stream_after: int | None = None
    hang_mid_stream_after: int | None = None
    overlong_line_bytes: int | None = None
    garbage_body: bool = False
    status: int | None = None
    status_body: bytes | None = None
    retry_after: str | None = None
    fault_paths: frozenset[str] | None = None
    zero_choices: bool = False


@dataclass
class RecordedRequest:
    """One request as received, plus what was written back (stream lines or the body)."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    received_at: float
    emitted: list[tuple[float, bytes]] = field(default_factory=list)

    def json(self) -> Any:
        return json.loads(self.body)


class ConnectionAbort(Exception):
    """Raised by a handler to drop the connection without (finishing) a response."""

    def __init__(self, *, rst: bool) -> None:
        super().__init__("reset" if rst else "close")
        self.rst = rst


class GenerationOutcome:
    """Handed out by ``EmulatorBase.generation``."""

    def __init__(self, server: EmulatorBase) -> None:
        self.completed = False
        self._server = server

    def complete(self) -> None:
        """Count the generation as completed; called just before its last write, so that
        the counters are already up to date when the client sees the end of the response."""
        if not self.completed:
            self.completed = True
            self._server.active_generations -= 1
            self._server.completed_generations += 1
            self._server.changed()


@dataclass(eq=False)
class _Conn:
    stream: trio.SocketStream
    h11: h11.Connection = field(default_factory=lambda: h11.Connection(h11.SERVER))
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    rst: bool = False


class Exchange:
    """One request on a connection, and the means to answer it."""

    def __init__(self, server: EmulatorBase, conn: _Conn, request: RecordedRequest) -> None:
        self.server = server
        self.request = request
        self.peer_closed = trio.Event()
        self.finished = False
        self._conn = conn
        self._stream_faults = False
        self._lines = 0

    @property
    def method(self) -> str:
        return self.request.method

    @property
    def path(self) -> str:
        return self.request.path

    def header(self, name: str) -> str | None:
        return self.request.headers.get(name.lower())

    def abort(self, *, rst: bool) -> NoReturn:
        """Drop the connection: RST (SO_LINGER 0) or a clean FIN."""
        raise ConnectionAbort(rst=rst)

    async def _send(self, event: h11.Event) -> None:
        data = self._conn.h11.send(event)
        if data:
            await self._conn.stream.send_all(data)

    def _head(
        self, status: int, content_type: str | None, headers: Iterable[Header]
    ) -> h11.Response:
        all_headers: list[Header] = [("date", email.utils.formatdate(usegmt=True))]
        if content_type is not None:
            all_headers.append(("content-type", content_type))
        all_headers.extend(headers)
        return h11.Response(status_code=status, headers=all_headers)

    async def respond(
        self,
        status: int,
        body: bytes = b"",
        *,
        content_type: str | None = None,
        headers: Iterable[Header] = (),
    ) -> None:
        """A complete response with a Content-Length (HEAD: headers only, same length);
        chunked without a length when larger than ``server.chunk_bodies_over``."""
        limit = self.server.chunk_bodies_over
        if limit is not None and len(body) > limit and self.method != "HEAD":
            await self._send(self._head(status, content_type, headers))
            for start in range(0, len(body), 65536):
                await self._send(h11.Data(data=body[start : start + 65536]))
            self.request.emitted.append((trio.current_time(), body))
            await self._send(h11.EndOfMessage())
            self.finished = True
            self.server.changed()
            return
        response = self._head(status, content_type, [*headers, ("content-length", str(len(body)))])
        await self._send(response)
        if body and self.method != "HEAD":
            await self._send(h11.Data(data=body))
        self.request.emitted.append((trio.current_time(), body))
        await self._send(h11.EndOfMessage())
        self.finished = True
        self.server.changed()

    async def start_stream(
        self,
        status: int,
        *,
        content_type: str,
        headers: Iterable[Header] = (),
        faulty: bool = False,
    ) -> None:
        """Send the headers of a chunked response; ``faulty`` enables the mid-stream faults."""
        self._stream_faults = faulty
        self.server.emitted = self.request.emitted
        await self._send(self._head(status, content_type, headers))

    async def apply_stream_faults(self) -> None:
        """Die or hang here if the mid-stream faults say so (also done by each write)."""
        if not self._stream_faults:
            return
        faults = self.server.faults
        if faults.die_mid_stream_after is not None and self._lines >= faults.die_mid_stream_after:
            self.abort(rst=False)
        if faults.hang_mid_stream_after is not None and self._lines >= faults.hang_mid_stream_after:
            await trio.sleep_forever()

    async def write_chunk(self, data: bytes) -> None:
        """Send ``data`` on the socket at once, as its own HTTP chunk."""
        await self.apply_stream_faults()
        await self._send(h11.Data(data=data))
        self._lines += 1
        self.request.emitted.append((trio.current_time(), data))
        self.server.changed()

    async def end_stream(self) -> None:
        """The terminating zero-length chunk."""
        await self.apply_stream_faults()
        await self._send(h11.EndOfMessage())
        self.finished = True
        self.server.changed()


class EmulatorBase:
    """Accept loop, connections, faults, recording and instrumentation."""

    host = "127.0.0.1"
    error_content_type = "application/json"

    def __init__(self) -> None:
        self.port: int = 0
        self.requests: list[RecordedRequest] = []
        self.open_connections: int = 0
        self.total_connections: int = 0
        self.faults: Faults = Faults()
        # generation instrumentation
        self.active_generations: int = 0
        self.max_concurrent_generations: int = 0
        self.completed_generations: int = 0
        self.cancelled_generations: int = 0
        self.generation_order: list[str] = []
        self.hold: trio.Event | None = None
        self.emitted: list[tuple[float, bytes]] = []
        # Like Go's net/http: a whole body larger than this goes out chunked, no length.
        self.chunk_bodies_over: int | None = None
        self._lot = trio.lowlevel.ParkingLot()
        self._listener: trio.socket.SocketType | None = None
        self._accept_scope: trio.CancelScope | None = None
        self._conns: set[_Conn] = set()

    # ----------------------------------------------------------------- state

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def changed(self) -> None:
        """Wake every ``wait_until``; call after any observable state change."""
        self._lot.unpark_all()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` is true; re-checked on every state change."""
        await trio.lowlevel.checkpoint()
        while not predicate():
            await self._lot.park()

    def requests_to(self, path: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == path]

    # ------------------------------------------------------------- lifecycle

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind 127.0.0.1:0 (or the same port again), serve until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                await self._bind()
                nursery.start_soon(self._accept_forever, nursery)
                task_status.started(self.port)
        finally:
            self._close_listener()

    async def set_down(self, down: bool) -> None:
        """Down: close the listener and abort (RST) every connection. Up: re-bind the port."""
        if down:
            if self._accept_scope is not None:
                self._accept_scope.cancel()
            self._close_listener()
            for conn in list(self._conns):
                conn.rst = True
                conn.scope.cancel()
            self.changed()
            await self.wait_until(lambda: self.open_connections == 0)
        elif self._listener is None:
            await self._bind()
            self.changed()

    async def _bind(self) -> None:
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
        await sock.bind((self.host, self.port))
        sock.listen(128)
        self.port = sock.getsockname()[1]
        self._listener = sock

    def _close_listener(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    async def _accept_forever(self, nursery: trio.Nursery) -> None:
        while True:
            await self.wait_until(lambda: self._listener is not None)
            listener = self._listener
            assert listener is not None
            with trio.CancelScope() as self._accept_scope:
                while True:
                    try:
                        sock, _ = await listener.accept()
                    except trio.ClosedResourceError:
                        break
                    except OSError:
                        if listener.fileno() == -1:
                            break
                        continue
                    nursery.start_soon(self._connection_task, trio.SocketStream(sock))
            self._accept_scope = None
            if self._listener is listener:  # closed under us without set_down
                self._listener = None

    # ----------------------------------------------------------- connections

    async def _connection_task(self, stream: trio.SocketStream) -> None:
        conn = _Conn(stream)
        self._conns.add(conn)
        self.open_connections += 1
        self.total_connections += 1
        self.changed()
        try:
            with conn.scope:
                try:
                    await self._serve_connection(conn)
                except ConnectionAbort as exc:
                    conn.rst = conn.rst or exc.rst
                except (*STREAM_ERRORS, h11.ProtocolError):
                    pass
        finally:
            self._conns.discard(conn)
            if conn.rst:
                linger = struct.pack("ii", 1, 0)
                stream.socket.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_LINGER, linger)
            stream.socket.close()
            self.open_connections -= 1
            self.changed()

    async def _serve_connection(self, conn: _Conn) -> None:
        while True:
            request = await self._read_request(conn)
            if request is None:
                return
            self.requests.append(request)
            self.changed()
            exchange = Exchange(self, conn, request)
            abort: ConnectionAbort | None = None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_peer, conn, exchange, nursery.cancel_scope)
                try:
                    await self._dispatch(exchange)
                except ConnectionAbort as exc:
                    abort = exc
                except STREAM_ERRORS:
                    exchange.peer_closed.set()
                finally:
                    nursery.cancel_scope.cancel()
            if abort is not None:
                raise abort
            if exchange.peer_closed.is_set() or not exchange.finished:
                return
            if conn.h11.our_state is not h11.DONE or conn.h11.their_state is not h11.DONE:
                return
            conn.h11.start_next_cycle()

    async def _read_request(self, conn: _Conn) -> RecordedRequest | None:
        start: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.h11.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await conn.stream.receive_some(MAX_RECV)
                except STREAM_ERRORS:
                    return None
                conn.h11.receive_data(data)
            elif isinstance(event, h11.Request):
                start = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage) and start is not None:
                target = start.target.decode("latin-1")
                path, _, query = target.partition("?")
                headers: dict[str, str] = {}
                for name, value in start.headers:
                    key, text = name.decode("latin-1").lower(), value.decode("latin-1")
                    headers[key] = f"{headers[key]}, {text}" if key in headers else text
                return RecordedRequest(
                    method=start.method.decode("ascii"),
                    path=path,
                    query=query,
                    headers=headers,
                    body=bytes(body),
                    received_at=trio.current_time(),
                )
            else:  # ConnectionClosed, PAUSED
                return None

    async def _watch_peer(self, conn: _Conn, exchange: Exchange, scope: trio.CancelScope) -> None:
        """Keep reading while a response is produced; EOF or error = the client hung up."""
        while True:
            try:
                data = await conn.stream.receive_some(MAX_RECV)
            except STREAM_ERRORS:
                data = b""
            if not data:
                exchange.peer_closed.set()
                self.changed()
                scope.cancel()
                return
            conn.h11.receive_data(data)  # a pipelined next request: kept for later

    # -------------------------------------------------------------- dispatch

    def is_generation_path(self, path: str) -> bool:
        raise NotImplementedError

    def is_embed_path(self, path: str) -> bool:
        raise NotImplementedError

    def error_body(self, status: int) -> bytes:
        """The upstream-shaped error body for a bare ``faults.status``."""
        raise NotImplementedError

    def fault_error(self, path: str, status: int) -> tuple[bytes, str]:
        """The body and content type of a bare ``faults.status`` on ``path``."""
        return self.error_body(status), self.error_content_type

    async def handle(self, exchange: Exchange) -> None:
        raise NotImplementedError

    def fault_applies(self, path: str, *, embeds_too: bool = False) -> bool:
        paths = self.faults.fault_paths
        if paths is not None:
            return any(path == p or path.endswith(p) for p in paths)
        return self.is_generation_path(path) or (embeds_too and self.is_embed_path(path))

    def overlong_bytes(self, exchange: Exchange) -> int | None:
        if self.fault_applies(exchange.path):
            return self.faults.overlong_line_bytes
        return None

    async def _dispatch(self, exchange: Exchange) -> None:
        faults = self.faults
        if self.fault_applies(exchange.path, embeds_too=True):
            if faults.reset_before_headers:
                exchange.abort(rst=True)
            if faults.close_before_headers:
                exchange.abort(rst=False)
            if faults.hang_before_headers:
                await trio.sleep_forever()
            if faults.status is not None:
                body, content_type = self.fault_error(exchange.path, faults.status)
                if faults.status_body is not None:
                    body = faults.status_body
                extra = [("retry-after", faults.retry_after)] if faults.retry_after else []
                await exchange.respond(
                    faults.status, body, content_type=content_type, headers=extra
                )
                return
        if faults.garbage_body and self.fault_applies(exchange.path):
            await exchange.respond(200, b"this is not json", content_type="application/json")
            return
        await self.handle(exchange)

    # ------------------------------------------------------ instrumentation

    @asynccontextmanager
    async def generation(self, tag: str) -> AsyncIterator[GenerationOutcome]:
        """Count one generation; not completed and not a server fault = cancelled."""
        outcome = GenerationOutcome(self)
        self.active_generations += 1
        self.max_concurrent_generations = max(
            self.max_concurrent_generations, self.active_generations
        )
        self.generation_order.append(tag)
        self.changed()
        faulted = False
        try:
            yield outcome
        except ConnectionAbort:
            faulted = True
            raise
        finally:
            if not outcome.completed:
                self.active_generations -= 1
                if not faulted:
                    self.cancelled_generations += 1
                self.changed()

    async def wait_hold(self, hold: trio.Event | None) -> None:
        """Wait for a test's hold event (the peer watcher cancels us on disconnect)."""
        if hold is not None:
            await hold.wait()
