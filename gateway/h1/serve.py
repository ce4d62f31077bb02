"""The server side of HTTP/1.1: one client connection, its requests in order, each run
through the ASGI app.

This replaces hypercorn's h11 protocol stack on the request path (ADR 0014: that stack
alone cost 1.05 ms of CPU per request here). Requests are parsed by llhttp
(`request_parser`, ADR 0016). Each connection has two tasks, and only one of them ever
reads the socket:

- the reader (`Connection._read`) reads, feeds the parser, and queues its events (heads,
  body pieces, ends, refusals). It stays waiting on the socket while a request is served,
  so a client that leaves is seen at once: the current request's cancel scopes (the
  `gateway.cancel_on_disconnect` ASGI extension) are cancelled, with no task spawned or
  cancelled per request. It stops reading when its queue is full (pipelined requests,
  a body the app reads slowly), and while idle it keeps the keep-alive deadline;
- the connection task (`Connection._serve_all`) takes the events in order, calls the app
  with `receive` (which hands out the queued body, with a deadline per wait and one for
  the whole body) and `send`, frames the answer (Content-Length as given, else chunked;
  HTTP/1.0 is close-delimited), writing the head together with the first body bytes.

Writes go straight to the socket when the kernel takes them whole (nearly always on a
LAN); only a client that stops reading makes a write wait, and that wait has a deadline
(`write_timeout_s`) after which the connection is dropped and the app sees a disconnect.

A client that closes its side (end of stream, or a reset) while its request is served
has left, as nginx also takes it: its request is cancelled (freeing the gate at once)
and logged as 499 by the app; nothing is written and nothing is logged as an error. A
half-close cannot be told from a client that left, so it is taken the same way.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import unquote

import trio

from gateway.errors import error_body
from gateway.h1.framing import NO_BODY_STATUSES, valid_value
from gateway.h1.request_parser import END, Event, Head, Refusal, RequestParser
from gateway.h1.transport import ClientGone, DateHeader, Transport

__all__ = [
    "DISCONNECT_EXTENSION",
    "REQUEST_BODY_TIMEOUT_S",
    "Connection",
    "DateHeader",
    "Transport",
    "accept_loop",
]

log = logging.getLogger("gateway.server")

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]

# The ASGI extension through which an app asks for a cancel scope to be cancelled when
# its client disconnects (see `Cycle.cancel_on_disconnect`; `gateway.web.asgi` uses it).
DISCONNECT_EXTENSION = "gateway.cancel_on_disconnect"
# The reader waits when this much is queued and not yet taken by the connection task.
MAX_QUEUED_EVENTS = 64
MAX_QUEUED_BODY = 256 * 1024
# The default overall deadline for a request body (`request_body_timeout_s`).
REQUEST_BODY_TIMEOUT_S = 60.0
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
    505: b"HTTP Version Not Supported",
}
_STATUS_LINES = {
    status: b"HTTP/1.1 %d %s\r\n" % (status, reason) for status, reason in _REASONS.items()
}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_LAST_CHUNK = b"0\r\n\r\n"
_DISCONNECT: Message = {"type": "http.disconnect"}


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
        request_body_timeout_s: float = REQUEST_BODY_TIMEOUT_S,
    ) -> None:
        self.transport = transport
        self._app = app
        self._scheme = scheme
        self._client = client
        self._server = server
        self._state = state
        self.keep_alive_timeout_s = keep_alive_timeout_s
        self.request_body_timeout_s = request_body_timeout_s
        self.date = date
        self.parser = RequestParser()
        self.ended = False  # the reader has stopped: no more events will come
        self.left = False  # the client closed or reset its connection
        self.closing = False  # no further request after the current one
        self.unread = False  # the client may still be sending: linger before closing
        self.cycle: Cycle | None = None  # the request being served
        self._arrived: trio.Event | None = None  # the connection task waits for events
        self._drained: trio.Event | None = None  # the reader waits for room in the queue
        # The reader's scope; while the connection is idle, its deadline is the
        # keep-alive timeout.
        self._reading = trio.CancelScope()
        self._idle = False

    def stop_when_idle(self) -> None:
        """Shutdown: close now if waiting for a request, else after the current answer."""
        self.closing = True
        if self._idle:
            self._reading.cancel()

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read)
                try:
                    await self._serve_all()
                finally:
                    nursery.cancel_scope.cancel()  # the reader
        finally:
            try:
                if self.unread and not self.left:
                    await self.transport.linger()
            finally:
                await self.transport.aclose()

    # The reader: the only task that reads the socket ------------------------------------

    async def _read(self) -> None:
        parser = self.parser
        events = parser.events
        receive = self.transport.receive
        reading = self._reading
        reading.deadline = trio.current_time() + self.keep_alive_timeout_s
        self._idle = True
        with reading:
            # After a request that closes the connection, reading goes on (the bytes are
            # dropped by the parser) only to see the client leave.
            while not parser.refused:
                if len(events) >= MAX_QUEUED_EVENTS or parser.queued_body >= MAX_QUEUED_BODY:
                    self._drained = drained = trio.Event()
                    await drained.wait()
                    continue
                try:
                    data = await receive()
                except ClientGone:
                    data = b""
                if not data:
                    self.left = True
                    break
                parser.feed(data)
                if events:
                    reading.deadline = math.inf  # a whole head came: timing is the app's
                    self._arrive()
        self.ended = True
        cycle = self.cycle
        if self.left and cycle is not None:
            cycle.client_left()
        self._arrive()

    def _arrive(self) -> None:
        arrived = self._arrived
        if arrived is not None:
            self._arrived = None
            arrived.set()

    async def wait_for_events(self) -> None:
        """Until the reader queues an event or stops."""
        arrived = self._arrived
        if arrived is None:
            arrived = self._arrived = trio.Event()
        await arrived.wait()

    def take(self) -> Event:
        """The next queued event (the queue must not be empty)."""
        parser = self.parser
        event = parser.events.popleft()
        if type(event) is bytes:
            parser.queued_body -= len(event)
        drained = self._drained
        if drained is not None and len(parser.events) < MAX_QUEUED_EVENTS // 2:
            self._drained = None
            drained.set()
        return event

    # The connection task ------------------------------------------------------------

    async def _serve_all(self) -> None:
        events = self.parser.events
        while not self.closing:
            if events:
                await trio.lowlevel.checkpoint()  # pipelined: let other tasks run first
            else:
                if self.ended:
                    return
                self._idle = True
                self._reading.deadline = trio.current_time() + self.keep_alive_timeout_s
                while not events and not self.ended:
                    await self.wait_for_events()
                self._idle = False
                if not events:
                    return
            event = self.take()
            if type(event) is Head:
                if not await self._serve(event):
                    return
            elif type(event) is Refusal:
                await self._refuse(event.status, event.message)
                return
            elif event is not END:  # the end of a bodiless request is skipped here
                raise RuntimeError(f"unexpected event {event!r}")  # pragma: no cover

    async def _refuse(self, status: int, message: str) -> None:
        self.unread = True
        body = error_body(message)
        head = _STATUS_LINES[status] + (
            b"content-type: application/json; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\ndate: %s\r\n\r\n"
        ) % (len(body), self.date.value())
        with contextlib.suppress(ClientGone):
            await self.transport.send(head + body)

    async def _serve(self, head: Head) -> bool:
        """Answer one request; whether the connection can carry another."""
        try:
            path = unquote(head.path.decode("ascii"))
        except UnicodeDecodeError:  # pragma: no cover - llhttp refuses non-ASCII targets
            await self._refuse(400, "malformed HTTP request: the target is not ASCII")
            return False
        method = head.method.decode("ascii")
        scope: MutableMapping[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1" if head.minor == 1 else "1.0",
            "method": method,
            "scheme": self._scheme,
            "path": path,
            "raw_path": head.path,
            "query_string": head.query,
            "root_path": "",
            "headers": head.headers,
            "client": self._client,
            "server": self._server,
            "state": self._state.copy(),
            "extensions": {},
        }
        cycle = self.cycle = Cycle(self, head)
        scope["extensions"][DISCONNECT_EXTENSION] = cycle.cancel_on_disconnect
        try:
            await self._app(scope, cycle.receive, cycle.send)
        except Exception:  # the app's own failure: answer it, log it, keep serving others
            log.exception("the app failed on %s %s", method, path)
            if not cycle.started and not cycle.gone:
                await self._refuse(*(cycle.refusal or (500, "internal error")))
            return False
        finally:
            cycle.finish()
            self.cycle = None
        if cycle.refusal is not None and not cycle.started:
            await self._refuse(*cycle.refusal)
            return False
        if not cycle.complete:
            if not cycle.started and not cycle.gone and not self.transport.closed:
                log.error("the app answered nothing to %s %s", method, path)
                await self._refuse(500, "internal error: no answer")
            return False
        if not cycle.body_done and not self._skip_body():
            self.unread = True
            return False
        return cycle.keep_alive

    def _skip_body(self) -> bool:
        """Drop the rest of a body the app did not read, if all of it is queued; else
        the connection cannot carry another request."""
        if END not in self.parser.events:
            return False
        while self.take() is not END:
            pass
        return True


class Cycle:
    """One request and its answer: the ASGI `receive` and `send` of one app call."""

    __slots__ = (
        "_body_deadline",
        "_chunked",
        "_conn",
        "_continue",
        "_delivered",
        "_head",
        "_http11",
        "_length",
        "_on_gone",
        "_settled",
        "body_done",
        "complete",
        "finished",
        "gone",
        "head_only",
        "keep_alive",
        "refusal",
        "started",
    )

    def __init__(self, conn: Connection, head: Head) -> None:
        self._conn = conn
        self.head_only = head.method == b"HEAD"
        self._http11 = head.minor == 1
        self.keep_alive = head.keep_alive
        self.body_done = not head.has_body  # all of it taken from the queue
        self._delivered = False  # the last `http.request` message was given to the app
        self._continue = head.expect_continue
        self._body_deadline = (
            trio.current_time() + conn.request_body_timeout_s if head.has_body else math.inf
        )
        self._head = b""
        self._length: int | None = None  # the answer's Content-Length, if it set one
        self._chunked = False
        self._on_gone: list[trio.CancelScope] = []
        self._settled: trio.Event | None = None  # set once complete, gone or finished
        self.started = False
        self.complete = False
        self.gone = conn.left
        self.finished = False  # the app returned
        self.refusal: tuple[int, str] | None = None  # the server's own answer to send

    # receive ------------------------------------------------------------------------

    @property
    def open(self) -> bool:
        """The answer is still to be completed, and someone is there to read it."""
        return not (self.complete or self.gone or self.finished)

    def cancel_on_disconnect(self, scope: trio.CancelScope) -> None:
        """The `gateway.cancel_on_disconnect` ASGI extension: cancel `scope` if the client
        leaves before the answer is complete. The app need not call `receive` for it:
        the connection's reader watches the socket anyway."""
        if self.gone:
            scope.cancel()
            return
        self._on_gone.append(scope)

    def client_left(self) -> None:
        """The reader saw the client's end of stream (or a reset) during this request."""
        if self.open:
            self._went()

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
        settled = self._settled
        if settled is not None:
            self._settled = None
            settled.set()

    async def receive(self) -> Message:
        if not self._delivered and self.refusal is None:
            # Even when the client has left, a body that came whole is handed over.
            return await self._receive_body()
        if self.open:
            # The reader watches the socket; wait until the client leaves or this request
            # ends.
            if self._settled is None:
                self._settled = trio.Event()
            await self._settled.wait()
        return _DISCONNECT

    async def _receive_body(self) -> Message:
        if self.body_done:
            self._delivered = True
            return {"type": "http.request", "body": b"", "more_body": False}
        conn = self._conn
        events = conn.parser.events
        while not events:
            if conn.ended:  # the client left mid-body
                self._went()
                return _DISCONNECT
            if self._continue:
                self._continue = False
                if not self.started:
                    try:
                        await conn.transport.send(_CONTINUE)
                    except ClientGone:
                        self._went()
                        return _DISCONNECT
                continue
            now = trio.current_time()
            if now >= self._body_deadline:
                return self._refused(
                    408,
                    "the request body took too long"
                    f" (over {conn.request_body_timeout_s:g} s in all)",
                )
            with trio.move_on_after(min(conn.keep_alive_timeout_s, self._body_deadline - now)):
                await conn.wait_for_events()
                continue
            if trio.current_time() < self._body_deadline:
                # A body that stalls is refused like a head that does: the client gets
                # `keep_alive_timeout_s` between two reads, not forever.
                return self._refused(
                    408,
                    "the request body stopped arriving"
                    f" ({conn.keep_alive_timeout_s:g} s without a byte)",
                )
            # The loop's first check answers: the whole body took too long.
        event = conn.take()
        if event is END:
            self.body_done = self._delivered = True
            return {"type": "http.request", "body": b"", "more_body": False}
        if type(event) is bytes:
            if events and events[0] is END:
                conn.take()
                self.body_done = self._delivered = True
                return {"type": "http.request", "body": event, "more_body": False}
            return {"type": "http.request", "body": event, "more_body": True}
        if type(event) is Refusal:
            # The body's framing is broken: nothing more can be read from here.
            reason = event.message.removeprefix("malformed HTTP request: ")
            return self._refused(400, f"malformed chunked request body: {reason}")
        raise RuntimeError(f"unexpected event {event!r}")  # pragma: no cover

    def _refused(self, status: int, message: str) -> Message:
        """The body cannot be read to its end: the app is told the client left, and the
        server answers `status` itself (if the app has not started an answer) and closes."""
        self.refusal = (status, message)
        self._conn.closing = True
        self._went()
        return _DISCONNECT

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
        if not self.body_done and END not in conn.parser.events:
            # The app answers before the body came whole: unless it reads the rest,
            # the connection ends after this answer, and the client must know.
            close = True
        for name, value in headers:
            lower = name.lower()
            if lower == b"content-length":
                if not value.isdigit():
                    raise RuntimeError(f"Content-Length {value[:40]!r} is not a length")
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
        if status == 204 or status < 200:
            length = None  # RFC 9110 8.6: never sent with these (304 keeps the GET's)
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
