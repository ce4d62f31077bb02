"""The chat gate on the autojump clock: FIFO order, bounds, cancellation, deadlines."""

import pytest
import trio
import trio.testing

from gateway.errors import GateFull, GateTimeout
from gateway.gate import Ask, ChatGate
from gateway.schedule import Settings


async def test_capacity_one_grants_in_arrival_order(autojump_clock: trio.abc.Clock) -> None:
    gate = ChatGate(1, max_queue=10)
    order: list[int] = []
    peak = 0

    async def client(n: int) -> None:
        nonlocal peak
        async with gate.hold(Ask(client=f"c{n}")):
            order.append(n)
            peak = max(peak, gate.busy)
            await trio.sleep(1)

    async with trio.open_nursery() as nursery:
        for n in range(6):
            nursery.start_soon(client, n)
            await trio.sleep(0.01)  # arrival order is the start order
    assert order == list(range(6))
    assert peak == 1
    assert trio.current_time() == pytest.approx(6.0)
    assert gate.figures().granted_total == 6


async def test_capacity_two_runs_two_at_once(autojump_clock: trio.abc.Clock) -> None:
    gate = ChatGate(2, max_queue=10)

    async def client() -> None:
        async with gate.hold():
            await trio.sleep(1)

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(client)
    assert trio.current_time() == pytest.approx(2.0)


async def test_queue_bound_refuses_with_retry_after(autojump_clock: trio.abc.Clock) -> None:
    gate = ChatGate(1, max_queue=2)
    release = trio.Event()

    async def client() -> None:
        async with gate.hold():
            await release.wait()

    async with trio.open_nursery() as nursery:
        for _ in range(3):  # one holder, two queued
            nursery.start_soon(client)
        await trio.testing.wait_all_tasks_blocked()
        assert (gate.busy, gate.queued) == (1, 2)
        with pytest.raises(GateFull) as refused:
            gate.check_admission()
        assert refused.value.status == 503
        assert "Retry-After" in refused.value.headers()
        with pytest.raises(GateFull):
            async with gate.hold():
                pass
        release.set()
    assert (gate.busy, gate.queued) == (0, 0)


async def test_cancelled_waiter_leaves_the_queue(autojump_clock: trio.abc.Clock) -> None:
    gate = ChatGate(1, max_queue=10)
    release = trio.Event()
    granted: list[str] = []

    async def client(name: str) -> None:
        async with gate.hold():
            granted.append(name)
            await release.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client, "holder")
        await trio.testing.wait_all_tasks_blocked()
        with trio.CancelScope() as leaver:
            nursery.start_soon(client, "next")
            await trio.testing.wait_all_tasks_blocked()
            assert gate.queued == 1
            with trio.move_on_after(1):
                async with gate.hold():
                    granted.append("leaver")
        assert not leaver.cancelled_caught
        assert gate.queued == 1  # the leaver is gone, "next" still waits
        release.set()
    assert granted == ["holder", "next"]


async def test_holder_cancelled_passes_gate_at_once(autojump_clock: trio.abc.Clock) -> None:
    gate = ChatGate(1, max_queue=10)
    times: dict[str, float] = {}

    async def holder(scope_out: list[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            scope_out.append(scope)
            async with gate.hold():
                await trio.sleep_forever()

    async def waiter() -> None:
        async with gate.hold():
            times["granted"] = trio.current_time()

    scopes: list[trio.CancelScope] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(holder, scopes)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(waiter)
        await trio.sleep(5)
        scopes[0].cancel()
    assert times["granted"] == pytest.approx(5.0)


async def test_max_wait_gives_503_after_exactly_that_long(
    autojump_clock: trio.abc.Clock,
) -> None:
    gate = ChatGate(1, max_queue=10, max_wait_s=2.5)
    async with trio.open_nursery() as nursery:

        async def holder() -> None:
            async with gate.hold():
                await trio.sleep(100)

        nursery.start_soon(holder)
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        with pytest.raises(GateTimeout):
            async with gate.hold():
                pass
        assert trio.current_time() - start == pytest.approx(2.5)
        assert gate.queued == 0
        nursery.cancel_scope.cancel()


async def test_hold_reports_the_wait(autojump_clock: trio.abc.Clock) -> None:
    gate = ChatGate(1)
    waits: list[float] = []

    async def client(hold_s: float) -> None:
        async with gate.hold() as grant:
            waits.append(grant.waited_s)
            await trio.sleep(hold_s)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client, 3)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(client, 0)
    assert waits == [0, pytest.approx(3.0)]


# ---------------------------------------------------------------- the scheduler in the gate


def fair_gate(capacity: int = 1, **settings: object) -> ChatGate:
    return ChatGate(capacity, max_queue=100, settings=Settings(**settings))  # type: ignore[arg-type]


async def run_clients(
    gate: ChatGate, plan: list[tuple[float, Ask, float]]
) -> list[tuple[float, str, str]]:
    """Start each (arrival time, ask, GPU seconds) and return (granted at, client, model)
    in grant order."""
    grants: list[tuple[float, str, str]] = []

    async def client(at: float, ask: Ask, seconds: float) -> None:
        await trio.sleep_until(at)
        async with gate.hold(ask):
            grants.append((trio.current_time(), ask.client, ask.model))
            await trio.sleep(seconds)

    async with trio.open_nursery() as nursery:
        for at, ask, seconds in plan:
            nursery.start_soon(client, at, ask, seconds)
    return grants


async def test_one_clients_batch_does_not_starve_anothers_one(
    autojump_clock: trio.abc.Clock,
) -> None:
    gate = fair_gate()
    plan = [(0.0, Ask("script", "m"), 10.0) for _ in range(10)]
    plan.append((1.0, Ask("alice", "m"), 10.0))
    grants = await run_clients(gate, plan)
    # alice arrived behind nine queued requests and goes second: the script has used 10 s.
    assert [c for _, c, _ in grants][:3] == ["script", "alice", "script"]
    assert grants[1][0] == pytest.approx(10.0)


async def test_arrival_order_keeps_fifo(autojump_clock: trio.abc.Clock) -> None:
    gate = fair_gate(order="arrival")
    plan = [(0.0, Ask("script", "m"), 10.0) for _ in range(4)]
    plan.append((1.0, Ask("alice", "m", "interactive"), 10.0))
    grants = await run_clients(gate, plan)
    assert [c for _, c, _ in grants] == ["script"] * 4 + ["alice"]


async def test_weights_share_gpu_seconds(autojump_clock: trio.abc.Clock) -> None:
    gate = fair_gate(window_s=1000.0)
    plan = [(0.0, Ask("heavy", "m", weight=3.0), 1.0) for _ in range(30)]
    plan += [(0.0, Ask("light", "m", weight=1.0), 1.0) for _ in range(30)]
    grants = await run_clients(gate, plan)
    first = [c for _, c, _ in grants][:20]
    assert first.count("heavy") == 15  # three to one while both wait
    assert first.count("light") == 5


async def test_interactive_goes_before_a_queued_batch(autojump_clock: trio.abc.Clock) -> None:
    gate = fair_gate()
    plan = [(0.0, Ask("nightly", "m", "batch"), 5.0) for _ in range(5)]
    plan.append((1.0, Ask("alice", "m", "interactive"), 1.0))
    grants = await run_clients(gate, plan)
    assert grants[1][1:] == ("alice", "m")
    assert grants[1][0] == pytest.approx(5.0)


async def test_affinity_serves_the_loaded_model_for_a_quantum(
    autojump_clock: trio.abc.Clock,
) -> None:
    gate = fair_gate(quantum_s=20.0)
    # Interleaved arrivals, each person with their own model.
    plan = [(0.0, Ask("a", "x"), 5.0)]
    for n in range(4):
        plan.append((0.1 + n * 0.2, Ask("b", "y"), 5.0))
        plan.append((0.2 + n * 0.2, Ask("a", "x"), 5.0))
    grants = await run_clients(gate, plan)
    models = "".join(m for _, _, m in grants)
    # x stays loaded for its 20 s quantum (4 requests), then y, then the last x.
    assert models == "xxxxyyyyx"


async def test_a_batch_request_is_overtaken_at_most_max_overtake_s(
    autojump_clock: trio.abc.Clock,
) -> None:
    gate = fair_gate(max_overtake_s=30.0)
    gate.estimates.note("m", 10.0, None)  # measured: a generation takes 10 s
    plan = [(0.0, Ask("alice", "m", "interactive"), 10.0)]
    plan.append((1.0, Ask("nightly", "m", "batch"), 10.0))
    # Interactive requests keep coming, always one waiting.
    plan += [(2.0 + n, Ask("alice", "m", "interactive"), 10.0) for n in range(10)]
    grants = await run_clients(gate, plan)
    batch_at = next(t for t, c, _ in grants if c == "nightly")
    # Arrival order would have started it at 10 s (the holder's estimated end); it is due
    # at 40 s and goes at the release then, ahead of the waiting interactive requests.
    assert batch_at == pytest.approx(40.0)
    assert [c for _, c, _ in grants].count("alice") == 11


async def test_a_queued_waiter_that_leaves_while_reordered_is_skipped(
    autojump_clock: trio.abc.Clock,
) -> None:
    gate = fair_gate()
    granted: list[str] = []

    async def client(name: str, ask: Ask, leave_at: float | None = None) -> None:
        with trio.CancelScope() as scope:
            if leave_at is not None:
                scope.deadline = leave_at
            async with gate.hold(ask):
                granted.append(name)
                await trio.sleep(5)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client, "first", Ask("s", "m"))
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(client, "s2", Ask("s", "m"))
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(client, "alice", Ask("alice", "m", "interactive"), 2.0)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(client, "bob", Ask("bob", "m"))
        await trio.testing.wait_all_tasks_blocked()
        assert gate.queued == 3
        await trio.sleep(3)
        assert gate.queued == 2  # alice left, the order of the rest holds
    assert granted == ["first", "bob", "s2"]


async def test_figures_list_waiters_with_an_estimated_start(
    autojump_clock: trio.abc.Clock,
) -> None:
    gate = fair_gate()
    release = trio.Event()

    async def client(ask: Ask) -> None:
        async with gate.hold(ask):
            await release.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client, Ask("a", "m"))
        await trio.testing.wait_all_tasks_blocked()
        gate.estimates.note("m", 4.0, None)
        nursery.start_soon(client, Ask("b", "m", "batch"))
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(client, Ask("c", "m", "interactive"))
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(1)
        figures = gate.figures()
        assert [h.ask.client for h in figures.holders] == ["a"]
        starts = {w.ask.client: w.start_in_s for w in figures.waiters}
        # The holder has 3 s left on the estimate; c (interactive) goes first.
        assert starts == {"c": pytest.approx(3.0), "b": pytest.approx(7.0)}
        assert gate.retry_after_s() == 3
        release.set()


async def test_queue_full_retry_after_comes_from_the_measured_rate(
    autojump_clock: trio.abc.Clock,
) -> None:
    gate = ChatGate(1, max_queue=1)
    gate.estimates.note("m", 20.0, 8.0)  # measured: 12 s generating after an 8 s load
    async with trio.open_nursery() as nursery:

        async def client() -> None:
            async with gate.hold(Ask("a", "m")):
                await trio.sleep(100)

        nursery.start_soon(client)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(client)
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(4.5)
        with pytest.raises(GateFull) as refused:
            gate.check_admission()
        # Nothing was loaded: the holder loads m (8 s) and generates (12 s); 4.5 s are
        # gone, the next place frees in 15.5 s.
        assert refused.value.headers() == {"Retry-After": "16"}
        nursery.cancel_scope.cancel()


async def test_serve_notes_wait_ahead_gpu_time_and_load_in_the_record(
    autojump_clock: trio.abc.Clock,
) -> None:
    from gateway.config import ClientConfig
    from gateway.record import RequestRecord

    settings_of = {"bob": ClientConfig(priority="batch", weight=2.0)}
    gate = ChatGate(1, clients=lambda name: settings_of.get(name, ClientConfig()))
    records = [RequestRecord(f"r{n}", "POST", "/api/chat", "10.0.0.9:5000", 0.0) for n in (1, 2)]
    records[1].client_name = "bob"
    asks: list[Ask] = []

    async def generate(record: RequestRecord, load_s: float) -> None:
        async with gate.serve(record, "llama3"):
            asks.extend(h.ask for h in gate.figures().holders)
            await trio.sleep(10)
            record.load_s = load_s  # what Ollama's final frame said

    async with trio.open_nursery() as nursery:
        nursery.start_soon(generate, records[0], 6.0)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(generate, records[1], 0.001)
    assert asks == [Ask("10.0.0.9", "llama3:latest"), Ask("bob", "llama3:latest", "batch", 2.0)]
    assert (records[0].gate_wait_s, records[0].gate_ahead, records[0].gpu_s) == (0, 0, 10)
    assert (records[1].gate_wait_s, records[1].gate_ahead, records[1].gpu_s) == (10, 0, 10)
    assert gate.estimates.load_s("llama3:latest") == pytest.approx(6.0)


async def test_resident_model_from_ps_until_the_gateway_runs_another(
    autojump_clock: trio.abc.Clock,
) -> None:
    gate = ChatGate(1, max_queue=10, loaded=lambda: (frozenset({"y"}), 0.5))
    assert gate.figures().resident == ("y",)
    # z is granted at 0, then /api/ps (asked at 0.5) shows y loaded, not z (say another
    # program used Ollama): at the release, y is what is resident.
    plan = [(0.0, Ask("a", "z"), 5.0), (1.0, Ask("b", "x"), 5.0), (1.5, Ask("c", "y"), 5.0)]
    plan.append((1.6, Ask("d", "x"), 5.0))
    grants = await run_clients(gate, plan)
    assert [c for _, c, _ in grants] == ["a", "c", "b", "d"]
    # Granted after the poll, x is what the gateway ran last: fresher than the poll.
    assert gate.figures().resident == ("x",)


async def test_switches_and_overdue_grants_are_counted(autojump_clock: trio.abc.Clock) -> None:
    gate = fair_gate(max_overtake_s=5.0)
    plan = [(0.0, Ask("a", "x"), 10.0), (1.0, Ask("b", "y", "batch"), 1.0)]
    plan += [(2.0, Ask("c", "x", "interactive"), 1.0), (3.0, Ask("d", "x"), 1.0)]
    grants = await run_clients(gate, plan)
    # Nothing measured yet: each is due 5 s after arriving. At 10 s all three are overdue
    # and go earliest deadline first: b (due 6 s) before c's priority and d's warm model.
    assert [c for _, c, _ in grants] == ["a", "b", "c", "d"]
    assert (gate.switches, gate.overdue_grants) == (3, 3)  # x, y, x again; d finds x
    assert gate.queued_by_priority() == {"interactive": 0, "normal": 0, "batch": 0}


async def test_cut_short_holds_do_not_feed_the_estimates(autojump_clock: trio.abc.Clock) -> None:
    from gateway.record import RequestRecord

    gate = ChatGate(1)
    record = RequestRecord("r", "POST", "/api/chat", "10.0.0.9:5000", 0.0)
    with trio.move_on_after(1):  # the client leaves mid-generation
        async with gate.serve(record, "m"):
            await trio.sleep(10)
    record.status = 404
    async with gate.serve(record, "m"):
        await trio.sleep(0.01)  # Ollama's quick error answer
    assert gate.estimates.service == {}
    record.status = 200
    async with gate.serve(record, "m"):
        await trio.sleep(4)
    assert gate.estimates.service == {"m:latest": pytest.approx(4.0)}
    assert record.gpu_s == pytest.approx(4.0)
