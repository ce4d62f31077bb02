"""The server side of HTTP/1.1: one client connection, its requests in order, each run
through the ASGI app.

This replaces hypercorn's h11 protocol stack on the request path (ADR 0014): that stack
alone cost 1.05 ms of CPU per request here, more than the whole budget of a proxied
request. What it does, per connection, in one task:

- read a request head (bounded, within `keep_alive_timeout_s` of the previous answer),
- call the app with an ASGI scope, `receive` and `send`,
- frame the answer (Content-Length as given, else chunked; HTTP/1.0 is close-delimited),
  writing the head together with the first body bytes, as ASGI allows,
- keep the connection for the next request, or close it.

Writes go straight to the socket when the kernel takes them whole (nearly always on a
LAN); only a client that stops reading makes a write wait, and that wait has a deadline
(`write_timeout_s`) after which the connection is dropped and the app sees a disconnect.
The request body is read inside the app's calls to `receive`. A client that leaves
mid-request is noticed by one watcher task per connection, started the first time an
app asks for it through the `gateway.cancel_on_disconnect` extension (or by the app's
own `receive` call): no task is spawned per request.
"""

from __future__ import annotations

import contextlib
import email.utils
import errno
import logging
import socket
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import unquote

import trio

from gateway.errors import error_body
from gateway.h1.framing import (
    CHUNKED,
    MAX_HEAD_BYTES,
    NO_BODY_STATUSES,
    ChunkedDecoder,
    FramingError,
    Headers,
    body_length,
    has_token,
    head_end,
    parse_request_head,
    valid_value,
)

log = logging.getLogger("gateway.server")

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]

RECEIVE_BYTES = 65536
# The ASGI extension through which an app asks for a cancel scope to be cancelled when
# its client disconnects (see `Cycle.cancel_on_disconnect`; `gateway.web.asgi` uses it).
DISCONNECT_EXTENSION = "gateway.cancel_on_disconnect"
# How long, and how much, a connection closed on a sending client reads and drops.
LINGER_S = 2.0
LINGER_BYTES = 64 * 1024 * 1024
_REASONS = {
    200: b"OK",
    201: b"Created",
    204: b"No Content",
    304: b"Not Modified",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    409: b"Conflict",
    413: b"Content Too Large",
    415: b"Unsupported Media Type",
    422: b"Unprocessable Content",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    499: b"Client Closed Request",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}
_STATUS_LINES = {
    status: b"HTTP/1.1 %d %s\r\n" % (status, reason) for status, reason in _REASONS.items()
}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_LAST_CHUNK = b"0\r\n\r\n"


class ClientGone(Exception):
    """The client closed or reset the connection, or stopped reading for too long."""


class DateHeader:
    """The Date header value, formatted once per second."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def value(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = email.utils.formatdate(now, usegmt=True).encode()
        return self._value


class Transport:
    """A connection's byte stream: a plain socket used directly, or any trio stream (TLS).

    The plain case skips trio's stream layers: a read or write the kernel can do at once
    costs one system call and no scheduler round trip; only waiting goes through trio.
    """

    __slots__ = ("_sock", "_stream", "_write_timeout_s", "closed")

    def __init__(
        self,
        *,
        write_timeout_s: float,
        sock: socket.socket | None = None,
        stream: trio.abc.Stream | None = None,
    ) -> None:
        self._sock = sock
        self._stream = stream
        self._write_timeout_s = write_timeout_s
        self.closed = False

    @property
    def plain(self) -> bool:
        """A plain socket, used directly (not a TLS stream)."""
        return self._sock is not None

    async def receive(self) -> bytes:
        """The next bytes from the client; b"" at its end of stream. Raises `ClientGone`
        on a reset. Waits (a checkpoint) only when nothing is there yet."""
        sock = self._sock
        if sock is None:
            assert self._stream is not None
            try:
                return bytes(await self._stream.receive_some(RECEIVE_BYTES))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ClientGone from exc
        while True:
            try:
                return sock.recv(RECEIVE_BYTES)
            except BlockingIOError:
                pass
            except OSError as exc:
                raise ClientGone from exc
            try:
                await trio.lowlevel.wait_readable(sock)
            except trio.ClosedResourceError as exc:  # closed by the write deadline
                raise ClientGone from exc

    async def send(self, data: bytes) -> None:
        """Write all of `data`, or raise `ClientGone`. Shielded from the caller's
        cancellation (half a chunk would corrupt the framing) but not from the write
        deadline."""
        if self.closed:
            raise ClientGone
        sock = self._sock
        sent = 0
        if sock is not None:
            try:
                sent = sock.send(data)
            except BlockingIOError:
                pass
            except OSError as exc:
                raise ClientGone from exc
            if sent == len(data):
                return
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + self._write_timeout_s
            try:
                if sock is None:
                    assert self._stream is not None
                    await self._stream.send_all(data)
                else:
                    view = memoryview(data)[sent:]
                    while view:
                        await trio.lowlevel.wait_writable(sock)
                        with contextlib.suppress(BlockingIOError):
                            view = view[sock.send(view) :]
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ClientGone from exc
        if scope.cancelled_caught:
            log.warning("dropped a client that read nothing for %g s", self._write_timeout_s)
            await self.aclose()
            raise ClientGone

    async def linger(self) -> None:
        """Before closing on a client that may still be sending (a refused body): stop
        writing, then read and drop what comes for a while. Closing with unread bytes
        makes the kernel send a reset, which can destroy the answer before it is read."""
        if self.closed or self._sock is None:
            return
        sock = self._sock
        with trio.move_on_after(LINGER_S):
            try:
                sock.shutdown(socket.SHUT_WR)
                dropped = 0
                while dropped < LINGER_BYTES:
                    data = await self.receive()
                    if not data:
                        break
                    dropped += len(data)
            except (OSError, ClientGone):
                pass

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        with trio.CancelScope(shield=True):
            if self._sock is not None:
                trio.lowlevel.notify_closing(self._sock)
                self._sock.close()
            else:
                assert self._stream is not None
                await self._stream.aclose()


class Connection:
    """One client connection: requests read in order, each answered by the app."""

    def __init__(
        self,
        transport: Transport,
        app: App,
        *,
        scheme: str,
        client: tuple[str, int] | None,
        server: tuple[str, int] | None,
        state: dict[str, Any],
        keep_alive_timeout_s: float,
        date: DateHeader,
    ) -> None:
        self.transport = transport
        self._app = app
        self._scheme = scheme
        self._client = client
        self._server = server
        self._state = state
        self.keep_alive_timeout_s = keep_alive_timeout_s
        self.date = date
        self.buffer = b""
        self.closing = False  # no further request after the current one
        self._nursery: trio.Nursery | None = None
        self._wake: trio.Event | None = None  # set to have the watcher watch `_watched`
        self._watched: Cycle | None = None
        self.unread = False  # the client may still be sending: linger before closing
        self._idle: trio.CancelScope | None = None

    def stop_when_idle(self) -> None:
        """Shutdown: close now if waiting for a request, else after the current answer."""
        self.closing = True
        if self._idle is not None:
            self._idle.cancel()

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    while not self.closing:
                        head = await self._read_head()
                        if head is None or not await self._serve(head):
                            break
                except ClientGone:
                    pass
                nursery.cancel_scope.cancel()  # the disconnect watcher, if it started
        finally:
            try:
                if self.unread:
                    await self.transport.linger()
            finally:
                await self.transport.aclose()

    def watch(self, cycle: Cycle) -> None:
        """Have the connection's watcher task wait for `cycle`'s client to leave. One task
        per connection, started on first use, instead of one per request: spawning and
        cancelling a task costs more than the rest of a proxied request's scheduling."""
        self._watched = cycle
        if self._wake is None:
            self._wake = trio.Event()
            assert self._nursery is not None
            self._nursery.start_soon(self._watch_disconnects)
        self._wake.set()

    async def _watch_disconnects(self) -> None:
        while True:
            assert self._wake is not None
            await self._wake.wait()
            self._wake = trio.Event()
            cycle, self._watched = self._watched, None
            if cycle is not None and cycle.open:
                await cycle.wait_for_disconnect()

    async def _read_head(self) -> bytes | None:
        """The next request head (without its blank line), or None when the connection
        should end: the client closed it, sent nothing in time, or sent garbage (which is
        answered first)."""
        try:
            end = head_end(self.buffer)
            if end < 0:
                with trio.CancelScope() as idle:
                    idle.deadline = trio.current_time() + self.keep_alive_timeout_s
                    self._idle = idle
                    end = await self._fill_head()
                self._idle = None
                if idle.cancelled_caught:
                    return None
            elif self.buffer:
                # A pipelined request: let other tasks run before serving it.
                await trio.lowlevel.checkpoint()
        except FramingError as exc:
            await self._refuse(431, f"request head too large: {exc}")
            return None
        if end < 0:
            return None
        head, self.buffer = self.buffer[: end - 4], self.buffer[end:]
        return head

    async def _fill_head(self) -> int:
        while True:
            data = await self.transport.receive()
            if not data:
                return -1
            self.buffer += data
            end = head_end(self.buffer)
            if end >= 0:
                return end

    async def _refuse(self, status: int, message: str) -> None:
        self.unread = True
        body = error_body(message)
        head = _STATUS_LINES[status] + (
            b"content-type: application/json; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\ndate: %s\r\n\r\n"
        ) % (len(body), self.date.value())
        with contextlib.suppress(ClientGone):
            await self.transport.send(head + body)

    async def _serve(self, head: bytes) -> bool:
        """Answer one request; whether the connection can carry another."""
        try:
            method, target, minor, fields = parse_request_head(head)
            length = body_length(fields)
            scope = self._scope(method, target, minor, fields)
        except FramingError as exc:
            await self._refuse(400, f"malformed HTTP request: {exc}")
            return False
        cycle = Cycle(self, scope, fields, length, head_only=method == b"HEAD", minor=minor)
        scope["extensions"][DISCONNECT_EXTENSION] = cycle.cancel_on_disconnect
        try:
            await self._app(scope, cycle.receive, cycle.send)
        except ClientGone:
            return False
        except Exception:  # the app's own failure: answer it, log it, keep serving others
            log.exception("the app failed on %s %s", scope["method"], scope["path"])
            if not cycle.started:
                await self._refuse(*(cycle.refusal or (500, "internal error")))
            return False
        finally:
            cycle.finish()
            if cycle.watching is not None and not self.transport.plain:
                # A TLS stream's read is not abandoned at once when cancelled: let the
                # watcher's read unwind before this task reads the next request.
                await cycle.watching.wait()
        if cycle.refusal is not None and not cycle.started:
            await self._refuse(*cycle.refusal)
            return False
        if not cycle.complete:
            if not cycle.started and not self.transport.closed:
                log.error("the app answered nothing to %s %s", scope["method"], scope["path"])
                await self._refuse(500, "internal error: no answer")
            return False
        if not cycle.body_done:
            self.unread = True
            return False
        return cycle.keep_alive

    def _scope(
        self, method: bytes, target: bytes, minor: int, fields: Headers
    ) -> MutableMapping[str, Any]:
        if not target.startswith(b"/"):
            if target.startswith((b"http://", b"https://")):
                # Absolute form: only the path matters here.
                rest = target.split(b"//", 1)[1]
                slash = rest.find(b"/")
                target = rest[slash:] if slash >= 0 else b"/"
            elif not (target == b"*" and method == b"OPTIONS"):
                raise FramingError(f"request target {bytes(target[:80])!r} is not a path")
        if minor == 1:
            for name, _ in fields:
                if name == b"host":
                    break
            else:
                raise FramingError("HTTP/1.1 request without a Host header")
        path, _, query = target.partition(b"?")
        try:
            decoded = unquote(path.decode("ascii"))
        except UnicodeDecodeError:
            raise FramingError("request target is not ASCII") from None
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1" if minor == 1 else "1.0",
            "method": method.decode("ascii"),
            "scheme": self._scheme,
            "path": decoded,
            "raw_path": path,
            "query_string": query,
            "root_path": "",
            "headers": fields,
            "client": self._client,
            "server": self._server,
            "state": self._state.copy(),
            "extensions": {},
        }


class Cycle:
    """One request and its answer: the ASGI `receive` and `send` of one app call."""

    __slots__ = (
        "_chunked",
        "_conn",
        "_continue",
        "_decoder",
        "_delivered",
        "_head",
        "_http11",
        "_left",
        "_length",
        "_on_gone",
        "_settled",
        "_waiting",
        "body_done",
        "complete",
        "finished",
        "gone",
        "head_only",
        "keep_alive",
        "refusal",
        "started",
        "watching",
    )

    def __init__(
        self,
        conn: Connection,
        scope: MutableMapping[str, Any],
        fields: Headers,
        length: int | None,
        *,
        head_only: bool,
        minor: int,
    ) -> None:
        self._conn = conn
        self.head_only = head_only
        self._http11 = minor == 1
        if minor == 1:
            self.keep_alive = not has_token(fields, b"connection", b"close")
        else:
            self.keep_alive = has_token(fields, b"connection", b"keep-alive")
        self._decoder: ChunkedDecoder | None = ChunkedDecoder() if length == CHUNKED else None
        self._left = 0 if length is None or length == CHUNKED else length
        self.body_done = self._decoder is None and self._left == 0  # all of it read
        self._delivered = False  # the last `http.request` message was given to the app
        self._continue = not self.body_done and has_token(fields, b"expect", b"100-continue")
        self._head = b""
        self._length: int | None = None  # the answer's Content-Length, if it set one
        self._chunked = False
        self._waiting: trio.CancelScope | None = None
        self.watching: trio.Event | None = None  # set when a wait for a disconnect ends
        self._on_gone: list[trio.CancelScope] = []
        self._settled: trio.Event | None = None  # set once complete, gone or finished
        self.started = False
        self.complete = False
        self.gone = False
        self.finished = False  # the app returned
        self.refusal: tuple[int, str] | None = None  # the server's own answer to send

    # receive ------------------------------------------------------------------------

    @property
    def open(self) -> bool:
        """The answer is still to be completed, and someone is there to read it."""
        return not (self.complete or self.gone or self.finished)

    def cancel_on_disconnect(self, scope: trio.CancelScope) -> None:
        """The `gateway.cancel_on_disconnect` ASGI extension: cancel `scope` if the client
        leaves before the answer is complete. The app need not call `receive` for it."""
        if self.gone:
            scope.cancel()
            return
        self._on_gone.append(scope)
        if len(self._on_gone) == 1 and self.open:
            self._conn.watch(self)

    def finish(self) -> None:
        """The app returned: stop watching for this request's client."""
        self.finished = True
        self._on_gone.clear()
        self._settle()

    def _went(self) -> None:
        self.gone = True
        for scope in self._on_gone:
            scope.cancel()
        self._on_gone.clear()
        self._settle()

    def _settle(self) -> None:
        if self._waiting is not None:
            self._waiting.cancel()
        if self._settled is not None:
            self._settled.set()

    async def receive(self) -> Message:
        try:
            if not self._delivered and not self.gone:
                return await self._receive_body()
            if self._on_gone and self.open:
                # The connection's watcher reads the socket; wait for what it finds.
                if self._settled is None:
                    self._settled = trio.Event()
                await self._settled.wait()
            elif self.open:
                await self.wait_for_disconnect()
        except ClientGone:
            self._went()
        return {"type": "http.disconnect"}

    async def _receive_body(self) -> Message:
        conn = self._conn
        if self.body_done:
            self._delivered = True
            return {"type": "http.request", "body": b"", "more_body": False}
        if self._continue:
            self._continue = False
            if not self.started:
                await conn.transport.send(_CONTINUE)
        while True:
            data = conn.buffer
            conn.buffer = b""
            if not data:
                # A body that stalls is refused like a head that does: the client gets
                # `keep_alive_timeout_s` between two reads, not forever.
                with trio.move_on_after(conn.keep_alive_timeout_s):
                    data = await conn.transport.receive()
                    if not data:
                        self._went()
                        return {"type": "http.disconnect"}
                if not data:
                    return self._refused(
                        408,
                        "the request body stopped arriving"
                        f" ({conn.keep_alive_timeout_s:g} s without a byte)",
                    )
            decoder = self._decoder
            if decoder is not None:
                try:
                    body = decoder.feed(data)
                except FramingError as exc:
                    # The body's framing is broken: nothing more can be read from here.
                    return self._refused(400, f"malformed chunked request body: {exc}")
                if decoder.done:
                    conn.buffer = decoder.rest
                    self.body_done = self._delivered = True
                    return {"type": "http.request", "body": body, "more_body": False}
            else:
                body = data[: self._left]
                conn.buffer = data[self._left :]
                self._left -= len(body)
                if self._left == 0:
                    self.body_done = self._delivered = True
                    return {"type": "http.request", "body": body, "more_body": False}
            if body:
                return {"type": "http.request", "body": body, "more_body": True}

    def _refused(self, status: int, message: str) -> Message:
        """The body cannot be read to its end: the app is told the client left, and the
        server answers `status` itself (if the app has not started an answer) and closes."""
        self.refusal = (status, message)
        self._conn.closing = True
        self._went()
        return {"type": "http.disconnect"}

    async def wait_for_disconnect(self) -> None:
        """Wait until the client leaves (then say so to whoever asked) or the answer is
        complete or abandoned. Bytes that arrive in the meantime are the next (pipelined)
        request: kept, up to a head's worth."""
        conn = self._conn
        with trio.CancelScope() as waiting:
            self._waiting = waiting
            self.watching = unwound = trio.Event()
            try:
                while len(conn.buffer) <= MAX_HEAD_BYTES:
                    data = await conn.transport.receive()
                    if not data:
                        self._went()
                        return
                    conn.buffer += data
                await trio.sleep_forever()
            except ClientGone:
                self._went()
            finally:
                self._waiting = self.watching = None
                unwound.set()

    # send ---------------------------------------------------------------------------

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.body":
            if self.complete or self.gone:
                return
            body = message.get("body", b"")
            more = message.get("more_body", False)
            await self._write(body, more)
        elif kind == "http.response.start":
            if self.gone:
                return  # nobody to answer; a refusal of the server's own may still go
            if self.started:
                raise RuntimeError("the answer has already started")
            self._head = self._encode_head(message["status"], message.get("headers", ()))
            self.started = True
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r}")

    def _encode_head(self, status: int, headers: Any) -> bytes:
        conn = self._conn
        lines = [_STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status]
        length: int | None = None
        close = not self.keep_alive or conn.closing
        for name, value in headers:
            lower = name.lower()
            if lower == b"content-length":
                length = int(value)
                continue
            if lower == b"connection":
                if b"close" in value.lower():
                    close = True
                continue
            if lower == b"transfer-encoding" or lower == b"date":
                continue
            if not valid_value(value):
                raise RuntimeError(f"header {name!r} has a value that cannot be sent")
            lines.append(b"%s: %s\r\n" % (name, value))
        lines.append(b"date: %s\r\n" % conn.date.value())
        no_body = status in NO_BODY_STATUSES or status < 200
        if length is not None:
            lines.append(b"content-length: %d\r\n" % length)
            self._length = length
        elif no_body or self.head_only:
            self._length = 0
        elif self.keep_alive and not close and self._http11:
            lines.append(b"transfer-encoding: chunked\r\n")
            self._chunked = True
        else:
            close = True  # close-delimited: the end of the connection ends the body
        if no_body or self.head_only:
            self._length = 0  # nothing follows the head, whatever length it announces
        if close:
            self.keep_alive = False
            lines.append(b"connection: close\r\n")
        elif not self._http11:
            lines.append(b"connection: keep-alive\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    async def _write(self, body: bytes, more: bool) -> None:
        head = self._head
        self._head = b""
        if self.head_only or (self._length == 0 and not self._chunked):
            out = head
        elif self._chunked:
            out = head + b"%x\r\n%s\r\n" % (len(body), body) if body else head
            if not more:
                out += _LAST_CHUNK
        else:
            out = head + body
            if self._length is not None:
                self._length -= len(body)
                if self._length < 0:
                    raise RuntimeError("the answer is longer than its Content-Length")
        if not more:
            self.complete = True
            if self._length:
                self.keep_alive = False  # shorter than declared: only a close can say so
        if out:
            try:
                await self._conn.transport.send(out)
            except ClientGone:
                self.complete = False
                await self._conn.transport.aclose()
                self._went()
                return
        if not more:
            self._settle()


_ACCEPT_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


async def accept_loop(
    listener: socket.socket,
    handle: Callable[[socket.socket, Any], Awaitable[None]],
    nursery: trio.Nursery,
) -> None:
    """Accept connections from `listener` forever, each handled in its own task in
    `nursery`. Out of file descriptors: wait a little rather than spin."""
    while True:
        await trio.lowlevel.wait_readable(listener)
        while True:
            try:
                sock, address = listener.accept()
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in _ACCEPT_ERRORS:
                    log.warning("cannot accept connections: %s", exc)
                    await trio.sleep(0.1)
                break
            nursery.start_soon(handle, sock, address)
