"""Several GPU hosts (issue 15, ADR 0020) with real Ollama-protocol servers: two
ollama-proxy-plus processes in front of the same llama-server, as two hosts of one gateway.

What is asserted is what a client and an operator see: two generations at once run on
the two hosts, one each (each host's gate granted one); a host whose process is gone is
degraded on its own, and every request still gets its answer from the other host.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import trio

from e2e.conftest import (
    OLLAMA_MODEL,
    Gateway,
    Service,
    async_client,
    eventually,
    start_gateway,
    start_proxy,
    stop,
)

STORY = [{"role": "user", "content": "Write a long story about a dragon, in ten chapters."}]


def chat(num_predict: int, *, stream: bool) -> dict[str, Any]:
    return {
        "model": OLLAMA_MODEL,
        "messages": STORY,
        "stream": stream,
        "options": {"num_predict": num_predict},
    }


async def two_host_gateway(
    nursery: trio.Nursery, a: Service, b: Service, llama: Service
) -> Gateway:
    return await start_gateway(nursery, a, llama, hosts={"a": a, "b": b})


async def finish(gw: Gateway) -> None:
    gw.stop.set()
    with trio.fail_after(15):
        await gw.stopped.wait()


def granted(gw: Gateway, name: str) -> int:
    host = gw.services.hosts.get(name)
    assert host is not None
    return host.gate.figures().granted_total


async def test_two_generations_run_at_once_one_on_each_host(
    nursery: trio.Nursery, proxy: Service, proxy_b: Service, llama_chat: Service
) -> None:
    gw = await two_host_gateway(nursery, proxy, proxy_b, llama_chat)
    busy = {"a": 0, "b": 0}
    answers: list[str] = []

    async def one(client: httpx.AsyncClient) -> None:
        frames = []
        async with client.stream("POST", gw.url + "/api/chat", json=chat(48, stream=True)) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line:
                    frames.append(json.loads(line))
        assert frames[-1]["done"] is True
        answers.append("".join(f["message"]["content"] for f in frames))

    async with async_client() as client, trio.open_nursery() as inner:
        inner.start_soon(one, client)
        inner.start_soon(one, client)

        def both_busy() -> bool:
            for name in busy:
                host = gw.services.hosts.get(name)
                assert host is not None
                busy[name] = max(busy[name], host.gate.figures().busy)
            return all(busy.values())

        # Each host's gate (capacity 1) holds one of the two at the same moment.
        await eventually(both_busy, timeout_s=60)
    assert len(answers) == 2
    assert all(text.strip() for text in answers)
    assert (granted(gw, "a"), granted(gw, "b")) == (1, 1)
    async with async_client() as client:
        health = (await client.get(gw.url + "/health")).json()
    assert set(health["hosts"]) == {"a", "b"}
    assert not health["hosts"]["a"]["degraded"]
    assert not health["hosts"]["b"]["degraded"]
    await finish(gw)


async def test_a_host_that_is_gone_is_degraded_alone_and_its_requests_run_elsewhere(
    nursery: trio.Nursery,
    manifest: dict[str, Any],
    logs: Path,
    tmp_path: Path,
    proxy: Service,
    llama_chat: Service,
    llama_embed: Service,
) -> None:
    doomed = start_proxy(
        "ollama-proxy-plus-doomed", manifest, logs, tmp_path, llama_chat, llama_embed
    )
    gw = await two_host_gateway(nursery, doomed, proxy, llama_chat)
    stop(doomed)  # host a's process is gone; the gateway has not polled it since

    statuses: list[int] = []

    async def one(client: httpx.AsyncClient) -> None:
        answer = await client.post(gw.url + "/api/chat", json=chat(8, stream=False))
        statuses.append(answer.status_code)
        assert answer.json()["message"]["content"].strip()

    async with async_client() as client:
        with trio.fail_after(120):
            async with trio.open_nursery() as inner:
                # Two at once: whichever is placed on a finds its connection refused (nothing
                # sent) and runs on b instead, after the other.
                inner.start_soon(one, client)
                inner.start_soon(one, client)
        assert statuses == [200, 200]
        assert granted(gw, "b") == 2
        health = (await client.get(gw.url + "/health")).json()
        assert health["hosts"]["a"]["degraded"] is True
        assert health["hosts"]["b"]["degraded"] is False
        ready = await client.get(gw.url + "/ready")
        assert ready.status_code == 200  # one host serves: the gateway is ready
        # Listings keep the gone host's last inventory, and the model once.
        tags = (await client.get(gw.url + "/api/tags")).json()["models"]
        assert [m["name"] for m in tags].count(OLLAMA_MODEL) == 1
    await finish(gw)
