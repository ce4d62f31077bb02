"""Issue 5.5: a bounded leak soak against `gateway serve` as a real process.

A mix of streamed and whole chats, generations, embeds, router and front-door calls,
bad requests, and clients that leave early (queued or mid-stream), from a few workers
at once. The gateway's RSS and open file descriptors are read from /proc after a
warm-up and again at the end; they must not grow beyond the margins below.

Short by default (`GATEWAY_SOAK_REQUESTS`, 300); `just soak` runs 3000.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import httpx
import pytest
import trio

from tests.emulators import OllamaEmulator
from tests.test_cli import GATEWAY, clean_environ, free_port, running, wait_for_health

REQUESTS = int(os.environ.get("GATEWAY_SOAK_REQUESTS", "300"))
WARMUP = 100
WORKERS = 8
# Margins: RSS may grow by allocator slack, not per request; fds come back to the start.
RSS_MARGIN_KIB = 12 * 1024
FD_MARGIN = 4
CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "why?"}]}


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) in KiB, and the number of open file descriptors."""
    figures: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            figures[key] = int(value.split()[0])
    figures["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return figures


KINDS = [
    "stream",
    "chat",
    "generate",
    "embed",
    "router",
    "openai_stream",
    "leave_early",
    "leave_mid_stream",
    "bad_json",
    "health",
    "hang_up",
]
_HANG_UP_BODY = json.dumps({**CHAT, "stream": True}).encode()
HANG_UPS = [
    b"GET /health HTTP/1.1\r\nhost: soak\r\n\r\n",
    b"GET /api/version HTTP/1.1\r\nhost: soak\r\n\r\n",
    b"POST /api/chat HTTP/1.1\r\nhost: soak\r\ncontent-type: application/json\r\n"
    b"content-length: " + str(len(_HANG_UP_BODY)).encode() + b"\r\n\r\n" + _HANG_UP_BODY,
]


async def one_request(client: httpx.AsyncClient, kind: str, rng: random.Random) -> str:
    """Run one request of `kind`; return what happened, for the tally."""
    if kind == "stream":
        response = await client.post("/api/chat", json=CHAT)
        assert b'"done":true' in response.content, response.content[-200:]
    elif kind == "chat":
        response = await client.post("/api/chat", json={**CHAT, "stream": False})
    elif kind == "generate":
        response = await client.post("/api/generate", json={"model": "llama3", "prompt": "x"})
    elif kind == "embed":
        body = {"model": "nomic-embed-text", "input": ["a", "b"]}
        response = await client.post("/api/embed", json=body)
    elif kind == "router":
        response = await client.post("/v1/chat", json=CHAT)
    elif kind == "openai_stream":
        response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        assert response.content.endswith(b"data: [DONE]\n\n")
    elif kind == "bad_json":
        response = await client.post("/api/chat", content=b'{"model": ')
        assert response.status_code == 400
        return "400"
    elif kind == "health":
        response = await client.get("/health" if rng.random() < 0.5 else "/metrics")
    elif kind == "hang_up":
        # Five whole requests, each on a connection of its own, gone within 2 ms.
        url = client.base_url
        for _ in range(5):
            stream = await trio.open_tcp_stream(url.host, url.port or 80)
            async with stream:
                await stream.send_all(rng.choice(HANG_UPS))
                await trio.sleep(rng.uniform(0.0, 0.002))
        return "left"
    else:
        # Leave while queued or holding (early), or after the first bytes (mid-stream).
        with trio.move_on_after(rng.uniform(0.0, 0.02) if kind == "leave_early" else 5):
            async with client.stream("POST", "/api/chat", json=CHAT) as streamed:
                async for _ in streamed.aiter_raw():
                    if kind == "leave_mid_stream":
                        return "left"
        return "left"
    assert response.status_code == 200, (kind, response.status_code, response.content[:200])
    return "200"


async def drive(url: str, count: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    plan = [rng.choice(KINDS) for _ in range(count)]
    tally: dict[str, int] = {}
    limits = httpx.Limits(max_connections=WORKERS * 2)
    async with httpx.AsyncClient(
        base_url=url, timeout=30.0, trust_env=False, limits=limits
    ) as client:

        async def worker() -> None:
            while plan:
                kind = plan.pop()
                outcome = await one_request(client, kind, rng)
                tally[f"{kind}:{outcome}"] = tally.get(f"{kind}:{outcome}", 0) + 1

        async with trio.open_nursery() as workers:
            for _ in range(WORKERS):
                workers.start_soon(worker)
    return tally


def stray_sockets(pid: int, port: int, upstream_port: int) -> int:
    """The gateway's sockets that are neither its listener nor a connection to the
    upstream: client connections still open, orphans whose TCP state is gone (a client
    that reset), and the event loop's own socketpair (constant)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    known = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            listener = local_port == port and fields[3] == "0A"
            if listener or remote_port == upstream_port:
                known.add(fields[9])
    return len(inodes - known)


async def settled(pid: int, port: int, upstream_port: int, strays: int) -> int:
    """Wait until the gateway holds no more stray sockets than `strays` (a closed
    keep-alive connection may take `keep_alive_timeout_s` to go); return the count."""
    with trio.move_on_after(10):
        while stray_sockets(pid, port, upstream_port) > strays:
            await trio.sleep(0.1)  # another process: nothing to wait on but time
    return stray_sockets(pid, port, upstream_port)


@pytest.mark.soak
async def test_leak_soak_rss_and_fds_stay_flat(tmp_path: Path, nursery: trio.Nursery) -> None:
    emulator = OllamaEmulator(token_delay_s=0.001, reply="one two three four five six")
    await nursery.start(emulator.run)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = clean_environ(
        GATEWAY_BIND=f"127.0.0.1:{port}",
        GATEWAY_OLLAMA_URL=emulator.url,
        GATEWAY_KEEP_ALIVE_TIMEOUT_S="0.5",
        GATEWAY_GATE_MAX_QUEUE="256",
        GATEWAY_LOG_FORMAT="json",
    )
    async with running([*GATEWAY, "serve"], env, url, tmp_path) as gw:
        await wait_for_health(gw)
        pid = gw.process.pid
        with trio.fail_after(60 + REQUESTS * 0.05):
            await drive(url, WARMUP, seed=1)
            await trio.sleep(1.0)  # let the warm-up's connections close
            start = proc_status(pid)
            start_strays = stray_sockets(pid, port, emulator.port)
            emulator.requests.clear()  # the emulator's records are not the gateway's
            tally = await drive(url, REQUESTS, seed=2)
            end_strays = await settled(pid, port, emulator.port, start_strays)
            end = proc_status(pid)
            async with httpx.AsyncClient(base_url=url, timeout=5.0, trust_env=False) as client:
                health = (await client.get("/health")).json()
        stderr = gw.stderr()

    print(
        f"\nsoak: {REQUESTS} requests {tally}\n"
        f"RSS start {start['VmRSS']} KiB, end {end['VmRSS']} KiB, peak {end['VmHWM']} KiB; "
        f"fds start {start['fds']}, end {end['fds']}; "
        f"sockets not listener/upstream: start {start_strays}, end {end_strays}"
    )
    assert sum(tally.values()) == REQUESTS
    assert end_strays == start_strays, f"{end_strays - start_strays} client sockets never closed"
    assert end["fds"] <= start["fds"] + FD_MARGIN, (start, end)
    assert end["VmRSS"] - start["VmRSS"] <= RSS_MARGIN_KIB, (start, end)
    assert health["gate"]["busy"] == 0
    assert health["gate"]["queued"] == 0
    assert health["in_flight"] == 0
    assert emulator.active_generations == 0
    assert "Traceback" not in stderr
