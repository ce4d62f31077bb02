"""Placement again at grant time (ADR 0020): a gate about to grant a waiter queued on
several hosts leaves it for another host that has its model loaded and gets to it
sooner, or when the load would evict a model still in use here that no other host has;
never past the waiter's overtake deadline. The policy alone, then gates on the autojump
clock."""

from __future__ import annotations

import math
from functools import partial

import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.gate import Ask, ChatGate, Claim, Grant
from gateway.hosts.bind import hold_first
from gateway.schedule import MIN_SWAP_S, Elsewhere, Settings, Swap, defer_grant

M1, M2, M3 = "m1:latest", "m2:latest", "m3:latest"

# ---------------------------------------------------------------------- the policy alone


def test_a_model_loaded_nowhere_else_is_loaded_here() -> None:
    here = Swap(0.0, 20.0, evicts_in_use=True)
    assert not defer_grant(here, [Elsewhere(False, 0.0)], overdue=False)
    assert not defer_grant(here, [], overdue=False)


def test_left_to_a_host_with_it_loaded_that_starts_it_sooner_than_the_swap() -> None:
    here = Swap(0.0, 20.0, evicts_in_use=False)
    assert defer_grant(here, [Elsewhere(True, 19.0)], overdue=False)
    # Counter-case: the queue for it there is longer than a swap here: a second copy.
    assert not defer_grant(here, [Elsewhere(True, 21.0)], overdue=False)
    # The soonest of the hosts that have it counts; one without it does not.
    assert defer_grant(
        here, [Elsewhere(True, 40.0), Elsewhere(False, 0.0), Elsewhere(True, 3.0)], overdue=False
    )
    # A slot free here later counts with the swap.
    assert defer_grant(Swap(10.0, 20.0, False), [Elsewhere(True, 25.0)], overdue=False)


def test_an_unmeasured_swap_still_costs_min_swap_s() -> None:
    here = Swap(0.0, 0.0, evicts_in_use=False)
    assert defer_grant(here, [Elsewhere(True, MIN_SWAP_S - 1)], overdue=False)
    assert not defer_grant(here, [Elsewhere(True, MIN_SWAP_S + 1)], overdue=False)


def test_not_worth_evicting_a_model_in_use_for_one_loaded_elsewhere() -> None:
    here = Swap(0.0, 5.0, evicts_in_use=True)
    # However long the queue there: the load here costs the evicted model's reload.
    assert defer_grant(here, [Elsewhere(True, 500.0)], overdue=False)
    # Counter-case: nothing in use is evicted, and the queue there is longer than a swap.
    assert not defer_grant(Swap(0.0, 5.0, False), [Elsewhere(True, 500.0)], overdue=False)


def test_a_waiter_past_its_deadline_is_granted_anyway() -> None:
    here = Swap(0.0, 30.0, evicts_in_use=True)
    assert defer_grant(here, [Elsewhere(True, 0.0)], overdue=False)
    assert not defer_grant(here, [Elsewhere(True, 0.0)], overdue=True)


# ---------------------------------------------------------------------- gates


def two_gates(
    *, quantum_s: float = 0.0, max_overtake_s: float = 120.0, claims: set[Claim]
) -> tuple[ChatGate, ChatGate]:
    """Two hosts' gates wired as the hosts layer wires them: peers, and a switch pokes
    every waiting claim."""
    gates = [
        ChatGate(1, settings=Settings(quantum_s=quantum_s, max_overtake_s=max_overtake_s))
        for _ in range(2)
    ]

    def poke() -> None:
        for claim in claims:
            claim.poke()

    for gate in gates:
        gate.peers = lambda: gates
        gate.on_switch = poke
        gate.estimates.load[M1] = gate.estimates.load[M2] = gate.estimates.load[M3] = 10.0
    return gates[0], gates[1]


async def hold(gate: ChatGate, model: str, until: trio.Event, *, priority: str = "normal") -> None:
    async with gate.hold(Ask("holder", model, priority)):
        await until.wait()


class Placed:
    """One request queued on both gates by `hold_first`: where and when it was granted."""

    def __init__(self) -> None:
        self.gate: ChatGate | None = None
        self.at = math.nan
        self.grant: Grant | None = None

    async def run(self, gates: list[ChatGate], model: str, claims: set[Claim]) -> None:
        async with hold_first(lambda: gates, Ask("asker", model), watch=claims) as (gate, grant):
            self.gate, self.at, self.grant = gate, trio.current_time(), grant


async def test_a_waiter_is_left_to_the_host_that_has_its_model_and_frees_sooner(
    autojump_clock: trio.testing.MockClock,
) -> None:
    claims: set[Claim] = set()
    a, b = two_gates(claims=claims)
    a.estimates.service[M2] = 4.0  # a's M2 holder: its load (10 s) and 4 s, ends at 14
    done_a, done_b = trio.Event(), trio.Event()
    placed = Placed()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold, a, M2, done_a)
        nursery.start_soon(hold, b, M1, done_b)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(placed.run, [a, b], M2, claims)
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(5)
        done_b.set()  # b frees first: a gets to it in 9 s, sooner than a swap on b (10)
        await trio.testing.wait_all_tasks_blocked()
        assert placed.gate is None
        assert (b.busy, b.queued, a.queued) == (0, 1, 1)
        await trio.sleep(9)
        done_a.set()
    assert placed.gate is a
    assert placed.at == 14
    assert b.switches == 1  # its own M1 only
    assert a.switches == 1


async def test_a_second_host_loads_the_model_when_its_queue_on_the_first_is_longer_than_a_swap(
    autojump_clock: trio.testing.MockClock,
) -> None:
    claims: set[Claim] = set()
    a, b = two_gates(claims=claims)
    a.estimates.service[M2] = 60.0  # a's M2 holder ends in 60 s: longer than the swap
    done_a, done_b = trio.Event(), trio.Event()
    placed = Placed()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold, a, M2, done_a)
        nursery.start_soon(hold, b, M1, done_b)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(placed.run, [a, b], M2, claims)
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(1)
        done_b.set()
        await trio.testing.wait_all_tasks_blocked()
        assert placed.gate is b
        assert placed.at == 1
        done_a.set()
    assert b.switches == 2


async def test_a_model_in_use_here_is_not_evicted_for_one_loaded_elsewhere_until_its_quantum_lapses(
    autojump_clock: trio.testing.MockClock,
) -> None:
    claims: set[Claim] = set()
    a, b = two_gates(quantum_s=30.0, claims=claims)
    a.estimates.service[M2] = 600.0  # a is busy for long: rule 1 alone would load M2 on b
    done_a, done_b = trio.Event(), trio.Event()
    placed = Placed()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold, a, M2, done_a)
        nursery.start_soon(hold, b, M1, done_b)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(placed.run, [a, b], M2, claims)
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(5)
        done_b.set()  # M1 was used just now on b, and no other host has it
        await trio.testing.wait_all_tasks_blocked()
        assert placed.gate is None
        # The quantum after M1's last use lapses at 5 + 30: then b loads M2.
        with trio.fail_after(100):
            while placed.gate is None:
                await trio.sleep(0.5)
        done_a.set()
    assert placed.gate is b
    assert placed.at == 35


async def test_a_model_in_use_here_but_loaded_on_another_host_too_is_evicted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Counter-case of the above: M1 is also loaded on a third host, so b may drop it.
    claims: set[Claim] = set()
    a, b = two_gates(quantum_s=30.0, claims=claims)
    c = ChatGate(1)
    peers = [a, b, c]
    a.peers = b.peers = lambda: peers
    a.estimates.service[M2] = 600.0
    done = trio.Event()
    placed = Placed()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold, a, M2, done)
        nursery.start_soon(hold, c, M1, done)
        done_b = trio.Event()
        nursery.start_soon(hold, b, M1, done_b)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(placed.run, [a, b], M2, claims)
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(5)
        done_b.set()
        await trio.testing.wait_all_tasks_blocked()
        assert placed.gate is b
        assert placed.at == 5
        done.set()


async def test_a_waiter_left_for_another_host_is_granted_at_its_overtake_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    claims: set[Claim] = set()
    a, b = two_gates(quantum_s=1000.0, max_overtake_s=20.0, claims=claims)
    a.estimates.service[M2] = 600.0
    b.estimates.service[M1] = 3.0
    done_a, done_b = trio.Event(), trio.Event()
    placed = Placed()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold, a, M2, done_a)
        nursery.start_soon(hold, b, M1, done_b)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(placed.run, [a, b], M2, claims)
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(3)
        done_b.set()  # b left it (M1 in use for 1000 s), a is busy for 600 s
        with trio.fail_after(500):
            while placed.gate is None:
                await trio.sleep(1)
        done_a.set()
    assert placed.gate is b
    assert placed.grant is not None
    # b's deadline for it: arrival order there (b's M1 holder: its load, 10 s, and 3 s)
    # plus the overtake bound; granted exactly then, by b's own overdue rule.
    assert placed.grant.deadline == 0 + 3 + 10 + 20
    assert placed.at == placed.grant.deadline
    assert b.overdue_grants == 1


async def test_a_waiter_left_for_another_host_is_taken_once_that_host_switches_model(
    autojump_clock: trio.testing.MockClock,
) -> None:
    claims: set[Claim] = set()
    a, b = two_gates(quantum_s=1000.0, claims=claims)
    a.estimates.service[M2] = 4.0
    done_a, done_b, done_m3 = trio.Event(), trio.Event(), trio.Event()
    placed = Placed()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold, a, M2, done_a)
        nursery.start_soon(hold, b, M1, done_b)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(placed.run, [a, b], M2, claims)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(partial(hold, a, M3, done_m3, priority="interactive"))
        await trio.testing.wait_all_tasks_blocked()
        done_b.set()  # b leaves the M2 waiter to a
        await trio.testing.wait_all_tasks_blocked()
        assert placed.gate is None
        await trio.sleep(2)
        done_a.set()  # a grants the interactive M3 first: M2 is loaded nowhere now
        await trio.testing.wait_all_tasks_blocked()
        assert a.figures().holders[0].ask.model == M3
        assert placed.gate is b
        assert placed.at == 2
        done_m3.set()


# ---------------------------------------------------------------------- no double run


@settings(max_examples=120, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sets(st.integers(0, 2), min_size=1),  # the gates the request queues at
            st.sampled_from([M1, M2, M3]),
            st.integers(0, 6),  # arrival, in steps
            st.integers(1, 4),  # hold, in steps
            st.booleans(),  # leaves while waiting
        ),
        min_size=1,
        max_size=14,
    ),
    st.sampled_from([0.0, 3.0, 30.0]),
)
def test_with_several_models_each_request_runs_once_and_never_past_the_bound(
    requests: list[tuple[set[int], str, int, int, bool]], quantum_s: float
) -> None:
    """Any mix of requests for three models on any subsets of three wired gates (peers,
    switch pokes): each runs exactly once unless it left, no gate holds more than its
    capacity, and a request left for another host still starts by its deadline there
    plus the holds that were under way or overdue before it (ADR 0017's bound, per host):
    checked here as no grant later than the last deadline + the longest hold times the
    number of requests."""

    async def main() -> None:
        claims: set[Claim] = set()
        gates = [
            ChatGate(1, settings=Settings(quantum_s=quantum_s, max_overtake_s=10.0))
            for _ in range(3)
        ]

        def poke() -> None:
            for claim in claims:
                claim.poke()

        for gate in gates:
            gate.peers = lambda: gates
            gate.on_switch = poke
            gate.estimates.service.update({M1: 2.0, M2: 2.0, M3: 2.0})
            gate.estimates.load.update({M1: 1.0, M2: 1.0, M3: 1.0})
        runs: dict[int, int] = {}
        left: set[int] = set()
        late: list[tuple[int, float, float]] = []

        async def one(
            i: int, where: set[int], model: str, at: int, hold: int, leaves: bool
        ) -> None:
            await trio.sleep(at)
            with trio.move_on_after(0.5 + hold if leaves else 1e9) as scope:
                chosen = [gates[g] for g in sorted(where)]
                async with hold_first(lambda: chosen, Ask(str(i), model), watch=claims) as bound:
                    gate, grant = bound
                    assert gate in chosen
                    runs[i] = runs.get(i, 0) + 1
                    assert all(g.busy <= g.capacity for g in gates)
                    scope.deadline = math.inf
                    bound_s = grant.deadline + 4 * len(requests)
                    if trio.current_time() > bound_s:
                        late.append((i, trio.current_time(), grant.deadline))
                    await trio.sleep(hold)
            if scope.cancelled_caught:
                left.add(i)

        async with trio.open_nursery() as nursery:
            for i, (where, model, at, hold, leaves) in enumerate(requests):
                nursery.start_soon(one, i, where, model, at, hold, leaves)
        for i in range(len(requests)):
            assert runs.get(i, 0) == (0 if i in left else 1), (i, runs, left)
        assert not late
        assert all(g.queued == 0 and g.busy == 0 for g in gates)
        assert not claims

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
