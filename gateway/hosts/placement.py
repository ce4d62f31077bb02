"""Placement: which GPU hosts a generation may queue on, and in what order (ADR 0020).

Pure on purpose, like `gateway.schedule`: the hosts layer (`gateway.hosts.set`) feeds it one
`HostView` per host and queues the request on every host it returns, in that order; the
first host whose gate grants runs it (late binding).

The rules, for one model:

1. Only healthy hosts that have the model installed are candidates; unhealthy hosts that
   have it are named (so the route can answer 503 naming them when nothing else has it).
2. Hosts where the model is resident come first, soonest expected start first.
3. A host that would have to load the model (a swap) comes after them, by its expected
   start plus the swap, and only if that is sooner than the best resident host's
   expected start: a model whose requests can stay where it is loaded stays there, so
   models are not swapped back and forth between hosts (no ping-pong).
4. With no resident host, every healthy host that has the model is a candidate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gateway.schedule import MIN_SWAP_S

__all__ = ["MIN_SWAP_S", "HostView", "Placement", "pick_embedder", "place"]


@dataclass(frozen=True, slots=True)
class HostView:
    """One host as placement sees it, for the model being placed."""

    name: str
    healthy: bool
    installed: bool  # the model is installed there (`/api/tags`)
    resident: bool  # the model is loaded there (`/api/ps`, or what the gate last ran)
    start_in_s: float  # estimated seconds until its gate would start one more request
    swap_s: float = 0.0  # estimated seconds to load the model there (0: not measured)


@dataclass(frozen=True, slots=True)
class Placement:
    hosts: tuple[str, ...]  # candidates, best first
    degraded: tuple[str, ...]  # unhealthy hosts that have the model


def place(views: Sequence[HostView], *, min_swap_s: float = MIN_SWAP_S) -> Placement:
    """The hosts to queue the request on, best first (see the module's rules)."""
    degraded = tuple(v.name for v in views if v.installed and not v.healthy)
    ready = [(i, v) for i, v in enumerate(views) if v.installed and v.healthy]
    warm = sorted((v.start_in_s, i, v.name) for i, v in ready if v.resident)
    cold = sorted(
        (v.start_in_s + max(v.swap_s, min_swap_s), i, v.name) for i, v in ready if not v.resident
    )
    if warm:
        best = warm[0][0]
        cold = [c for c in cold if c[0] < best]
    return Placement(tuple(name for *_, name in warm + cold), degraded)


def pick_embedder(views: Sequence[HostView]) -> str | None:
    """The host for an embedding (ungated): one where the model is resident, else one
    that has it installed; among equals the least busy. None: no healthy host has it."""
    ready = [(not v.resident, v.start_in_s, i, v.name) for i, v in enumerate(views)]
    ready = [r for r, v in zip(ready, views, strict=True) if v.installed and v.healthy]
    return min(ready)[-1] if ready else None
