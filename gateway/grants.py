"""What the chat gate hands out and reports (`gateway.gate`, ADR 0007, 0017): who asks
(`Ask`), a granted slot (`Grant`), its holder and the queued (`Holder`, `Queued`), the
gate's figures for `/health`, metrics and the status page, and `noted`, which writes a
held grant into the request's record. Plain values, so the hosts layer and the pages
read them without reaching into the gate."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from gateway.record import RequestRecord


@dataclass(frozen=True, slots=True)
class Ask:
    """Who asks for the GPU, for what model, with which client settings."""

    client: str = ""
    model: str = ""
    priority: str = "normal"
    weight: float = 1.0


@dataclass(slots=True)
class Grant:
    """A granted slot: how long it took and how many waited ahead on arrival. The holder
    may note the model load time Ollama reported (`load_duration`), for the estimates, or
    that the hold was no whole generation (then it is not measured)."""

    ticket: int
    number: int  # this was the gate's n-th grant: the order of grants
    waited_s: float
    ahead: int
    deadline: float
    load_s: float | None = None
    measured: bool = True  # a whole generation: its times feed the estimates


@dataclass(frozen=True, slots=True)
class Holder:
    ticket: int
    ask: Ask
    since: float
    loads: bool = False  # its model was not resident: Ollama loads it first
    # The request holding the slot, for the status page's live figures (tokens so far).
    record: RequestRecord | None = None


@dataclass(frozen=True, slots=True)
class Queued:
    ask: Ask
    arrived: float
    start_in_s: float  # estimated, from the policy run forward on measured times


@dataclass(frozen=True, slots=True)
class GateFigures:
    capacity: int
    busy: int
    queued: int
    max_queue: int
    holders: tuple[Holder, ...]
    waiters: tuple[Queued, ...]
    granted_total: int
    order: str
    resident: tuple[str, ...]


@asynccontextmanager
async def noted(record: RequestRecord, grant: Grant) -> AsyncIterator[Grant]:
    """Note a held grant in the request's record (wait, how many were ahead, GPU time),
    and in the grant what the hold says of the service rate."""
    record.gate_wait_s = grant.waited_s
    record.gate_ahead = grant.ahead
    granted = trio.current_time()
    try:
        yield grant
    except BaseException:
        grant.measured = False  # cut short (client gone, upstream failed)
        raise
    finally:
        record.gpu_s = trio.current_time() - granted
        grant.load_s = record.load_s
        if record.status not in (0, 200):
            grant.measured = False  # an error answer says nothing of the rate
