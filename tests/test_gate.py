"""The chat gate on the autojump clock: FIFO order, bounds, cancellation, deadlines."""

import pytest
import trio
import trio.testing

from gateway.errors import GateFull, GateTimeout
from gateway.gate import ChatGate


async def test_capacity_one_grants_in_arrival_order(autojump_clock: trio.abc.Clock) -> None:
    gate = ChatGate(1, max_queue=10)
    order: list[int] = []
    peak = 0

    async def client(n: int) -> None:
        nonlocal peak
        async with gate.hold(f"c{n}"):
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
        async with gate.hold() as waited:
            waits.append(waited)
            await trio.sleep(hold_s)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client, 3)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(client, 0)
    assert waits == [0, pytest.approx(3.0)]
