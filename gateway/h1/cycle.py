"""One request and its answer on a client connection: the ASGI `receive` and `send` of
one app call (`Cycle`), for `serve.Connection`.

`receive` hands out the body the connection's reader queued, with a deadline per wait
(`keep_alive_timeout_s`) and one for the whole body (`request_body_timeout_s`), then waits
until the client leaves or the answer ends; `send` frames the answer (Content-Length as
given, else chunked; HTTP/1.0 close-delimited) and writes its head with the first body
bytes. A refusal of the server's own (408, a broken chunked body) is recorded in
`refusal` for the connection to send.
"""

from __future__ import annotations

import math
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any

import trio

from gateway.h1.framing import NO_BODY_STATUSES, valid_value
from gateway.h1.request_parser import END, Head, Refusal
from gateway.h1.transport import ClientGone

if TYPE_CHECKING:
    from gateway.h1.serve import Connection

Message = MutableMapping[str, Any]

REASONS = {
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
STATUS_LINES = {
    status: b"HTTP/1.1 %d %s\r\n" % (status, reason) for status, reason in REASONS.items()
}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_LAST_CHUNK = b"0\r\n\r\n"
_DISCONNECT: Message = {"type": "http.disconnect"}


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
        lines = [STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status]
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
