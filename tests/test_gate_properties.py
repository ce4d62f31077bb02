"""Properties of the scheduling gate over random arrivals, models, priorities, weights,
hold times and departures, each run on trio's autojump clock (virtual time):

- the gate never holds more than `capacity`;
- nothing is lost or served twice: every request is granted exactly once, or left
  while waiting and was never granted;
- no request waits beyond its bound: once its deadline (arrival order's estimated start
  plus `max_overtake_s`) has passed, only requests due no later than it are granted
  before it, and it is granted within one hold time per such grant, plus one;
- `order = "arrival"` grants in arrival order.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.gate import Ask, ChatGate
from gateway.schedule import PRIORITY_NAMES, Settings

MAX_HOLD_S = 8.0


@dataclass(frozen=True)
class Request:
    at: float
    client: str
    priority: str
    weight: float
    model: str
    hold_s: float
    leave_after_s: float | None


requests = st.builds(
    Request,
    at=st.integers(0, 60).map(lambda n: n / 2),
    client=st.sampled_from(["alice", "bob", "carol", "nightly"]),
    priority=st.sampled_from(PRIORITY_NAMES),
    weight=st.sampled_from([0.5, 1.0, 3.0]),
    model=st.sampled_from(["x", "y", "z"]),
    hold_s=st.integers(1, int(MAX_HOLD_S * 2)).map(lambda n: n / 2),
    leave_after_s=st.none() | st.integers(1, 40).map(float),
)


@dataclass
class Outcome:
    request: Request
    ticket: int = 0
    number: int = 0  # the gate's n-th grant
    granted_at: float | None = None
    deadline: float = 0.0
    left: bool = False
    grants: int = 0


def simulate(
    plan: list[Request], capacity: int, policy: Settings
) -> tuple[list[Outcome], list[int], int]:
    """Run `plan` against a real gate; return outcomes, grant numbers, peak busy."""
    outcomes = [Outcome(r) for r in plan]
    order: list[int] = []
    peak = 0

    async def client(outcome: Outcome) -> None:
        nonlocal peak
        r = outcome.request
        await trio.sleep_until(r.at)
        with trio.CancelScope() as leave:
            if r.leave_after_s is not None:
                leave.deadline = r.at + r.leave_after_s
            async with gate.hold(Ask(r.client, r.model, r.priority, r.weight)) as grant:
                leave.deadline = float("inf")  # leaving only while waiting
                outcome.grants += 1
                outcome.ticket = grant.ticket
                outcome.number = grant.number
                outcome.granted_at = trio.current_time()
                outcome.deadline = grant.deadline
                order.append(grant.number)
                peak = max(peak, gate.busy)
                await trio.sleep(r.hold_s)
        outcome.left = leave.cancelled_caught

    async def main() -> None:
        with trio.fail_after(100_000):  # a lost waiter would wait forever
            async with trio.open_nursery() as nursery:
                for outcome in outcomes:
                    nursery.start_soon(client, outcome)

    gate = ChatGate(capacity, max_queue=1000, settings=policy)
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return outcomes, order, peak


policies = st.builds(
    Settings,
    order=st.just("fair"),
    quantum_s=st.sampled_from([0.0, 10.0, 30.0]),
    max_overtake_s=st.sampled_from([5.0, 20.0, 60.0]),
    window_s=st.sampled_from([10.0, 120.0]),
)


@settings(max_examples=150, deadline=None)
@given(
    plan=st.lists(requests, min_size=1, max_size=25),
    capacity=st.integers(1, 2),
    policy=policies,
)
def test_fair_gate_bounds_every_wait_and_loses_nothing(
    plan: list[Request], capacity: int, policy: Settings
) -> None:
    outcomes, order, peak = simulate(plan, capacity, policy)
    assert peak <= capacity
    for o in outcomes:
        assert o.grants == (0 if o.left else 1)
    assert len(order) == len(set(order))
    granted = [o for o in outcomes if o.granted_at is not None]
    for w in granted:
        assert w.granted_at is not None
        if w.granted_at <= w.deadline:
            continue
        # Granted after its deadline: everything granted since was due no later.
        since = [
            o
            for o in granted
            if o.granted_at is not None and o.granted_at > w.deadline and o.number < w.number
        ]
        assert all(o.deadline <= w.deadline for o in since), (w, since)
        assert w.granted_at - w.deadline <= MAX_HOLD_S * (len(since) + 1) + 1e-9


@settings(max_examples=60, deadline=None)
@given(plan=st.lists(requests, min_size=1, max_size=20), capacity=st.integers(1, 2))
def test_arrival_order_grants_first_come_first_served(plan: list[Request], capacity: int) -> None:
    outcomes, _, peak = simulate(plan, capacity, Settings(order="arrival"))
    assert peak <= capacity
    granted = sorted((o for o in outcomes if o.granted_at is not None), key=lambda o: o.number)
    assert [o.ticket for o in granted] == sorted(o.ticket for o in granted)
    for o in outcomes:
        assert o.grants == (0 if o.left else 1)
