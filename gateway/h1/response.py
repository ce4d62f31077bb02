"""One exchange on the hot path's upstream client: send a request on a pooled connection,
read the answer's head, then its body as it arrives (`gateway.h1.pool` makes them).

It reaches the pool only through its interface for the exchange (slots, idle or new
connections, the watchdog's deadlines), and raises errors already in the gateway's tree.
"""

from __future__ import annotations

import math
from types import TracebackType
from typing import TYPE_CHECKING

import trio

from gateway.errors import UpstreamProtocol, UpstreamTimeout
from gateway.h1.connection import STREAM_ERRORS, Connection, reason
from gateway.h1.framing import Headers
from gateway.h1.response_parser import FramingError, ResponseParser

if TYPE_CHECKING:
    from gateway.h1.pool import ConnectionPool


class _Stale(Exception):
    """A reused connection ended before any byte of the answer: the server had closed it."""


class Response:
    """One exchange: entering it sends the request and reads the head (`status`,
    `headers` as lowercased names with their values, hop-by-hop fields removed);
    iterating it yields the body as it arrives. On exit the connection is kept if the
    body was read to its end and the answer allows it, otherwise closed."""

    __slots__ = (
        "_body",
        "_conn",
        "_first_byte_timeout_s",
        "_head",
        "_method",
        "_parser",
        "_pool",
        "_reusable",
        "_slot",
        "headers",
        "status",
    )

    def __init__(
        self,
        pool: ConnectionPool,
        method: str,
        head: bytes,
        body: bytes | None,
        first_byte_timeout_s: float,
    ) -> None:
        self._pool = pool
        self._first_byte_timeout_s = first_byte_timeout_s
        self._method = method
        self._head = head
        self._body = body  # a large body, sent on its own after the head
        self._conn: Connection | None = None
        self._slot = False
        self._parser = ResponseParser(head_only=method == "HEAD")
        self._reusable = False
        self.status = 0
        self.headers: Headers = []

    @property
    def length(self) -> int | None:
        """The body length the answer declared; None when chunked or until close."""
        return self._parser.length

    async def __aenter__(self) -> Response:
        pool = self._pool
        deadline = trio.current_time() + self._first_byte_timeout_s
        await pool.acquire_slot()
        self._slot = True
        try:
            conn = pool.take_idle()
            if conn is not None:
                try:
                    await self._exchange(conn, deadline, reused=True)
                    return self
                except _Stale:
                    self._conn = None
                    self._parser = ResponseParser(head_only=self._method == "HEAD")
                    pool.put_back(conn, reusable=False)
            await self._exchange(await pool.connect(), deadline, reused=False)
            return self
        except BaseException:
            self._finish()
            raise

    async def _exchange(self, conn: Connection, deadline: float, *, reused: bool) -> None:
        pool = self._pool
        parser = self._parser
        self._conn = conn
        pool.lend(conn, deadline)
        received = False
        # Retrying on a fresh connection is safe when the server cannot have acted on the
        # request: nothing of it was written, or it is a GET/HEAD. A POST that reached a
        # server which then closed is not sent again (it could be a second generation);
        # net/http draws the same line.
        replayable = reused and self._method in ("GET", "HEAD")
        written = False
        try:
            await conn.send_all(self._head)
            if self._body is not None:
                await conn.send_all(self._body)
            written = True
            while not parser.head_done:
                data = await conn.receive_some()
                if not data:
                    if replayable and not received:
                        raise _Stale
                    raise UpstreamProtocol(
                        f"{pool.name} dropped the connection: it closed before answering"
                    )
                received = True
                parser.feed(data)
        except STREAM_ERRORS as exc:
            if conn.expired:
                raise UpstreamTimeout(
                    f"{pool.name} sent no answer within {self._first_byte_timeout_s:g} s"
                ) from None
            if reused and not received and (replayable or not written):
                raise _Stale from None
            raise UpstreamProtocol(f"{pool.name} dropped the connection: {reason(exc)}") from None
        except FramingError as exc:
            raise UpstreamProtocol(f"{pool.name} sent a malformed answer: {exc}") from None
        finally:
            conn.deadline = math.inf
        self.status = parser.status
        self.headers = parser.headers
        self._reusable = parser.keep_alive

    def header(self, name: bytes) -> bytes | None:
        """The first value of header `name` (lowercase), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def __aiter__(self) -> Response:
        return self

    async def __anext__(self) -> bytes:
        parser = self._parser
        while True:
            if parser.pieces:
                return parser.take()
            if parser.done:
                raise StopAsyncIteration
            data = await self._receive()
            if not data:
                if parser.until_close:  # the end of the connection ends the body
                    parser.done = True
                    continue
                self._reusable = False
                raise UpstreamProtocol(
                    f"{self._pool.name} dropped the connection: the answer ended before its end"
                )
            try:
                parser.feed(data)
            except FramingError as exc:
                self._reusable = False
                raise UpstreamProtocol(
                    f"{self._pool.name} sent a malformed answer: {exc}"
                ) from None

    async def _receive(self) -> bytes:
        conn = self._conn
        if conn is None:
            raise RuntimeError("the response is closed")
        pool = self._pool
        pool.watch(conn, trio.current_time() + pool.idle_timeout_s)
        try:
            data = await conn.receive_some()
        except STREAM_ERRORS as exc:
            self._reusable = False
            if conn.expired:
                raise UpstreamTimeout(
                    f"{pool.name} sent nothing for too long ({pool.idle_timeout_s:g} s)"
                ) from None
            raise UpstreamProtocol(f"{pool.name} dropped the connection: {reason(exc)}") from None
        finally:
            conn.deadline = math.inf
        return data

    async def read(self) -> bytes:
        """The rest of the body, whole; an answer over the pool's `max_read_bytes` is
        refused (`UpstreamProtocol`) without being buffered: as soon as its declared
        length says so, or when what came exceeds it."""
        limit = self._pool.max_read_bytes
        if self._parser.length is not None and self._parser.length > limit:
            self._reusable = False
            raise UpstreamProtocol(f"{self._pool.name} sent an answer over {limit} bytes")
        parts: list[bytes] = []
        size = 0
        async for chunk in self:
            size += len(chunk)
            if size > limit:
                self._reusable = False
                raise UpstreamProtocol(f"{self._pool.name} sent an answer over {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    async def aclose(self) -> None:
        """Give the connection back (or close it) now; exiting does the same."""
        self._finish()
        await trio.lowlevel.checkpoint()

    def _finish(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            parser = self._parser
            # Body bytes the caller did not take (even if they all came) close the
            # connection too: the caller gave up on this answer.
            reusable = parser.done and not parser.pieces and not parser.extra
            self._pool.put_back(conn, reusable and self._reusable)
        if self._slot:
            self._slot = False
            self._pool.release_slot()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._finish()
