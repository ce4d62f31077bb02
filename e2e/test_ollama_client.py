"""The official `ollama` client against the gateway's Ollama passthrough, with a
third-party Ollama-protocol server (ollama-proxy-plus) and llama-server behind it.

ollama-proxy-plus is not Ollama: its counters are word counts, `done_reason` is always
"stop", `/api/tags` lists its built-in cloud names too. Only the structure is asserted.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import trio
from ollama import ChatResponse, Client

from e2e.conftest import (
    EMBED_MODEL,
    OLLAMA_MODEL,
    ROUTER_MODEL,
    Gateway,
    Service,
    async_client,
    busy_slots,
    in_thread,
    released,
    slots,
)

MESSAGES = [{"role": "user", "content": "Why is the sky blue? Answer briefly."}]
# For a chat that must still be running a while later: a story does not stop early.
STORY = [{"role": "user", "content": "Write a long story about a dragon, in ten chapters."}]
CAP = {"num_predict": 16}


def client_for(gw: Gateway) -> Client:
    return Client(host=gw.url, timeout=120, trust_env=False)


async def test_chat_not_streaming(gateway: Gateway) -> None:
    def call() -> ChatResponse:
        with client_for(gateway) as client:
            answer = client.chat(model=OLLAMA_MODEL, messages=MESSAGES, stream=False, options=CAP)
            assert isinstance(answer, ChatResponse)
            return answer

    answer = await in_thread(call)
    assert answer.message.role == "assistant"
    assert answer.message.content
    assert answer.message.content.strip()
    assert answer.done is True
    assert answer.done_reason == "stop"
    assert answer.eval_count is not None
    assert answer.eval_count > 0
    assert answer.prompt_eval_count is not None
    assert answer.prompt_eval_count > 0
    assert gateway.services.gate.figures().granted_total == 1


async def test_chat_streaming(gateway: Gateway) -> None:
    def call() -> list[ChatResponse]:
        with client_for(gateway) as client:
            return list(
                client.chat(model=OLLAMA_MODEL, messages=MESSAGES, stream=True, options=CAP)
            )

    parts = await in_thread(call)
    assert len(parts) > 2  # streamed, not one block
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert "".join(p.message.content or "" for p in parts).strip()
    assert parts[-1].done_reason == "stop"
    assert parts[-1].eval_count is not None
    assert parts[-1].eval_count > 0
    assert all(p.model == OLLAMA_MODEL for p in parts)


async def test_embed(gateway: Gateway) -> None:
    """`/api/embed` (never gated) reaches the embedding llama-server: one vector per input."""
    texts = ["the sky is blue", "grass is green", "the sky is blue"]

    def call() -> Any:
        with client_for(gateway) as client:
            return client.embed(model=EMBED_MODEL, input=texts)

    answer = await in_thread(call)
    vectors = [list(v) for v in answer.embeddings]
    assert len(vectors) == 3
    assert len(vectors[0]) == 576  # SmolLM2-135M's hidden size, mean-pooled
    assert all(len(v) == len(vectors[0]) for v in vectors)
    assert any(abs(x) > 0 for x in vectors[0])
    assert vectors[0] == vectors[2]  # same text, same vector
    assert vectors[0] != vectors[1]
    assert gateway.services.gate.figures().granted_total == 0


async def test_list(gateway: Gateway) -> None:
    def call() -> Any:
        with client_for(gateway) as client:
            return client.list()

    listed = await in_thread(call)
    names = {m.model for m in listed.models}
    assert {OLLAMA_MODEL, EMBED_MODEL} <= names


async def test_gate_serializes_two_concurrent_chats(gateway: Gateway, llama_chat: Service) -> None:
    """Two chats at once through the gateway run one after the other: the gate shows one
    holder and one waiter, and llama-server (which has two slots and runs two requests
    side by side when asked directly) never works on both."""
    gate = gateway.services.gate
    samples: dict[str, int] = {"gate_busy": 0, "gate_queued": 0, "slots_busy": 0}
    slot_samples: list[int] = []

    async def sample_gate() -> None:
        while True:
            figures = gate.figures()
            samples["gate_busy"] = max(samples["gate_busy"], figures.busy)
            samples["gate_queued"] = max(samples["gate_queued"], figures.queued)
            await trio.sleep(0.002)

    async def sample_slots(client: httpx.AsyncClient) -> None:
        while True:
            slot_samples.append(busy_slots(await slots(llama_chat, client)))
            await trio.sleep(0.01)

    def chat(results: list[tuple[float, float, float]]) -> None:
        with client_for(gateway) as client:
            begun = time.monotonic()
            first = 0.0
            for _part in client.chat(
                model=OLLAMA_MODEL, messages=MESSAGES, stream=True, options={"num_predict": 32}
            ):
                first = first or time.monotonic()
            results.append((begun, first, time.monotonic()))

    # Control: straight to llama-server, two requests do run at once.
    async with async_client() as client:
        control: list[int] = []

        async def direct() -> None:
            await client.post(
                llama_chat.url + "/v1/chat/completions",
                headers=llama_chat.headers,
                json={"model": "x", "messages": MESSAGES, "max_tokens": 32, "ignore_eos": True},
            )

        async def watch() -> None:
            while True:
                control.append(busy_slots(await slots(llama_chat, client)))
                await trio.sleep(0.01)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            with trio.fail_after(120):
                async with trio.open_nursery() as pair:
                    pair.start_soon(direct)
                    pair.start_soon(direct)
            nursery.cancel_scope.cancel()
        assert max(control) == 2, "llama-server never ran two requests at once directly"

        results: list[tuple[float, float, float]] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample_gate)
            nursery.start_soon(sample_slots, client)
            async with trio.open_nursery() as pair:
                pair.start_soon(in_thread, lambda: chat(results))
                pair.start_soon(in_thread, lambda: chat(results))
            nursery.cancel_scope.cancel()

    assert len(results) == 2
    assert samples["gate_busy"] == 1
    assert samples["gate_queued"] == 1
    assert gate.figures().granted_total == 2
    await released(gate)
    assert max(slot_samples) == 1
    # The second answer starts only once the first is over (allowing for thread wake-ups).
    (_, _, end_a), (_, first_b, _) = sorted(results, key=lambda r: r[1])
    assert first_b >= end_a - 0.05, (results, samples)


async def test_router_and_passthrough_share_the_gate(gateway: Gateway) -> None:
    """A router call to the local target waits behind an `/api/chat` stream."""
    gate = gateway.services.gate
    async with (
        async_client() as client,
        client.stream(
            "POST",
            gateway.url + "/api/chat",
            json={"model": OLLAMA_MODEL, "messages": STORY, "options": {"num_predict": 96}},
        ) as stream,
    ):
        lines = stream.aiter_lines()
        await anext(lines)  # the first line: the stream holds the gate
        assert gate.figures().busy == 1
        async with trio.open_nursery() as nursery:

            async def routed() -> None:
                answer = await client.post(
                    gateway.url + "/v1/chat",
                    json={
                        "model": f"ollama/{OLLAMA_MODEL}",
                        "messages": MESSAGES,
                        "max_tokens": 8,
                    },
                )
                assert answer.status_code == 200

            nursery.start_soon(routed)
            with trio.fail_after(60):
                while gate.figures().queued == 0:  # noqa: ASYNC110
                    await trio.sleep(0.005)
            # Meanwhile a cloud-provider call does not queue: it never takes the gate.
            answer = await client.post(
                gateway.url + "/v1/chat",
                json={"model": ROUTER_MODEL, "messages": MESSAGES, "max_tokens": 4},
            )
            assert answer.status_code == 200
            assert gate.figures().busy == 1
            assert gate.figures().queued == 1
            async for _ in lines:  # finish the stream; the routed call then runs
                pass
    assert gate.figures().granted_total == 2
    await released(gate)


async def test_generate_streaming(gateway: Gateway) -> None:
    """`/api/generate` is gated like chat; the proxy turns it into a chat upstream."""

    def call() -> list[Any]:
        with client_for(gateway) as client:
            return list(
                client.generate(model=OLLAMA_MODEL, prompt="Say hi.", stream=True, options=CAP)
            )

    parts = await in_thread(call)
    assert parts[-1].done is True
    assert all(p.done is False for p in parts[:-1])
    assert "".join(p.response for p in parts).strip()
    assert gateway.services.gate.figures().granted_total == 1


async def test_show_ps_and_health(gateway: Gateway, proxy: Service) -> None:
    def call() -> tuple[Any, Any]:
        with client_for(gateway) as client:
            return client.show(OLLAMA_MODEL), client.ps()

    shown, running = await in_thread(call)
    assert shown.modelfile is not None
    assert OLLAMA_MODEL in shown.modelfile
    assert running.models == []  # ollama-proxy-plus has no notion of loaded models
    async with async_client() as client:
        health = (await client.get(gateway.url + "/health")).json()
    assert health["degraded"] is False
    assert proxy.url in str(health)
