"""The GPU scheduling policy: which waiting request gets the gate next (ADR 0017).

Pure on purpose: times are arguments, nothing here awaits, reads a clock or imports the
gateway, so the policy is tested alone and the gate (`gateway.gate`) only feeds it facts.

`pick` decides in this order:

1. **The overtake bound.** A waiter whose deadline (what arrival order would have given
   it, plus `max_overtake_s`) has passed goes next; among several, the earliest deadline.
   Nothing else can overtake it, which is what makes starvation impossible.
2. **Priority.** Only waiters of the best class present compete: interactive, then
   normal, then batch.
3. **Model affinity.** While the GPU-seconds served since the last model load are under
   `quantum_s`, waiters for a resident model go before the others: a swap costs seconds,
   so switching has to earn its cost.
4. **Fair share.** Among what is left, the client with the least GPU-seconds held over a
   decaying window (divided by its weight) goes first; its earliest request is served.

`order = "arrival"` skips all of it: first come, first served.

With several GPU hosts, `defer_grant` is placement decided again when a gate is about to
grant a waiter queued on other hosts too (ADR 0020): it may leave it for a host that has
its model loaded, never past its deadline, so the bound above holds per host.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

Order = Literal["fair", "arrival"]
RANKS: Mapping[str, int] = {"interactive": 0, "normal": 1, "batch": 2}
PRIORITY_NAMES = tuple(RANKS)

# A load_duration shorter than this is Ollama touching a model that was already loaded.
LOAD_NOISE_S = 0.25
_EWMA = 0.3  # weight of the newest observation in the service-time averages
# A swap never costs less than this in the estimates: a load not yet measured is not free.
MIN_SWAP_S = 5.0


@dataclass(frozen=True, slots=True)
class Settings:
    order: Order = "fair"
    # GPU-seconds served on the resident model(s) before another model may take over.
    quantum_s: float = 30.0
    # No request starts later than arrival order would have started it plus this.
    max_overtake_s: float = 120.0
    # Time constant of the decay of each client's GPU-seconds (the fair-share window).
    window_s: float = 120.0


@dataclass(frozen=True, slots=True)
class Waiter:
    """One queued request, as the policy sees it."""

    ticket: int  # increasing with arrival
    client: str
    rank: int  # RANKS value: lower goes first
    weight: float
    model: str
    arrived: float
    deadline: float  # arrival order's estimated start + max_overtake_s


@dataclass(frozen=True, slots=True)
class View:
    """What the gate knows when a slot frees."""

    now: float
    resident: frozenset[str] = frozenset()
    run_s: float = 0.0  # GPU-seconds served since the last model load
    usage: Mapping[str, float] = field(default_factory=dict)  # decayed GPU-seconds by client


def pick(waiters: Sequence[Waiter], view: View, settings: Settings) -> Waiter:
    """The waiter to grant next (`waiters` is not empty)."""
    if settings.order == "arrival":
        return min(waiters, key=_by_ticket)
    overdue = [w for w in waiters if w.deadline <= view.now]
    if overdue:
        return min(overdue, key=lambda w: (w.deadline, w.ticket))
    best = min(w.rank for w in waiters)
    candidates = [w for w in waiters if w.rank == best]
    if view.run_s < settings.quantum_s:
        warm = [w for w in candidates if w.model in view.resident]
        if warm:
            candidates = warm
    return fair_pick(candidates, view.usage)


def fair_pick(candidates: Sequence[Waiter], usage: Mapping[str, float]) -> Waiter:
    """The earliest request of the client with the least weighted GPU-seconds."""
    first: dict[str, Waiter] = {}
    for w in sorted(candidates, key=_by_ticket):
        first.setdefault(w.client, w)
    return min(first.values(), key=lambda w: (usage.get(w.client, 0.0) / w.weight, w.ticket))


def _by_ticket(w: Waiter) -> int:
    return w.ticket


class Usage:
    """Each client's GPU-seconds, decaying exponentially with time constant `window_s`."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._held: dict[str, tuple[float, float]] = {}  # client -> (seconds, as of)

    def of(self, client: str, now: float) -> float:
        seconds, at = self._held.get(client, (0.0, now))
        return seconds * math.exp(-max(0.0, now - at) / self.window_s)

    def add(self, client: str, seconds: float, now: float) -> None:
        self._held[client] = (self.of(client, now) + max(0.0, seconds), now)
        if len(self._held) > 256:  # forget clients whose usage has decayed to nothing
            self._held = {c: (s, at) for c, (s, at) in self._held.items() if self.of(c, now) > 1e-3}

    def snapshot(self, now: float, clients: Iterable[str]) -> dict[str, float]:
        return {c: self.of(c, now) for c in clients}


@dataclass(slots=True)
class Estimates:
    """Measured service rate: recent generation time and model load time, per model."""

    default_service_s: float = 0.0
    service: dict[str, float] = field(default_factory=dict)
    load: dict[str, float] = field(default_factory=dict)

    def note(self, model: str, held_s: float, load_s: float | None) -> None:
        loaded = load_s if load_s is not None and load_s >= LOAD_NOISE_S else 0.0
        if loaded:
            self.load[model] = _average(self.load.get(model), loaded)
        self.service[model] = _average(self.service.get(model), max(0.0, held_s - loaded))

    def service_s(self, model: str) -> float:
        if model in self.service:
            return self.service[model]
        if self.service:
            return sum(self.service.values()) / len(self.service)
        return self.default_service_s

    def load_s(self, model: str) -> float:
        if model in self.load:
            return self.load[model]
        return sum(self.load.values()) / len(self.load) if self.load else 0.0

    def cost_s(self, model: str, resident: frozenset[str]) -> float:
        """Expected gate time of one request: its generation, plus a load if not resident."""
        return self.service_s(model) + (0.0 if model in resident else self.load_s(model))


def _average(old: float | None, new: float) -> float:
    return new if old is None else old + _EWMA * (new - old)


@dataclass(frozen=True, slots=True)
class Slot:
    """A request holding the gate, for estimates: its model and its expected time left."""

    model: str
    left_s: float


def arrival_start(
    holders: Sequence[Slot],
    queued_models: Sequence[str],
    model: str,
    *,
    capacity: int,
    last_model: str | None,
    estimates: Estimates,
) -> float:
    """Seconds from now until a request for `model` would start in arrival order, behind
    the holders and everyone queued (in their order), counting a load at each change of
    model as Ollama would do it."""
    free = sorted([h.left_s for h in holders] + [0.0] * max(0, capacity - len(holders)))
    current = last_model
    for queued in queued_models:
        start = free.pop(0)
        cost = estimates.service_s(queued)
        if queued != current:
            cost += estimates.load_s(queued)
        current = queued
        free.append(start + cost)
        free.sort()
    return free[0]


def plan(
    waiters: Sequence[Waiter],
    view: View,
    settings: Settings,
    *,
    holders: Sequence[Slot],
    capacity: int,
    estimates: Estimates,
) -> dict[int, float]:
    """Estimated start of each waiter, in seconds from now: the policy run forward on the
    estimated service times (for /health and Retry-After; it decides nothing)."""
    free = sorted([h.left_s for h in holders] + [0.0] * max(0, capacity - len(holders)))
    queue = list(waiters)
    resident, run_s, usage = view.resident, view.run_s, dict(view.usage)
    starts: dict[int, float] = {}
    while queue:
        start = free.pop(0)
        at = replace(view, now=view.now + start, resident=resident, run_s=run_s, usage=usage)
        w = pick(queue, at, settings)
        queue.remove(w)
        starts[w.ticket] = start
        cost = estimates.cost_s(w.model, resident)
        if w.model not in resident:
            resident, run_s = frozenset({w.model}), 0.0
        run_s += cost
        usage[w.client] = usage.get(w.client, 0.0) + cost
        free.append(start + cost)
        free.sort()
    return starts


# ------------------------------------------------ several hosts: placement at grant time


@dataclass(frozen=True, slots=True)
class Elsewhere:
    """Another of the waiter's candidate hosts, at the moment this host would grant it."""

    resident: bool  # the waiter's model is loaded (or loading) there
    start_in_s: float  # seconds until it would start the waiter: a slot free there, plus
    # the requests for the model queued there ahead of it (one host's model queue)


@dataclass(frozen=True, slots=True)
class Swap:
    """This host granting a waiter whose model it does not have loaded."""

    start_in_s: float  # seconds until this host would start it (0: a slot is free now)
    swap_s: float  # estimated load time of the model here
    evicts_in_use: bool  # the load unloads a model loaded on no other host that still
    # has waiters here or ran within the affinity quantum


def defer_grant(
    here: Swap, elsewhere: Sequence[Elsewhere], *, overdue: bool, min_swap_s: float = MIN_SWAP_S
) -> bool:
    """Whether a host about to grant a waiter (by its scheduler's pick) whose model it does
    not have loaded leaves it for another candidate host instead (ADR 0020, at grant time).

    Placement at arrival is stale by the time a slot frees: the model may have been loaded
    on another host since. So, with the residency of this moment:

    - a waiter past its overtake deadline is granted anyway (ADR 0017's bound, per host);
    - if no other candidate host has the model loaded, this host loads it;
    - if the load would evict a model that no other host has and that is still in use
      here, the model loaded elsewhere is not worth two swaps: leave it there;
    - otherwise leave it while a host with the model loaded would start it sooner than
      this host could after the swap; so a model is loaded on a second host only when its
      queue on the first is longer than a swap.
    """
    if overdue:
        return False
    loaded = [e.start_in_s for e in elsewhere if e.resident]
    if not loaded:
        return False
    if here.evicts_in_use:
        return True
    return min(loaded) < here.start_in_s + max(here.swap_s, min_swap_s)
