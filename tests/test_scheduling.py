"""The scheduler through real sockets: a whole gateway with inbound tokens and
`[clients.x]` priorities in front of the Ollama emulator. The emulator's `hold` keeps the
first generation on the GPU while the others queue; its `generation_order` is the order
in which the gate granted them."""

from __future__ import annotations

from typing import Any

import httpx
import trio

from tests.conftest import RunningGateway, StartGateway, eventually, make_config, stop_gateway
from tests.emulators import OllamaEmulator

TOKENS = {"alice": "tok-alice", "bob": "tok-bob", "nightly": "tok-nightly", "carol": "tok-carol"}
CLIENTS = {
    "alice": {"priority": "interactive"},
    "bob": {"priority": "normal"},
    "carol": {"priority": "normal"},
    "nightly": {"priority": "batch"},
}


async def scheduled_gateway(
    start_gateway: StartGateway, ollama: OllamaEmulator, **sections: Any
) -> RunningGateway:
    environ = {"GATEWAY_TOKENS": ",".join(f"{n}:{t}" for n, t in TOKENS.items())}
    config = make_config(ollama.url, clients=CLIENTS, **sections)
    return await start_gateway(config, environ=environ)


class Clients:
    """Requests as named clients; each answer's status and headers, by tag."""

    def __init__(self, gw: RunningGateway) -> None:
        self.gw = gw
        self.answers: dict[str, httpx.Response] = {}

    async def chat(self, who: str, tag: str, model: str = "llama3") -> None:
        body = {"model": model, "messages": [{"role": "user", "content": tag}], "stream": False}
        headers = {"Authorization": f"Bearer {TOKENS[who]}"}
        self.answers[tag] = await self.gw.client.post("/api/chat", json=body, headers=headers)

    async def queue(self, nursery: trio.Nursery, who: str, tag: str, model: str = "llama3") -> None:
        """Start a request and return once it waits in the gate's queue."""
        queued = self.gw.services.gate.queued
        nursery.start_soon(self.chat, who, tag, model)
        await eventually(lambda: self.gw.services.gate.queued == queued + 1)


async def test_grants_follow_priority_then_fair_share(
    start_gateway: StartGateway, ollama: OllamaEmulator
) -> None:
    gw = await scheduled_gateway(start_gateway, ollama)
    ollama.hold = trio.Event()
    clients = Clients(gw)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(clients.chat, "nightly", "n1")
            await ollama.wait_until(lambda: ollama.active_generations == 1)
            await clients.queue(nursery, "nightly", "n2")
            await clients.queue(nursery, "bob", "b1")
            await clients.queue(nursery, "bob", "b2")
            await clients.queue(nursery, "carol", "c1")
            await clients.queue(nursery, "alice", "a1")
            health = (await gw.client.get("/health")).json()["gate"]
            assert [(w["client"], w["priority"]) for w in health["waiters"]] == [
                ("nightly", "batch"),
                ("bob", "normal"),
                ("bob", "normal"),
                ("carol", "normal"),
                ("alice", "interactive"),
            ]
            assert health["holders"][0]["client"] == "nightly"
            ollama.hold.set()
    # Interactive first; then normal, where carol (no GPU time yet) goes before bob's
    # second request; the batch last.
    assert ollama.generation_order == ["n1", "a1", "b1", "c1", "b2", "n2"]
    assert all(a.status_code == 200 for a in clients.answers.values())
    assert clients.answers["a1"].headers["x-gateway-queue-ahead"] == "4"
    assert clients.answers["b1"].headers["x-gateway-queue-ahead"] == "1"
    assert float(clients.answers["n2"].headers["x-gateway-queue-ms"]) > 0
    assert "x-gateway-queue-ahead" not in (await gw.client.get("/api/tags")).headers


async def test_the_loaded_model_goes_first_and_arrival_order_does_not(
    start_gateway: StartGateway, ollama: OllamaEmulator
) -> None:
    for order, expected in (
        ("fair", ["first", "same-1", "same-2", "other"]),
        ("arrival", ["first", "other", "same-1", "same-2"]),
    ):
        ollama.generation_order.clear()
        gw = await scheduled_gateway(start_gateway, ollama, gate={"order": order})
        ollama.hold = trio.Event()
        clients = Clients(gw)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(clients.chat, "bob", "first", "llama3")
                await ollama.wait_until(lambda: ollama.active_generations == 1)
                await clients.queue(nursery, "bob", "other", "qwen2.5:7b")
                await clients.queue(nursery, "carol", "same-1", "llama3")
                await clients.queue(nursery, "carol", "same-2", "llama3:latest")
                ollama.hold.set()
        assert ollama.generation_order == expected, order
        await stop_gateway(gw)


async def test_a_queued_client_that_leaves_while_reordered(
    start_gateway: StartGateway, ollama: OllamaEmulator
) -> None:
    gw = await scheduled_gateway(start_gateway, ollama)
    gate = gw.services.gate
    ollama.hold = trio.Event()
    clients = Clients(gw)
    alice = trio.CancelScope()

    async def alice_hangs_up_later() -> None:
        with alice:
            await clients.chat("alice", "a1")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(clients.chat, "bob", "b1")
            await ollama.wait_until(lambda: ollama.active_generations == 1)
            await clients.queue(nursery, "nightly", "n1")
            await clients.queue(nursery, "bob", "b2")
            nursery.start_soon(alice_hangs_up_later)
            await eventually(lambda: gate.queued == 3)
            # alice (interactive) would go next; she hangs up while waiting.
            alice.cancel()
            await eventually(lambda: gate.queued == 2)
            await clients.queue(nursery, "carol", "c1")
            ollama.hold.set()
    assert ollama.generation_order == ["b1", "c1", "b2", "n1"]
    assert "a1" not in clients.answers
    assert gate.figures().granted_total == 4


async def test_shutdown_with_a_reordered_queue(
    start_gateway: StartGateway, ollama: OllamaEmulator
) -> None:
    """Every waiter gets 503 at once, whatever its place; the holder finishes."""
    gw = await scheduled_gateway(start_gateway, ollama, shutdown_grace_s=5.0)
    gate = gw.services.gate
    ollama.hold = trio.Event()
    clients = Clients(gw)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(clients.chat, "bob", "b1")
            await ollama.wait_until(lambda: ollama.active_generations == 1)
            await clients.queue(nursery, "nightly", "n1")
            await clients.queue(nursery, "bob", "b2", "qwen2.5:7b")
            await clients.queue(nursery, "alice", "a1")
            gw.stop.set()
            await eventually(lambda: len(clients.answers) == 3)
            assert gate.queued == 0
            ollama.hold.set()
        await gw.stopped.wait()
    assert clients.answers["b1"].status_code == 200
    for tag in ("n1", "b2", "a1"):
        answer = clients.answers[tag]
        assert answer.status_code == 503
        assert "shutting down" in answer.json()["error"]
        assert answer.headers["retry-after"] == "5"
    assert ollama.generation_order == ["b1"]
