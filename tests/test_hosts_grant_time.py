"""Two emulated hosts on real sockets: placement again at grant time (ADR 0020). A host
does not evict a model still in use that no other host has, for a request whose model
another host has loaded (the bench's team case: a batch queued on both hosts while
nothing was resident, an interactive user's model on the second)."""

from __future__ import annotations

import httpx
import trio

from tests.conftest import StartGateway, eventually
from tests.test_hosts import LLAMA, QWEN, chats, emulator, post_chat, start_hosts


async def test_a_host_keeps_a_model_in_use_rather_than_load_one_loaded_elsewhere(
    start_gateway: StartGateway, nursery: trio.Nursery
) -> None:
    a = await emulator(nursery, [LLAMA, QWEN])
    b = await emulator(nursery, [LLAMA, QWEN])
    gw = await start_hosts(start_gateway, {"a": a, "b": b})
    gate_a = gw.services.hosts.get("a").gate  # type: ignore[union-attr]
    gate_b = gw.services.hosts.get("b").gate  # type: ignore[union-attr]
    for gate in (gate_a, gate_b):  # as measured: a batch answer takes a minute
        gate.estimates.service.update({QWEN: 60.0, LLAMA: 10.0})
    a.hold, b.hold = trio.Event(), trio.Event()
    responses: dict[str, httpx.Response] = {}

    async def send(tag: str, model: str) -> None:
        responses[tag] = await post_chat(gw, tag, model)

    with trio.fail_after(10):
        async with trio.open_nursery() as clients:
            clients.start_soon(send, "batch-1", "qwen2.5:7b")  # nothing resident: a
            await eventually(lambda: gate_a.busy == 1)
            clients.start_soon(send, "alice-1", "llama3")  # a is busy: b loads llama3
            await eventually(lambda: gate_b.busy == 1)
            # qwen is resident on a, busy for a minute: b (llama3's 10 s, then a swap)
            # would start it sooner, so it queues on both.
            clients.start_soon(send, "batch-2", "qwen2.5:7b")
            await eventually(lambda: gate_a.queued == 1 and gate_b.queued == 1)
            b.hold.set()  # alice's answer ends; b must not evict llama3 for qwen
            await eventually(lambda: "alice-1" in responses and gate_b.busy == 0)
            assert gate_b.granted_total == 1
            assert (gate_a.queued, gate_b.queued) == (1, 1)
            clients.start_soon(send, "alice-2", "llama3")  # alice again: llama3 still there
            await eventually(lambda: "alice-2" in responses)
            a.hold.set()
    assert {tag: r.status_code for tag, r in responses.items()} == dict.fromkeys(responses, 200)
    assert chats(a) == ["batch-1", "batch-2"]
    assert chats(b) == ["alice-1", "alice-2"]
    assert a.loads == {QWEN: 1}
    assert b.loads == {LLAMA: 1}
