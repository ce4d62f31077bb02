"""A small HTTP/1.1 client pool to one origin, on trio streams: the Ollama target's transport.

It replaces httpx on the hottest path of the gateway (every passthrough request and every
streamed line), so it does little per request and less per chunk: connections are kept
alive and reused last-in first-out, a request is one `send_all`, a body chunk is one
`receive_some` (de-chunked, never re-split), and errors are raised once, already in the
gateway's tree (`gateway.errors`), with the texts `gateway.upstream.map_error` gives httpx's.

The pool owns the connections, the slots and the watchdog; one exchange on a connection
is a `gateway.h1.response.Response`, which uses the pool only through the small interface
under "For the exchange" below.

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
import math
import re
import socket
import ssl
from collections import deque
from collections.abc import Sequence
from types import TracebackType
from urllib.parse import quote, unquote, urlsplit

import trio

from gateway.errors import BadRequest, UpstreamUnavailable
from gateway.h1.connection import STREAM_ERRORS, Connection, reason
from gateway.h1.framing import TOKEN, valid_value
from gateway.h1.response import Response

_TARGET = re.compile(rb"/[^\x00-\x20\x7f]*")
# Framing is the pool's to write; a caller's copy could disagree with it.
_RESERVED = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Larger bodies are sent after the head rather than copied into one buffer with it.
JOIN_LIMIT = 256 * 1024
# What `Response.read` buffers at most, unless the pool says otherwise.
MAX_READ_BYTES = 64 * 1024 * 1024


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
        self.idle_timeout_s = idle_timeout_s
        self._keepalive_expiry_s = keepalive_expiry_s
        self._slots = trio.Semaphore(max_connections)
        self._idle: deque[Connection] = deque()  # most recently used on the right
        self._busy: set[Connection] = set()
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

    def watch(self, conn: Connection, deadline: float) -> None:
        """Have the watchdog end `conn`'s next read if it still waits at `deadline`."""
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
        # A large body is not in the head: the exchange sends it on its own, after it.
        tail = body if body is not None and len(body) > JOIN_LIMIT else None
        return Response(self, method, head, tail, first_byte_timeout_s)

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
            if len(body) <= JOIN_LIMIT:
                parts.append(body)
        else:
            parts.append(b"Content-Length: 0\r\n\r\n" if method in _BODY_METHODS else b"\r\n")
        return b"".join(parts)

    # For the exchange ----------------------------------------------------------------
    # A `Response` takes a slot, then an idle connection or a new one, lends it while it
    # talks on it, and puts both back; nothing else of the pool is its business.

    async def acquire_slot(self) -> None:
        """Wait (FIFO, up to `connect_timeout_s`) until fewer than `max_connections` are in use."""
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            with trio.move_on_after(self._connect_timeout_s):
                await self._slots.acquire()
                return
            raise UpstreamUnavailable(f"no free connection to {self.name}") from None

    def release_slot(self) -> None:
        self._slots.release()

    def take_idle(self) -> Connection | None:
        """The most recently used idle connection still fit for a request, if any."""
        idle = self._idle
        oldest = trio.current_time() - self._keepalive_expiry_s
        while idle:
            conn = idle.pop()
            if conn.idle_since > oldest and not conn.closed_while_idle():
                return conn
            conn.close()
        return None

    async def connect(self) -> Connection:
        """A new connection to the origin (TLS handshake done), within `connect_timeout_s`."""
        with trio.move_on_after(self._connect_timeout_s):
            try:
                tcp = await trio.open_tcp_stream(self._host, self._port)
            except OSError as exc:
                raise UpstreamUnavailable(f"{self.name} is unreachable: {reason(exc)}") from None
            if self._ssl_context is None:
                # The socket leaves trio's stream (which is not used again) for direct use.
                raw = socket.socket(fileno=tcp.socket.detach())
                raw.setblocking(False)
                return Connection(None, raw, raw=raw)
            stream = trio.SSLStream(
                tcp, self._ssl_context, server_hostname=self._host, https_compatible=True
            )
            try:
                await stream.do_handshake()
            except STREAM_ERRORS as exc:
                tcp.socket.close()
                raise UpstreamUnavailable(f"{self.name} is unreachable: {reason(exc)}") from None
            except BaseException:
                tcp.socket.close()
                raise
            return Connection(stream, tcp.socket)
        raise UpstreamUnavailable(f"{self.name} did not accept a connection in time")

    def lend(self, conn: Connection, deadline: float) -> None:
        """`conn` carries an exchange now; its first read must end by `deadline`."""
        self._busy.add(conn)
        self.watch(conn, deadline)

    def put_back(self, conn: Connection, reusable: bool) -> None:
        """The exchange on `conn` is over: keep it for the next one, or close it."""
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


def _check_field(name: bytes, value: bytes) -> None:
    if TOKEN.fullmatch(name) is None or not valid_value(value):
        raise BadRequest(f"the header {bytes(name[:40])!r} cannot be sent upstream as it is")
