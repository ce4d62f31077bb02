"""One open upstream connection of the hot path's client pool, and the errors its I/O raises.

A plain TCP connection is driven on its socket directly: a read or write the kernel can do
at once is one system call and no trip through trio's scheduler; only waiting goes through
trio. A TLS connection goes through its `trio.SSLStream`.
"""

from __future__ import annotations

import contextlib
import math
import select
import socket

import trio

READ_BYTES = 65536
# Reads in a row that found data waiting before one lets other tasks run.
_STREAK = 16
# What reading or writing a connection raises when the peer or the watchdog ends it.
STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class Connection:
    """One open connection; `deadline` is that of the read it waits in (`inf` if none).

    `expired` is set by the pool's watchdog when it closed the socket under an overdue
    read, so that the failed read reports a timeout rather than a dropped connection.
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


def reason(exc: BaseException) -> str:
    """What went wrong in a few words: the first attempt's error when trio tried several."""
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        return reason(cause.exceptions[0])
    if not str(exc) and cause is not None:  # trio's stream errors wrap the ssl/OS error
        return reason(cause)
    return str(exc) or type(exc).__name__
