"""The Ollama passthrough, end to end: a real gateway, a real client, the Ollama emulator."""

from __future__ import annotations

import json
import socket
from functools import partial

import httpx
import pytest
import trio

from tests.conftest import RunningGateway, StartGateway, eventually, make_config
from tests.emulators import OllamaEmulator

CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "why is the sky blue?"}]}


def chat_body(tag: str, **extra: object) -> dict[str, object]:
    return {"model": "llama3", "messages": [{"role": "user", "content": tag}], **extra}


async def test_streamed_bytes_equal_the_upstream_bytes(
    gateway: RunningGateway, ollama: OllamaEmulator
) -> None:
    body = {
        **CHAT,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "images": ["aGVsbG8="],
        "think": True,
        "options": {"temperature": 0.1, "some_future_option": [1, 2]},
        "keep_alive": "5m",
        "format": "",
    }
    raw = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode() + b"  \n"
    with trio.fail_after(10):
        response = await gateway.client.post("/api/chat", content=raw)
    upstream = ollama.requests_to("/api/chat")[-1]
    assert upstream.body == raw  # forwarded as received, unknown fields and all
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-ndjson"
    assert response.content == b"".join(line for _, line in upstream.emitted)
    final = json.loads(response.content.splitlines()[-1])
    assert final["done"] is True
    assert final["done_reason"] == "stop"


async def test_non_streaming_chat_is_passed_through(
    gateway: RunningGateway, ollama: OllamaEmulator
) -> None:
    with trio.fail_after(10):
        response = await gateway.client.post("/api/chat", json={**CHAT, "stream": False})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    answer = response.json()
    assert answer["message"]["content"] == ollama.reply
    assert answer["eval_count"] > 0
    assert response.content == b"".join(
        line for _, line in ollama.requests_to("/api/chat")[-1].emitted
    )


async def test_each_line_arrives_before_the_next_is_produced(
    start_gateway: StartGateway, nursery: trio.Nursery
) -> None:
    emulator = OllamaEmulator(token_delay_s=0.05, reply="one two three four five six")
    await nursery.start(emulator.run)
    gw = await start_gateway(make_config(emulator.url))
    arrivals: list[tuple[float, bytes]] = []
    with trio.fail_after(10):
        async with gw.client.stream(
            "POST", "/api/generate", json={"model": "llama3", "prompt": "x"}
        ) as response:
            buffer = b""
            async for chunk in response.aiter_raw():
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    arrivals.append((trio.current_time(), line + b"\n"))
    emitted = emulator.requests_to("/api/generate")[-1].emitted
    assert [line for _, line in arrivals] == [line for _, line in emitted]
    assert len(emitted) == 7
    for (arrived, _), (next_emitted, _) in zip(arrivals, emitted[1:], strict=False):
        assert arrived < next_emitted


async def test_chats_are_serialized_in_arrival_order_while_embeds_run_concurrently(
    start_gateway: StartGateway, nursery: trio.Nursery
) -> None:
    emulator = OllamaEmulator(token_delay_s=0.01, embed_delay_s=0.05)
    await nursery.start(emulator.run)
    gw = await start_gateway(make_config(emulator.url))
    gate = gw.services.gate
    emulator.hold = trio.Event()
    results: dict[str, int] = {}
    embed_done: list[float] = []

    async def chat(tag: str) -> None:
        response = await gw.client.post("/api/chat", json=chat_body(tag))
        results[tag] = response.status_code

    async def embed(n: int) -> None:
        response = await gw.client.post(
            "/api/embed", json={"model": "nomic-embed-text", "input": f"text {n}"}
        )
        assert response.status_code == 200
        assert len(response.json()["embeddings"]) == 1
        embed_done.append(trio.current_time())

    with trio.fail_after(20):
        async with trio.open_nursery() as clients:
            for n in range(6):
                clients.start_soon(chat, f"chat-{n}")
                # Wait until this one holds the gate or queues, so arrival order is known.
                await eventually(lambda n=n: gate.busy + gate.queued == n + 1)
            assert gate.busy == 1
            assert gate.queued == 5
            async with trio.open_nursery() as embeds:
                for n in range(20):
                    embeds.start_soon(embed, n)
            # All 20 embeds finished while the first chat still held the gate.
            assert emulator.active_generations == 1
            assert len(embed_done) == 20
            emulator.hold.set()
    assert emulator.max_concurrent_generations == 1
    assert emulator.generation_order == [f"chat-{n}" for n in range(6)]
    assert emulator.max_concurrent_embeds > 1
    assert set(results.values()) == {200}
    await eventually(lambda: (gate.busy, gate.queued) == (0, 0))


async def test_full_queue_gets_503_with_retry_after(
    start_gateway: StartGateway, ollama: OllamaEmulator, nursery: trio.Nursery
) -> None:
    gw = await start_gateway(make_config(ollama.url, gate={"max_queue": 1}))
    gate = gw.services.gate
    ollama.hold = trio.Event()
    statuses: list[int] = []

    async def chat(tag: str) -> None:
        statuses.append((await gw.client.post("/api/chat", json=chat_body(tag))).status_code)

    with trio.fail_after(10):
        async with trio.open_nursery() as clients:
            clients.start_soon(chat, "holder")
            await eventually(lambda: gate.busy == 1)
            clients.start_soon(chat, "waiter")
            await eventually(lambda: gate.queued == 1)
            refused = await gw.client.post("/api/chat", json=chat_body("refused"))
            assert refused.status_code == 503
            assert refused.headers["retry-after"].isdigit()
            assert refused.json()["error"].startswith("server busy")
            ollama.hold.set()
    assert statuses == [200, 200]
    assert "refused" not in ollama.generation_order


async def test_waiter_that_disconnects_leaves_the_queue(
    gateway: RunningGateway, ollama: OllamaEmulator
) -> None:
    gate = gateway.services.gate
    ollama.hold = trio.Event()
    with trio.fail_after(10):
        async with trio.open_nursery() as clients:
            clients.start_soon(partial(gateway.client.post, "/api/chat", json=chat_body("holder")))
            await eventually(lambda: gate.busy == 1)
            waiter = trio.CancelScope()
            clients.start_soon(_post_in_scope, gateway.client, waiter, chat_body("leaver"))
            await eventually(lambda: gate.queued == 1)
            waiter.cancel()
            await eventually(lambda: gate.queued == 0)
            ollama.hold.set()
    assert ollama.generation_order == ["holder"]


async def _post_in_scope(
    client: httpx.AsyncClient, scope: trio.CancelScope, body: dict[str, object]
) -> None:
    with scope:
        await client.post("/api/chat", json=body)


async def test_holder_that_disconnects_cancels_upstream_and_passes_the_gate(
    gateway: RunningGateway, ollama: OllamaEmulator
) -> None:
    gate = gateway.services.gate
    ollama.hold = trio.Event()
    with trio.fail_after(10):
        async with trio.open_nursery() as clients:
            holder = trio.CancelScope()
            clients.start_soon(_post_in_scope, gateway.client, holder, chat_body("holder"))
            await ollama.wait_until(lambda: ollama.active_generations == 1)
            clients.start_soon(partial(gateway.client.post, "/api/chat", json=chat_body("next")))
            await eventually(lambda: gate.queued == 1)
            holder.cancel()
            # The emulator sees the upstream connection closed; the next waiter starts.
            await ollama.wait_until(lambda: ollama.cancelled_generations == 1)
            await ollama.wait_until(lambda: ollama.generation_order == ["holder", "next"])
            ollama.hold.set()
    await eventually(lambda: (gate.busy, gate.queued) == (0, 0))


async def test_slow_reader_is_dropped_at_the_write_deadline(
    start_gateway: StartGateway, nursery: trio.Nursery
) -> None:
    # About 16 MB of answer, far more than the socket buffers hold.
    emulator = OllamaEmulator(reply=("x" * 4000 + " ") * 4000)
    await nursery.start(emulator.run)
    gw = await start_gateway(make_config(emulator.url, write_timeout_s=0.5))
    host, port = gw.url.removeprefix("http://").split(":")
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect((host, int(port)))
    body = json.dumps(chat_body("slow")).encode()
    request = (
        f"POST /api/chat HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body
    await sock.send(request)
    gate = gw.services.gate
    with trio.fail_after(10):
        await emulator.wait_until(lambda: emulator.active_generations == 1)
        # Never read: the gateway must drop us and free the gate by itself.
        await eventually(lambda: gate.busy == 0)
        await emulator.wait_until(lambda: emulator.cancelled_generations == 1)
        response = await gw.client.post("/api/chat", json={**chat_body("after"), "stream": False})
    assert response.status_code == 200
    sock.close()


async def test_unknown_model_gets_ollamas_404_after_one_repoll(
    gateway: RunningGateway, ollama: OllamaEmulator
) -> None:
    polls_before = len(ollama.requests_to("/api/tags"))
    response = await gateway.client.post("/api/chat", json={**CHAT, "model": "nope:7b"})
    assert response.status_code == 404
    assert response.json() == {"error": 'model "nope:7b" not found, try pulling it first'}
    assert len(ollama.requests_to("/api/tags")) == polls_before + 1
    assert ollama.requests_to("/api/chat") == []


async def test_a_model_pulled_after_start_is_found_by_the_repoll(
    gateway: RunningGateway, ollama: OllamaEmulator
) -> None:
    ollama.add_model("mistral:latest")
    response = await gateway.client.post(
        "/api/chat", json={**CHAT, "model": "mistral", "stream": False}
    )
    assert response.status_code == 200


@pytest.mark.parametrize("name", ["llama3", "llama3:latest"])
async def test_name_and_name_latest_are_the_same_model(
    gateway: RunningGateway, ollama: OllamaEmulator, name: str
) -> None:
    response = await gateway.client.post("/api/chat", json={**CHAT, "model": name, "stream": False})
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/", None),
        ("HEAD", "/", None),
        ("GET", "/api/version", None),
        ("HEAD", "/api/version", None),
        ("GET", "/api/tags", None),
        ("GET", "/api/ps", None),
        ("POST", "/api/show", {"model": "llama3"}),
        ("POST", "/api/show", {"model": "nope"}),
        ("POST", "/api/embeddings", {"model": "nomic-embed-text", "prompt": "hi"}),
        ("POST", "/api/embed", {"model": "nomic-embed-text", "input": ["a", "b"]}),
    ],
)
async def test_plain_routes_answer_as_the_upstream_does(
    gateway: RunningGateway, ollama: OllamaEmulator, method: str, path: str, body: object
) -> None:
    async with httpx.AsyncClient(base_url=ollama.url) as direct:
        expected = await direct.request(method, path, json=body)
    got = await gateway.client.request(method, path, json=body)
    assert got.status_code == expected.status_code
    assert got.headers["content-type"] == expected.headers["content-type"]
    if path in ("/api/embed", "/api/ps"):
        # Durations and expiry times differ per call; the shape and values must not.
        assert got.json().keys() == expected.json().keys()
    else:
        assert got.headers.get("content-length") == expected.headers.get("content-length")
        assert got.content == expected.content


async def test_management_routes_are_refused_unless_enabled(
    start_gateway: StartGateway, ollama: OllamaEmulator
) -> None:
    locked = await start_gateway(make_config(ollama.url))
    response = await locked.client.post("/api/pull", json={"model": "llama3"})
    assert response.status_code == 403
    assert "allow_management" in response.json()["error"]
    assert (
        await locked.client.request("DELETE", "/api/delete", content=b'{"model":"llama3"}')
    ).status_code == 403
    assert ollama.requests_to("/api/pull") == []

    opened = await start_gateway(make_config(ollama.url, ollama={"allow_management": True}))
    response = await opened.client.post("/api/pull", json={"model": "llama3"})
    assert response.status_code == 200
    assert json.loads(response.content.splitlines()[-1]) == {"status": "success"}


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b"", 400, "missing request body"),
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "invalid request body"),
        (b'{"model": 42}', 400, "invalid request body"),
        (b'{"model": "llama3", "stream": "yes"}', 400, "invalid request body"),
        (b'{"messages": []}', 400, "model is required"),
    ],
)
async def test_bad_bodies_get_a_clear_400(
    gateway: RunningGateway, ollama: OllamaEmulator, body: bytes, status: int, fragment: str
) -> None:
    response = await gateway.client.post("/api/chat", content=body)
    assert response.status_code == status
    assert fragment in response.json()["error"]
    assert ollama.requests_to("/api/chat") == []


async def test_body_over_the_limit_gets_413_in_ollamas_shape(
    start_gateway: StartGateway, ollama: OllamaEmulator
) -> None:
    gw = await start_gateway(make_config(ollama.url, max_body_bytes=4096))
    response = await gw.client.post("/api/chat", content=b"x" * 5000)
    assert response.status_code == 413
    assert "4096" in response.json()["error"]

    async def chunks():  # no content-length: the bound applies while reading
        for _ in range(10):
            yield b"x" * 1000

    response = await gw.client.post("/api/chat", content=chunks())
    assert response.status_code == 413


async def test_wrong_method_is_405(gateway: RunningGateway) -> None:
    response = await gateway.client.get("/api/chat")
    assert response.status_code == 405
    assert "POST" in response.json()["error"]


async def test_upstream_error_status_is_kept(
    gateway: RunningGateway, ollama: OllamaEmulator
) -> None:
    ollama.faults.status = 500
    response = await gateway.client.post("/api/chat", json=CHAT)
    assert response.status_code == 500
    assert "error" in response.json()


async def test_death_mid_stream_ends_with_an_error_line(
    gateway: RunningGateway, ollama: OllamaEmulator
) -> None:
    ollama.faults.die_mid_stream_after = 2
    with trio.fail_after(10):
        response = await gateway.client.post("/api/chat", json=CHAT)
    lines = response.content.splitlines()
    assert response.status_code == 200
    assert len(lines) == 3
    assert "error" in json.loads(lines[-1])
    await eventually(lambda: gateway.services.gate.busy == 0)


async def test_over_long_line_ends_with_an_error_line(
    gateway: RunningGateway, ollama: OllamaEmulator
) -> None:
    ollama.faults.overlong_line_bytes = 4 * 1024 * 1024 + 1
    with trio.fail_after(20):
        response = await gateway.client.post("/api/chat", json=CHAT)
    last = json.loads(response.content.splitlines()[-1])
    assert "longer than 4194304 bytes" in last["error"]
    await eventually(lambda: gateway.services.gate.busy == 0)


async def test_hang_before_headers_is_a_504_at_our_deadline(
    start_gateway: StartGateway, ollama: OllamaEmulator
) -> None:
    gw = await start_gateway(make_config(ollama.url, ollama={"first_byte_timeout_s": 0.3}))
    ollama.faults.hang_before_headers = True
    with trio.fail_after(5):
        response = await gw.client.post("/api/chat", json=CHAT)
    assert response.status_code == 504
    assert "0.3 s" in response.json()["error"]
    await eventually(lambda: gw.services.gate.busy == 0)


async def test_hang_mid_stream_ends_with_an_error_line_at_the_idle_deadline(
    start_gateway: StartGateway, ollama: OllamaEmulator
) -> None:
    gw = await start_gateway(make_config(ollama.url, ollama={"idle_timeout_s": 0.3}))
    ollama.faults.hang_mid_stream_after = 2
    with trio.fail_after(5):
        response = await gw.client.post("/api/chat", json=CHAT)
    lines = response.content.splitlines()
    assert len(lines) == 3
    assert "sent nothing for too long" in json.loads(lines[-1])["error"]
    await eventually(lambda: gw.services.gate.busy == 0)


async def test_degraded_then_recovered_without_restart(
    start_gateway: StartGateway, ollama: OllamaEmulator
) -> None:
    gw = await start_gateway(make_config(ollama.url, ollama={"embed_model": "nomic-embed-text"}))
    warmer = gw.services.warmer
    assert warmer is not None
    await eventually(lambda: warmer.warmups == 1)
    tags_before = (await gw.client.get("/api/tags")).content

    await ollama.set_down(True)
    started = trio.current_time()
    response = await gw.client.post("/api/chat", json=CHAT)
    assert trio.current_time() - started < 1.0
    assert response.status_code == 503
    assert ollama.url.removeprefix("http://") in response.json()["error"]
    assert "retry-after" in response.headers

    health = (await gw.client.get("/health")).json()
    assert health["status"] == "degraded"
    assert health["models"] == 3
    assert (await gw.client.get("/ready")).status_code == 503

    # Fails fast from now on, without a connection attempt; listings come from the cache.
    response = await gw.client.post("/api/generate", json={"model": "llama3", "prompt": "x"})
    assert response.status_code == 503
    cached = await gw.client.get("/api/tags")
    assert cached.status_code == 200
    assert cached.content == tags_before
    assert cached.headers["x-gateway-inventory"] == "cached"

    await ollama.set_down(False)
    await eventually(lambda: not gw.services.inventory.degraded)
    await eventually(lambda: warmer.warmups == 2)
    assert ollama.keep_alive_seen["nomic-embed-text:latest"] == -1
    response = await gw.client.post("/api/chat", json={**CHAT, "stream": False})
    assert response.status_code == 200
    assert (await gw.client.get("/health")).json()["status"] == "ok"


async def test_embedder_is_warmed_again_when_evicted(
    start_gateway: StartGateway, ollama: OllamaEmulator
) -> None:
    gw = await start_gateway(
        make_config(ollama.url, ollama={"embed_model": "nomic-embed-text", "poll_interval_s": 0.1})
    )
    warmer = gw.services.warmer
    assert warmer is not None
    await eventually(lambda: warmer.warmups == 1)
    await eventually(lambda: gw.services.inventory.is_loaded("nomic-embed-text"))
    ollama.evict("nomic-embed-text")
    await eventually(lambda: warmer.warmups == 2)
    # Warm-ups never wait for the chat gate.
    assert gw.services.gate.figures().granted_total == 0


async def test_a_long_stream_is_not_cut(
    start_gateway: StartGateway, nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    # 75 s of virtual time, real sockets: no framework default may end it early.
    emulator = OllamaEmulator(token_delay_s=1.0, reply=" ".join(["w"] * 75))
    await nursery.start(emulator.run)
    gw = await start_gateway(make_config(emulator.url, ollama={"idle_timeout_s": 5.0}))
    started = trio.current_time()
    response = await gw.client.post("/api/chat", json=CHAT, timeout=None)
    assert trio.current_time() - started >= 75
    lines = response.content.splitlines()
    assert len(lines) == 76
    assert json.loads(lines[-1])["done"] is True


async def test_large_json_answers_sent_chunked_pass_whole_and_unbounded(
    gateway: RunningGateway, ollama: OllamaEmulator
) -> None:
    # Go's net/http chunks a large JSON answer (no newline, no length): the NDJSON line
    # bound must not apply to it, and its bytes must arrive whole.
    ollama.chunk_bodies_over = 1024
    inputs = [f"text {n}" for n in range(30000)]
    body = {"model": "nomic-embed-text", "input": inputs}
    direct_bytes = None
    async with httpx.AsyncClient(base_url=ollama.url) as direct:
        direct_bytes = (await direct.post("/api/embed", json=body)).content
    assert len(direct_bytes) > 4 * 1024 * 1024  # more than one NDJSON line may hold
    with trio.fail_after(10):
        response = await gateway.client.post("/api/embed", json=body)
    assert response.status_code == 200
    assert len(response.json()["embeddings"]) == 30000
    assert response.json()["embeddings"] == json.loads(direct_bytes)["embeddings"]
    answer = await gateway.client.post("/api/chat", json={**CHAT, "stream": False})
    assert answer.status_code == 200
    assert answer.json()["done"] is True
