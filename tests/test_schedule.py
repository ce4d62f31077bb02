"""The scheduling policy alone: priority, fair share, affinity, the overtake bound,
arrival order, and the estimates it runs forward (no trio, no gate)."""

from __future__ import annotations

import math

import pytest

from gateway.schedule import (
    RANKS,
    Estimates,
    Settings,
    Slot,
    Usage,
    View,
    Waiter,
    arrival_start,
    pick,
    plan,
)

FAR = math.inf


def waiter(
    ticket: int,
    client: str = "a",
    *,
    priority: str = "normal",
    model: str = "m",
    weight: float = 1.0,
    deadline: float = FAR,
) -> Waiter:
    return Waiter(ticket, client, RANKS[priority], weight, model, float(ticket), deadline)


FAIR = Settings()


def test_arrival_order_is_first_come_first_served_whatever_else() -> None:
    waiters = [
        waiter(3, "b", priority="interactive"),
        waiter(2, "c", model="warm"),
        waiter(1, "a", priority="batch", model="cold"),
    ]
    view = View(10.0, frozenset({"warm"}), 0.0, {"a": 100.0})
    assert pick(waiters, view, Settings(order="arrival")).ticket == 1


def test_interactive_before_normal_before_batch() -> None:
    waiters = [waiter(1, "a", priority="batch"), waiter(2, "b"), waiter(3, "c", priority="batch")]
    assert pick(waiters, View(0.0), FAIR).ticket == 2
    waiters.append(waiter(4, "d", priority="interactive"))
    assert pick(waiters, View(0.0), FAIR).ticket == 4


def test_priority_beats_affinity() -> None:
    waiters = [waiter(1, "a", model="warm"), waiter(2, "b", model="cold", priority="interactive")]
    assert pick(waiters, View(0.0, frozenset({"warm"})), FAIR).ticket == 2


def test_fair_share_serves_the_client_with_least_gpu_seconds() -> None:
    # a queued five requests first; b's one still goes first because a has used the GPU.
    waiters = [waiter(n, "a") for n in range(1, 6)] + [waiter(6, "b")]
    assert pick(waiters, View(0.0, usage={"a": 20.0}), FAIR).ticket == 6
    # Without usage, ties go to the earliest request.
    assert pick(waiters, View(0.0), FAIR).ticket == 1


def test_weights_divide_usage() -> None:
    waiters = [waiter(1, "a", weight=3.0), waiter(2, "b", weight=1.0)]
    # a used twice as much as b but has three times the weight: a is behind its share.
    assert pick(waiters, View(0.0, usage={"a": 20.0, "b": 10.0}), FAIR).ticket == 1
    assert pick(waiters, View(0.0, usage={"a": 40.0, "b": 10.0}), FAIR).ticket == 2


def test_affinity_keeps_the_resident_model_for_a_quantum() -> None:
    waiters = [waiter(1, "a", model="cold"), waiter(2, "b", model="warm")]
    usage = {"a": 0.0, "b": 50.0}  # fair share alone would pick a
    within = View(0.0, frozenset({"warm"}), run_s=29.0, usage=usage)
    assert pick(waiters, within, FAIR).ticket == 2
    spent = View(0.0, frozenset({"warm"}), run_s=30.0, usage=usage)
    assert pick(waiters, spent, FAIR).ticket == 1
    assert pick(waiters, within, Settings(quantum_s=0.0)).ticket == 1


def test_an_overdue_waiter_goes_next_earliest_deadline_first() -> None:
    waiters = [
        waiter(1, "a", priority="batch", model="cold", deadline=9.0),
        waiter(2, "b", priority="batch", model="cold", deadline=8.0),
        waiter(3, "c", priority="interactive", model="warm"),
    ]
    view = View(10.0, frozenset({"warm"}), usage={"a": 99.0, "b": 99.0})
    assert pick(waiters, view, FAIR).ticket == 2
    assert pick(waiters, View(7.0, frozenset({"warm"})), FAIR).ticket == 3


def test_usage_decays_with_its_window() -> None:
    usage = Usage(window_s=60.0)
    usage.add("a", 30.0, now=0.0)
    assert usage.of("a", 0.0) == pytest.approx(30.0)
    assert usage.of("a", 60.0) == pytest.approx(30.0 / math.e)
    usage.add("a", 10.0, now=60.0)
    assert usage.of("a", 60.0) == pytest.approx(30.0 / math.e + 10.0)
    assert usage.of("nobody", 5.0) == 0.0


def test_estimates_split_load_from_generation() -> None:
    est = Estimates()
    assert est.service_s("x") == 0.0
    est.note("x", held_s=12.0, load_s=8.0)
    assert (est.service_s("x"), est.load_s("x")) == (pytest.approx(4.0), pytest.approx(8.0))
    est.note("x", held_s=4.1, load_s=0.01)  # load_duration noise: no load
    assert est.load_s("x") == pytest.approx(8.0)
    assert est.service_s("y") == est.service_s("x")  # unknown model: the mean of known ones
    assert est.cost_s("x", frozenset({"x"})) == est.service_s("x")
    assert est.cost_s("x", frozenset()) == pytest.approx(est.service_s("x") + 8.0)


def test_arrival_start_counts_a_load_at_each_change_of_model() -> None:
    est = Estimates(service={"x": 2.0, "y": 3.0}, load={"x": 10.0, "y": 10.0})
    start = arrival_start(
        [Slot("x", 1.0)], ["x", "y", "x"], "y", capacity=1, last_model="x", estimates=est
    )
    # holder 1 s, x 2 s, swap + y 13 s, swap + x 12 s
    assert start == pytest.approx(1 + 2 + 13 + 12)
    assert arrival_start([], [], "y", capacity=1, last_model="x", estimates=est) == 0.0


def test_plan_runs_the_policy_forward() -> None:
    est = Estimates(service={"x": 2.0, "y": 2.0}, load={"x": 10.0, "y": 10.0})
    waiters = [waiter(1, "a", model="y"), waiter(2, "b", model="x"), waiter(3, "c", model="x")]
    starts = plan(
        waiters,
        View(0.0, frozenset({"x"})),
        FAIR,
        holders=[Slot("x", 1.0)],
        capacity=1,
        estimates=est,
    )
    # affinity: both x requests first (1 s, 3 s), then the swap to y (5 s)
    assert starts == {2: pytest.approx(1.0), 3: pytest.approx(3.0), 1: pytest.approx(5.0)}
