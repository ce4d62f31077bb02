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
from gateway.h1.cycle import STATUS_LINES, Cycle
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
        head = STATUS_LINES[status] + (
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
