"""The OpenAI routes end to end: the official `openai` SDK (and raw httpx for the bytes)
against a real gateway in front of the Ollama and OpenAI-compatible emulators (the
passthrough itself: tests/test_client_apis.py and tests/test_client_sdks.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import msgspec
import openai
import pytest
import trio
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessageParam

from gateway.config import ProvidersConfig
from tests.conftest import RunningGateway, StartGateway, eventually, make_config
from tests.emulators import OllamaEmulator, OpenAIEmulator
from tests.emulators.openai import error_json
from tests.emulators.wire import split_tokens

T = TypeVar("T")

CLIENT_KEY = "client-secret-xyz"
PROVIDER_KEY = "sk-test"
CLOUD_KEY = "cloud-key"
ROUTER_MODEL = "openrouter/openai/gpt-4o-mini"
QUESTION: list[ChatCompletionMessageParam] = [{"role": "user", "content": "why is the sky blue?"}]


def providers(**base_urls: str) -> dict[str, Any]:
    """A full `providers` section: every provider's defaults, no `.env` fallback (so the
    host's files cannot register one), and the given base URLs."""
    defaults: dict[str, dict[str, Any]] = msgspec.to_builtins(ProvidersConfig())
    return {
        name: {
            **table,
            "env_file": "",
            **({"base_url": base_urls[name]} if name in base_urls else {}),
        }
        for name, table in defaults.items()
    }


async def router_gateway(
    start_gateway: StartGateway,
    ollama: OllamaEmulator,
    openai_emu: OpenAIEmulator,
    *,
    key: str = PROVIDER_KEY,
) -> RunningGateway:
    """A gateway with OpenRouter registered and pointed at the OpenAI emulator."""
    config = make_config(ollama.url, providers=providers(openrouter=openai_emu.url + "/api/v1"))
    return await start_gateway(config, environ={"OPENROUTER_API_KEY": key})


async def local_gateway(start_gateway: StartGateway, ollama: OllamaEmulator) -> RunningGateway:
    """A gateway with no cloud provider registered."""
    return await start_gateway(make_config(ollama.url, providers=providers()))


async def sdk(gw: RunningGateway, call: Callable[[openai.OpenAI], T], timeout_s: float = 5) -> T:
    """Run `call` with a synchronous SDK client in a worker thread, bounded in time."""

    def run() -> T:
        with openai.OpenAI(
            base_url=gw.url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=timeout_s
        ) as client:
            return call(client)

    with trio.fail_after(timeout_s + 1):
        return await trio.to_thread.run_sync(run, abandon_on_cancel=True)


def complete(client: openai.OpenAI, model: str, **kwargs: Any) -> ChatCompletion:
    answer = client.chat.completions.create(model=model, messages=QUESTION, **kwargs)
    assert isinstance(answer, ChatCompletion)
    return answer


def stream(client: openai.OpenAI, model: str, **kwargs: Any) -> list[ChatCompletionChunk]:
    chunks = client.chat.completions.create(model=model, messages=QUESTION, stream=True, **kwargs)
    assert isinstance(chunks, openai.Stream)
    return list(chunks)


def joined(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def sse_data(body: bytes) -> list[bytes]:
    """The `data` of each event, checking that every event is exactly `data: ...\\n\\n`."""
    assert body.endswith(b"\n\n")
    events = body[:-2].split(b"\n\n")
    for event in events:
        assert event.startswith(b"data: ")
        assert b"\n" not in event
    return [event.removeprefix(b"data: ") for event in events]


def chat_body(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": QUESTION, **extra}


def final_ollama_line(ollama: OllamaEmulator) -> dict[str, Any]:
    request = ollama.requests_to("/api/chat")[-1]
    result: dict[str, Any] = json.loads(request.emitted[-1][1])
    return result


# ------------------------------------------------------------------ local Ollama


# --------------------------------------------------------- OpenAI-compatible


async def test_openrouter_completion_and_stream_through_the_sdk(
    start_gateway: StartGateway, ollama: OllamaEmulator, openai_emu: OpenAIEmulator
) -> None:
    """OpenRouter gets the prefix-stripped model, its own key only, and unknown fields."""
    gw = await router_gateway(start_gateway, ollama, openai_emu)
    answer = await sdk(gw, partial(complete, model=ROUTER_MODEL, extra_body={"top_k": 3}))
    assert answer.choices[0].message.content == openai_emu.reply
    assert answer.choices[0].finish_reason == "stop"
    sent = openai_emu.requests_to("/api/v1/chat/completions")[-1]
    assert sent.json()["model"] == "openai/gpt-4o-mini"
    assert sent.json()["top_k"] == 3
    assert sent.headers["authorization"] == f"Bearer {PROVIDER_KEY}"

    chunks = await sdk(
        gw,
        partial(
            stream,
            model=ROUTER_MODEL,
            extra_body={"top_k": 3},
            stream_options={"include_usage": True},
        ),
    )
    assert joined(chunks) == openai_emu.reply
    assert next(c.usage for c in chunks if c.usage is not None).completion_tokens == len(
        split_tokens(openai_emu.reply)
    )
    sent = openai_emu.requests_to("/api/v1/chat/completions")[-1]
    assert sent.json()["model"] == "openai/gpt-4o-mini"
    assert sent.json()["top_k"] == 3
    assert sent.json()["stream"] is True

    # A local call too, so both upstreams have seen a chat.
    await sdk(gw, partial(complete, model="llama3"))
    assert ollama.requests_to("/v1/chat/completions")
    for request in [*openai_emu.requests, *ollama.requests]:
        assert CLIENT_KEY not in json.dumps(request.headers)
        assert CLIENT_KEY.encode() not in request.body
    assert all(r.headers["authorization"] == f"Bearer {PROVIDER_KEY}" for r in openai_emu.requests)
    assert all("authorization" not in r.headers for r in ollama.requests)


async def test_openrouter_stream_is_passed_through_byte_for_byte(
    start_gateway: StartGateway, ollama: OllamaEmulator, openai_emu: OpenAIEmulator
) -> None:
    """A provider's SSE stream reaches the client as the provider sent it."""
    gw = await router_gateway(start_gateway, ollama, openai_emu)
    with trio.fail_after(5):
        response = await gw.client.post(
            "/v1/chat/completions",
            json=chat_body(ROUTER_MODEL, stream=True),
            headers={"Authorization": f"Bearer {CLIENT_KEY}"},
        )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    emitted = openai_emu.requests_to("/api/v1/chat/completions")[-1].emitted
    assert response.content == b"".join(data for _, data in emitted)
    assert sse_data(response.content)[-1] == b"[DONE]"


# -------------------------------------------------------------------- errors


async def test_unregistered_provider_is_404_naming_its_key_variable(
    start_gateway: StartGateway, ollama: OllamaEmulator, openai_emu: OpenAIEmulator
) -> None:
    """`kimi/x` without KIMI_API_KEY is a NotFoundError naming the variable, no fall-through."""
    gw = await router_gateway(start_gateway, ollama, openai_emu)
    with pytest.raises(openai.NotFoundError) as caught:
        await sdk(gw, partial(complete, model="kimi/x"))
    assert caught.value.status_code == 404
    assert "KIMI_API_KEY" in caught.value.message
    assert openai_emu.requests == []
    assert ollama.requests_to("/api/chat") == []


async def test_missing_model_is_400(start_gateway: StartGateway, ollama: OllamaEmulator) -> None:
    """An empty or absent model is a BadRequestError that says the model is required."""
    gw = await local_gateway(start_gateway, ollama)
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk(gw, partial(complete, model=""))
    assert caught.value.status_code == 400
    assert "model is required" in caught.value.message
    with trio.fail_after(5):
        response = await gw.client.post("/v1/chat/completions", json={"messages": QUESTION})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "model is required"
    assert response.json()["error"]["type"] == "invalid_request_error"


async def test_upstream_429_stays_429_with_retry_after(
    start_gateway: StartGateway, ollama: OllamaEmulator, openai_emu: OpenAIEmulator
) -> None:
    """A provider's rate limit is a RateLimitError, and its Retry-After reaches the client."""
    gw = await router_gateway(start_gateway, ollama, openai_emu)
    openai_emu.faults.status = 429
    openai_emu.faults.retry_after = "7"
    with pytest.raises(openai.RateLimitError) as caught:
        await sdk(gw, partial(complete, model=ROUTER_MODEL))
    assert caught.value.status_code == 429
    assert caught.value.response.headers["retry-after"] == "7"
    for stream_it in (False, True):
        with trio.fail_after(5):
            response = await gw.client.post(
                "/v1/chat/completions", json=chat_body(ROUTER_MODEL, stream=stream_it)
            )
        assert response.status_code == 429
        assert response.headers["retry-after"] == "7"
        assert response.json() == json.loads(openai_emu.error_body(429))  # the provider's own


async def test_upstream_401_is_502_without_the_key(
    start_gateway: StartGateway, ollama: OllamaEmulator, openai_emu: OpenAIEmulator
) -> None:
    """A wrong provider key is a 502 whose message never shows the key, even when echoed."""
    wrong = "sk-wrong-0123456789abcdef"
    gw = await router_gateway(start_gateway, ollama, openai_emu, key=wrong)
    with pytest.raises(openai.APIStatusError) as caught:
        await sdk(gw, partial(complete, model=ROUTER_MODEL))
    assert caught.value.status_code == 502
    assert "Incorrect API key" in caught.value.message
    assert wrong not in str(caught.value)
    assert openai_emu.requests[-1].headers["authorization"] == f"Bearer {wrong}"

    # A provider that echoes the key in full: the gateway scrubs it.
    openai_emu.faults.status = 401
    openai_emu.faults.status_body = error_json(f"bad key {wrong}", "invalid_request_error")
    with trio.fail_after(5):
        response = await gw.client.post("/v1/chat/completions", json=chat_body(ROUTER_MODEL))
    assert response.status_code == 502
    assert "bad key" in response.text
    assert wrong not in response.text


async def test_target_down_is_a_fast_503(
    start_gateway: StartGateway, ollama: OllamaEmulator
) -> None:
    """With the Ollama target down, local completions fail in under a second with 503."""
    gw = await local_gateway(start_gateway, ollama)
    await ollama.set_down(True)
    started = trio.current_time()
    with pytest.raises(openai.APIStatusError) as caught:
        await sdk(gw, partial(complete, model="llama3"))
    assert trio.current_time() - started < 1.0
    assert caught.value.status_code == 503
    assert ollama.url.removeprefix("http://") in caught.value.message
    started = trio.current_time()
    with trio.fail_after(5):
        response = await gw.client.post(
            "/v1/chat/completions", json=chat_body("llama3", stream=True)
        )
    assert trio.current_time() - started < 1.0
    assert response.status_code == 503
    assert "retry-after" in response.headers
    assert response.json()["error"]["message"]


# --------------------------------------------------- failures after the first byte


async def test_provider_dying_mid_stream_ends_with_an_error_event(
    start_gateway: StartGateway, ollama: OllamaEmulator, openai_emu: OpenAIEmulator
) -> None:
    """A provider cut mid-stream ends the SSE body with an error event and `[DONE]`."""
    gw = await router_gateway(start_gateway, ollama, openai_emu)
    openai_emu.faults.die_mid_stream_after = 2
    with trio.fail_after(5):
        response = await gw.client.post(
            "/v1/chat/completions", json=chat_body(ROUTER_MODEL, stream=True)
        )
    assert response.status_code == 200
    data = sse_data(response.content)
    assert len(data) == 4  # two upstream events, the error, [DONE]
    assert data[-1] == b"[DONE]"
    assert json.loads(data[-2])["error"]["message"]
    with pytest.raises(openai.APIError):
        await sdk(gw, partial(stream, model=ROUTER_MODEL))


async def test_local_target_dying_mid_stream_ends_with_an_error_event(
    start_gateway: StartGateway, ollama: OllamaEmulator
) -> None:
    """A local stream cut mid-answer ends with an error event and `[DONE]`; the SDK raises."""
    gw = await local_gateway(start_gateway, ollama)
    ollama.faults.die_mid_stream_after = 2
    with trio.fail_after(5):
        response = await gw.client.post(
            "/v1/chat/completions", json=chat_body("llama3", stream=True)
        )
    assert response.status_code == 200
    data = sse_data(response.content)
    assert data[-1] == b"[DONE]"
    error = json.loads(data[-2])["error"]
    assert error["message"]
    contents = [json.loads(d)["choices"][0]["delta"].get("content", "") for d in data[:-2]]
    assert "".join(contents) == "".join(split_tokens(ollama.reply)[:2])
    await eventually(lambda: gw.services.gate.busy == 0)
    with pytest.raises(openai.APIError):
        await sdk(gw, partial(stream, model="llama3"))
    await eventually(lambda: gw.services.gate.busy == 0)


# ----------------------------------------------------------------- the chat gate


async def test_front_door_waits_behind_an_ollama_stream(
    start_gateway: StartGateway, ollama: OllamaEmulator
) -> None:
    """A local `/v1/chat/completions` call queues behind `/api/chat` on the shared gate."""
    gw = await local_gateway(start_gateway, ollama)
    gate = gw.services.gate
    ollama.hold = trio.Event()
    answers: list[ChatCompletion] = []

    async def front_door() -> None:
        def call(client: openai.OpenAI) -> ChatCompletion:
            return client.chat.completions.create(
                model="llama3", messages=[{"role": "user", "content": "front-door"}]
            )

        answers.append(await sdk(gw, call))

    passthrough = {"model": "llama3", "messages": [{"role": "user", "content": "passthrough"}]}
    with trio.fail_after(5):
        async with trio.open_nursery() as clients:
            clients.start_soon(partial(gw.client.post, "/api/chat", json=passthrough))
            await ollama.wait_until(lambda: ollama.active_generations == 1)
            clients.start_soon(front_door)
            await eventually(lambda: gate.queued == 1)
            assert gate.busy == 1
            assert ollama.generation_order == ["passthrough"]
            ollama.hold.set()
    assert answers[0].choices[0].message.content == ollama.reply
    assert ollama.max_concurrent_generations == 1
    assert ollama.generation_order == ["passthrough", "front-door"]
    await eventually(lambda: (gate.busy, gate.queued) == (0, 0))


async def test_client_leaving_mid_stream_frees_the_gate(
    start_gateway: StartGateway, ollama: OllamaEmulator
) -> None:
    """A client that disconnects mid-stream cancels the generation and frees the gate."""
    gw = await local_gateway(start_gateway, ollama)
    gate = gw.services.gate
    ollama.hold = trio.Event()
    with trio.fail_after(5):
        async with gw.client.stream(
            "POST", "/v1/chat/completions", json=chat_body("llama3", stream=True)
        ) as response:
            assert response.status_code == 200
            buffer = b""
            async for chunk in response.aiter_raw():
                buffer += chunk
                if buffer.count(b"\n\n") >= 1:  # the first token
                    assert gate.busy == 1
                    break
        await ollama.wait_until(lambda: ollama.cancelled_generations == 1)
        await eventually(lambda: (gate.busy, gate.queued) == (0, 0))
    assert ollama.completed_generations == 0
    ollama.hold.set()
    answer = await sdk(gw, partial(complete, model="llama3"))
    assert answer.choices[0].message.content == ollama.reply


# ----------------------------------------------------------------- Ollama Cloud


# ------------------------------------------------------------- models, embeddings
