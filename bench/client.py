"""The load client: a minimal HTTP/1.1 client with keep-alive, in two flavours.

`BlockingConnection` (plain blocking socket) serves the sequential, concurrency-1 phases:
the cheapest way to send a request and time its answer in Python. `AsyncConnection`
(an asyncio protocol) serves the concurrent phases. Both feed the same incremental
`ResponseParser`, which records when each byte of the body arrived, so first line, first
SSE event and per-line arrival times can be read off afterwards. All times are
`time.monotonic()` (CLOCK_MONOTONIC, the clock the upstream stamps lines with).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from bisect import bisect_right
from dataclasses import dataclass, field

monotonic = time.monotonic


class ProtocolError(Exception):
    """The answer is not HTTP/1.1 as this client understands it, or was cut short."""


@dataclass(slots=True)
class Response:
    started: float = 0.0
    status: int = 0
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    # (time, body length after that read): when each byte of the body arrived.
    arrivals: list[tuple[float, int]] = field(default_factory=list)
    first_byte: float = 0.0
    ended: float = 0.0
    reads: int = 0
    keep_alive: bool = True

    @property
    def elapsed(self) -> float:
        return self.ended - self.started

    def arrival_of(self, offset: int) -> float:
        """When body byte `offset` arrived."""
        ends = [n for _, n in self.arrivals]
        i = bisect_right(ends, offset)
        return self.arrivals[min(i, len(self.arrivals) - 1)][0]

    def first_line_at(self) -> float | None:
        at = self.body.find(b"\n")
        return None if at < 0 else self.arrival_of(at)

    def first_event_at(self) -> float | None:
        """The first complete SSE event (`\\n\\n`)."""
        at = self.body.find(b"\n\n")
        return None if at < 0 else self.arrival_of(at + 1)

    def line_arrivals(self) -> list[float]:
        """The arrival time of every complete NDJSON line, in order."""
        times: list[float] = []
        body = self.body
        arrivals = self.arrivals
        k = 0
        at = body.find(b"\n")
        while at >= 0:
            while arrivals[k][1] <= at:
                k += 1
            times.append(arrivals[k][0])
            at = body.find(b"\n", at + 1)
        return times

    def lines(self) -> list[bytes]:
        return bytes(self.body).splitlines()


_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _TRAILER, _UNTIL_CLOSE, _DONE = range(7)


class ResponseParser:
    """Incremental HTTP/1.1 response parser: Content-Length, chunked, or until close."""

    def __init__(self, response: Response, head_only: bool = False) -> None:
        self.r = response
        self.buf = bytearray()
        self.state = _HEAD
        self.remaining = 0
        self.head_only = head_only

    @property
    def done(self) -> bool:
        return self.state == _DONE

    def feed(self, data: bytes, now: float) -> bool:
        """Take the bytes read at `now`; True once the response is complete."""
        r = self.r
        if not r.first_byte:
            r.first_byte = now
        r.reads += 1
        before = len(r.body)
        self.buf += data
        self._run()
        if len(r.body) != before:
            r.arrivals.append((now, len(r.body)))
        if self.state == _DONE:
            r.ended = now
            return True
        return False

    def eof(self, now: float) -> bool:
        if self.state == _UNTIL_CLOSE:
            self.state = _DONE
            self.r.ended = now
            return True
        return False

    def _run(self) -> None:
        buf = self.buf
        r = self.r
        while True:
            state = self.state
            if state == _HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > 65536:
                        raise ProtocolError("response head larger than 64 KiB")
                    return
                lines = bytes(buf[:end]).split(b"\r\n")
                del buf[: end + 4]
                parts = lines[0].split(b" ", 2)
                if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
                    raise ProtocolError(f"bad status line {lines[0]!r}")
                r.status = int(parts[1])
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    r.headers[name.strip().lower()] = value.strip()
                connection = r.headers.get(b"connection", b"").lower()
                r.keep_alive = connection != b"close"
                if self.head_only or r.status in (204, 304) or 100 <= r.status < 200:
                    self.state = _DONE
                elif r.headers.get(b"transfer-encoding", b"").lower() == b"chunked":
                    self.state = _CHUNK_SIZE
                elif b"content-length" in r.headers:
                    self.remaining = int(r.headers[b"content-length"])
                    self.state = _LENGTH if self.remaining else _DONE
                else:
                    r.keep_alive = False
                    self.state = _UNTIL_CLOSE
            elif state == _LENGTH:
                if not buf:
                    return
                take = min(self.remaining, len(buf))
                r.body += buf[:take]
                del buf[:take]
                self.remaining -= take
                if not self.remaining:
                    self.state = _DONE
            elif state == _CHUNK_SIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                size = int(bytes(buf[:end]).split(b";", 1)[0], 16)
                del buf[: end + 2]
                if size == 0:
                    self.state = _TRAILER
                else:
                    self.remaining = size + 2  # the data and its CRLF
                    self.state = _CHUNK_DATA
            elif state == _CHUNK_DATA:
                if not buf:
                    return
                take = min(self.remaining, len(buf))
                data_left = self.remaining - 2  # bytes of data (not CRLF) still expected
                if data_left > 0:
                    r.body += buf[: min(take, data_left)]
                del buf[:take]
                self.remaining -= take
                if not self.remaining:
                    self.state = _CHUNK_SIZE
            elif state == _TRAILER:
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                line = bytes(buf[:end])
                del buf[: end + 2]
                if not line:
                    self.state = _DONE
            elif state == _UNTIL_CLOSE:
                if buf:
                    r.body += buf
                    buf.clear()
                return
            else:
                return


def build_request(
    method: str,
    path: str,
    host: str,
    port: int,
    body: bytes = b"",
    content_type: bytes = b"application/json",
    headers: tuple[tuple[bytes, bytes], ...] = (),
) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\n".encode()
    if body or method in ("POST", "PUT"):
        head += b"Content-Type: " + content_type + b"\r\nContent-Length: %d\r\n" % len(body)
    for name, value in headers:
        head += name + b": " + value + b"\r\n"
    return head + b"Accept: */*\r\n\r\n" + body


class BlockingConnection:
    """One keep-alive connection; `request` sends raw bytes and reads the whole answer."""

    def __init__(self, host: str, port: int, timeout_s: float = 30.0) -> None:
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        self.sock: socket.socket | None = None

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        return sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def request(self, raw: bytes, head_only: bool = False) -> Response:
        reused = self.sock is not None
        try:
            return self._request(raw, head_only)
        except (ConnectionError, ProtocolError) as exc:
            self.close()
            # A kept-alive connection that the server closed while idle: retry once, fresh.
            if reused and isinstance(exc, ConnectionError | _ClosedBeforeAnswer):
                return self._request(raw, head_only)
            raise

    def _request(self, raw: bytes, head_only: bool) -> Response:
        sock = self.sock or self._connect()
        response = Response()
        parser = ResponseParser(response, head_only)
        recv = sock.recv
        response.started = monotonic()
        sock.sendall(raw)
        while True:
            data = recv(262144)
            now = monotonic()
            if not data:
                self.close()
                if parser.eof(now):
                    return response
                if not response.reads:
                    raise _ClosedBeforeAnswer("connection closed before any answer")
                raise ProtocolError("connection closed mid-answer")
            if parser.feed(data, now):
                if not response.keep_alive:
                    self.close()
                return response


class _ClosedBeforeAnswer(ProtocolError):
    pass


class AsyncConnection(asyncio.Protocol):
    """One keep-alive connection driven by asyncio; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser: ResponseParser | None = None
        self.waiter: asyncio.Future[Response] | None = None
        self.closed = False

    @classmethod
    async def open(cls, host: str, port: int) -> AsyncConnection:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(cls, host, port)
        return protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        parser, waiter = self.parser, self.waiter
        if parser is None or waiter is None:
            return
        try:
            complete = parser.feed(data, monotonic())
        except ProtocolError as exc:
            self.parser = self.waiter = None
            if not waiter.done():
                waiter.set_exception(exc)
            return
        if complete:
            self.parser = self.waiter = None
            if not waiter.done():
                waiter.set_result(parser.r)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        parser, waiter = self.parser, self.waiter
        self.parser = self.waiter = None
        if waiter is not None and not waiter.done():
            if parser is not None and parser.eof(monotonic()):
                waiter.set_result(parser.r)
            elif parser is None or not parser.r.reads:
                waiter.set_exception(ProtocolError("connection closed before any answer"))
            else:
                waiter.set_exception(ProtocolError("connection closed mid-answer"))

    async def request(self, raw: bytes) -> Response:
        if self.closed or self.transport is None:
            raise ProtocolError("connection is closed")
        response = Response()
        self.parser = ResponseParser(response)
        self.waiter = asyncio.get_running_loop().create_future()
        response.started = monotonic()
        self.transport.write(raw)
        return await self.waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
