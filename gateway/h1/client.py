"""A small HTTP/1.1 client pool to one origin, on trio streams: the Ollama target's transport.

It replaces httpx on the hottest path of the gateway (every passthrough request and every
streamed line), so it does little per request and less per chunk: connections are kept
alive and reused last-in first-out, a request is one `send_all`, a body chunk is one
`receive_some` (de-chunked, never re-split), and errors are raised once, already in the
gateway's tree (`gateway.errors`), with the texts `gateway.upstream.map_error` gives httpx's.

Deadlines are the gateway's own, but not one cancel scope per read: a scope costs about as
much as the read it guards, and one scope across the caller's block cannot be used either,
because once its deadline fires it stays cancelled and the caller could not even write the
error line it was handed. Instead each connection carries the deadline of the read it is
waiting in (a float, `inf` between reads), and the pool's watchdog (`run`) closes the
socket of a connection whose read overstays; the read then fails and reports the timeout.
Connecting and waiting for a free connection are rare and use ordinary cancel scopes.
"""

from __future__ import annotations

import base64
import contextlib
import math
import re
import select
import socket
import ssl
from collections import deque
from collections.abc import Sequence
from types import TracebackType
from urllib.parse import quote, unquote, urlsplit

import trio

from gateway.errors import BadRequest, UpstreamProtocol, UpstreamTimeout, UpstreamUnavailable
from gateway.h1.framing import TOKEN, Headers, valid_value
from gateway.h1.response_parser import FramingError, ResponseParser

READ_BYTES = 65536
# Reads in a row that found data waiting before one lets other tasks run.
_STREAK = 16
# Larger bodies are sent after the head rather than copied into one buffer with it.
_JOIN_LIMIT = 256 * 1024
_TARGET = re.compile(rb"/[^\x00-\x20\x7f]*")
# Framing is the pool's to write; a caller's copy could disagree with it.
_RESERVED = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
# What `Response.read` buffers at most, unless the pool says otherwise.
MAX_READ_BYTES = 64 * 1024 * 1024


class _Stale(Exception):
    """A reused connection ended before any byte of the answer: the server had closed it."""


class _Connection:
    """One open connection; `deadline` is that of the read it waits in (`inf` if none).

    A plain TCP connection is driven on its socket directly (`raw`): a read or write the
    kernel can do at once is one system call and no trip through trio's scheduler; only
    waiting goes through trio. A TLS connection goes through its `trio.SSLStream`.
    """

    __slots__ = ("deadline", "expired", "idle_since", "poller", "raw", "socket", "streak", "stream")

    def __init__(
        self,
        stream: trio.abc.Stream | None,
        sock: trio.socket.SocketType | socket.socket,
        *,
        raw: socket.socket | None = None,
    ) -> None:
        self.stream = stream
        self.socket = sock
        self.raw = raw
        self.deadline = math.inf
        self.expired = False
        self.idle_since = 0.0
        self.streak = 0  # reads in a row that did not wait
        self.poller = select.poll()
        self.poller.register(sock.fileno(), select.POLLIN)

    async def send_all(self, data: bytes) -> None:
        raw = self.raw
        if raw is None:
            assert self.stream is not None
            await self.stream.send_all(data)
            return
        try:
            sent = raw.send(data)
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            return
        view = memoryview(data)
        while sent < len(data):
            await trio.lowlevel.wait_writable(raw)
            with contextlib.suppress(BlockingIOError):
                sent += raw.send(view[sent:])

    async def receive_some(self) -> bytes:
        raw = self.raw
        if raw is None:
            assert self.stream is not None
            data = await self.stream.receive_some(READ_BYTES)
            return data if type(data) is bytes else bytes(data)
        if self.streak >= _STREAK:
            # An upstream that always has more (a large download) must not keep the
            # other tasks from running.
            self.streak = 0
            await trio.lowlevel.checkpoint()
        while True:
            try:
                data = raw.recv(READ_BYTES)
            except BlockingIOError:
                self.streak = 0
                await trio.lowlevel.wait_readable(raw)
                continue
            self.streak += 1
            return data

    def closed_while_idle(self) -> bool:
        """Anything to read on an idle connection (end of file, an error, stray bytes)
        means it cannot carry a request: one `poll` call, no waiting."""
        return bool(self.poller.poll(0))

    def close(self) -> None:
        # Closing the socket is enough, for TLS too (no close_notify, as browsers do), and
        # it is synchronous: a cancelled caller cannot interrupt it. trio wakes any task
        # still waiting on the socket.
        if self.raw is not None:
            if self.raw.fileno() >= 0:
                trio.lowlevel.notify_closing(self.raw)
            self.raw.close()
        else:
            self.socket.close()


class ConnectionPool:
    """Keep-alive connections to the origin of `url` (http or https), at most
    `max_connections` open; callers wait in FIFO order for `connect_timeout_s` when all are
    busy. `name` is how errors name the upstream; the URL itself is never shown.

    A path in `url` prefixes every request path. Credentials in `url` are sent as Basic
    auth and replace a caller's `Authorization`, as httpx did with the same URL.
    Its `run` task must be running while requests are made; `async with pool:` closes it.
    """

    def __init__(
        self,
        url: str,
        *,
        name: str,
        connect_timeout_s: float,
        idle_timeout_s: float,
        max_connections: int,
        keepalive_expiry_s: float = 30.0,
        default_headers: Sequence[tuple[bytes, bytes]] = (),
        ssl_context: ssl.SSLContext | None = None,
        max_read_bytes: int = MAX_READ_BYTES,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("expected an http:// or https:// URL")
        self.name = name
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl_context: ssl.SSLContext | None = None
        if parts.scheme == "https":
            if ssl_context is None:
                ssl_context = ssl.create_default_context()
                ssl_context.set_alpn_protocols(["http/1.1"])
            self._ssl_context = ssl_context
        self._prefix = parts.path.rstrip("/").encode("ascii")
        host = f"[{self._host}]" if ":" in self._host else self._host
        if parts.port is not None and parts.port != (443 if self._ssl_context else 80):
            host = f"{host}:{parts.port}"
        fixed = [b"Host: ", host.encode("ascii"), b"\r\n"]
        self._basic_auth = parts.username is not None or parts.password is not None
        if self._basic_auth:
            user = unquote(parts.username or "") + ":" + unquote(parts.password or "")
            fixed += [b"Authorization: Basic ", base64.b64encode(user.encode()), b"\r\n"]
        for key, value in default_headers:
            _check_field(key, value)
            fixed += [key, b": ", value, b"\r\n"]
        self._fixed = b"".join(fixed)
        self._connect_timeout_s = connect_timeout_s
        self.max_read_bytes = max_read_bytes
        self._idle_timeout_s = idle_timeout_s
        self._keepalive_expiry_s = keepalive_expiry_s
        self._slots = trio.Semaphore(max_connections)
        self._idle: deque[_Connection] = deque()  # most recently used on the right
        self._busy: set[_Connection] = set()
        self._closed = False
        # The watchdog's wake-up time; a deadline earlier than it moves it (rarely).
        self._next_check = math.inf
        self._sleep = trio.CancelScope()
        self._watching = False

    # The watchdog --------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """End reads that wait past their deadline and idle connections past their expiry,
        until cancelled."""
        self._watching = True
        task_status.started()
        try:
            while True:
                with trio.CancelScope(deadline=self._next_check) as self._sleep:
                    await trio.sleep_forever()
                self._next_check = self._sweep(trio.current_time())
        finally:
            self._watching = False

    def _sweep(self, now: float) -> float:
        soonest = math.inf
        for conn in self._busy:
            if conn.deadline <= now:
                conn.expired = True
                conn.close()
            elif conn.deadline < soonest:
                soonest = conn.deadline
        idle = self._idle
        while idle and idle[0].idle_since + self._keepalive_expiry_s <= now:
            idle.popleft().close()
        if idle:
            soonest = min(soonest, idle[0].idle_since + self._keepalive_expiry_s)
        return soonest

    def _watch(self, conn: _Connection, deadline: float) -> None:
        conn.deadline = deadline
        self._check_by(deadline)

    def _check_by(self, when: float) -> None:
        """Have the watchdog look again at `when` at the latest."""
        if when < self._next_check:
            self._next_check = when
            self._sleep.deadline = when

    # Connections ---------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        headers: Sequence[tuple[bytes, bytes]] = (),
        body: bytes | None = None,
        first_byte_timeout_s: float = 300.0,
    ) -> Response:
        """`async with pool.request(...) as response:` sends the request and yields the
        answer with its body unread. The head must come within `first_byte_timeout_s`."""
        if self._closed:
            raise RuntimeError("the connection pool is closed")
        if not self._watching:
            raise RuntimeError("start ConnectionPool.run before making requests")
        head = self._head(method, path, headers, body)
        return Response(self, method, head, body, first_byte_timeout_s)

    def _head(
        self, method: str, path: str, headers: Sequence[tuple[bytes, bytes]], body: bytes | None
    ) -> bytes:
        if not path.isascii():
            path = quote(path, safe="/:?#[]@!$&'()*+,;=%~")
        target = self._prefix + path.encode("ascii")
        verb = method.encode("ascii")
        if _TARGET.fullmatch(target) is None or TOKEN.fullmatch(verb) is None:
            raise ValueError(f"cannot send {method} {path[:80]!r}")
        parts = [verb, b" ", target, b" HTTP/1.1\r\n", self._fixed]
        for key, value in headers:
            _check_field(key, value)
            lowered = key.lower()
            if lowered in _RESERVED:
                raise ValueError(f"the {key!r} header is the connection pool's to write")
            if self._basic_auth and lowered == b"authorization":
                continue
            parts += [key, b": ", value, b"\r\n"]
        if body is not None:
            parts.append(b"Content-Length: %d\r\n\r\n" % len(body))
            if len(body) <= _JOIN_LIMIT:
                parts.append(body)
        else:
            parts.append(b"Content-Length: 0\r\n\r\n" if method in _BODY_METHODS else b"\r\n")
        return b"".join(parts)

    async def _acquire(self) -> None:
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            with trio.move_on_after(self._connect_timeout_s):
                await self._slots.acquire()
                return
            raise UpstreamUnavailable(f"no free connection to {self.name}") from None

    def _take_idle(self) -> _Connection | None:
        idle = self._idle
        oldest = trio.current_time() - self._keepalive_expiry_s
        while idle:
            conn = idle.pop()
            if conn.idle_since > oldest and not conn.closed_while_idle():
                return conn
            conn.close()
        return None

    async def _connect(self) -> _Connection:
        with trio.move_on_after(self._connect_timeout_s):
            try:
                tcp = await trio.open_tcp_stream(self._host, self._port)
            except OSError as exc:
                raise UpstreamUnavailable(f"{self.name} is unreachable: {_reason(exc)}") from None
            if self._ssl_context is None:
                # The socket leaves trio's stream (which is not used again) for direct use.
                raw = socket.socket(fileno=tcp.socket.detach())
                raw.setblocking(False)
                return _Connection(None, raw, raw=raw)
            stream = trio.SSLStream(
                tcp, self._ssl_context, server_hostname=self._host, https_compatible=True
            )
            try:
                await stream.do_handshake()
            except _STREAM_ERRORS as exc:
                tcp.socket.close()
                raise UpstreamUnavailable(f"{self.name} is unreachable: {_reason(exc)}") from None
            except BaseException:
                tcp.socket.close()
                raise
            return _Connection(stream, tcp.socket)
        raise UpstreamUnavailable(f"{self.name} did not accept a connection in time")

    def _release(self, conn: _Connection, reusable: bool) -> None:
        self._busy.discard(conn)
        if not reusable or self._closed or conn.expired:
            conn.close()
            return
        now = conn.idle_since = trio.current_time()
        self._idle.append(conn)
        self._check_by(now + self._keepalive_expiry_s)

    async def aclose(self) -> None:
        """Close the idle connections now, busy ones when their answer is done."""
        self._closed = True
        while self._idle:
            self._idle.pop().close()
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> ConnectionPool:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()


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
        # A large body is sent on its own, after the head.
        self._body = body if body is not None and len(body) > _JOIN_LIMIT else None
        self._conn: _Connection | None = None
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
        await pool._acquire()
        self._slot = True
        try:
            conn = pool._take_idle()
            if conn is not None:
                try:
                    await self._exchange(conn, deadline, reused=True)
                    return self
                except _Stale:
                    self._conn = None
                    self._parser = ResponseParser(head_only=self._method == "HEAD")
                    pool._release(conn, reusable=False)
            await self._exchange(await pool._connect(), deadline, reused=False)
            return self
        except BaseException:
            self._finish()
            raise

    async def _exchange(self, conn: _Connection, deadline: float, *, reused: bool) -> None:
        pool = self._pool
        parser = self._parser
        self._conn = conn
        pool._busy.add(conn)
        pool._watch(conn, deadline)
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
        except _STREAM_ERRORS as exc:
            if conn.expired:
                raise UpstreamTimeout(
                    f"{pool.name} sent no answer within {self._first_byte_timeout_s:g} s"
                ) from None
            if reused and not received and (replayable or not written):
                raise _Stale from None
            raise UpstreamProtocol(f"{pool.name} dropped the connection: {_reason(exc)}") from None
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
        pool._watch(conn, trio.current_time() + pool._idle_timeout_s)
        try:
            data = await conn.receive_some()
        except _STREAM_ERRORS as exc:
            self._reusable = False
            if conn.expired:
                raise UpstreamTimeout(
                    f"{pool.name} sent nothing for too long ({pool._idle_timeout_s:g} s)"
                ) from None
            raise UpstreamProtocol(f"{pool.name} dropped the connection: {_reason(exc)}") from None
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
            self._pool._release(conn, reusable and self._reusable)
        if self._slot:
            self._slot = False
            self._pool._slots.release()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._finish()


def _check_field(name: bytes, value: bytes) -> None:
    if TOKEN.fullmatch(name) is None or not valid_value(value):
        raise BadRequest(f"the header {bytes(name[:40])!r} cannot be sent upstream as it is")


def _reason(exc: BaseException) -> str:
    """What went wrong in a few words: the first attempt's error when trio tried several."""
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        return _reason(cause.exceptions[0])
    if not str(exc) and cause is not None:  # trio's stream errors wrap the ssl/OS error
        return _reason(cause)
    return str(exc) or type(exc).__name__
