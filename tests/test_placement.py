"""Placement (pure) and late binding over several gates: the first grant wins, the others
forget the request in the same step, so no request ever runs twice (ADR 0020)."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import GateTimeout, ShuttingDown
from gateway.gate import Ask, ChatGate, Claim
from gateway.hosts.bind import hold_first
from gateway.hosts.placement import MIN_SWAP_S, HostView, pick_embedder, place


def view(name: str, **kw: object) -> HostView:
    fields: dict[str, object] = {
        "healthy": True,
        "installed": True,
        "resident": False,
        "start_in_s": 0.0,
        "swap_s": 0.0,
    }
    fields.update(kw)
    return HostView(name, **fields)  # type: ignore[arg-type]


def test_resident_hosts_come_first_soonest_first() -> None:
    views = [
        view("a", resident=True, start_in_s=30.0),
        view("b", resident=True, start_in_s=10.0),
        view("c", start_in_s=0.0, swap_s=2.0),  # 0 + max(2, 5) = 5 < 10: worth a swap
    ]
    assert place(views).hosts == ("b", "a", "c")


def test_no_swap_when_a_resident_host_starts_it_sooner_than_the_swap() -> None:
    # The resident host is busy 4 s; a swap elsewhere costs 20 s: stay (no ping-pong).
    views = [view("idle", swap_s=20.0), view("warm", resident=True, start_in_s=4.0)]
    assert place(views).hosts == ("warm",)
    # An unmeasured swap still counts MIN_SWAP_S.
    views = [view("idle"), view("warm", resident=True, start_in_s=MIN_SWAP_S - 1)]
    assert place(views).hosts == ("warm",)
    views = [view("idle"), view("warm", resident=True, start_in_s=MIN_SWAP_S + 1)]
    assert place(views).hosts == ("warm", "idle")


def test_without_a_resident_host_every_host_with_the_model_by_expected_start() -> None:
    views = [
        view("busy", start_in_s=50.0),
        view("slow-load", swap_s=30.0),
        view("free"),
        view("lacks", installed=False),
    ]
    assert place(views).hosts == ("free", "slow-load", "busy")


def test_unhealthy_hosts_are_never_candidates_and_are_named() -> None:
    views = [
        view("down", healthy=False, resident=True),
        view("down-without", healthy=False, installed=False),
        view("up"),
    ]
    result = place(views)
    assert result.hosts == ("up",)
    assert result.degraded == ("down",)
    assert place([view("down", healthy=False)]).hosts == ()


def test_embeddings_go_where_the_model_is_resident_else_installed() -> None:
    views = [view("a", start_in_s=0.0), view("b", resident=True, start_in_s=3.0)]
    assert pick_embedder(views) == "b"
    assert pick_embedder([view("a", start_in_s=2.0), view("b", start_in_s=1.0)]) == "b"
    assert pick_embedder([view("a", installed=False), view("b", healthy=False)]) is None


async def test_a_claim_granted_by_one_gate_leaves_the_others_at_once() -> None:
    a, b = ChatGate(1), ChatGate(1)
    claims: set[Claim] = set()
    ran: list[str] = []
    release_a, release_b = trio.Event(), trio.Event()

    async def hold(gate: ChatGate, until: trio.Event) -> None:
        async with gate.hold(Ask("x", "m")):
            await until.wait()

    async def placed() -> None:
        async with hold_first(lambda: [a, b], Ask("y", "m"), watch=claims) as (gate, _):
            ran.append("a" if gate is a else "b")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold, a, release_a)
        nursery.start_soon(hold, b, release_b)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(placed)
        await trio.testing.wait_all_tasks_blocked()
        assert (a.queued, b.queued, len(claims)) == (1, 1, 1)
        release_b.set()
        await trio.testing.wait_all_tasks_blocked()
        assert ran == ["b"]
        assert (a.queued, b.queued, len(claims)) == (0, 0, 0)
        release_a.set()
    assert a.figures().granted_total == 1
    assert b.figures().granted_total == 2


async def test_a_nudged_claim_moves_to_the_gates_placement_gives_now() -> None:
    a, b = ChatGate(1), ChatGate(1)
    claims: set[Claim] = set()
    candidates = [a]
    release_a, release_b = trio.Event(), trio.Event()
    ran: list[ChatGate] = []

    async def hold(gate: ChatGate, until: trio.Event) -> None:
        async with gate.hold(Ask("x", "m")):
            await until.wait()

    async def placed() -> None:
        async with hold_first(lambda: list(candidates), Ask("y", "m"), watch=claims) as bound:
            ran.append(bound[0])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold, a, release_a)
        nursery.start_soon(hold, b, release_b)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(placed)
        await trio.testing.wait_all_tasks_blocked()
        assert (a.queued, b.queued) == (1, 0)
        candidates[:] = [b]  # a went down
        for claim in claims:
            claim.nudge()
        await trio.testing.wait_all_tasks_blocked()
        assert (a.queued, b.queued) == (0, 1)
        release_a.set()  # a frees first, but the request has left it
        await trio.testing.wait_all_tasks_blocked()
        assert ran == []
        release_b.set()
    assert ran == [b]


async def test_a_claim_moved_to_an_idle_gate_is_granted_there_at_once() -> None:
    a, b = ChatGate(1), ChatGate(1)
    claims: set[Claim] = set()
    candidates = [a]
    release_a = trio.Event()
    ran: list[ChatGate] = []

    async def placed() -> None:
        async with hold_first(lambda: list(candidates), Ask("y", "m"), watch=claims) as bound:
            ran.append(bound[0])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_hold, a, release_a)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(placed)
        await trio.testing.wait_all_tasks_blocked()
        candidates[:] = [b]  # a went down; b is idle
        for claim in claims:
            claim.nudge()
        await trio.testing.wait_all_tasks_blocked()
        assert ran == [b]
        assert a.queued == 0
        release_a.set()


async def _hold(gate: ChatGate, until: trio.Event) -> None:
    async with gate.hold(Ask("x", "m")):
        await until.wait()


requests_strategy = st.lists(
    st.tuples(
        st.sets(st.integers(0, 2), min_size=1),  # the gates the request queues at
        st.integers(0, 5),  # arrival, in steps
        st.integers(1, 4),  # hold, in steps
        st.booleans(),  # leaves while waiting (a client that goes away)
    ),
    min_size=1,
    max_size=14,
)


@settings(max_examples=150, deadline=None)
@given(requests_strategy, st.lists(st.integers(1, 2), min_size=3, max_size=3))
def test_no_request_is_ever_granted_twice(
    requests: list[tuple[set[int], int, int, bool]], capacities: list[int]
) -> None:
    """Any mix of requests queued at any subsets of three gates, holding for any time,
    some leaving while they wait: each runs at most once (exactly once unless it left),
    no gate holds more than its capacity, and every queue ends empty."""

    async def main() -> None:
        gates = [ChatGate(c) for c in capacities]
        claims: set[Claim] = set()
        runs: dict[int, int] = {}
        left: set[int] = set()

        async def one(i: int, where: set[int], at: int, hold: int, leaves: bool) -> None:
            await trio.sleep(at)
            with trio.move_on_after(0.5 + hold if leaves else 1e9) as scope:
                chosen = [gates[g] for g in sorted(where)]
                async with hold_first(lambda: chosen, Ask(str(i), "m"), watch=claims) as bound:
                    gate = bound[0]
                    assert gate in chosen
                    runs[i] = runs.get(i, 0) + 1
                    for g in gates:
                        assert g.busy <= g.capacity
                    scope.deadline = float("inf")  # once running it runs to the end
                    await trio.sleep(hold)
            if scope.cancelled_caught:
                left.add(i)

        async with trio.open_nursery() as nursery:
            for i, (where, at, hold, leaves) in enumerate(requests):
                nursery.start_soon(one, i, where, at, hold, leaves)
        for i in range(len(requests)):
            assert runs.get(i, 0) == (0 if i in left else 1), (i, runs, left)
        assert all(g.queued == 0 and g.busy == 0 for g in gates)
        assert not claims
        assert sum(g.figures().granted_total for g in gates) == len(requests) - len(left)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


@settings(max_examples=150, deadline=None)
@given(
    requests_strategy,
    st.lists(st.tuples(st.integers(0, 8), st.integers(0, 2)), max_size=6),
)
def test_no_request_runs_twice_while_hosts_go_down_and_come_back(
    requests: list[tuple[set[int], int, int, bool]], toggles: list[tuple[int, int]]
) -> None:
    """As above, with gates leaving and re-entering placement at any time (a host going
    down, coming back) and every waiting claim nudged each time, as the hosts layer does:
    still each request runs at most once, exactly once unless it left."""

    async def main() -> None:
        gates = [ChatGate(1) for _ in range(3)]
        down: set[int] = set()
        claims: set[Claim] = set()
        runs: dict[int, int] = {}
        left: set[int] = set()
        placed: set[int] = set()

        async def one(i: int, where: set[int], at: int, hold: int, leaves: bool) -> None:
            await trio.sleep(at)

            def place() -> list[ChatGate]:
                return [gates[g] for g in sorted(where) if g not in down]

            if not place():
                return  # no candidate: the route answers 503 before queueing
            placed.add(i)
            with trio.move_on_after(0.5 + hold if leaves else 1e9) as scope:
                async with hold_first(place, Ask(str(i), "m"), watch=claims):
                    runs[i] = runs.get(i, 0) + 1
                    scope.deadline = float("inf")
                    await trio.sleep(hold)
            if scope.cancelled_caught:
                left.add(i)

        async def toggle(at: int, gate: int) -> None:
            await trio.sleep(at + 0.25)
            down.symmetric_difference_update({gate})
            for claim in list(claims):
                claim.nudge()

        async with trio.open_nursery() as nursery:
            for at, gate in toggles:
                nursery.start_soon(toggle, at, gate)
            for i, (where, at, hold, leaves) in enumerate(requests):
                nursery.start_soon(one, i, where, at, hold, leaves)
        assert runs == dict.fromkeys(placed - left, 1), (runs, placed, left)
        assert all(g.queued == 0 and g.busy == 0 for g in gates)
        assert not claims
        assert sum(g.granted_total for g in gates) == len(runs)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


async def test_a_claim_waits_at_most_max_wait_s_then_leaves_every_queue(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, b = ChatGate(1), ChatGate(1)
    claims: set[Claim] = set()
    release = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_hold, a, release)
        nursery.start_soon(_hold, b, release)
        await trio.testing.wait_all_tasks_blocked()
        started = trio.current_time()
        with pytest.raises(GateTimeout, match="waited 7 s"):
            async with hold_first(lambda: [a, b], Ask("y", "m"), watch=claims, max_wait_s=7):
                pytest.fail("granted")
        assert trio.current_time() - started == 7
        assert (a.queued, b.queued, len(claims)) == (0, 0, 0)
        release.set()


async def test_shutdown_refuses_a_claim_waiting_at_several_gates() -> None:
    a, b = ChatGate(1), ChatGate(1)
    claims: set[Claim] = set()
    release = trio.Event()
    refused: list[str] = []

    async def placed() -> None:
        with pytest.raises(ShuttingDown) as caught:
            async with hold_first(lambda: [a, b], Ask("y", "m"), watch=claims):
                pytest.fail("granted")
        refused.append(caught.value.message)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_hold, a, release)
        nursery.start_soon(_hold, b, release)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(placed)
        await trio.testing.wait_all_tasks_blocked()
        b.refuse_waiters("the gateway is shutting down")
        await trio.testing.wait_all_tasks_blocked()
        assert refused == ["the gateway is shutting down"]
        assert (a.queued, b.queued) == (0, 0)
        release.set()
