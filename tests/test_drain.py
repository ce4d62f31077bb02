"""The drain on the autojump clock: refusal, shedding, grace, then cancellation."""

import pytest
import trio
import trio.testing

from gateway.drain import Drain
from gateway.errors import ShuttingDown
from gateway.gate import Ask, ChatGate


async def test_work_that_ends_within_the_grace_is_left_alone(
    autojump_clock: trio.abc.Clock,
) -> None:
    drain = Drain()
    outcome: list[str] = []

    async def request(seconds: float) -> None:
        with drain.track() as activity:
            with activity.scope:
                await trio.sleep(seconds)
                outcome.append("finished")
            if activity.ended_by_shutdown:
                outcome.append("ended")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(request, 3)
        await trio.testing.wait_all_tasks_blocked()
        await drain.drain(grace_s=10)
        assert trio.current_time() == pytest.approx(3)
    assert outcome == ["finished"]


async def test_work_that_outlives_the_grace_is_cancelled_at_the_grace(
    autojump_clock: trio.abc.Clock,
) -> None:
    drain = Drain()
    outcome: list[tuple[str, float]] = []

    async def request() -> None:
        with drain.track() as activity:
            with activity.scope:
                await trio.sleep(100)
            if activity.ended_by_shutdown:
                outcome.append(("ended", trio.current_time()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(request)
        await trio.testing.wait_all_tasks_blocked()
        await drain.drain(grace_s=5)
    assert outcome == [("ended", pytest.approx(5))]


async def test_new_work_is_refused_and_the_gate_queue_is_shed(
    autojump_clock: trio.abc.Clock,
) -> None:
    gate = ChatGate(1, max_queue=10)
    drain = Drain(on_drain=[gate.refuse_waiters])
    results: list[str] = []

    async def chat(name: str, seconds: float) -> None:
        try:
            with drain.track() as activity, activity.scope:
                async with gate.hold(Ask(client=name)):
                    await trio.sleep(seconds)
                    results.append(f"{name} done")
        except ShuttingDown:
            results.append(f"{name} refused")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(chat, "holder", 2)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(chat, "waiter", 1)
        await trio.testing.wait_all_tasks_blocked()
        assert gate.queued == 1
        await drain.drain(grace_s=30)
        with pytest.raises(ShuttingDown):
            drain.refuse_if_draining()
        with pytest.raises(ShuttingDown):
            gate.check_admission()
    assert results == ["waiter refused", "holder done"]
    assert trio.current_time() == pytest.approx(2)


async def test_drain_with_nothing_running_returns_at_once(autojump_clock: trio.abc.Clock) -> None:
    drain = Drain()
    await drain.drain(grace_s=30)
    assert trio.current_time() == 0
    assert drain.active == 0
