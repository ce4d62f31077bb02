"""`/v1/chat` and `/v1/chat/providers` end to end, against both emulators."""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
import trio

from tests.conftest import RunningGateway, StartGateway, eventually, make_config
from tests.emulators import OllamaEmulator, OpenAIEmulator

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Why is the sky blue?"},
    {"role": "assistant", "content": "Rayleigh."},
    {"role": "user", "content": "More."},
]
KEYS = {
    "OPENROUTER_API_KEY": "sk-openrouter-marker",
    "KIMI_API_KEY": "sk-kimi-marker",
    "OLLAMA_CLOUD_KEY": "cloud-key-marker",
}


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": MESSAGES, **extra}


@pytest.fixture
async def cloud(nursery: trio.Nursery) -> OllamaEmulator:
    emulator = OllamaEmulator(
        models=("kimi-k2:cloud", "gpt-oss:120b"), required_token="cloud-key-marker"
    )
    await nursery.start(emulator.run)
    return emulator


@pytest.fixture
async def kimi(nursery: trio.Nursery) -> OpenAIEmulator:
    emulator = OpenAIEmulator(api_key="sk-kimi-marker", models=("kimi-for-coding",))
    await nursery.start(emulator.run)
    return emulator


@pytest.fixture
async def routed(
    start_gateway: StartGateway,
    ollama: OllamaEmulator,
    cloud: OllamaEmulator,
    kimi: OpenAIEmulator,
    nursery: trio.Nursery,
) -> tuple[RunningGateway, OpenAIEmulator]:
    openrouter = OpenAIEmulator(api_key="sk-openrouter-marker")
    await nursery.start(openrouter.run)
    config = make_config(
        ollama.url,
        providers={
            "openrouter": {"base_url": f"{openrouter.url}/api/v1", "env_file": ""},
            "kimi": {"base_url": f"{kimi.url}/coding/v1", "env_file": ""},
            "ollama_cloud": {"base_url": cloud.url, "env_file": ""},
            "opencode": {"env_file": ""},
        },
    )
    return await start_gateway(config, environ=dict(KEYS)), openrouter


async def test_providers_lists_only_registered_in_a_stable_order(
    routed: tuple[RunningGateway, OpenAIEmulator], gateway: RunningGateway
) -> None:
    gw, openrouter = routed
    listing = (await gw.client.get("/v1/chat/providers")).json()["providers"]
    assert [p["name"] for p in listing] == ["ollama", "ollama_cloud", "openrouter", "kimi"]
    assert listing[2] == {
        "name": "openrouter",
        "base_url": f"{openrouter.url}/api/v1",
        "available": True,
    }
    assert not any(marker in str(listing) for marker in KEYS.values())
    only_local = (await gateway.client.get("/v1/chat/providers")).json()["providers"]
    assert [p["name"] for p in only_local] == ["ollama"]


async def test_bare_model_goes_to_local_ollama_with_counts_and_latency(
    gateway: RunningGateway, ollama: OllamaEmulator
) -> None:
    response = await gateway.client.post(
        "/v1/chat", json=chat("llama3", max_tokens=50, temperature=0.2)
    )
    assert response.status_code == 200
    answer = response.json()
    assert answer["provider"] == "ollama"
    assert answer["model"] == "llama3"
    assert answer["content"] == ollama.reply
    assert answer["input_tokens"] > 0
    assert answer["output_tokens"] == len(ollama.reply.split())
    assert answer["finish_reason"] == "stop"
    assert isinstance(answer["latency_ms"], int)
    sent = ollama.requests_to("/api/chat")[-1].json()
    assert sent["model"] == "llama3"
    assert sent["stream"] is False
    assert sent["think"] is False
    assert sent["options"] == {"num_predict": 50, "temperature": 0.2}
    assert sent["messages"] == MESSAGES


async def test_prefix_is_stripped_and_done_reason_comes_first(
    gateway: RunningGateway, ollama: OllamaEmulator
) -> None:
    response = await gateway.client.post(
        "/v1/chat", json=chat("ollama/llama3", max_tokens=2, format="json")
    )
    assert response.json()["finish_reason"] == "length"
    assert response.json()["output_tokens"] == 2
    sent = ollama.requests_to("/api/chat")[-1].json()
    assert sent["model"] == "llama3"
    assert sent["format"] == "json"


async def test_cloud_suffix_without_a_key_is_404_naming_the_variable(
    gateway: RunningGateway, ollama: OllamaEmulator
) -> None:
    response = await gateway.client.post("/v1/chat", json=chat("kimi-k2:cloud"))
    assert response.status_code == 404
    assert "OLLAMA_CLOUD_KEY" in response.json()["error"]
    assert ollama.requests_to("/api/chat") == []  # never a silent fall-through
    response = await gateway.client.post("/v1/chat", json=chat("openrouter/openai/gpt-4o"))
    assert response.status_code == 404
    assert "OPENROUTER_API_KEY" in response.json()["error"]


async def test_unknown_prefix_reaches_local_ollama_and_its_404_becomes_502(
    gateway: RunningGateway, ollama: OllamaEmulator
) -> None:
    response = await gateway.client.post("/v1/chat", json=chat("unknown/x"))
    assert response.status_code == 502
    assert "not found" in response.json()["error"]
    assert ollama.requests_to("/api/chat")[-1].json()["model"] == "unknown/x"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"", "missing request body"),
        (b"{", "not valid JSON"),
        (b'{"messages": [{"role": "user", "content": "x"}]}', "model is required"),
        (b'{"model": "llama3"}', "messages"),
        (b'{"model": "llama3", "messages": "hi"}', "messages"),
        (b'{"model": "llama3", "messages": [{"role": "user"}]}', "content"),
        (b'{"model": "llama3", "messages": []}', "at least one message"),
        (b'{"model": 7, "messages": []}', "model"),
        (b'{"model": "", "messages": [{"role": "user", "content": "x"}]}', "model is required"),
        (
            b'{"model": "llama3", "messages": [{"role": "user", "content": "x"}],'
            b' "max_tokens": "5"}',
            "max_tokens",
        ),
    ],
)
async def test_bad_requests_are_400_with_a_reason(
    gateway: RunningGateway, ollama: OllamaEmulator, body: bytes, fragment: str
) -> None:
    response = await gateway.client.post("/v1/chat", content=body)
    assert response.status_code == 400
    assert fragment in response.json()["error"]
    assert ollama.requests_to("/api/chat") == []


async def test_openrouter_gets_stripped_name_and_only_its_own_key(
    routed: tuple[RunningGateway, OpenAIEmulator],
    kimi: OpenAIEmulator,
    cloud: OllamaEmulator,
    ollama: OllamaEmulator,
) -> None:
    gw, openrouter = routed
    response = await gw.client.post(
        "/v1/chat",
        json=chat("openrouter/openai/gpt-4o-mini", format="json", max_tokens=100),
        headers={"Authorization": "Bearer client-secret-token"},
    )
    assert response.status_code == 200
    answer = response.json()
    assert answer["provider"] == "openrouter"
    assert answer["model"] == "openai/gpt-4o-mini"
    assert answer["input_tokens"] > 0
    assert answer["output_tokens"] > 0
    request = openrouter.requests[-1]
    assert request.path == "/api/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-openrouter-marker"
    sent = request.json()
    assert sent["model"] == "openai/gpt-4o-mini"
    assert sent["response_format"] == {"type": "json_object"}
    assert sent["max_tokens"] == 100
    await gw.client.post("/v1/chat", json=chat("kimi/kimi-for-coding"))
    assert kimi.requests[-1].headers["authorization"] == "Bearer sk-kimi-marker"
    await gw.client.post("/v1/chat", json=chat("llama3"))
    for emulator in (openrouter, kimi, cloud, ollama):
        for recorded in emulator.requests:
            auth = recorded.headers.get("authorization", "")
            assert "client-secret-token" not in auth
    assert "authorization" not in ollama.requests_to("/api/chat")[-1].headers


async def test_ollama_cloud_gets_a_flattened_generate_with_floor_and_defaults(
    routed: tuple[RunningGateway, OpenAIEmulator], cloud: OllamaEmulator
) -> None:
    gw, _ = routed
    response = await gw.client.post("/v1/chat", json=chat("kimi-k2:cloud", max_tokens=10))
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["provider"] == "ollama_cloud"
    assert answer["model"] == "kimi-k2:cloud"
    assert answer["content"] == cloud.reply
    assert answer["finish_reason"] == "stop"
    request = cloud.requests_to("/api/generate")[-1]
    assert request.headers["authorization"] == "Bearer cloud-key-marker"
    sent = request.json()
    assert sent["system"] == "Be brief."
    assert sent["prompt"] == "User: Why is the sky blue?\n\nAssistant: Rayleigh.\n\nUser: More."
    assert sent["think"] is False
    assert sent["stream"] is False
    assert sent["options"] == {"num_predict": 400, "temperature": 0.3}
    await gw.client.post(
        "/v1/chat", json=chat("ollama_cloud/gpt-oss:120b", max_tokens=900, temperature=0)
    )
    sent = cloud.requests_to("/api/generate")[-1].json()
    assert sent["model"] == "gpt-oss:120b"
    assert sent["options"] == {"num_predict": 900, "temperature": 0}


async def test_upstream_429_stays_429_with_retry_after(
    routed: tuple[RunningGateway, OpenAIEmulator],
) -> None:
    gw, openrouter = routed
    openrouter.faults.status = 429
    openrouter.faults.retry_after = "17"
    response = await gw.client.post("/v1/chat", json=chat("openrouter/a/b"))
    assert response.status_code == 429
    assert response.headers["retry-after"] == "17"


@pytest.mark.parametrize(("status", "body"), [(500, None), (500, b""), (401, None), (400, None)])
async def test_other_upstream_errors_are_502_with_the_message_kept(
    routed: tuple[RunningGateway, OpenAIEmulator], status: int, body: bytes | None
) -> None:
    gw, openrouter = routed
    openrouter.faults.status = status
    openrouter.faults.status_body = body
    response = await gw.client.post("/v1/chat", json=chat("openrouter/a/b"))
    assert response.status_code == 502
    message = response.json()["error"]
    assert f"upstream status {status}" in message
    assert "sk-openrouter-marker" not in message


async def test_wrong_key_is_502_and_the_key_is_not_echoed(
    start_gateway: StartGateway, ollama: OllamaEmulator, openai_emu: OpenAIEmulator
) -> None:
    config = make_config(
        ollama.url, providers={"kimi": {"base_url": openai_emu.url, "env_file": ""}}
    )
    gw = await start_gateway(config, environ={"KIMI_API_KEY": "sk-wrong-key-marker"})
    response = await gw.client.post("/v1/chat", json=chat("kimi/x"))
    assert response.status_code == 502
    assert "sk-wrong-key-marker" not in response.text
    assert "401" in response.json()["error"]


async def test_zero_choices_is_an_upstream_error_not_a_crash(
    routed: tuple[RunningGateway, OpenAIEmulator],
) -> None:
    gw, openrouter = routed
    openrouter.faults.zero_choices = True
    response = await gw.client.post("/v1/chat", json=chat("openrouter/openai/gpt-4o-mini"))
    assert response.status_code == 502
    assert "no choices" in response.json()["error"]


async def test_provider_timeout_is_504(
    start_gateway: StartGateway, ollama: OllamaEmulator, openai_emu: OpenAIEmulator
) -> None:
    config = make_config(
        ollama.url,
        providers={"kimi": {"base_url": openai_emu.url, "env_file": "", "timeout_s": 0.3}},
    )
    gw = await start_gateway(config, environ={"KIMI_API_KEY": "sk-test"})
    openai_emu.faults.hang_before_headers = True
    with trio.fail_after(5):
        response = await gw.client.post("/v1/chat", json=chat("kimi/x"))
    assert response.status_code == 504
    assert "0.3 s" in response.json()["error"]


async def test_provider_refusing_connections_is_502(
    start_gateway: StartGateway, ollama: OllamaEmulator, openai_emu: OpenAIEmulator
) -> None:
    config = make_config(
        ollama.url, providers={"kimi": {"base_url": openai_emu.url, "env_file": ""}}
    )
    gw = await start_gateway(config, environ={"KIMI_API_KEY": "sk-test"})
    await openai_emu.set_down(True)
    response = await gw.client.post("/v1/chat", json=chat("kimi/x"))
    assert response.status_code == 502
    assert "unreachable" in response.json()["error"]


async def test_local_chat_waits_behind_an_api_chat_stream(
    gateway: RunningGateway, ollama: OllamaEmulator
) -> None:
    gate = gateway.services.gate
    ollama.hold = trio.Event()
    results: list[int] = []

    async def router_chat() -> None:
        results.append((await gateway.client.post("/v1/chat", json=chat("llama3"))).status_code)

    with trio.fail_after(10):
        async with trio.open_nursery() as clients:
            clients.start_soon(
                partial(
                    gateway.client.post,
                    "/api/chat",
                    json={"model": "llama3", "messages": [{"role": "user", "content": "first"}]},
                )
            )
            await ollama.wait_until(lambda: ollama.active_generations == 1)
            clients.start_soon(router_chat)
            await eventually(lambda: gate.queued == 1)
            assert ollama.active_generations == 1
            ollama.hold.set()
    assert results == [200]
    assert ollama.max_concurrent_generations == 1
    assert ollama.generation_order == ["first", "Why is the sky blue?"]


async def test_local_chat_fails_fast_while_the_target_is_down(
    gateway: RunningGateway, ollama: OllamaEmulator
) -> None:
    await ollama.set_down(True)
    await gateway.client.post("/api/chat", json={"model": "llama3", "messages": []})
    await eventually(lambda: gateway.services.inventory.degraded)
    started = trio.current_time()
    response = await gateway.client.post("/v1/chat", json=chat("llama3"))
    assert trio.current_time() - started < 1.0
    assert response.status_code == 503
    assert ollama.url.removeprefix("http://") in response.json()["error"]


async def test_embeddings_in_base64_are_little_endian_float32(
    gateway: RunningGateway, ollama: OllamaEmulator
) -> None:
    import base64
    import struct

    body = {"model": "nomic-embed-text", "input": ["a"]}
    floats = (await gateway.client.post("/v1/embeddings", json=body)).json()["data"][0]["embedding"]
    packed = (
        await gateway.client.post("/v1/embeddings", json={**body, "encoding_format": "base64"})
    ).json()
    raw = base64.b64decode(packed["data"][0]["embedding"])
    assert struct.unpack(f"<{len(floats)}f", raw) == pytest.approx(floats, rel=1e-6)
    bad = await gateway.client.post("/v1/embeddings", json={**body, "encoding_format": "int8"})
    assert bad.status_code == 400
