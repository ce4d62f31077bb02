"""Issue 5.4 and 5.7: bounded load on loopback, and shutdown under load.

Load: 500 chat clients queue on the capacity-1 gate (started one after another, each only
once the previous one holds the gate or waits in its queue, so their arrival order is
known), 50 embed clients run while the gate is held, then the gate opens. Every chat
client is served in arrival order or refused with 503 by the queue limit, none is lost
or served twice (the emulator records each generation once), embeds never wait.

Shutdown: `gateway serve` as a real process gets SIGTERM while streams run (local and
cloud, some ending within the grace period, some not) and clients queue: queued clients
get 503, streams finish or end with an error line (NDJSON) or an error event (SSE),
the process exits 0 without a traceback.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import httpx
import trio

from tests.conftest import StartGateway, eventually, make_config
from tests.emulators import OllamaEmulator, OpenAIEmulator
from tests.test_cli import GATEWAY, clean_environ, free_port, running, wait_for_health

CLIENTS = 500
MAX_QUEUE = 400  # one holder + 400 waiters admitted; the other 99 are refused
EMBEDS = 50


def chat_body(tag: str, *, stream: bool) -> dict[str, Any]:
    return {"model": "llama3", "messages": [{"role": "user", "content": tag}], "stream": stream}


async def test_500_queued_chats_are_served_in_order_or_refused_and_embeds_pass(
    start_gateway: StartGateway, nursery: trio.Nursery
) -> None:
    emulator = OllamaEmulator(reply="Rayleigh scattering.", embed_delay_s=0.05)
    await nursery.start(emulator.run)
    gw = await start_gateway(make_config(emulator.url, gate={"max_queue": MAX_QUEUE}))
    gate = gw.services.gate
    emulator.hold = trio.Event()
    answers: dict[int, httpx.Response] = {}
    embeds: list[httpx.Response] = []
    limits = httpx.Limits(max_connections=CLIENTS + EMBEDS + 10, max_keepalive_connections=0)
    tags = [f"client-{i:03d}" for i in range(CLIENTS)]
    started = trio.current_time()

    async with httpx.AsyncClient(
        base_url=gw.url, limits=limits, timeout=60.0, trust_env=False
    ) as client:

        async def chat(i: int) -> None:
            body = chat_body(tags[i], stream=i % 2 == 0)
            answers[i] = await client.post("/api/chat", json=body)

        async def embed(j: int) -> None:
            body = {"model": "nomic-embed-text", "input": f"text {j}"}
            embeds.append(await client.post("/api/embed", json=body))

        with trio.fail_after(60):
            async with trio.open_nursery() as clients:
                for i in range(CLIENTS):
                    clients.start_soon(chat, i)
                    if i <= MAX_QUEUE:  # admitted: holds the gate or waits in its queue
                        await eventually(lambda i=i: gate.busy + gate.queued == i + 1)
                    else:  # refused at once
                        await eventually(lambda i=i: i in answers)
                queued_at_peak = gate.queued
                assert (gate.busy, queued_at_peak) == (1, MAX_QUEUE)
                async with trio.open_nursery() as embedders:
                    for j in range(EMBEDS):
                        embedders.start_soon(embed, j)
                # All embeds answered while the first chat still holds the gate.
                assert emulator.active_generations == 1
                assert gate.queued == MAX_QUEUE
                emulator.hold.set()
    elapsed = trio.current_time() - started

    admitted = range(MAX_QUEUE + 1)
    for i in admitted:
        response = answers[i]
        assert response.status_code == 200, (i, response.content)
        last = json.loads(response.content.splitlines()[-1])
        assert last["done"] is True, (i, response.content)
    for i in range(MAX_QUEUE + 1, CLIENTS):
        response = answers[i]
        assert response.status_code == 503, (i, response.content)
        assert response.headers["retry-after"].isdigit()
        assert response.json()["error"].startswith("server busy")
    assert len(answers) == CLIENTS  # none lost
    # First come, first served; each generation exactly once; never two at a time.
    assert emulator.generation_order == [tags[i] for i in admitted]
    assert len(emulator.requests_to("/api/chat")) == MAX_QUEUE + 1
    assert emulator.completed_generations == MAX_QUEUE + 1
    assert emulator.max_concurrent_generations == 1
    assert [r.status_code for r in embeds] == [200] * EMBEDS
    assert emulator.max_concurrent_embeds > 1
    await eventually(lambda: (gate.busy, gate.queued, gw.services.drain.active) == (0, 0, 0))
    assert gate.figures().granted_total == MAX_QUEUE + 1
    assert elapsed < 60
    print(f"\nload: {CLIENTS} chats + {EMBEDS} embeds in {elapsed:.1f} s")


# ----------------------------------------------------------------------- shutdown under load

GRACE_S = 2.0
CAPACITY = 2
QUEUED = 20
CLOUD_STREAMS = 3
OPENROUTER_KEY = "sk-load-openrouter"


def _config(tmp: Path, port: int, ollama: OllamaEmulator, openrouter: OpenAIEmulator) -> Path:
    path = tmp / "gateway.toml"
    providers = "".join(
        f'[providers.{name}]\nenv_file = ""\n' for name in ("ollama_cloud", "opencode", "kimi")
    )
    path.write_text(
        f'bind = "127.0.0.1:{port}"\n'
        f"shutdown_grace_s = {GRACE_S}\n"
        f'log_format = "json"\n'
        f'[ollama]\nurl = "{ollama.url}"\n'
        f"[gate]\ncapacity = {CAPACITY}\nmax_queue = 64\n"
        f'[providers.openrouter]\nbase_url = "{openrouter.url}/api/v1"\nenv_file = ""\n'
        + providers,
        encoding="utf-8",
    )
    return path


async def _read_stream(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], out: dict[str, Any]
) -> None:
    async with client.stream("POST", path, json=body) as response:
        out["status"] = response.status_code
        out["chunks"] = []
        async for chunk in response.aiter_raw():
            out["chunks"].append(chunk)
            out.setdefault("first_at", trio.current_time())
    out["ended_at"] = trio.current_time()
    out["body"] = b"".join(out["chunks"])


async def test_sigterm_under_load_drains_and_exits_0(tmp_path: Path, nursery: trio.Nursery) -> None:
    """SIGTERM with two local streams holding the gate (one ends inside the grace period,
    one would run 10 s more), three OpenRouter SSE streams, and 20 queued chats."""
    ollama = OllamaEmulator(token_delay_s=0.05, reply=" ".join(["word"] * 200))
    await nursery.start(ollama.run)
    openrouter = OpenAIEmulator(
        api_key=OPENROUTER_KEY, token_delay_s=0.05, reply=" ".join(["word"] * 200)
    )
    await nursery.start(openrouter.run)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = _config(tmp_path, port, ollama, openrouter)
    env = clean_environ(OPENROUTER_API_KEY=OPENROUTER_KEY)
    args = [*GATEWAY, "serve", "--config", str(config)]
    short: dict[str, Any] = {}
    long: dict[str, Any] = {}
    cloud: list[dict[str, Any]] = [{} for _ in range(CLOUD_STREAMS)]
    queued: list[httpx.Response] = []

    async with running(args, env, url, tmp_path) as gw:
        await wait_for_health(gw)
        limits = httpx.Limits(max_connections=64)
        async with (
            httpx.AsyncClient(base_url=url, timeout=30.0, trust_env=False, limits=limits) as client,
            trio.open_nursery() as clients,
        ):
            # 30 tokens at 50 ms: ends 1.5 s from its start, inside the 2 s grace.
            short_body = {**chat_body("short", stream=True), "options": {"num_predict": 30}}
            clients.start_soon(_read_stream, client, "/api/chat", short_body, short)
            clients.start_soon(
                _read_stream, client, "/api/chat", chat_body("long", stream=True), long
            )
            for n in range(CLOUD_STREAMS):
                body = {
                    "model": "openrouter/openai/gpt-4o-mini",
                    "messages": [{"role": "user", "content": f"cloud {n}"}],
                    "stream": True,
                }
                clients.start_soon(_read_stream, client, "/v1/chat/completions", body, cloud[n])

            async def waiter(n: int) -> None:
                body = chat_body(f"queued {n}", stream=False)
                queued.append(await client.post("/api/chat", json=body))

            with trio.fail_after(10):
                await ollama.wait_until(lambda: ollama.active_generations == CAPACITY)
                await openrouter.wait_until(lambda: openrouter.active_generations == CLOUD_STREAMS)
                for n in range(QUEUED):
                    clients.start_soon(waiter, n)
                while True:  # another process: ask its /health
                    health = (await client.get("/health")).json()
                    if health["gate"]["queued"] == QUEUED:
                        break
                    await trio.sleep(0.02)
                assert health["gate"]["busy"] == CAPACITY
                await eventually(lambda: all("first_at" in s for s in (short, long, *cloud)))

            gw.process.send_signal(signal.SIGTERM)
            signalled = trio.current_time()
            with trio.fail_after(GRACE_S + 8):
                returncode = await gw.process.wait()
            exited = trio.current_time()
        stderr = gw.stderr()

    assert returncode == 0, stderr
    assert "Traceback" not in stderr, stderr
    assert "Error in ASGI" not in stderr, stderr
    assert exited - signalled < GRACE_S + 4, exited - signalled
    # Queued: 503 with Retry-After, at once.
    assert len(queued) == QUEUED
    for response in queued:
        assert response.status_code == 503, response.content
        assert "shutting down" in response.json()["error"]
        assert response.headers["retry-after"].isdigit()
    # The short stream finished normally inside the grace period.
    assert short["status"] == 200
    last = json.loads(short["body"].splitlines()[-1])
    assert last["done"] is True, short["body"][-300:]
    assert short["ended_at"] - signalled < GRACE_S
    # The long one was ended at the grace period with an NDJSON error line.
    assert long["status"] == 200
    last = json.loads(long["body"].splitlines()[-1])
    assert set(last) == {"error"}, long["body"][-300:]
    assert "shutting down" in last["error"]
    assert GRACE_S * 0.9 <= long["ended_at"] - signalled < GRACE_S + 2
    # The SSE streams end with an error event and [DONE], never a silent cut.
    for stream in cloud:
        assert stream["status"] == 200
        assert stream["body"].endswith(b"data: [DONE]\n\n"), stream["body"][-300:]
        events = [e for e in stream["body"].split(b"\n\n") if e.startswith(b"data: {")]
        error = json.loads(events[-1].removeprefix(b"data: "))["error"]
        assert "shutting down" in error["message"]
    # Nothing generates upstream any more; the queued chats never reached it.
    await ollama.wait_until(lambda: ollama.active_generations == 0)
    await openrouter.wait_until(lambda: openrouter.active_generations == 0)
    assert sorted(ollama.generation_order) == ["long", "short"]
    assert ollama.completed_generations == 1
    assert openrouter.cancelled_generations == CLOUD_STREAMS
