"""Late binding: one request queued at the gates of several GPU hosts at once, run on the
first that grants it (ADR 0020).

The gates do the granting (`gateway.gate`); a `Claim` ties one request's queue entries
together, so that the first grant removes the others in the same step.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

import trio

from gateway.errors import GateFull, GateTimeout, ShuttingDown
from gateway.gate import Ask, ChatGate, Claim, Grant
from gateway.schedule import Waiter

Place = Callable[[], Sequence[ChatGate]]


@asynccontextmanager
async def hold_first(
    place: Place, ask: Ask, *, watch: set[Claim], max_wait_s: float = 0.0
) -> AsyncIterator[tuple[ChatGate, Grant]]:
    """Hold a slot of whichever gate among `place()` grants first (late binding, ADR 0020).

    A gate with a free slot and nobody queued is taken at once, in `place()`'s order.
    Otherwise the request queues at every gate of `place()` under one `Claim`, and runs on
    the first that grants it; the others forget it in that same step. While it waits the
    claim sits in `watch`, so that the hosts layer can `nudge` it when a host goes down or
    comes back: it then places itself again (joins new candidates, leaves the others).
    """
    gates = place()
    if not gates:
        raise ValueError("hold_first needs at least one gate")
    started = trio.current_time()
    for gate in gates:
        if gate._refusal or gate.busy >= gate.capacity or gate._queue:
            continue
        # Not there if another candidate has the model loaded and gets to it sooner, or the
        # load would evict a model still in use there (placement at grant time, ADR 0020).
        others = [g for g in gates if g is not gate]
        arrival = Waiter(0, ask.client, 0, ask.weight, ask.model, started, math.inf)
        if gate._leave_for(ask.model, arrival, others, started) is None:
            ticket = next(gate._tickets)
            winner, grant = gate, Grant(ticket, gate._take(ticket, ask, started), 0.0, 0, started)
            break
    else:
        winner, grant = await _wait_first(place, gates, ask, watch, max_wait_s)
    try:
        yield winner, grant
    finally:
        winner._release(grant.ticket, grant.load_s, measured=grant.measured)


async def _wait_first(
    place: Place, gates: Sequence[ChatGate], ask: Ask, watch: set[Claim], max_wait_s: float
) -> tuple[ChatGate, Grant]:
    claim = Claim(ask)
    _join(claim, gates)
    if max_wait_s > 0:
        claim.scope.deadline = claim.started + max_wait_s
    watch.add(claim)
    try:
        with claim.scope:
            while claim.winner is None:
                # A gate that left the claim for another host looks again by then at the
                # latest (its overtake deadline; the quantum of the model it would evict).
                claim.until = claim.recheck_at(trio.current_time())
                with trio.move_on_at(claim.until):
                    await claim.wake.wait()
                claim.until = -math.inf  # awake: it looks at its deadlines again below
                if claim.winner is None:
                    claim.wake = trio.Event()
                    if claim.moved:
                        claim.moved = False
                        _replace(claim, place())
                    _redispatch(claim)
    except BaseException:
        # Cancelled in the same tick as it was granted: the slot goes on at once.
        if claim.winner is not None:
            claim.winner._release(claim.entries[claim.winner].waiter.ticket, None)
        raise
    finally:
        watch.discard(claim)
        joined = claim.gates
        for gate in joined:
            if gate is not claim.winner:
                claim.leave(gate)
    if claim.winner is None:
        refusal = next((g._refusal for g in joined if g._refusal), "")
        if refusal:
            raise ShuttingDown(refusal, retry_after_s=5)
        raise GateTimeout(
            f"server busy, waited {max_wait_s:g} s for the model; retry later",
            retry_after_s=max(1, int(max_wait_s)),
        )
    entry = claim.entries[claim.winner]
    waited = trio.current_time() - claim.started
    return claim.winner, Grant(
        entry.waiter.ticket, entry.number, waited, entry.ahead, entry.waiter.deadline
    )


def _redispatch(claim: Claim) -> None:
    """Let each gate of a waiting claim grant again: residency changed or a deadline came."""
    now = trio.current_time()
    for gate in claim.gates:
        if claim.winner is not None:
            return
        gate._dispatch(now)


def _join(claim: Claim, gates: Sequence[ChatGate]) -> None:
    """Queue at each gate that admits it; if none does, its refusal is the answer."""
    refusals: list[GateFull | ShuttingDown] = []
    for gate in gates:
        try:
            claim.join(gate)
        except (GateFull, ShuttingDown) as exc:
            refusals.append(exc)
    if not claim.entries:
        raise refusals[0]


def _replace(claim: Claim, gates: Sequence[ChatGate]) -> None:
    """Move a waiting claim to the gates placement gives now. With no candidate at all
    (every host with the model down), it stays where it is, to run on recovery or fail
    there; it also stays where it is if no new candidate admits it."""
    for gate in gates:
        with contextlib.suppress(GateFull, ShuttingDown):
            claim.join(gate)
    if any(gate in claim.entries for gate in gates):
        for gate in claim.gates:
            if gate not in gates:
                claim.leave(gate)
