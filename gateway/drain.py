"""Graceful shutdown: track running requests, refuse new work, and end what outlives the grace.

Each request that does upstream work runs inside `Drain.track()`, which gives it a cancel
scope of its own. On shutdown, `drain()` refuses new work, runs the shedding callbacks
(the gate refuses its waiters, who answer 503), waits up to the grace period for running
work, then cancels it; each handler sees its own scope cancelled and ends its stream
with an error line, instead of being cut by the server.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import trio

from gateway.errors import ShuttingDown


@dataclass(slots=True)
class Activity:
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    @property
    def ended_by_shutdown(self) -> bool:
        return self.scope.cancelled_caught


class Drain:
    def __init__(self, *, on_drain: Sequence[Callable[[str], None]] = ()) -> None:
        self._on_drain = tuple(on_drain)
        self.draining = False
        self._active: dict[int, Activity] = {}
        self._ids = itertools.count()
        self._idle = trio.Event()
        self._idle.set()

    @property
    def active(self) -> int:
        return len(self._active)

    def refuse_if_draining(self) -> None:
        if self.draining:
            raise ShuttingDown("the gateway is shutting down; retry shortly", retry_after_s=5)

    @contextmanager
    def track(self) -> Iterator[Activity]:
        self.refuse_if_draining()
        key = next(self._ids)
        activity = self._active[key] = Activity()
        self._idle = self._idle if len(self._active) > 1 else trio.Event()
        try:
            yield activity
        finally:
            del self._active[key]
            if not self._active:
                self._idle.set()

    async def drain(self, grace_s: float) -> None:
        """Refuse new work, shed the queue, give running work `grace_s`, then end it."""
        self.draining = True
        for shed in self._on_drain:
            shed("the gateway is shutting down; retry shortly")
        with trio.move_on_after(grace_s):
            await self._idle.wait()
        for activity in list(self._active.values()):
            activity.scope.cancel()
        await self._idle.wait()
