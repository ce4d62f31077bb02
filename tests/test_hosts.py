"""Several GPU hosts behind one gateway (ADR 0020), on real sockets: two or three Ollama
emulators on port 0; which host runs what is counted at each emulator."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import trio

from gateway.config import DEFAULT_HOST
from tests.conftest import RunningGateway, StartGateway, eventually, make_config
from tests.emulators import OllamaEmulator

LLAMA = "llama3:latest"
QWEN = "qwen2.5:7b"
EMBED = "nomic-embed-text:latest"


def chat(tag: str, model: str = "llama3", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": tag}], **extra}


async def emulator(
    nursery: trio.Nursery, models: Sequence[str], *, loaded: Sequence[str] = ()
) -> OllamaEmulator:
    emu = OllamaEmulator(models)
    for name in loaded:
        emu.loaded[name] = None  # resident before the gateway's first poll
    await nursery.start(emu.run)
    return emu


async def start_hosts(
    start_gateway: StartGateway, hosts: dict[str, OllamaEmulator], **sections: Any
) -> RunningGateway:
    table = {name: {"url": emu.url} for name, emu in hosts.items()}
    ollama = {"hosts": table, **sections.pop("ollama", {})}
    return await start_gateway(
        make_config(next(iter(hosts.values())).url, ollama=ollama, **sections)
    )


def chats(emu: OllamaEmulator) -> list[str]:
    return [json.loads(r.body)["messages"][0]["content"] for r in emu.requests_to("/api/chat")]


async def post_chat(gw: RunningGateway, tag: str, model: str = "llama3") -> httpx.Response:
    with trio.fail_after(10):
        return await gw.client.post("/api/chat", json=chat(tag, model, stream=False))


async def test_a_single_url_is_one_host_named_default_as_before(
    gateway: RunningGateway, ollama: OllamaEmulator
) -> None:
    hosts = gateway.services.hosts
    assert [h.name for h in hosts] == [DEFAULT_HOST]
    assert gateway.services.gate is hosts.first.gate
    health = (await gateway.client.get("/health")).json()
    assert list(health) == [
        *("status", "degraded", "draining", "target", "last_good_poll", "inventory_age_s"),
        *("last_error", "poll_failures", "models", "loaded", "gate", "in_flight", "hosts"),
    ]
    assert health["target"] == ollama.url
    assert health["gate"]["capacity"] == 1
    assert health["hosts"][DEFAULT_HOST]["target"] == ollama.url
    response = await post_chat(gateway, "hello")
    assert response.status_code == 200
    metrics = (await gateway.client.get("/metrics")).text
    assert "gateway_gate_capacity 1.0" in metrics  # no host label with one host


async def test_placement_prefers_resident_then_installed(
    start_gateway: StartGateway, nursery: trio.Nursery
) -> None:
    a = await emulator(nursery, [LLAMA, QWEN])
    b = await emulator(nursery, [LLAMA, QWEN], loaded=[QWEN])
    c = await emulator(nursery, [LLAMA, "mistral:latest"])
    gw = await start_hosts(start_gateway, {"a": a, "b": b, "c": c})
    # Resident on b (though a is listed first and idle too).
    assert (await post_chat(gw, "warm", "qwen2.5:7b")).status_code == 200
    # Installed only on c.
    assert (await post_chat(gw, "only-c", "mistral")).status_code == 200
    # Resident nowhere, installed on all: the soonest to start, in host order on a tie.
    assert (await post_chat(gw, "cold", "llama3")).status_code == 200
    assert chats(a) == ["cold"]
    assert chats(b) == ["warm"]
    assert chats(c) == ["only-c"]
    # ...and now llama3 is resident on a: it stays there.
    assert (await post_chat(gw, "again", "llama3")).status_code == 200
    assert chats(a) == ["cold", "again"]


async def test_late_binding_a_request_queued_on_two_hosts_runs_once_on_the_first_free(
    start_gateway: StartGateway, nursery: trio.Nursery
) -> None:
    a = await emulator(nursery, [LLAMA], loaded=[LLAMA])
    b = await emulator(nursery, [LLAMA], loaded=[LLAMA])
    gw = await start_hosts(start_gateway, {"a": a, "b": b})
    gate_a, gate_b = gw.services.hosts.get("a").gate, gw.services.hosts.get("b").gate  # type: ignore[union-attr]
    a.hold, b.hold = trio.Event(), trio.Event()
    statuses: dict[str, int] = {}
    headers: dict[str, httpx.Headers] = {}

    async def send(tag: str) -> None:
        response = await post_chat(gw, tag)
        statuses[tag], headers[tag] = response.status_code, response.headers

    with trio.fail_after(10):
        async with trio.open_nursery() as clients:
            clients.start_soon(send, "first")
            await eventually(lambda: gate_a.busy == 1)
            clients.start_soon(send, "second")
            await eventually(lambda: gate_b.busy == 1)
            clients.start_soon(send, "third")
            await eventually(lambda: gate_a.queued == 1 and gate_b.queued == 1)
            b.hold.set()  # b frees first: the third runs there, a forgets it at once
            await eventually(lambda: len(chats(b)) == 2)
            assert gate_a.queued == 0
            a.hold.set()
    assert statuses == {"first": 200, "second": 200, "third": 200}
    assert chats(a) == ["first"]
    assert chats(b) == ["second", "third"]
    assert headers["third"]["x-gateway-queue-ahead"] == "0"
    assert (gate_a.figures().granted_total, gate_b.figures().granted_total) == (1, 2)


async def test_no_swap_to_an_idle_host_when_the_resident_host_starts_it_sooner(
    start_gateway: StartGateway, nursery: trio.Nursery
) -> None:
    warm = await emulator(nursery, [LLAMA], loaded=[LLAMA])
    idle = await emulator(nursery, [LLAMA])
    gw = await start_hosts(start_gateway, {"idle": idle, "warm": warm})
    gate_warm = gw.services.hosts.get("warm").gate  # type: ignore[union-attr]
    gate_idle = gw.services.hosts.get("idle").gate  # type: ignore[union-attr]
    # One generation measured on the warm host: its queue's start is known (milliseconds).
    assert (await post_chat(gw, "measured")).status_code == 200
    warm.hold = trio.Event()
    with trio.fail_after(10):
        async with trio.open_nursery() as clients:
            for n, tag in enumerate(("one", "two", "three")):
                clients.start_soon(post_chat, gw, tag)
                await eventually(lambda n=n: gate_warm.busy + gate_warm.queued == n + 1)
            await eventually(lambda: gate_warm.queued == 2)
            assert gate_idle.queued == 0  # never offered to the host that would swap
            warm.hold.set()
    assert chats(warm) == ["measured", "one", "two", "three"]
    assert chats(idle) == []
    assert warm.loads.get(LLAMA, 0) == 0  # no load anywhere
    assert idle.loads == {}


async def test_a_busy_host_of_unknown_speed_does_not_keep_an_idle_host_idle(
    start_gateway: StartGateway, nursery: trio.Nursery
) -> None:
    """Freshly started, nothing measured: while one host runs the first generation, the
    second request is not held back for it on a guess of zero seconds; the idle host that
    has the model installed runs it at once (a load there evicts nothing)."""
    a = await emulator(nursery, [LLAMA])
    b = await emulator(nursery, [LLAMA])
    gw = await start_hosts(start_gateway, {"a": a, "b": b})
    gate_a = gw.services.hosts.get("a").gate  # type: ignore[union-attr]
    gate_b = gw.services.hosts.get("b").gate  # type: ignore[union-attr]
    a.hold, b.hold = trio.Event(), trio.Event()
    with trio.fail_after(10):
        async with trio.open_nursery() as clients:
            clients.start_soon(post_chat, gw, "first")
            await eventually(lambda: gate_a.busy == 1)
            clients.start_soon(post_chat, gw, "second")
            await eventually(lambda: gate_b.busy == 1)  # both generations run at once
            assert gate_a.queued == gate_b.queued == 0
            a.hold.set()
            b.hold.set()
    assert chats(a) == ["first"]
    assert chats(b) == ["second"]


async def test_a_host_refusing_connections_is_degraded_alone_and_its_requests_go_elsewhere(
    start_gateway: StartGateway, nursery: trio.Nursery
) -> None:
    a = await emulator(nursery, [LLAMA, QWEN], loaded=[LLAMA])
    b = await emulator(nursery, [LLAMA])
    gw = await start_hosts(start_gateway, {"a": a, "b": b})
    host_a = gw.services.hosts.get("a")
    assert host_a is not None
    await a.set_down(True)  # the gateway does not know yet: its next poll is 30 s away
    assert host_a.healthy
    with trio.fail_after(5):
        response = await post_chat(gw, "moved")
    assert response.status_code == 200
    assert chats(b) == ["moved"]
    assert not host_a.healthy
    assert gw.services.hosts.get("b").healthy  # type: ignore[union-attr]
    # A model only a has: 503 naming it, fast.
    with trio.fail_after(2):
        response = await post_chat(gw, "qwen", "qwen2.5:7b")
    assert response.status_code == 503
    assert "(a)" in response.json()["error"]
    assert "b" not in response.json()["error"].split("(")[1].split(")")[0]
    health = (await gw.client.get("/health")).json()
    assert health["hosts"]["a"]["degraded"] is True
    assert health["hosts"]["b"]["degraded"] is False
    assert health["degraded_hosts"] == ["a"]
    assert (await gw.client.get("/health?ready")).status_code == 200  # b serves
    # Recovery: a answers again and gets its resident model's work back.
    await a.set_down(False)
    await eventually(lambda: host_a.healthy)
    assert (await post_chat(gw, "back", "qwen2.5:7b")).status_code == 200
    assert chats(a) == ["back"]


async def test_a_model_on_no_host_is_404_after_one_re_poll_of_every_host(
    start_gateway: StartGateway, nursery: trio.Nursery
) -> None:
    a = await emulator(nursery, [LLAMA])
    b = await emulator(nursery, [QWEN])
    gw = await start_hosts(start_gateway, {"a": a, "b": b})
    polls = len(a.requests_to("/api/tags")), len(b.requests_to("/api/tags"))
    response = await post_chat(gw, "x", "no-such-model")
    assert response.status_code == 404
    assert response.json() == {"error": 'model "no-such-model" not found, try pulling it first'}
    assert (len(a.requests_to("/api/tags")), len(b.requests_to("/api/tags"))) == (
        polls[0] + 1,
        polls[1] + 1,
    )
    assert chats(a) == chats(b) == []


async def test_a_host_dying_mid_stream_ends_its_stream_and_its_queue_moves(
    start_gateway: StartGateway, nursery: trio.Nursery
) -> None:
    a = await emulator(nursery, [LLAMA], loaded=[LLAMA])
    b = await emulator(nursery, [LLAMA])
    gw = await start_hosts(start_gateway, {"a": a, "b": b})
    gate_a = gw.services.hosts.get("a").gate  # type: ignore[union-attr]
    # One generation measured on a: its queue's start is known, so the queue stays there.
    assert (await post_chat(gw, "measured")).status_code == 200
    a.hold = trio.Event()
    lines: list[dict[str, Any]] = []
    queued: dict[str, httpx.Response] = {}

    async def streaming() -> None:
        async with gw.client.stream("POST", "/api/chat", json=chat("streamed")) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                lines.append(json.loads(line))

    async def waiting(tag: str) -> None:
        queued[tag] = await post_chat(gw, tag)

    with trio.fail_after(10):
        async with trio.open_nursery() as clients:
            clients.start_soon(streaming)
            await eventually(lambda: a.active_generations == 1 and len(lines) == 1)
            clients.start_soon(waiting, "queued-1")
            clients.start_soon(waiting, "queued-2")
            await eventually(lambda: gate_a.queued == 2)  # resident on a: queued there only
            await a.set_down(True)
    assert "error" in lines[-1]
    assert lines[-1].get("done") is not True
    assert {tag: r.status_code for tag, r in queued.items()} == {"queued-1": 200, "queued-2": 200}
    assert chats(a) == ["measured", "streamed"]
    assert sorted(chats(b)) == ["queued-1", "queued-2"]  # each ran once, on b
    assert b.completed_generations == 2


async def test_listings_are_the_union_and_keep_a_degraded_hosts_models(
    start_gateway: StartGateway, nursery: trio.Nursery
) -> None:
    a = await emulator(nursery, [LLAMA, QWEN], loaded=[QWEN])
    b = await emulator(nursery, [LLAMA, "mistral:latest"], loaded=[LLAMA])
    gw = await start_hosts(start_gateway, {"a": a, "b": b})

    async def names(path: str) -> list[str]:
        response = await gw.client.get(path)
        assert response.status_code == 200
        return sorted(m["name"] for m in response.json()["models"])

    assert await names("/api/tags") == [LLAMA, "mistral:latest", QWEN]
    assert await names("/api/ps") == [LLAMA, QWEN]
    models = (await gw.client.get("/v1/models")).json()["data"]
    assert sorted(m["id"] for m in models) == [LLAMA, "mistral:latest", QWEN]
    assert (await gw.client.get("/v1/models/mistral")).status_code == 200
    show = await gw.client.post("/api/show", json={"model": "mistral"})
    assert show.status_code == 200
    assert len(b.requests_to("/api/show")) == 1
    assert a.requests_to("/api/show") == []
    await b.set_down(True)
    await gw.services.hosts.get("b").inventory.refresh()  # type: ignore[union-attr]
    assert await names("/api/tags") == [LLAMA, "mistral:latest", QWEN]


async def test_health_and_metrics_per_host(
    start_gateway: StartGateway, nursery: trio.Nursery
) -> None:
    a = await emulator(nursery, [LLAMA])
    b = await emulator(nursery, [LLAMA, QWEN])
    gw = await start_hosts(
        start_gateway,
        {"a": a, "b": b},
        ollama={"hosts": {"a": {"url": a.url, "capacity": 2}, "b": {"url": b.url}}},
    )
    health = (await gw.client.get("/health")).json()
    assert set(health["hosts"]) == {"a", "b"}
    assert health["hosts"]["a"]["gate"]["capacity"] == 2
    assert health["hosts"]["b"]["models"] == 2
    assert health["models"] == 2
    assert (await post_chat(gw, "q", "qwen2.5:7b")).status_code == 200
    text = (await gw.client.get("/metrics")).text
    assert 'gateway_gate_capacity{host="a"} 2.0' in text
    assert 'gateway_gate_capacity{host="b"} 1.0' in text
    assert 'gateway_inventory_models{host="b"} 2.0' in text
    assert 'gateway_gate_wait_seconds_count{host="b"} 1.0' in text
    assert 'gateway_gate_grants_total{host="a"} 0.0' in text
    assert 'gateway_gate_grants_total{host="b"} 1.0' in text
    # Per-request figures say where the request ran (speed and latency differ by host).
    assert (
        'gateway_requests_total{client="",host="b",provider="ollama",route="/api/chat",'
        'status="200"} 1.0'
    ) in text
    assert 'gateway_upstream_seconds_count{host="b",provider="ollama"} 1.0' in text
    assert 'gateway_tokens_per_second_count{host="b",model="qwen2.5:7b",provider="ollama"}' in text


async def test_management_routes_need_a_host_when_there_are_several(
    start_gateway: StartGateway, nursery: trio.Nursery
) -> None:
    a = await emulator(nursery, [LLAMA])
    b = await emulator(nursery, [LLAMA])
    gw = await start_hosts(start_gateway, {"a": a, "b": b}, ollama={"allow_management": True})
    response = await gw.client.request("DELETE", "/api/delete", json={"model": "llama3"})
    assert response.status_code == 400
    assert "?host=<name>, one of a, b" in response.json()["error"]
    response = await gw.client.request("DELETE", "/api/delete?host=c", json={"model": "llama3"})
    assert response.status_code == 400
    response = await gw.client.request("DELETE", "/api/delete?host=b", json={"model": "llama3"})
    assert response.status_code == 200
    assert a.requests_to("/api/delete") == []
    [deleted] = b.requests_to("/api/delete")
    assert deleted.query in ("", b"")  # ?host= is the gateway's, not sent upstream


async def test_embeddings_go_ungated_to_the_host_with_the_embedder_resident(
    start_gateway: StartGateway, nursery: trio.Nursery
) -> None:
    a = await emulator(nursery, [LLAMA, EMBED])
    b = await emulator(nursery, [LLAMA, EMBED], loaded=[EMBED, LLAMA])
    gw = await start_hosts(start_gateway, {"a": a, "b": b})
    b.hold = trio.Event()  # b's gate busy with a held chat: embeddings still pass
    with trio.fail_after(10):
        async with trio.open_nursery() as clients:
            clients.start_soon(post_chat, gw, "held", "llama3")
            await eventually(lambda: b.active_generations == 1)
            for n in range(3):
                response = await gw.client.post(
                    "/api/embed", json={"model": "nomic-embed-text", "input": f"t{n}"}
                )
                assert response.status_code == 200
            assert b.active_generations == 1
            b.hold.set()
    assert len(b.requests_to("/api/embed")) == 3
    assert a.requests_to("/api/embed") == []


async def test_every_generation_route_is_placed_and_the_ledger_names_the_host(
    start_gateway: StartGateway, nursery: trio.Nursery, tmp_path: Path
) -> None:
    a = await emulator(nursery, [LLAMA])
    b = await emulator(nursery, [LLAMA, QWEN], loaded=[QWEN])
    path = tmp_path / "usage.db"
    gw = await start_hosts(start_gateway, {"a": a, "b": b}, usage={"path": str(path)})
    with trio.fail_after(10):
        routed = await gw.client.post(
            "/v1/chat", json={"model": "qwen2.5:7b", "messages": [{"role": "user", "content": "r"}]}
        )
        openai = await gw.client.post(
            "/v1/chat/completions",
            json={"model": "qwen2.5:7b", "messages": [{"role": "user", "content": "o"}]},
        )
        generate = await gw.client.post(
            "/api/generate", json={"model": "llama3", "prompt": "g", "stream": False}
        )
    assert (routed.status_code, openai.status_code, generate.status_code) == (200, 200, 200)
    assert chats(b) == ["r"]
    assert len(b.requests_to("/v1/chat/completions")) == 1
    assert len(a.requests_to("/api/generate")) == 1  # llama3 resident nowhere: a, first
    await eventually(lambda: gw.services.ledger.written >= 3)
    with sqlite3.connect(path) as conn:
        hosts = [row[0] for row in conn.execute("SELECT host FROM requests ORDER BY id")]
    conn.close()
    assert hosts == ["b", "b", "a"]


async def test_the_router_retries_on_another_host_only_when_the_connection_was_refused(
    start_gateway: StartGateway, nursery: trio.Nursery
) -> None:
    a = await emulator(nursery, [LLAMA], loaded=[LLAMA])
    b = await emulator(nursery, [LLAMA])
    gw = await start_hosts(start_gateway, {"a": a, "b": b})
    body = {"model": "llama3", "messages": [{"role": "user", "content": "r"}]}
    await a.set_down(True)
    with trio.fail_after(5):
        response = await gw.client.post("/v1/chat", json=body)
    assert response.status_code == 200
    assert chats(b) == ["r"]
    # An upstream that failed after it got the request is not asked again elsewhere.
    b.faults.status = 500
    with trio.fail_after(5):
        response = await gw.client.post("/v1/chat", json=body)
    assert response.status_code == 502
    assert len(chats(b)) == 2
    assert chats(a) == []


async def test_a_host_down_at_start_does_not_stop_the_others(
    start_gateway: StartGateway, nursery: trio.Nursery
) -> None:
    a = await emulator(nursery, [LLAMA])
    b = await emulator(nursery, [LLAMA, QWEN])
    await b.set_down(True)
    gw = await start_hosts(
        start_gateway, {"b": b, "a": a}, ollama={"degraded_poll_interval_s": 0.2}
    )
    host_b = gw.services.hosts.get("b")
    assert host_b is not None
    assert not host_b.healthy
    assert (await gw.client.get("/health?ready")).status_code == 200
    assert (await post_chat(gw, "up", "llama3")).status_code == 200
    assert chats(a) == ["up"]
    # qwen is on no known host (b has been down since start, its inventory is empty):
    # Ollama's 404 after one re-poll, until b answers.
    assert (await post_chat(gw, "q", "qwen2.5:7b")).status_code == 404
    await b.set_down(False)
    await eventually(lambda: host_b.healthy)
    assert (await post_chat(gw, "q", "qwen2.5:7b")).status_code == 200
    assert chats(b) == ["q"]


async def test_every_host_down_is_503_naming_them(
    start_gateway: StartGateway, nursery: trio.Nursery
) -> None:
    a = await emulator(nursery, [LLAMA])
    b = await emulator(nursery, [LLAMA])
    gw = await start_hosts(start_gateway, {"a": a, "b": b})
    await a.set_down(True)
    await b.set_down(True)
    for host in gw.services.hosts:
        await host.inventory.refresh()
    with trio.fail_after(2):
        response = await post_chat(gw, "x")
    assert response.status_code == 503
    assert "(a, b)" in response.json()["error"]
    assert (await gw.client.get("/health?ready")).status_code == 503
    tags = await gw.client.get("/api/tags")
    assert [m["name"] for m in tags.json()["models"]] == [LLAMA]  # last inventory kept


async def test_shutdown_sheds_a_request_queued_on_several_hosts(
    start_gateway: StartGateway, nursery: trio.Nursery
) -> None:
    a = await emulator(nursery, [LLAMA], loaded=[LLAMA])
    b = await emulator(nursery, [LLAMA], loaded=[LLAMA])
    gw = await start_hosts(start_gateway, {"a": a, "b": b}, shutdown_grace_s=5.0)
    gate_a, gate_b = (h.gate for h in gw.services.hosts)
    a.hold, b.hold = trio.Event(), trio.Event()
    answers: dict[str, httpx.Response] = {}

    async def send(tag: str) -> None:
        answers[tag] = await post_chat(gw, tag)

    with trio.fail_after(10):
        async with trio.open_nursery() as clients:
            clients.start_soon(send, "on-a")
            await eventually(lambda: gate_a.busy == 1)
            clients.start_soon(send, "on-b")
            await eventually(lambda: gate_b.busy == 1)
            clients.start_soon(send, "queued")
            await eventually(lambda: (gate_a.queued, gate_b.queued) == (1, 1))
            gw.stop.set()
            await eventually(lambda: "queued" in answers)
            assert (gate_a.queued, gate_b.queued) == (0, 0)
            a.hold.set()
            b.hold.set()
        await gw.stopped.wait()
    assert answers["queued"].status_code == 503
    assert "shutting down" in answers["queued"].json()["error"]
    assert (answers["on-a"].status_code, answers["on-b"].status_code) == (200, 200)
    assert chats(a) == ["on-a"]
    assert chats(b) == ["on-b"]
