"""A client connection's byte stream, and the Date header: the I/O under `serve.py`.

A plain socket is used directly: a read or write the kernel can do at once costs one
system call and no trip through trio's scheduler; only waiting goes through trio (ADR
0014). Writes have a deadline (`write_timeout_s`), reads none: the connection's one
reader task (`serve.Connection`) owns the reads and their deadlines.
"""

from __future__ import annotations

import contextlib
import email.utils
import logging
import socket
import time

import trio

log = logging.getLogger("gateway.server")

RECEIVE_BYTES = 65536
# How long, and how much, a connection closed on a sending client reads and drops.
LINGER_S = 2.0
LINGER_BYTES = 64 * 1024 * 1024


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
