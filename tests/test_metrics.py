"""`GET /metrics` after real traffic: the Prometheus exposition, parsed, asserted exactly."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from gateway.metrics import MAX_MODELS
from gateway.web.middleware import KNOWN_ROUTES
from tests.conftest import RunningGateway, StartGateway, eventually, make_config
from tests.emulators import OllamaEmulator, OpenAIEmulator

USER = {"role": "user", "content": "why is the sky blue?"}


def chat_body(content: str = "why is the sky blue?", **extra: Any) -> dict[str, Any]:
    return {"model": "llama3", "messages": [{"role": "user", "content": content}], **extra}


@dataclass
class Scrape:
    samples: list[Sample]
    families: dict[str, str]  # name -> type

    def value(self, name: str, **labels: str) -> float:
        """The one sample named `name` whose labels are exactly `labels`."""
        for sample in self.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
        seen = [s.labels for s in self.samples if s.name == name]
        raise AssertionError(f"no sample {name}{labels}; samples of that name: {seen}")

    def find(self, name: str, **labels: str) -> list[Sample]:
        """Samples named `name` whose labels include `labels`."""
        return [
            s
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]

    def total(self, name: str, **labels: str) -> float:
        return sum(s.value for s in self.find(name, **labels))

    def label_values(self, name: str, label: str) -> set[str]:
        return {s.labels[label] for s in self.samples if s.name == name and label in s.labels}


async def scrape(gw: RunningGateway) -> Scrape:
    with trio.fail_after(5):
        response = await gw.client.get("/metrics")
    assert response.status_code == 200
    families = list(text_string_to_metric_families(response.text))
    return Scrape(
        samples=[s for f in families for s in f.samples],
        families={f.name: f.type for f in families},
    )


def requests(route: str, status: int, provider: str = "ollama", client: str = "") -> dict[str, str]:
    return {"route": route, "status": str(status), "provider": provider, "client": client}


def final_frame(emulator: OllamaEmulator, path: str, index: int = -1) -> dict[str, Any]:
    """The last NDJSON line (or the whole JSON body) the emulator wrote for a request."""
    emitted = b"".join(chunk for _, chunk in emulator.requests_to(path)[index].emitted)
    frame: dict[str, Any] = json.loads(emitted.splitlines()[-1])
    assert frame["done"] is True
    return frame


async def test_metrics_is_prometheus_text_with_every_family(gateway: RunningGateway) -> None:
    with trio.fail_after(5):
        response = await gateway.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    metrics = await scrape(gateway)
    assert {
        "gateway_requests": "counter",
        "gateway_gate_wait_seconds": "histogram",
        "gateway_upstream_first_byte_seconds": "histogram",
        "gateway_upstream_seconds": "histogram",
        "gateway_tokens": "counter",
        "gateway_model_load_seconds": "histogram",
        "gateway_tokens_per_second": "histogram",
        "gateway_gate_capacity": "gauge",
        "gateway_gate_busy": "gauge",
        "gateway_gate_queue_depth": "gauge",
        "gateway_gate_queue_depth_by_priority": "gauge",
        "gateway_gate_model_switches": "counter",
        "gateway_gate_overdue_grants": "counter",
        "gateway_inventory_degraded": "gauge",
        "gateway_inventory_age_seconds": "gauge",
        "gateway_inventory_models": "gauge",
        "gateway_inventory_poll_failures": "counter",
        "gateway_inventory_recoveries": "counter",
    }.items() <= metrics.families.items()
    # No embedder configured: no warm-up counter.
    assert "gateway_embed_warmups" not in metrics.families
    assert metrics.value("gateway_gate_capacity") == 1
    assert metrics.value("gateway_gate_busy") == 0
    assert metrics.value("gateway_gate_queue_depth") == 0
    assert metrics.value("gateway_inventory_degraded") == 0
    assert metrics.value("gateway_inventory_models") == 3
    assert metrics.value("gateway_inventory_poll_failures_total") == 0
    assert 0 <= metrics.value("gateway_inventory_age_seconds") < 5
    # A scrape is counted once answered: the third sees the first two.
    again = await scrape(gateway)
    assert again.value("gateway_requests_total", **requests("/metrics", 200, "")) == 2


async def test_requests_are_counted_by_route_status_and_provider(
    gateway: RunningGateway, ollama: OllamaEmulator
) -> None:
    client = gateway.client
    with trio.fail_after(10):
        assert (await client.post("/api/chat", json=chat_body())).status_code == 200
        assert (await client.post("/api/chat", json=chat_body(stream=False))).status_code == 200
        missing = {**chat_body(), "model": "no-such-model"}
        assert (await client.post("/api/chat", json=missing)).status_code == 404
        assert (await client.post("/api/chat", content=b"{")).status_code == 400
        assert (await client.get("/api/tags")).status_code == 200
        embed = {"model": "nomic-embed-text", "input": "x"}
        assert (await client.post("/api/embed", json=embed)).status_code == 200
        assert (await client.post("/api/pull", json={"model": "x"})).status_code == 403
        assert (await client.head("/api/blobs/sha256:abc")).status_code == 403
        assert (await client.post("/v1/chat", json=chat_body())).status_code == 200
        # No key for kimi: refused before any provider is chosen.
        kimi = {**chat_body(), "model": "kimi/k2"}
        assert (await client.post("/v1/chat", json=kimi)).status_code == 404
        assert (await client.get("/health")).status_code == 200
        for n in range(5):
            assert (await client.get(f"/no/such/route/{n}")).status_code == 404
    metrics = await scrape(gateway)
    value = metrics.value
    assert value("gateway_requests_total", **requests("/api/chat", 200)) == 2
    assert value("gateway_requests_total", **requests("/api/chat", 404)) == 1
    assert value("gateway_requests_total", **requests("/api/chat", 400)) == 1
    assert value("gateway_requests_total", **requests("/api/tags", 200)) == 1
    assert value("gateway_requests_total", **requests("/api/embed", 200)) == 1
    assert value("gateway_requests_total", **requests("/api/pull", 403)) == 1
    assert value("gateway_requests_total", **requests("/api/blobs", 403)) == 1
    assert value("gateway_requests_total", **requests("/v1/chat", 200)) == 1
    assert value("gateway_requests_total", **requests("/v1/chat", 404, "")) == 1
    assert value("gateway_requests_total", **requests("/health", 200, "")) == 1
    # Unknown paths share one label: the route set is bounded.
    assert value("gateway_requests_total", **requests("other", 404, "")) == 5
    routes = metrics.label_values("gateway_requests_total", "route")
    assert routes <= KNOWN_ROUTES | {"other", "/api/blobs"}
    assert metrics.total("gateway_requests_total") == 16
    # Upstream timings: one per answer that came from the target (chat x2, tags, embed,
    # and the router's local chat).
    assert value("gateway_upstream_seconds_count", provider="ollama") == 5
    assert value("gateway_upstream_seconds_sum", provider="ollama") > 0
    first_byte = value("gateway_upstream_first_byte_seconds_count", provider="ollama")
    assert first_byte >= 4  # the passthrough's four at least
    assert "kimi" not in metrics.label_values("gateway_upstream_seconds_count", "provider")


async def test_gate_figures_while_a_chat_holds_it_and_the_wait_of_the_second(
    gateway: RunningGateway, ollama: OllamaEmulator
) -> None:
    gate = gateway.services.gate
    ollama.hold = trio.Event()
    queue_ms: dict[str, float] = {}

    async def chat(tag: str) -> None:
        response = await gateway.client.post("/api/chat", json=chat_body(tag, stream=False))
        assert response.status_code == 200
        queue_ms[tag] = float(response.headers["x-gateway-queue-ms"])

    with trio.fail_after(10):
        async with trio.open_nursery() as clients:
            clients.start_soon(chat, "first")
            await eventually(lambda: gate.busy == 1)
            clients.start_soon(chat, "second")
            await eventually(lambda: gate.queued == 1)
            queued_at = trio.current_time()
            during = await scrape(gateway)
            released_at = trio.current_time()
            ollama.hold.set()
    assert during.value("gateway_gate_capacity") == 1
    assert during.value("gateway_gate_busy") == 1
    assert during.value("gateway_gate_queue_depth") == 1
    assert during.value("gateway_gate_queue_depth_by_priority", priority="normal") == 1
    assert during.value("gateway_gate_queue_depth_by_priority", priority="interactive") == 0
    # Waits are observed when their requests end.
    assert during.value("gateway_gate_wait_seconds_count") == 0

    after = await scrape(gateway)
    assert after.value("gateway_gate_busy") == 0
    assert after.value("gateway_gate_queue_depth") == 0
    # Nothing was loaded (/api/ps): the first chat loads llama3, the second finds it.
    assert after.value("gateway_gate_model_switches_total") == 1
    assert after.value("gateway_gate_overdue_grants_total") == 0
    assert after.value("gateway_gate_wait_seconds_count") == 2
    waited = after.value("gateway_gate_wait_seconds_sum")
    # The second waited at least from when it was seen queued until the hold was released.
    assert waited >= released_at - queued_at > 0
    assert queue_ms["second"] > queue_ms["first"]
    # The response headers say the same waits (rounded to 0.1 ms each).
    assert waited * 1000 == pytest.approx(queue_ms["first"] + queue_ms["second"], abs=0.2)
    assert after.value("gateway_requests_total", **requests("/api/chat", 200)) == 2


async def test_gate_wait_is_observed_for_router_chats_too(
    gateway: RunningGateway, ollama: OllamaEmulator
) -> None:
    """/v1/chat to local Ollama queues on the same gate: its wait is a gate wait too."""
    gate = gateway.services.gate
    ollama.hold = trio.Event()
    queue_ms: list[float] = []

    async def routed() -> None:
        response = await gateway.client.post("/v1/chat", json=chat_body("routed"))
        assert response.status_code == 200
        queue_ms.append(float(response.headers["x-gateway-queue-ms"]))

    with trio.fail_after(10):
        async with trio.open_nursery() as clients:
            clients.start_soon(partial(gateway.client.post, "/api/chat", json=chat_body("holder")))
            await eventually(lambda: gate.busy == 1)
            clients.start_soon(routed)
            await eventually(lambda: gate.queued == 1)
            queued_at = trio.current_time()
            await scrape(gateway)
            released_at = trio.current_time()
            ollama.hold.set()
    metrics = await scrape(gateway)
    assert metrics.value("gateway_gate_wait_seconds_count") == 2
    assert metrics.value("gateway_gate_wait_seconds_sum") >= released_at - queued_at
    assert queue_ms[0] > 0


async def test_token_counts_equal_ollamas_final_frames(
    gateway: RunningGateway, ollama: OllamaEmulator
) -> None:
    client = gateway.client
    with trio.fail_after(10):
        streamed = await client.post("/api/chat", json=chat_body("one two three"))
        whole = await client.post("/api/chat", json=chat_body("four five", stream=False))
        generated = await client.post(
            "/api/generate", json={"model": "llama3", "prompt": "six seven eight nine"}
        )
    assert [r.status_code for r in (streamed, whole, generated)] == [200, 200, 200]
    frames = [final_frame(ollama, "/api/chat", 0), final_frame(ollama, "/api/chat", 1)]
    frames.append(final_frame(ollama, "/api/generate"))
    tokens_in = sum(f["prompt_eval_count"] for f in frames)
    tokens_out = sum(f["eval_count"] for f in frames)
    assert tokens_in == 3 + 2 + 4  # the emulator counts words
    metrics = await scrape(gateway)
    labels = {"provider": "ollama", "model": "llama3:latest"}
    assert metrics.value("gateway_tokens_total", **labels, direction="in") == tokens_in
    assert metrics.value("gateway_tokens_total", **labels, direction="out") == tokens_out
    # Embeddings bring no generation counts, and nothing else carries tokens.
    assert metrics.total("gateway_tokens_total") == tokens_in + tokens_out


async def test_token_counts_of_router_and_openai_calls_to_local_ollama(
    gateway: RunningGateway, ollama: OllamaEmulator
) -> None:
    """Counts come from Ollama's final frame on `/v1/chat`, and from the OpenAI usage
    object the passthrough forwards (a stream has one only when it asks for it)."""
    client = gateway.client
    with trio.fail_after(10):
        routed = await client.post("/v1/chat", json=chat_body("a b c", model="ollama/llama3"))
        completion = await client.post(
            "/v1/chat/completions", json={"model": "llama3", "messages": [USER]}
        )
        streamed = await client.post(
            "/v1/chat/completions",
            json={
                "model": "llama3",
                "messages": [USER],
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
    assert [r.status_code for r in (routed, completion, streamed)] == [200, 200, 200]
    assert b"data: [DONE]" in streamed.content
    frame = final_frame(ollama, "/api/chat", 0)
    usages = [completion.json()["usage"]]
    events = [e.removeprefix(b"data: ") for e in streamed.content.split(b"\n\n") if e]
    usages += [json.loads(e)["usage"] for e in events[:-1] if json.loads(e).get("usage")]
    assert len(usages) == 2
    metrics = await scrape(gateway)
    # `llama3` and `llama3:latest` are one model, one label.
    labels = {"provider": "ollama", "model": "llama3:latest"}
    assert metrics.value("gateway_tokens_total", **labels, direction="in") == frame[
        "prompt_eval_count"
    ] + sum(u["prompt_tokens"] for u in usages)
    assert metrics.value("gateway_tokens_total", **labels, direction="out") == frame[
        "eval_count"
    ] + sum(u["completion_tokens"] for u in usages)
    assert all(u["completion_tokens"] > 0 for u in usages)
    assert routed.json()["input_tokens"] == frame["prompt_eval_count"]


@pytest.fixture
async def kimi_gateway(
    start_gateway: StartGateway, ollama: OllamaEmulator, nursery: trio.Nursery
) -> tuple[RunningGateway, OpenAIEmulator]:
    models = tuple(f"m{n}" for n in range(MAX_MODELS + 6))
    kimi = OpenAIEmulator(api_key="sk-kimi-marker", models=models)
    await nursery.start(kimi.run)
    config = make_config(ollama.url, providers={"kimi": {"base_url": f"{kimi.url}/coding/v1"}})
    gw = await start_gateway(config, environ={"KIMI_API_KEY": "sk-kimi-marker"})
    return gw, kimi


def usage_of(emulator: OpenAIEmulator, index: int = -1) -> dict[str, int]:
    request = emulator.requests_to("/coding/v1/chat/completions")[index]
    body = b"".join(chunk for _, chunk in request.emitted)
    usage: dict[str, int] = json.loads(body)["usage"]
    return usage


async def test_token_counts_of_a_cloud_provider_via_the_router(
    kimi_gateway: tuple[RunningGateway, OpenAIEmulator],
) -> None:
    gw, kimi = kimi_gateway
    with trio.fail_after(10):
        response = await gw.client.post("/v1/chat", json=chat_body("x y", model="kimi/m1"))
    assert response.status_code == 200
    usage = usage_of(kimi)
    metrics = await scrape(gw)
    labels = {"provider": "kimi", "model": "m1"}
    assert metrics.value("gateway_tokens_total", **labels, direction="in") == usage["prompt_tokens"]
    out = usage["completion_tokens"]
    assert metrics.value("gateway_tokens_total", **labels, direction="out") == out
    assert metrics.value("gateway_requests_total", **requests("/v1/chat", 200, "kimi")) == 1
    assert metrics.value("gateway_upstream_seconds_count", provider="kimi") == 1


async def test_token_counts_of_a_cloud_provider_via_the_openai_front_door(
    kimi_gateway: tuple[RunningGateway, OpenAIEmulator],
) -> None:
    """The front door forwards OpenAI-family answers as they are; their `usage` still
    counts."""
    gw, kimi = kimi_gateway
    with trio.fail_after(10):
        response = await gw.client.post(
            "/v1/chat/completions", json={"model": "kimi/m2", "messages": [USER]}
        )
    assert response.status_code == 200
    usage = usage_of(kimi)
    assert response.json()["usage"] == usage
    metrics = await scrape(gw)
    assert (
        metrics.value("gateway_requests_total", **requests("/v1/chat/completions", 200, "kimi"))
        == 1
    )
    labels = {"provider": "kimi", "model": "m2"}
    assert metrics.value("gateway_tokens_total", **labels, direction="in") == usage["prompt_tokens"]
    out = usage["completion_tokens"]
    assert metrics.value("gateway_tokens_total", **labels, direction="out") == out


async def test_cloud_model_labels_are_bounded(
    kimi_gateway: tuple[RunningGateway, OpenAIEmulator],
) -> None:
    gw, kimi = kimi_gateway
    count = MAX_MODELS + 3
    with trio.fail_after(20):
        for n in range(count):
            response = await gw.client.post("/v1/chat", json=chat_body(model=f"kimi/m{n}"))
            assert response.status_code == 200
    metrics = await scrape(gw)
    models = metrics.label_values("gateway_tokens_total", "model")
    assert models == {f"m{n}" for n in range(MAX_MODELS)} | {"other"}
    beyond = [usage_of(kimi, n)["completion_tokens"] for n in range(MAX_MODELS, count)]
    out = metrics.value("gateway_tokens_total", provider="kimi", model="other", direction="out")
    assert out == sum(beyond)


async def test_local_models_outside_the_inventory_are_labelled_other(
    gateway: RunningGateway, ollama: OllamaEmulator
) -> None:
    # Installed after the last poll: the router reaches it, the inventory does not know it.
    ollama.add_model("fresh:latest")
    with trio.fail_after(10):
        fresh = await gateway.client.post("/v1/chat", json=chat_body(model="ollama/fresh"))
        unknown = await gateway.client.post("/v1/chat", json=chat_body(model="unknown/x"))
        known = await gateway.client.post("/v1/chat", json=chat_body(model="llama3"))
    assert (fresh.status_code, unknown.status_code, known.status_code) == (200, 502, 200)
    metrics = await scrape(gateway)
    labels = {"provider": "ollama", "direction": "out"}
    assert (
        metrics.value("gateway_tokens_total", **labels, model="other")
        == (fresh.json()["output_tokens"])
    )
    assert (
        metrics.value("gateway_tokens_total", **labels, model="llama3:latest")
        == (known.json()["output_tokens"])
    )
    every_label = {v for s in metrics.samples for v in s.labels.values()}
    assert "fresh" not in every_label
    assert "unknown/x" not in every_label
    assert "x" not in every_label
    assert metrics.value("gateway_requests_total", **requests("/v1/chat", 502)) == 1


async def test_cold_model_load_and_tokens_per_second_from_final_frames(
    start_gateway: StartGateway, nursery: trio.Nursery
) -> None:
    emulator = OllamaEmulator(load_delay_s=0.15, token_delay_s=0.002)
    await nursery.start(emulator.run)
    gw = await start_gateway(make_config(emulator.url))
    with trio.fail_after(10):
        for stream in (True, False, True):
            response = await gw.client.post("/api/chat", json=chat_body(stream=stream))
            assert response.status_code == 200
    frames = [final_frame(emulator, "/api/chat", i) for i in range(3)]
    assert frames[0]["load_duration"] >= 0.15e9  # cold: the first one loaded the model
    metrics = await scrape(gw)
    load = {"model": "llama3:latest"}
    load_sum = metrics.value("gateway_model_load_seconds_sum", **load)
    assert load_sum == pytest.approx(sum(f["load_duration"] for f in frames) / 1e9)
    # Exactly one answer took a model load of more than 0.1 s.
    loads_over = metrics.value("gateway_model_load_seconds_count", **load) - metrics.value(
        "gateway_model_load_seconds_bucket", **load, le="0.1"
    )
    assert loads_over == 1
    rate = {"provider": "ollama", "model": "llama3:latest"}
    assert metrics.value("gateway_tokens_per_second_count", **rate) == 3
    expected = sum(f["eval_count"] / (f["eval_duration"] / 1e9) for f in frames)
    assert metrics.value("gateway_tokens_per_second_sum", **rate) == pytest.approx(expected)


async def test_degraded_flag_poll_failures_and_recovery(
    gateway: RunningGateway, ollama: OllamaEmulator
) -> None:
    inventory = gateway.services.inventory
    before = await scrape(gateway)
    assert before.value("gateway_inventory_degraded") == 0
    await ollama.set_down(True)
    with trio.fail_after(10):
        response = await gateway.client.post("/api/chat", json=chat_body())
        assert response.status_code == 503
        await eventually(lambda: inventory.poll_failures > 0)
        down = await scrape(gateway)
        assert down.value("gateway_inventory_degraded") == 1
        assert down.value("gateway_inventory_poll_failures_total") == inventory.poll_failures > 0
        assert down.value("gateway_inventory_age_seconds") >= 0
        assert down.value("gateway_inventory_models") == 3  # the last inventory is kept
        assert down.value("gateway_requests_total", **requests("/api/chat", 503)) == 1
        assert (await gateway.client.get("/ready")).status_code == 503

        await ollama.set_down(False)
        await eventually(lambda: not inventory.degraded)
        up = await scrape(gateway)
    assert up.value("gateway_inventory_degraded") == 0
    assert up.value("gateway_inventory_recoveries_total") == 1
    assert up.value("gateway_inventory_poll_failures_total") == inventory.poll_failures
    assert up.value("gateway_requests_total", **requests("/ready", 503, "")) == 1


async def test_embedder_warmups_are_counted(
    start_gateway: StartGateway, ollama: OllamaEmulator
) -> None:
    gw = await start_gateway(make_config(ollama.url, ollama={"embed_model": "nomic-embed-text"}))
    warmer = gw.services.warmer
    assert warmer is not None
    await eventually(lambda: warmer.warmups == 1)
    metrics = await scrape(gw)
    assert metrics.families["gateway_embed_warmups"] == "counter"
    assert metrics.value("gateway_embed_warmups_total") == 1
    # Evicted and warmed again: the counter follows.
    ollama.evict("nomic-embed-text")
    await gw.services.inventory.refresh()
    await eventually(lambda: warmer.warmups == 2)
    assert (await scrape(gw)).value("gateway_embed_warmups_total") == 2


async def test_name_and_name_latest_count_as_one_model(gateway: RunningGateway) -> None:
    """`llama3` and `llama3:latest` are one model in Ollama, so one series here."""
    with trio.fail_after(10):
        for name in ("llama3", "llama3:latest"):
            await gateway.client.post(
                "/api/chat", json={**chat_body(), "model": name, "stream": False}
            )
        text = (await gateway.client.get("/metrics")).text
    assert 'model="llama3:latest"' in text
    assert 'model="llama3"' not in text
