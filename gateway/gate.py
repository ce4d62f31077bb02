"""The chat gate: at most `capacity` generations on the GPU host at once, first come first served.

It is a Trio memory channel with a buffer of `capacity`: acquiring sends a token (blocking
while the buffer is full), releasing receives one. Trio queues blocked senders in FIFO
order with no barging, removes a sender whose wait is cancelled (a client that left), and
lets any task release (a channel, unlike `trio.Lock`, has no owner). The queue is bounded
by `max_queue`: `check_admission` refuses before a response starts, so the refusal can
still be a clean 503.

This module imports nothing of the gateway but its errors, on purpose.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from gateway.errors import GateFull, GateTimeout, ShuttingDown


@dataclass(frozen=True, slots=True)
class Holder:
    ticket: int
    label: str
    since: float


@dataclass(frozen=True, slots=True)
class GateFigures:
    capacity: int
    busy: int
    queued: int
    max_queue: int
    holders: tuple[Holder, ...]
    granted_total: int


class ChatGate:
    def __init__(self, capacity: int = 1, *, max_queue: int = 64, max_wait_s: float = 0.0) -> None:
        if capacity < 1:
            raise ValueError("gate capacity must be at least 1")
        self.capacity = capacity
        self.max_queue = max_queue
        self.max_wait_s = max_wait_s
        self._send, self._receive = trio.open_memory_channel[None](capacity)
        self._holders: dict[int, Holder] = {}
        self._waiting: dict[int, trio.CancelScope] = {}
        self._tickets = itertools.count(1)
        self._granted_total = 0
        self._refusal = ""

    @property
    def queued(self) -> int:
        return self._send.statistics().tasks_waiting_send

    @property
    def busy(self) -> int:
        return self._send.statistics().current_buffer_used

    def check_admission(self) -> None:
        """Refuse now if a new waiter would overflow the queue (call before responding)."""
        if self._refusal:
            raise ShuttingDown(self._refusal, retry_after_s=5)
        if self.busy >= self.capacity and self.queued >= self.max_queue:
            raise GateFull(
                f"server busy, {self.queued} requests are already waiting for the model;"
                " retry later",
                retry_after_s=max(1, self.queued // max(self.capacity, 1)),
            )

    def refuse_waiters(self, reason: str) -> None:
        """From now on refuse everyone who waits or comes (shutdown); holders keep the gate."""
        self._refusal = reason
        for scope in self._waiting.values():
            scope.cancel()

    @asynccontextmanager
    async def hold(self, label: str = "") -> AsyncIterator[float]:
        """Wait for a slot, hold it for the body of the `async with`, yield the wait in seconds.

        Admission is checked again here because other clients may have queued between
        the caller's check and now; a waiter beyond `max_queue` would break the bound.
        """
        self.check_admission()
        started = trio.current_time()
        ticket = next(self._tickets)
        waiting = trio.CancelScope()
        if self.max_wait_s > 0:
            waiting.deadline = started + self.max_wait_s
        try:
            # A free slot is taken without a trip through the scheduler. It is free only
            # when nobody queues: trio hands a freed slot to the first waiter at once.
            self._send.send_nowait(None)
        except trio.WouldBlock:
            self._waiting[ticket] = waiting
            try:
                with waiting:
                    await self._send.send(None)
            finally:
                del self._waiting[ticket]
        if waiting.cancelled_caught:
            if self._refusal:
                raise ShuttingDown(self._refusal, retry_after_s=5)
            raise GateTimeout(
                f"server busy, waited {self.max_wait_s:g} s for the model; retry later",
                retry_after_s=max(1, int(self.max_wait_s)),
            )
        now = trio.current_time()
        self._holders[ticket] = Holder(ticket, label, now)
        self._granted_total += 1
        try:
            yield now - started
        finally:
            del self._holders[ticket]
            self._receive.receive_nowait()

    def figures(self) -> GateFigures:
        return GateFigures(
            capacity=self.capacity,
            busy=self.busy,
            queued=self.queued,
            max_queue=self.max_queue,
            holders=tuple(self._holders.values()),
            granted_total=self._granted_total,
        )
