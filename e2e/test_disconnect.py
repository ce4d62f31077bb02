"""A client that leaves mid-generation: the gateway cancels its upstream call, llama-server
stops generating (its /slots say idle, and its `tokens_predicted_total` counter, which
counts cancelled tasks too, grew by far fewer tokens than were asked for), and the chat
gate is free at once for the next client."""

from __future__ import annotations

import httpx
import trio

from e2e.conftest import (
    OLLAMA_MODEL,
    ROUTER_MODEL,
    Gateway,
    Service,
    async_client,
    busy_slots,
    metrics,
    released,
    slots,
)

LONG = [{"role": "user", "content": "Write a very long story about a dragon, in ten chapters."}]
ASKED = 600  # SmolLM2-135M makes 20-60 tokens/s on 2 threads: 10-30 s of work


async def wait_idle(llama: Service, client: httpx.AsyncClient, timeout_s: float) -> None:
    """Wait until no slot of llama-server is processing."""
    with trio.fail_after(timeout_s):
        while busy_slots(await slots(llama, client)):  # noqa: ASYNC110
            await trio.sleep(0.02)


async def predicted(llama: Service, client: httpx.AsyncClient) -> float:
    return (await metrics(llama, client))["tokens_predicted_total"]


async def assert_generation_stopped(
    llama: Service, client: httpx.AsyncClient, before: float, left: float
) -> None:
    """llama-server is idle soon after the client left, having made few of the tokens asked
    for, and makes no more afterwards."""
    await wait_idle(llama, client, 5)
    stopped_after = trio.current_time() - left
    made = await predicted(llama, client) - before
    assert 0 < made < ASKED // 4, made
    assert stopped_after < 3, stopped_after
    await trio.sleep(0.5)
    assert await predicted(llama, client) - before == made


async def wait_busy(llama: Service, client: httpx.AsyncClient) -> None:
    with trio.fail_after(60):
        while busy_slots(await slots(llama, client)) == 0:  # noqa: ASYNC110
            await trio.sleep(0.01)


async def test_openai_stream_disconnect_stops_llama_server(
    gateway: Gateway, llama_chat: Service
) -> None:
    """Provider path: `/v1/chat/completions` forwarded to llama-server (ignore_eos rides
    along untouched, so the generation would run to `max_tokens` if nobody stopped it)."""
    async with async_client() as client:
        await wait_idle(llama_chat, client, 60)
        before = await predicted(llama_chat, client)
        body = {
            "model": ROUTER_MODEL,
            "messages": LONG,
            "max_tokens": ASKED,
            "ignore_eos": True,
            "stream": True,
        }
        async with (
            async_client() as leaving,
            leaving.stream("POST", gateway.url + "/v1/chat/completions", json=body) as answer,
        ):
            assert answer.status_code == 200
            events = 0
            async for line in answer.aiter_lines():
                events += line.startswith("data: ")
                if events >= 5:
                    break
            await wait_busy(llama_chat, client)
        left = trio.current_time()
        await assert_generation_stopped(llama_chat, client, before, left)


async def test_ollama_stream_disconnect_frees_the_gate(
    gateway: Gateway, llama_chat: Service
) -> None:
    """Passthrough path: `/api/chat` (gated) through ollama-proxy-plus. The gate is free as
    soon as the client leaves, and the next chat runs with no wait."""
    gate = gateway.services.gate
    async with async_client() as client:
        await wait_idle(llama_chat, client, 60)
        before = await predicted(llama_chat, client)
        body = {"model": OLLAMA_MODEL, "messages": LONG, "options": {"num_predict": ASKED}}
        async with (
            async_client() as leaving,
            leaving.stream("POST", gateway.url + "/api/chat", json=body) as answer,
        ):
            assert answer.status_code == 200
            lines = 0
            async for _line in answer.aiter_lines():
                lines += 1
                if lines >= 5:
                    break
            assert gate.figures().busy == 1
            await wait_busy(llama_chat, client)
        left = trio.current_time()
        with trio.fail_after(2):
            while gate.figures().busy:  # noqa: ASYNC110 - gate state, read across a socket
                await trio.sleep(0.002)
        freed_after = trio.current_time() - left
        assert freed_after < 1, freed_after
        # The proxy drops its upstream call too, so llama-server stops generating.
        await assert_generation_stopped(llama_chat, client, before, left)
        # The next client gets the gate at once.
        answer2 = await client.post(
            gateway.url + "/api/chat",
            json={
                "model": OLLAMA_MODEL,
                "messages": LONG,
                "stream": False,
                "options": {"num_predict": 8},
            },
        )
        assert answer2.status_code == 200
        assert answer2.json()["done"] is True
    await released(gate)
    assert gate.figures().granted_total == 2


async def test_waiter_that_leaves_is_removed_from_the_queue(
    gateway: Gateway, llama_chat: Service
) -> None:
    """A client queued behind a running chat leaves: the queue empties, the running chat
    goes on undisturbed and ends normally."""
    gate = gateway.services.gate
    body = {"model": OLLAMA_MODEL, "messages": LONG, "options": {"num_predict": 48}}
    async with async_client() as holder, async_client() as waiter:
        async with holder.stream("POST", gateway.url + "/api/chat", json=body) as running:
            lines = running.aiter_lines()
            await anext(lines)
            assert gate.figures().busy == 1
            async with trio.open_nursery() as nursery:

                async def wait_in_queue() -> None:
                    await waiter.post(gateway.url + "/api/chat", json=body)

                nursery.start_soon(wait_in_queue)
                with trio.fail_after(60):
                    while gate.figures().queued == 0:  # noqa: ASYNC110
                        await trio.sleep(0.002)
                nursery.cancel_scope.cancel()  # the waiter's connection closes
            with trio.fail_after(2):
                while gate.figures().queued:  # noqa: ASYNC110
                    await trio.sleep(0.002)
            rest = [line async for line in lines]
        assert '"done":true' in rest[-1].replace(" ", "")
    await released(gate)
    assert gate.figures().granted_total == 1
