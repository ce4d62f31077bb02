"""The chat gate: at most `capacity` generations on the GPU host at once, granted by the
scheduling policy (`gateway.schedule`, ADR 0017) each time a slot frees.

A request that finds a slot free and nobody queued takes it without a checkpoint. Otherwise
it queues with its client, priority, weight, model and a deadline (what arrival order
would have given it plus `max_overtake_s`), and waits on an event of its own; on each
release the gate asks the policy for the next waiter and grants it. A waiter whose wait is
cancelled (a client that left, `max_wait_s`, shutdown) is simply removed. The queue is
bounded by `max_queue`: `check_admission` refuses before a response starts, so the refusal
can still be a clean 503, with a `Retry-After` from the measured service rate.

The gate learns what it needs as it goes: GPU-seconds per client (fair share), generation
and load times per model (estimates), and the model it last ran (affinity), which is
fresher than the inventory's `/api/ps` until the next poll.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace

import trio

from gateway import schedule
from gateway.config import ClientConfig, GateConfig
from gateway.errors import GateFull, GateTimeout, ShuttingDown
from gateway.grants import Ask, GateFigures, Grant, Holder, Queued, noted
from gateway.record import RequestRecord
from gateway.schedule import Estimates, Settings, Slot, Usage, Waiter
from gateway.target.wire import canonical_model

# Ollama's `/api/ps` as of a time on the trio clock (-inf: never polled).
Loaded = Callable[[], tuple[frozenset[str], float]]
_RETRY_AFTER_MAX_S = 300

# What a grant is, as the holders and `/health` see it (re-exported: `gateway.grants`).
__all__ = [
    "Ask",
    "ChatGate",
    "Claim",
    "GateFigures",
    "Grant",
    "Holder",
    "Queued",
    "gate_settings",
    "noted",
]


@dataclass(slots=True, eq=False)
class _Entry:
    waiter: Waiter
    ask: Ask
    event: trio.Event = field(default_factory=trio.Event)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    granted: bool = False
    number: int = 0
    ahead: int = 0
    claim: Claim | None = None  # queued at several gates at once (hosts layer)
    recheck_at: float = math.inf  # left for another host until then (at the latest)


class Claim:
    """One request queued at several gates at once (several GPU hosts, ADR 0020).

    The first gate to grant it wins, and in the same step, before any checkpoint, takes it
    out of every other gate's queue (`_won`): trio runs one task at a time, so no other
    gate can run its dispatch in between, and a second grant is impossible by
    construction. The waiting task sleeps on `wake`, which a grant sets, and so does
    `nudge` (the hosts changed: the waiter places itself again).
    """

    def __init__(self, ask: Ask) -> None:
        self.ask = ask
        self.started = trio.current_time()
        self.scope = trio.CancelScope()
        self.wake = trio.Event()
        self.entries: dict[ChatGate, _Entry] = {}
        self.winner: ChatGate | None = None
        self.moved = False  # the hosts changed: place again before waiting on
        self.until = math.inf  # its task sleeps until then at the latest (-inf: awake)

    def recheck_at(self, now: float) -> float:
        """When a gate that left this claim for another host must look at it again (its
        overtake deadline, the affinity quantum of the model it would evict)."""
        return min(
            (e.recheck_at for e in self.entries.values() if e.recheck_at > now), default=math.inf
        )

    def poke(self) -> None:
        """Residency changed somewhere: the gates that left this claim look again."""
        self.wake.set()

    @property
    def gates(self) -> tuple[ChatGate, ...]:
        return tuple(self.entries)

    def join(self, gate: ChatGate) -> None:
        """Queue at `gate` too (refused with `GateFull`/`ShuttingDown` like `hold`)."""
        if self.winner is None and gate not in self.entries:
            gate.check_admission()
            self.entries[gate] = gate._enqueue(self.ask, self.started, claim=self)
            # A gate with a slot free (a host that just came up or was idle) grants now.
            gate._dispatch(trio.current_time())

    def leave(self, gate: ChatGate) -> None:
        entry = self.entries.pop(gate, None)
        if entry is not None:
            gate._queue.pop(entry.waiter.ticket, None)

    def nudge(self) -> None:
        self.moved = True
        self.wake.set()

    def _won(self, gate: ChatGate) -> None:
        self.winner = gate
        for other, entry in self.entries.items():
            if other is not gate:
                other._queue.pop(entry.waiter.ticket, None)
        self.wake.set()


def _no_ps() -> tuple[frozenset[str], float]:
    return frozenset(), -math.inf


def gate_settings(config: GateConfig) -> Settings:
    return Settings(
        order=config.order,
        quantum_s=config.affinity_quantum_s,
        max_overtake_s=config.max_overtake_s,
        window_s=config.fair_window_s,
    )


class ChatGate:
    def __init__(
        self,
        capacity: int = 1,
        *,
        max_queue: int = 64,
        max_wait_s: float = 0.0,
        settings: Settings | None = None,
        clients: Callable[[str], ClientConfig] | None = None,
        loaded: Loaded = _no_ps,
    ) -> None:
        if capacity < 1:
            raise ValueError("gate capacity must be at least 1")
        self.capacity = capacity
        self.max_queue = max_queue
        self.max_wait_s = max_wait_s
        self.settings = settings or Settings()
        self._clients = clients
        self._loaded = loaded
        self.estimates = Estimates()
        self._usage = Usage(self.settings.window_s)
        self._holders: dict[int, Holder] = {}
        self._queue: dict[int, _Entry] = {}
        self._tickets = itertools.count(1)
        self._granted_total = 0
        self._refusal = ""
        self._last_model: str | None = None
        self._last_grant_at = -math.inf
        self._last_release_at = -math.inf
        # The other hosts' gates (set by the hosts layer), and what to call when this gate
        # loads another model, so that waiters left for another host are looked at again.
        self.peers: Callable[[], Sequence[ChatGate]] = tuple
        self.on_switch: Callable[[], None] | None = None
        self._run_s = 0.0  # GPU-seconds of finished holds since the last model load
        self.switches = 0  # grants of a model that was not resident (Ollama loads it)
        self.overdue_grants = 0  # grants the overtake bound decided

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def busy(self) -> int:
        return len(self._holders)

    @property
    def granted_total(self) -> int:
        return self._granted_total

    def queued_by_priority(self) -> dict[str, int]:
        counts = dict.fromkeys(schedule.PRIORITY_NAMES, 0)
        for entry in self._queue.values():
            counts[entry.ask.priority] = counts.get(entry.ask.priority, 0) + 1
        return counts

    # ------------------------------------------------------------------ admission

    def check_admission(self) -> None:
        """Refuse now if a new waiter would overflow the queue (call before responding)."""
        if self._refusal:
            raise ShuttingDown(self._refusal, retry_after_s=5)
        if self.busy >= self.capacity and self.queued >= self.max_queue:
            raise GateFull(
                f"server busy, {self.queued} requests are already waiting for the model;"
                " retry later",
                retry_after_s=self.retry_after_s(),
            )

    def retry_after_s(self) -> int:
        """Seconds until a place in the queue is expected to free: the next grant, from
        the measured generation and load times (at least 1)."""
        # With every slot taken, the next grant comes when the first holder is expected
        # to finish (the policy run forward, `plan`, starts its first waiter there too).
        slots = self._slots(trio.current_time())
        first = min((s.left_s for s in slots), default=0.0)
        return max(1, min(_RETRY_AFTER_MAX_S, math.ceil(first)))

    def refuse_waiters(self, reason: str) -> None:
        """From now on refuse everyone who waits or comes (shutdown); holders keep the gate."""
        self._refusal = reason
        for entry in self._queue.values():
            entry.scope.cancel()

    # ------------------------------------------------------------------ holding

    def ask_for(self, record: RequestRecord, model: str) -> Ask:
        """The request's identity and client settings, as the scheduler sees them."""
        who = record.who
        client = self._clients(who) if self._clients is not None else ClientConfig()
        return Ask(who, canonical_model(model), client.priority, client.weight)

    @asynccontextmanager
    async def serve(self, record: RequestRecord, model: str) -> AsyncIterator[Grant]:
        """Hold the gate for one generation and note it in the request's record: the wait,
        how many were ahead, the GPU time held, and the load time Ollama reported."""
        async with self.hold(self.ask_for(record, model)) as grant, noted(record, grant):
            self.attach(grant, record)
            yield grant

    def attach(self, grant: Grant, record: RequestRecord) -> None:
        """Name the request holding `grant`'s slot, for the status page's live figures."""
        holder = self._holders.get(grant.ticket)
        if holder is not None:
            self._holders[grant.ticket] = replace(holder, record=record)

    @asynccontextmanager
    async def hold(self, ask: Ask | None = None) -> AsyncIterator[Grant]:
        """Wait for a slot, hold it for the body of the `async with`, yield the `Grant`.

        Admission is checked again here because other clients may have queued between
        the caller's check and now; a waiter beyond `max_queue` would break the bound.
        """
        ask = ask or Ask()
        self.check_admission()
        started = trio.current_time()
        ticket = next(self._tickets)
        if self.busy < self.capacity and not self._queue:
            # A free slot is taken without a trip through the scheduler: nobody queues.
            grant = Grant(ticket, self._take(ticket, ask, started), 0.0, 0, started)
        else:
            grant = await self._wait(ticket, ask, started)
        try:
            yield grant
        finally:
            self._release(ticket, grant.load_s, measured=grant.measured)

    def start_in_s(self, model: str) -> float:
        """Estimated seconds until one more request for `model` would start here in arrival
        order, behind the holders and everyone queued (its own load not counted); `inf`
        while no slot is free and no generation has been measured here yet: a busy host
        of unknown speed is not assumed to be about to free up (ADR 0020)."""
        now = trio.current_time()
        if self.busy >= self.capacity and not self.estimates.service:
            return math.inf
        return schedule.arrival_start(
            self._slots(now),
            [e.ask.model for e in sorted(self._queue.values(), key=lambda e: e.waiter.ticket)],
            canonical_model(model),
            capacity=self.capacity,
            last_model=self._last_model,
            estimates=self.estimates,
        )

    def is_resident(self, model: str) -> bool:
        return self._is_resident(canonical_model(model))

    def _enqueue(
        self, ask: Ask, started: float, *, ticket: int | None = None, claim: Claim | None = None
    ) -> _Entry:
        ticket = next(self._tickets) if ticket is None else ticket
        ahead = len(self._queue)
        fifo_in_s = schedule.arrival_start(
            self._slots(started),
            [e.ask.model for e in sorted(self._queue.values(), key=lambda e: e.waiter.ticket)],
            ask.model,
            capacity=self.capacity,
            last_model=self._last_model,
            estimates=self.estimates,
        )
        deadline = started + fifo_in_s + self.settings.max_overtake_s
        rank = schedule.RANKS.get(ask.priority, schedule.RANKS["normal"])
        waiter = Waiter(ticket, ask.client, rank, ask.weight, ask.model, started, deadline)
        entry = _Entry(waiter, ask, ahead=ahead, claim=claim)
        if claim is not None:
            entry.scope = claim.scope
        self._queue[ticket] = entry
        return entry

    async def _wait(self, ticket: int, ask: Ask, started: float) -> Grant:
        entry = self._enqueue(ask, started, ticket=ticket)
        ahead, deadline = entry.ahead, entry.waiter.deadline
        if self.max_wait_s > 0:
            entry.scope.deadline = started + self.max_wait_s
        try:
            with entry.scope:
                await entry.event.wait()
        except BaseException:
            # Cancelled (deadline, client gone) in the same tick as it was granted: the
            # grant is never used, the slot goes to the next waiter at once.
            if entry.granted:
                self._release(ticket, None)
            raise
        finally:
            self._queue.pop(ticket, None)
        if not entry.granted:
            if self._refusal:
                raise ShuttingDown(self._refusal, retry_after_s=5)
            raise GateTimeout(
                f"server busy, waited {self.max_wait_s:g} s for the model; retry later",
                retry_after_s=max(1, int(self.max_wait_s)),
            )
        return Grant(ticket, entry.number, trio.current_time() - started, ahead, deadline)

    def _take(self, ticket: int, ask: Ask, now: float) -> int:
        loads = not self._is_resident(ask.model)
        if loads:
            self._run_s = 0.0  # this grant loads another model: a new run begins
            self.switches += 1
        self._holders[ticket] = Holder(ticket, ask, now, loads)
        self._granted_total += 1
        self._last_model = ask.model
        self._last_grant_at = now
        if loads and self.on_switch is not None:
            self.on_switch()
        return self._granted_total

    def _release(self, ticket: int, load_s: float | None, *, measured: bool = False) -> None:
        holder = self._holders.pop(ticket)
        now = trio.current_time()
        held = now - holder.since
        self._usage.add(holder.ask.client, held, now)
        self._run_s += held
        if holder.ask.model == self._last_model:
            self._last_release_at = now
        if measured and holder.ask.model:
            self.estimates.note(holder.ask.model, held, load_s)
        self._dispatch(now)

    def _dispatch(self, now: float) -> None:
        left: set[int] = set()  # waiters left for another host this time (ADR 0020)
        while self.busy < self.capacity and len(self._queue) > len(left):
            waiter = schedule.pick(
                [e.waiter for t, e in self._queue.items() if t not in left],
                self._view(now),
                self.settings,
            )
            entry = self._queue[waiter.ticket]
            if entry.claim is not None:
                others = [g for g in entry.claim.entries if g is not self]
                recheck = self._leave_for(entry.ask.model, waiter, others, now)
                entry.recheck_at = math.inf if recheck is None else recheck
                if recheck is not None:
                    left.add(waiter.ticket)
                    if recheck < entry.claim.until:
                        entry.claim.poke()  # its task sleeps longer: it must wake by then
                    continue
            if self.settings.order == "fair" and waiter.deadline <= now:
                self.overdue_grants += 1
            del self._queue[waiter.ticket]
            entry.granted = True
            entry.number = self._take(waiter.ticket, entry.ask, now)
            if entry.claim is not None:
                entry.claim._won(self)  # out of every other gate's queue, in this same step
            else:
                entry.event.set()

    # ------------------------------------------------------------------ several hosts

    def _leave_for(
        self, model: str, waiter: Waiter, others: Sequence[ChatGate], now: float
    ) -> float | None:
        """Placement again at grant time (`schedule.defer_grant`, ADR 0020): None to grant
        `waiter` here now, else the time by which to look at it again (its overtake
        deadline, or when the model a load would evict leaves its affinity quantum); a
        change of residency elsewhere (`on_switch`) or a release here looks sooner."""
        if not others or self._is_resident(model):
            return None
        elsewhere = [
            schedule.Elsewhere(g._is_resident(model), g._model_start_in_s(model, waiter.arrived))
            for g in others
        ]
        in_use_until = self._in_use_until(model, now)
        here = schedule.Swap(0.0, self.estimates.load_s(model), in_use_until > now)
        if not schedule.defer_grant(here, elsewhere, overdue=waiter.deadline <= now):
            return None
        return min(waiter.deadline, in_use_until) if in_use_until > now else waiter.deadline

    def _in_use_until(self, model: str, now: float) -> float:
        """Until when a load of `model` here would evict a model still in use that no
        other host has loaded: inf while it has holders or waiters here, else the end of
        its affinity quantum after its last use; -inf when the load evicts nothing so."""
        until = -math.inf
        for other in self._resident() - {model}:
            if any(p is not self and p._is_resident(other) for p in self.peers()):
                continue
            if any(h.ask.model == other for h in self._holders.values()) or any(
                e.ask.model == other for e in self._queue.values()
            ):
                return math.inf
            if other == self._last_model:
                last = max(self._last_grant_at, self._last_release_at)
                until = max(until, last + self.settings.quantum_s)
        return until

    def _model_start_in_s(self, model: str, arrived: float) -> float:
        """Seconds until this gate would start a request for `model` that arrived at
        `arrived`: a slot free, then the requests for it queued here ahead of it, on
        measured times (the affinity rule keeps a loaded model's queue together)."""
        slots = sorted(s.left_s for s in self._slots(trio.current_time()))
        if len(slots) >= self.capacity and not self.estimates.service:
            return math.inf  # busy, and no generation measured here yet: unknown
        free = 0.0 if len(slots) < self.capacity else slots[0]
        ahead = sum(
            1 for e in self._queue.values() if e.ask.model == model and e.waiter.arrived < arrived
        )
        return free + ahead * self.estimates.service_s(model) / self.capacity

    # ------------------------------------------------------------------ what it knows

    def _is_resident(self, model: str) -> bool:
        """`model in self._resident()`, without building the set (on every grant)."""
        if any(h.ask.model == model for h in self._holders.values()):
            return True
        models, polled_at = self._loaded()
        if self._last_model is not None and self._last_grant_at >= polled_at:
            return model == self._last_model
        return model in models

    def _resident(self) -> frozenset[str]:
        """The models on the GPU: what the gateway last ran when that is fresher than the
        last `/api/ps` poll (one chat model at a time), else what the poll saw."""
        running = frozenset(h.ask.model for h in self._holders.values())
        models, polled_at = self._loaded()
        if self._last_model is not None and self._last_grant_at >= polled_at:
            return running | {self._last_model}
        return running | models

    def _view(self, now: float) -> schedule.View:
        clients = {e.ask.client for e in self._queue.values()}
        clients.update(h.ask.client for h in self._holders.values())
        usage = self._usage.snapshot(now, clients)
        for h in self._holders.values():  # time held so far counts already
            usage[h.ask.client] += now - h.since
        run_s = self._run_s + sum(now - h.since for h in self._holders.values())
        return schedule.View(now, self._resident(), run_s, usage)

    def _slots(self, now: float) -> list[Slot]:
        return [
            Slot(h.ask.model, max(0.0, self._expected_s(h) - (now - h.since)))
            for h in self._holders.values()
        ]

    def _expected_s(self, holder: Holder) -> float:
        load = self.estimates.load_s(holder.ask.model) if holder.loads else 0.0
        return self.estimates.service_s(holder.ask.model) + load

    def figures(self) -> GateFigures:
        now = trio.current_time()
        entries = sorted(self._queue.values(), key=lambda e: e.waiter.ticket)
        starts = schedule.plan(
            [e.waiter for e in entries],
            self._view(now),
            self.settings,
            holders=self._slots(now),
            capacity=self.capacity,
            estimates=self.estimates,
        )
        return GateFigures(
            capacity=self.capacity,
            busy=self.busy,
            queued=self.queued,
            max_queue=self.max_queue,
            holders=tuple(self._holders.values()),
            waiters=tuple(
                Queued(e.ask, e.waiter.arrived, starts.get(e.waiter.ticket, 0.0)) for e in entries
            ),
            granted_total=self._granted_total,
            order=self.settings.order,
            resident=tuple(sorted(self._resident())),
        )
