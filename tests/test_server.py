"""The HTTP server as a whole: idle keep-alive close, shutdown drain, health and readiness."""

from __future__ import annotations

import json
from typing import Any

import h11
import httpx
import pytest
import trio

from tests.conftest import RunningGateway, StartGateway, eventually, make_config
from tests.emulators import OllamaEmulator

GRACE_S = 1.0


def chat_body(tag: str, **extra: object) -> dict[str, object]:
    return {"model": "llama3", "messages": [{"role": "user", "content": tag}], **extra}


def _host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


async def _exchange(
    stream: trio.SocketStream, method: str, target: str, body: bytes = b""
) -> tuple[h11.Response, bytes]:
    """One keep-alive request on a raw socket; returns the response head and whole body."""
    conn = h11.Connection(h11.CLIENT)
    headers = [("host", "gateway"), ("connection", "keep-alive")]
    if body:
        headers += [("content-type", "application/json"), ("content-length", str(len(body)))]
    data = conn.send(h11.Request(method=method, target=target, headers=headers))
    data += conn.send(h11.Data(data=body)) if body else b""
    data += conn.send(h11.EndOfMessage())
    await stream.send_all(data)
    head: h11.Response | None = None
    payload = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            chunk = await stream.receive_some(65536)
            assert chunk, "the server closed the connection before the response ended"
            conn.receive_data(chunk)
        elif isinstance(event, h11.Response):
            head = event
        elif isinstance(event, h11.Data):
            payload += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            return head, bytes(payload)


def _header(head: h11.Response, name: bytes) -> bytes | None:
    return next((v for k, v in head.headers if k == name), None)


# ------------------------------------------------------------------ idle keep-alive close


@pytest.mark.parametrize(
    ("method", "target", "body", "route"),
    [
        ("GET", "/health", b"", "quart"),
        ("GET", "/ready", b"", "quart"),
        ("GET", "/api/version", b"", "passthrough"),
        ("POST", "/api/chat", json.dumps(chat_body("idle")).encode(), "passthrough stream"),
    ],
    ids=["health", "ready", "version", "chat-stream"],
)
async def test_idle_keep_alive_connection_is_closed_after_the_timeout(
    start_gateway: StartGateway,
    ollama: OllamaEmulator,
    method: str,
    target: str,
    body: bytes,
    route: str,
) -> None:
    """After one complete keep-alive exchange the server closes the idle connection at
    `keep_alive_timeout_s`, not never (STACK-NOTES 4: quart-trio cancelled the idle timer)."""
    gw = await start_gateway(make_config(ollama.url, keep_alive_timeout_s=0.5))
    stream = await trio.open_tcp_stream(*_host_port(gw.url))
    async with stream:
        with trio.fail_after(3):
            head, payload = await _exchange(stream, method, target, body)
            answered = trio.current_time()
            assert head.status_code == 200, payload
            assert _header(head, b"connection") != b"close"  # it really is kept alive
            assert payload
            eof = await stream.receive_some(65536)
            closed = trio.current_time()
    assert eof == b"", f"{route}: unexpected bytes on an idle connection: {eof!r}"
    # Closed by the keep-alive timer: not at once (keep-alive honoured), not much later.
    assert 0.4 <= closed - answered <= 2.0, f"{route}: idle close after {closed - answered:.2f} s"


# ----------------------------------------------------------------------- shutdown drain


async def _stream_lines(
    client: httpx.AsyncClient, body: dict[str, object], out: list[bytes]
) -> int:
    """POST a streaming chat, appending each complete NDJSON line as it arrives."""
    async with client.stream("POST", "/api/chat", json=body) as response:
        buffer = b""
        async for chunk in response.aiter_raw():
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                out.append(line)
        if buffer:
            out.append(buffer)
        return response.status_code


async def _new_request_is_refused(url: str) -> str:
    """A fresh client during the drain: 503 in Ollama's shape, or no connection at all."""
    async with httpx.AsyncClient(base_url=url, timeout=2.0, trust_env=False) as fresh:
        try:
            response = await fresh.post("/api/chat", json=chat_body("late"))
        except httpx.ConnectError:
            return "refused"
    assert response.status_code == 503, response.content
    assert "shutting down" in response.json()["error"]
    return "503"


async def test_shutdown_sheds_the_queue_and_lets_the_running_stream_finish(
    start_gateway: StartGateway, ollama: OllamaEmulator
) -> None:
    """On shutdown the queued chat gets 503 at once, new work is refused, and the running
    stream, released within the grace period, completes normally; serve then returns."""
    gw = await start_gateway(make_config(ollama.url, shutdown_grace_s=GRACE_S))
    gate = gw.services.gate
    ollama.hold = trio.Event()
    lines: list[bytes] = []
    statuses: dict[str, int] = {}
    queued: dict[str, Any] = {}

    ended_at: list[float] = []

    async def holder() -> None:
        statuses["holder"] = await _stream_lines(gw.client, chat_body("holder"), lines)
        ended_at.append(trio.current_time())

    async def waiter() -> None:
        response = await gw.client.post("/api/chat", json=chat_body("waiter"))
        queued["status"] = response.status_code
        queued["body"] = response.json()
        queued["retry_after"] = response.headers.get("retry-after")

    with trio.fail_after(GRACE_S + 5):
        async with trio.open_nursery() as clients:
            clients.start_soon(holder)
            await ollama.wait_until(lambda: ollama.active_generations == 1)
            await eventually(lambda: len(lines) >= 1)  # the stream has started
            clients.start_soon(waiter)
            await eventually(lambda: gate.queued == 1)

            gw.stop.set()
            stop_at = trio.current_time()
            await eventually(lambda: "status" in queued)
            assert queued["status"] == 503
            assert "shutting down" in queued["body"]["error"]
            assert queued["retry_after"] is not None
            assert gw.services.drain.draining
            await _new_request_is_refused(gw.url)
            # Still within the grace period: the holder has not been ended.
            assert trio.current_time() - stop_at < GRACE_S
            assert not any(b'"error"' in line for line in lines), lines
            ollama.hold.set()
        await gw.stopped.wait()
    stopped_at = trio.current_time()

    assert statuses["holder"] == 200
    final = json.loads(lines[-1])
    assert final["done"] is True, lines
    assert "error" not in final
    content = "".join(json.loads(line)["message"]["content"] for line in lines)
    assert content == ollama.reply
    assert ollama.generation_order == ["holder"]
    assert ollama.completed_generations == 1
    # Nothing is left to wait for once the stream has ended: no lingering connection.
    assert stopped_at - ended_at[0] < 1.0, stopped_at - ended_at[0]
    assert stopped_at - stop_at < GRACE_S + 3


async def test_shutdown_ends_a_stream_that_outlives_the_grace_with_an_error_line(
    start_gateway: StartGateway, ollama: OllamaEmulator
) -> None:
    """A stream still running when the grace period ends gets an NDJSON error line (not a
    silent cut), no earlier than the grace; the upstream call is cancelled; serve returns."""
    gw = await start_gateway(make_config(ollama.url, shutdown_grace_s=GRACE_S))
    ollama.hold = trio.Event()  # never released
    lines: list[bytes] = []
    statuses: dict[str, int] = {}
    ended_at: list[float] = []

    async def holder() -> None:
        statuses["holder"] = await _stream_lines(gw.client, chat_body("holder"), lines)
        ended_at.append(trio.current_time())

    with trio.fail_after(GRACE_S + 5):
        async with trio.open_nursery() as clients:
            clients.start_soon(holder)
            await ollama.wait_until(lambda: ollama.active_generations == 1)
            await eventually(lambda: len(lines) >= 1)
            gw.stop.set()
            stop_at = trio.current_time()
        await gw.stopped.wait()
    stopped_at = trio.current_time()

    assert statuses["holder"] == 200
    assert len(lines) >= 2, lines
    assert json.loads(lines[0])["done"] is False
    last = json.loads(lines[-1])
    assert set(last) == {"error"}, lines
    assert "shutting down" in last["error"]
    # Ended by the grace period, not at once and not by the server's own cut.
    assert GRACE_S * 0.9 <= ended_at[0] - stop_at < GRACE_S + 2, ended_at[0] - stop_at
    assert stopped_at - ended_at[0] < 1.0, stopped_at - ended_at[0]
    assert stopped_at - stop_at < GRACE_S + 3
    await ollama.wait_until(lambda: ollama.cancelled_generations == 1)
    assert ollama.completed_generations == 0


async def test_serve_returns_as_soon_as_a_request_finished_during_the_drain(
    start_gateway: StartGateway, ollama: OllamaEmulator
) -> None:
    """An (ungated) embed that answers during the drain completes normally, its keep-alive
    connection is closed, and serve returns at once rather than at the hard deadline."""
    gw = await start_gateway(make_config(ollama.url, shutdown_grace_s=GRACE_S))
    ollama.embed_hold = trio.Event()
    answer: dict[str, Any] = {}

    async def embed() -> None:
        response = await gw.client.post(
            "/api/embed", json={"model": "nomic-embed-text", "input": "drain"}
        )
        answer["status"] = response.status_code
        answer["body"] = response.json()
        answer["at"] = trio.current_time()

    with trio.fail_after(GRACE_S + 5):
        async with trio.open_nursery() as clients:
            clients.start_soon(embed)
            await ollama.wait_until(lambda: ollama.active_embeds == 1)
            gw.stop.set()
            stop_at = trio.current_time()
            await eventually(lambda: gw.services.drain.draining)
            ollama.embed_hold.set()
        await gw.stopped.wait()
    stopped_at = trio.current_time()

    assert answer["status"] == 200
    assert len(answer["body"]["embeddings"][0]) > 0
    assert answer["at"] - stop_at < GRACE_S
    assert stopped_at - answer["at"] < 1.0, stopped_at - answer["at"]


async def test_shutdown_with_nothing_running_returns_at_once(gateway: RunningGateway) -> None:
    """With no request in flight (an idle keep-alive connection included), serve returns
    well before the grace period: nothing waits out the drain."""
    assert (await gateway.client.get("/health")).status_code == 200  # leaves a pooled conn
    gateway.stop.set()
    started = trio.current_time()
    with trio.fail_after(5):
        await gateway.stopped.wait()
    assert trio.current_time() - started < 1.0


# ------------------------------------------------------------------------- health, ready


async def test_health_reports_the_gate_while_chats_hold_and_queue(
    gateway: RunningGateway, ollama: OllamaEmulator
) -> None:
    """`/health` shows status, target, models and live gate figures (busy, then queued);
    `/ready` is 200 while the target is up."""
    gate = gateway.services.gate
    ollama.hold = trio.Event()
    statuses: list[int] = []

    async def chat(tag: str) -> None:
        response = await gateway.client.post("/api/chat", json=chat_body(tag, stream=False))
        statuses.append(response.status_code)

    with trio.fail_after(5):
        idle = (await gateway.client.get("/health")).json()
        assert idle["gate"]["busy"] == 0
        assert idle["gate"]["queued"] == 0

        async with trio.open_nursery() as clients:
            clients.start_soon(chat, "first")
            await ollama.wait_until(lambda: ollama.active_generations == 1)
            response = await gateway.client.get("/health")
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("application/json")
            health = response.json()
            assert health["status"] == "ok"
            assert health["degraded"] is False
            assert health["draining"] is False
            assert health["target"] == ollama.url
            assert health["models"] == len(ollama.models) == 3
            assert health["gate"]["capacity"] == 1
            assert health["gate"]["busy"] == 1
            assert health["gate"]["queued"] == 0
            assert health["gate"]["max_queue"] == 64
            # Models as Ollama names them (`llama3` is `llama3:latest`): the scheduler's view.
            assert [h["model"] for h in health["gate"]["holders"]] == ["llama3:latest"]
            assert health["gate"]["holders"][0]["client"] == "127.0.0.1"
            assert health["gate"]["holders"][0]["priority"] == "normal"
            assert health["in_flight"] == 1

            clients.start_soon(chat, "second")
            await eventually(lambda: gate.queued == 1)
            health = (await gateway.client.get("/health")).json()
            assert health["gate"]["busy"] == 1
            assert health["gate"]["queued"] == 1
            (waiter,) = health["gate"]["waiters"]
            assert (waiter["client"], waiter["model"], waiter["priority"]) == (
                "127.0.0.1",
                "llama3:latest",
                "normal",
            )
            assert waiter["waited_s"] >= 0
            assert waiter["estimated_start_s"] == 0  # nothing measured yet
            assert health["in_flight"] == 2

            ready = await gateway.client.get("/ready")
            assert ready.status_code == 200
            assert ready.json() == {"ready": True, "status": "ok"}
            ollama.hold.set()

        after = (await gateway.client.get("/health")).json()
    assert statuses == [200, 200]
    assert after["gate"]["busy"] == 0
    assert after["gate"]["queued"] == 0
    assert after["gate"]["granted_total"] == 2
    assert after["in_flight"] == 0
