"""The inventory poller on the autojump clock, with a fake transport as the target."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from gateway.config import OllamaConfig
from gateway.errors import ModelNotFound, TargetDegraded, UpstreamUnavailable
from gateway.target.client import TargetClient, target_name
from gateway.target.inventory import Inventory


class FakeResponse:
    """A whole answer, as a `gateway.target.client.UpstreamResponse`."""

    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        self.headers = [(b"content-type", b"application/json")]
        self._body = body

    def header(self, name: bytes) -> bytes | None:
        return dict(self.headers).get(name)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self._body

    async def read(self) -> bytes:
        return self._body

    async def aclose(self) -> None:
        pass


class FakeTarget:
    """A `Transport` that answers /api/tags and /api/ps, or refuses connections while
    `down`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.models = ["llama3:latest"]
        self.down = False
        self.polls: list[float] = []

    @asynccontextmanager
    async def request(
        self,
        method: str,
        path: str,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes | None,
        first_byte_timeout_s: float,
    ) -> AsyncIterator[FakeResponse]:
        await trio.lowlevel.checkpoint()
        if self.down:
            raise UpstreamUnavailable(f"{self.name} is unreachable: connection refused")
        if path == "/api/tags":
            self.polls.append(trio.current_time())
            models = [{"name": m} for m in self.models]
            yield FakeResponse(200, json.dumps({"models": models}).encode())
        else:
            yield FakeResponse(200, json.dumps({"models": []}).encode())


@pytest.fixture
def target() -> tuple[FakeTarget, Inventory]:
    config = OllamaConfig(url="http://gpu.lan:11434")
    fake = FakeTarget(target_name(config))
    client = TargetClient(fake, config, token=None)
    return fake, Inventory(client, poll_interval_s=30, degraded_poll_interval_s=2)


async def test_polls_at_the_interval(
    target: tuple[FakeTarget, Inventory], autojump_clock: trio.abc.Clock
) -> None:
    fake, inventory = target
    async with trio.open_nursery() as nursery:
        await nursery.start(inventory.run)
        assert not inventory.degraded
        assert inventory.has_model("llama3")
        await trio.sleep(95)
        nursery.cancel_scope.cancel()
    assert fake.polls == [0, 30, 60, 90]


async def test_degrades_keeps_inventory_polls_faster_and_recovers(
    target: tuple[FakeTarget, Inventory], autojump_clock: trio.abc.Clock
) -> None:
    fake, inventory = target
    async with trio.open_nursery() as nursery:
        await nursery.start(inventory.run)
        fake.down = True
        await trio.sleep(31)  # the poll at 30 fails
        assert inventory.degraded
        assert inventory.has_model("llama3")  # the last inventory is kept
        assert "gpu.lan:11434" in inventory.last_error
        with pytest.raises(TargetDegraded, match=r"gpu\.lan:11434"):
            inventory.require_reachable()
        failures = inventory.poll_failures
        await trio.sleep(10)  # degraded: every 2 s
        assert inventory.poll_failures == failures + 5
        fake.down = False
        await trio.sleep(2)
        assert not inventory.degraded
        assert inventory.recoveries == 1
        nursery.cancel_scope.cancel()


async def test_a_failed_request_degrades_at_once_and_wakes_the_poller(
    target: tuple[FakeTarget, Inventory], autojump_clock: trio.abc.Clock
) -> None:
    fake, inventory = target
    async with trio.open_nursery() as nursery:
        await nursery.start(inventory.run)
        await trio.sleep(5)
        answer = inventory.note_failure(UpstreamUnavailable("Ollama target x is unreachable"))
        assert isinstance(answer, TargetDegraded)
        assert inventory.degraded
        await trio.testing.wait_all_tasks_blocked()
        assert fake.polls == [0, 5]  # re-polled at once, and it answered: recovered
        assert not inventory.degraded
        nursery.cancel_scope.cancel()


async def test_a_miss_repolls_once_then_404(target: tuple[FakeTarget, Inventory]) -> None:
    fake, inventory = target
    await inventory.refresh()
    assert len(fake.polls) == 1
    with pytest.raises(ModelNotFound, match='model "mistral" not found, try pulling it first'):
        await inventory.require_model("mistral")
    assert len(fake.polls) == 2
    fake.models.append("mistral:latest")
    await inventory.require_model("mistral")  # found by the re-poll
    assert len(fake.polls) == 3
    await inventory.require_model("mistral:latest")  # known now: no poll
    assert len(fake.polls) == 3


async def test_concurrent_misses_share_one_poll(target: tuple[FakeTarget, Inventory]) -> None:
    fake, inventory = target
    await inventory.refresh()
    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(inventory.refresh)
    assert len(fake.polls) <= 3  # at most one running and one queued behind it
