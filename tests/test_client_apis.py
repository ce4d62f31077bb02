"""The client-API routes on the wire (issue 12): bytes through the gateway equal the
upstream's bytes on every route, streamed and not; unknown models are 404 in each route's
shape; cloud models reach their provider's endpoint for the protocol, with `model` the
one rewrite; a protocol a provider does not serve is a 400 naming both."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from tests.conftest import RunningGateway, StartGateway, eventually, make_config
from tests.emulators import OllamaEmulator, OpenAIEmulator
from tests.test_openai_api import providers

CLOUD_KEY = "cloud-key-marker"
ROUTER_KEY = "sk-router-marker"
USER = [{"role": "user", "content": "why is the sky blue?"}]

# A valid body per route, for a model name the test fills in.
BODIES: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"messages": USER},
    "/v1/completions": {"prompt": "why is the sky blue?"},
    "/v1/responses": {"input": "why is the sky blue?"},
    "/v1/messages": {"max_tokens": 64, "messages": USER},
    "/v1/embeddings": {"input": ["alpha beta", "gamma"]},
}
STREAMING = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages")


def body_for(path: str, model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, **BODIES[path], **extra}


def local_model(path: str) -> str:
    return "nomic-embed-text" if path == "/v1/embeddings" else "llama3"


def emitted(emulator: OllamaEmulator | OpenAIEmulator, path: str) -> bytes:
    return b"".join(chunk for _, chunk in emulator.requests_to(path)[-1].emitted)


async def cloud_gateway(
    start_gateway: StartGateway, ollama: OllamaEmulator, nursery: trio.Nursery, **urls: str
) -> tuple[RunningGateway, OllamaEmulator]:
    cloud = OllamaEmulator.cloud(api_key=CLOUD_KEY)
    await nursery.start(cloud.run)
    config = make_config(ollama.url, providers=providers(ollama_cloud=cloud.url, **urls))
    environ = {"OLLAMA_CLOUD_KEY": CLOUD_KEY, "OPENROUTER_API_KEY": ROUTER_KEY}
    return await start_gateway(config, environ=environ), cloud


# ------------------------------------------------------------------ local, byte for byte


@pytest.mark.parametrize(
    ("path", "stream"),
    [(path, False) for path in BODIES] + [(path, True) for path in STREAMING],
)
async def test_local_answers_are_the_targets_bytes(
    start_gateway: StartGateway, ollama: OllamaEmulator, path: str, stream: bool
) -> None:
    """Every route, streamed and not: status, content type and body as Ollama sent them,
    and the request body as the client sent it."""
    gw = await start_gateway(make_config(ollama.url, providers=providers()))
    payload = body_for(path, local_model(path), **({"stream": True} if stream else {}))
    raw = json.dumps(payload, indent=1).encode()  # whitespace the gateway must not touch
    with trio.fail_after(5):
        response = await gw.client.post(
            path, content=raw, headers={"content-type": "application/json"}
        )
    assert response.status_code == 200, response.content
    sent = ollama.requests_to(path)[-1]
    assert sent.body == raw
    assert response.content == emitted(ollama, path)
    kind = response.headers["content-type"]
    assert kind.startswith("text/event-stream" if stream else "application/json")
    assert "authorization" not in sent.headers


async def test_prefix_is_the_one_rewrite(
    start_gateway: StartGateway, ollama: OllamaEmulator
) -> None:
    """`ollama/llama3` reaches Ollama as `llama3`, every other field byte for byte."""
    gw = await start_gateway(make_config(ollama.url, providers=providers()))
    raw = (
        b'{"model": "ollama/llama3", "messages": [{"role": "user", "content": "hi"}],'
        b'\n "top_p": 0.50}'
    )
    with trio.fail_after(5):
        response = await gw.client.post("/v1/chat/completions", content=raw)
    assert response.status_code == 200
    sent = ollama.requests_to("/v1/chat/completions")[-1].body
    assert json.loads(sent)["model"] == "llama3"
    assert b'"top_p":0.50' in sent  # the value's own bytes, not re-encoded
    assert b'[{"role": "user", "content": "hi"}]' in sent


@pytest.mark.parametrize("path", list(BODIES))
async def test_unknown_local_model_is_404_in_the_routes_shape(
    start_gateway: StartGateway, ollama: OllamaEmulator, path: str
) -> None:
    """Checked against the inventory: 404, never 502, never the target's URL; nothing
    generation-shaped reaches the target."""
    gw = await start_gateway(make_config(ollama.url, providers=providers()))
    with trio.fail_after(5):
        response = await gw.client.post(path, json=body_for(path, "no-such-model"))
    assert response.status_code == 404
    assert ollama.url.removeprefix("http://") not in response.text
    body = response.json()
    if path == "/v1/messages":
        assert body["type"] == "error"
        assert body["error"]["type"] == "not_found_error"
        assert "no-such-model" in body["error"]["message"]
    else:
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert "no-such-model" in body["error"]["message"]
    assert ollama.requests_to(path) == []


async def test_an_older_ollama_is_named_with_the_version_that_added_the_route(
    start_gateway: StartGateway, nursery: trio.Nursery
) -> None:
    """Ollama 0.13.0 has no /v1/messages nor /v1/responses: gin's 404 becomes a message
    naming the release that added each route, in the route's shape."""
    old = OllamaEmulator(version="0.13.0")
    await nursery.start(old.run)
    gw = await start_gateway(make_config(old.url, providers=providers()))
    with trio.fail_after(5):
        messages = await gw.client.post("/v1/messages", json=body_for("/v1/messages", "llama3"))
        responses = await gw.client.post("/v1/responses", json=body_for("/v1/responses", "llama3"))
        chat = await gw.client.post(
            "/v1/chat/completions", json=body_for("/v1/chat/completions", "llama3")
        )
    assert messages.status_code == 404
    assert "v0.14.0" in messages.json()["error"]["message"]
    assert responses.status_code == 404
    assert "v0.13.3" in responses.json()["error"]["message"]
    assert chat.status_code == 200


async def test_generation_routes_take_the_gate_and_embeddings_do_not(
    start_gateway: StartGateway, ollama: OllamaEmulator
) -> None:
    """A /v1/messages call waits behind an /api/chat stream; /v1/embeddings does not."""
    gw = await start_gateway(make_config(ollama.url, providers=providers()))
    gate = gw.services.gate
    ollama.hold = trio.Event()
    answers: dict[str, int] = {}

    async def post(path: str, payload: dict[str, Any]) -> None:
        answers[path] = (await gw.client.post(path, json=payload)).status_code

    chat = {"model": "llama3", "messages": USER, "stream": False}
    with trio.fail_after(5):
        async with trio.open_nursery() as clients:
            clients.start_soon(post, "/api/chat", chat)
            await ollama.wait_until(lambda: ollama.active_generations == 1)
            clients.start_soon(post, "/v1/messages", body_for("/v1/messages", "llama3"))
            await eventually(lambda: gate.queued == 1)
            await post("/v1/embeddings", body_for("/v1/embeddings", "nomic-embed-text"))
            assert answers["/v1/embeddings"] == 200
            assert gate.busy == 1
            ollama.hold.set()
    assert answers == {"/api/chat": 200, "/v1/messages": 200, "/v1/embeddings": 200}
    assert ollama.max_concurrent_generations == 1


async def test_local_usage_counts_reach_the_record(
    start_gateway: StartGateway, ollama: OllamaEmulator
) -> None:
    """Token counts come from each protocol's usage object (metrics by provider/model)."""
    gw = await start_gateway(make_config(ollama.url, providers=providers()))
    with trio.fail_after(5):
        answer = await gw.client.post("/v1/messages", json=body_for("/v1/messages", "llama3"))
    usage = answer.json()["usage"]
    metrics = (await gw.client.get("/metrics")).text
    line = next(
        row
        for row in metrics.splitlines()
        if row.startswith("gateway_tokens_total{") and 'direction="out"' in row
    )
    assert float(line.rsplit(" ", 1)[1]) == usage["output_tokens"] > 0


# ------------------------------------------------------------------------- cloud


@pytest.mark.parametrize(
    "model", ["gpt-oss:120b-cloud", "gpt-oss:120b:cloud", "ollama_cloud/gpt-oss:120b"]
)
@pytest.mark.parametrize("path", list(BODIES))
async def test_cloud_models_reach_ollama_cloud_on_the_same_route(
    start_gateway: StartGateway,
    ollama: OllamaEmulator,
    nursery: trio.Nursery,
    model: str,
    path: str,
) -> None:
    """The cloud tag or prefix stripped as a local Ollama strips it, the provider's key
    only, the answer's bytes as the cloud sent them, never the local gate."""
    gw, cloud = await cloud_gateway(start_gateway, ollama, nursery)
    with trio.fail_after(5):
        response = await gw.client.post(
            path, json=body_for(path, model), headers={"authorization": "Bearer client-own"}
        )
    assert response.status_code == 200, response.content
    sent = cloud.requests_to(path)[-1]
    assert json.loads(sent.body)["model"] == "gpt-oss:120b"
    assert sent.headers["authorization"] == f"Bearer {CLOUD_KEY}"
    assert response.content == emitted(cloud, path)
    assert ollama.requests_to(path) == []
    assert gw.services.gate.figures().granted_total == 0


async def test_cloud_stream_is_forwarded_as_it_arrives(
    start_gateway: StartGateway, ollama: OllamaEmulator, nursery: trio.Nursery
) -> None:
    gw, cloud = await cloud_gateway(start_gateway, ollama, nursery)
    payload = body_for("/v1/messages", "gpt-oss:120b-cloud", stream=True)
    with trio.fail_after(5):
        response = await gw.client.post("/v1/messages", json=payload)
    assert response.status_code == 200
    assert response.content == emitted(cloud, "/v1/messages")
    assert response.content.count(b"event: ") >= 4


async def test_a_protocol_the_provider_does_not_serve_is_a_400_naming_both(
    start_gateway: StartGateway, ollama: OllamaEmulator, openai_emu: OpenAIEmulator
) -> None:
    config = make_config(
        ollama.url,
        providers=providers(openrouter=openai_emu.url + "/api/v1")
        | {
            "openrouter": {
                **providers()["openrouter"],
                "base_url": openai_emu.url + "/api/v1",
                "protocols": ["chat_completions"],
            }
        },
    )
    gw = await start_gateway(config, environ={"OPENROUTER_API_KEY": "sk-test"})
    model = "openrouter/openai/gpt-4o-mini"
    with trio.fail_after(5):
        response = await gw.client.post("/v1/messages", json=body_for("/v1/messages", model))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "openrouter" in error["message"]
    assert "Anthropic Messages" in error["message"]
    assert openai_emu.requests == []


async def test_openrouter_messages_go_to_its_messages_endpoint(
    start_gateway: StartGateway, ollama: OllamaEmulator, nursery: trio.Nursery
) -> None:
    """Anthropic Messages to an OpenAI-family provider: `<base_url>/messages`, its key in
    both `Authorization` and `x-api-key`, `anthropic-version` passed on, bytes back."""
    router = OpenAIEmulator(api_key=ROUTER_KEY, serves_messages=True, serves_responses=True)
    await nursery.start(router.run)
    config = make_config(ollama.url, providers=providers(openrouter=router.url + "/api/v1"))
    gw = await start_gateway(config, environ={"OPENROUTER_API_KEY": ROUTER_KEY})
    model = "openrouter/openai/gpt-4o-mini"
    for stream in (False, True):
        with trio.fail_after(5):
            response = await gw.client.post(
                "/v1/messages?beta=true",
                json=body_for("/v1/messages", model, stream=stream),
                headers={"anthropic-version": "2023-06-01", "x-api-key": "client-own"},
            )
        assert response.status_code == 200, response.content
        sent = router.requests_to("/api/v1/messages")[-1]
        assert sent.query == "beta=true"
        assert sent.headers["x-api-key"] == ROUTER_KEY
        assert sent.headers["anthropic-version"] == "2023-06-01"
        assert json.loads(sent.body)["model"] == "openai/gpt-4o-mini"
        assert response.content == emitted(router, "/api/v1/messages")
    with trio.fail_after(5):
        response = await gw.client.post("/v1/responses", json=body_for("/v1/responses", model))
    assert response.status_code == 200
    assert response.content == emitted(router, "/api/v1/responses")


async def test_unregistered_provider_is_404_in_the_anthropic_shape(gateway: RunningGateway) -> None:
    with trio.fail_after(5):
        response = await gateway.client.post(
            "/v1/messages", json=body_for("/v1/messages", "kimi/kimi-for-coding")
        )
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"
    assert "KIMI_API_KEY" in response.json()["error"]["message"]


# ---------------------------------------------------------------- model listings


async def test_models_list_local_and_provider_models_only(
    start_gateway: StartGateway, ollama: OllamaEmulator, nursery: trio.Nursery
) -> None:
    """No pseudo-entries: every id listed works as a model name, and retrieves."""
    gw, cloud = await cloud_gateway(start_gateway, ollama, nursery)
    with trio.fail_after(5):
        listing = (await gw.client.get("/v1/models")).json()
    ids = [m["id"] for m in listing["data"]]
    assert ids[:3] == ["llama3:latest", "nomic-embed-text:latest", "qwen2.5:7b"]
    assert {f"ollama_cloud/{m}" for m in cloud.models} <= set(ids)
    assert not any(i.endswith("/") for i in ids)
    assert listing["data"][0]["owned_by"] == "library"
    with trio.fail_after(5):
        one = await gw.client.get("/v1/models/llama3")
        cloud_one = await gw.client.get("/v1/models/gpt-oss:120b-cloud")
        missing = await gw.client.get("/v1/models/nope")
        missing_cloud = await gw.client.get("/v1/models/ollama_cloud/nope")
    assert one.json()["id"] == "llama3"
    assert cloud_one.json()["id"] == "gpt-oss:120b-cloud"
    assert missing.status_code == missing_cloud.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


# ------------------------------------------------------- Ollama's native API, cloud


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate", "/api/show"])
async def test_native_routes_reach_ollama_cloud_for_cloud_models(
    start_gateway: StartGateway, ollama: OllamaEmulator, nursery: trio.Nursery, path: str
) -> None:
    gw, cloud = await cloud_gateway(start_gateway, ollama, nursery)
    payload: dict[str, Any] = {"model": "gpt-oss:120b-cloud"}
    if path == "/api/chat":
        payload["messages"] = USER
    elif path == "/api/generate":
        payload["prompt"] = "why?"
    with trio.fail_after(5):
        response = await gw.client.post(path, json=payload)
    assert response.status_code == 200, response.content
    sent = cloud.requests_to(path)[-1]
    assert json.loads(sent.body)["model"] == "gpt-oss:120b"
    assert sent.headers["authorization"] == f"Bearer {CLOUD_KEY}"
    assert response.content == emitted(cloud, path)
    assert ollama.requests_to(path) == []
    assert gw.services.gate.figures().granted_total == 0


@pytest.mark.parametrize(
    ("path", "ending"),
    [
        ("/v1/chat/completions", b"data: [DONE]\n\n"),
        ("/v1/completions", b"data: [DONE]\n\n"),
        ("/v1/responses", None),
        ("/v1/messages", None),
    ],
)
async def test_a_stream_cut_mid_answer_ends_with_the_protocols_error(
    start_gateway: StartGateway, ollama: OllamaEmulator, path: str, ending: bytes | None
) -> None:
    """After the first byte: what the target sent, then the protocol's in-band error."""
    gw = await start_gateway(make_config(ollama.url, providers=providers()))
    ollama.faults.die_mid_stream_after = 2
    with trio.fail_after(5):
        response = await gw.client.post(path, json=body_for(path, "llama3", stream=True))
    assert response.status_code == 200
    sent = emitted(ollama, path)
    assert response.content.startswith(sent)
    tail = response.content[len(sent) :]
    if ending is not None:
        assert tail.endswith(ending)
        error = json.loads(tail.split(b"\n\n")[-3].removeprefix(b"data: "))["error"]
        assert "Ollama target" in error["message"]
    else:
        assert tail.lstrip(b"\n").startswith(b"event: error\ndata: ")
        data = json.loads(tail.split(b"data: ", 1)[1])
        message = data["error"]["message"] if path == "/v1/messages" else data["message"]
        assert "Ollama target" in message
    await eventually(lambda: gw.services.gate.busy == 0)


async def test_list_in_tags_adds_the_clouds_models_named_to_route_there(
    start_gateway: StartGateway, ollama: OllamaEmulator, nursery: trio.Nursery
) -> None:
    """Off by default (the target's bytes); on, the cloud's models follow the local ones
    as `<m>:<tag>-cloud`, and a name picked from the list reaches Ollama Cloud."""
    cloud = OllamaEmulator.cloud(api_key=CLOUD_KEY)
    await nursery.start(cloud.run)
    environ = {"OLLAMA_CLOUD_KEY": CLOUD_KEY}
    plain = await start_gateway(
        make_config(ollama.url, providers=providers(ollama_cloud=cloud.url)), environ=environ
    )
    with trio.fail_after(5):
        response = await plain.client.get("/api/tags")
    assert response.content == emitted(ollama, "/api/tags")
    tables = providers(ollama_cloud=cloud.url)
    tables["ollama_cloud"]["list_in_tags"] = True
    gw = await start_gateway(make_config(ollama.url, providers=tables), environ=environ)
    with trio.fail_after(5):
        response = await gw.client.get("/api/tags")
    local = json.loads(emitted(ollama, "/api/tags"))["models"]
    names = [m["name"] for m in response.json()["models"]]
    assert names == [m["name"] for m in local] + [f"{m}-cloud" for m in cloud.models]
    picked = names[-1]
    with trio.fail_after(5):
        chat = await gw.client.post(
            "/api/chat", json={"model": picked, "messages": USER, "stream": False}
        )
    assert chat.status_code == 200
    assert json.loads(cloud.requests_to("/api/chat")[-1].body)["model"] == cloud.models[-1]
