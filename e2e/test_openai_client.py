"""The official `openai` client against the gateway's `/v1/chat/completions`, with a real
model behind it: llama-server as an OpenAI-compatible provider (the body is forwarded),
and local Ollama through ollama-proxy-plus (its own `/v1/chat/completions`, passed
through since issue 12)."""

from __future__ import annotations

from typing import Any

import openai
import pytest
import trio
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from e2e.conftest import (
    EMBED_MODEL,
    LLAMA_KEY,
    OLLAMA_MODEL,
    ROUTER_MODEL,
    Gateway,
    Service,
    in_thread,
    start_gateway,
)

QUESTION: Any = [{"role": "user", "content": "Say hello."}]
CAP = 16


def sdk(gw: Gateway) -> openai.OpenAI:
    # The client's key is not the provider's: the gateway has no inbound auth here, and a
    # client's Authorization header is never forwarded upstream.
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="client-key", max_retries=0, timeout=120)


@pytest.mark.parametrize("model", [ROUTER_MODEL, f"ollama/{OLLAMA_MODEL}"])
async def test_not_streaming(gateway: Gateway, model: str) -> None:
    def call() -> ChatCompletion:
        with sdk(gateway) as client:
            return client.chat.completions.create(model=model, messages=QUESTION, max_tokens=CAP)

    answer = await in_thread(call)
    assert len(answer.choices) == 1
    choice = answer.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert answer.usage is not None
    assert answer.usage.prompt_tokens > 0
    assert answer.usage.completion_tokens > 0
    if model == ROUTER_MODEL:  # real token counts from llama-server
        assert answer.usage.completion_tokens <= CAP
        assert answer.usage.total_tokens == (
            answer.usage.prompt_tokens + answer.usage.completion_tokens
        )


@pytest.mark.parametrize("model", [ROUTER_MODEL, f"ollama/{OLLAMA_MODEL}"])
async def test_streaming(gateway: Gateway, model: str) -> None:
    def call() -> list[ChatCompletionChunk]:
        with sdk(gateway) as client:
            stream = client.chat.completions.create(
                model=model,
                messages=QUESTION,
                max_tokens=CAP,
                stream=True,
                stream_options={"include_usage": True},
            )
            return list(stream)

    chunks = await in_thread(call)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length")
    assert all(f is None for f in finishes[:-1])
    usage = [c.usage for c in chunks if c.usage is not None]
    if model == ROUTER_MODEL:
        # The stream is the server's own (issue 12): llama-server honours include_usage;
        # ollama-proxy-plus, the Ollama stand-in, sends no usage chunk (Ollama does).
        assert len(usage) == 1
        assert usage[0].completion_tokens > 0
        assert usage[0].completion_tokens <= CAP
        assert len({c.id for c in chunks}) == 1


async def test_streaming_holds_no_gate_for_a_cloud_provider(gateway: Gateway) -> None:
    """The gate is for the local target only: a provider stream never holds it."""
    seen_busy = 0

    async def watch() -> None:
        nonlocal seen_busy
        while True:
            seen_busy = max(seen_busy, gateway.services.gate.figures().busy)
            await trio.sleep(0.005)

    def call() -> int:
        with sdk(gateway) as client:
            stream = client.chat.completions.create(
                model=ROUTER_MODEL, messages=QUESTION, max_tokens=CAP, stream=True
            )
            return sum(1 for _ in stream)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        assert await in_thread(call) > 1
        nursery.cancel_scope.cancel()
    assert seen_busy == 0


async def test_wrong_provider_key(
    nursery: trio.Nursery, proxy: Service, llama_chat: Service
) -> None:
    """A provider that refuses the gateway's key: the SDK raises a typed 502 error."""
    gw = await start_gateway(nursery, proxy, llama_chat, key="sk-not-the-key")

    def call() -> None:
        with sdk(gw) as client:
            client.chat.completions.create(model=ROUTER_MODEL, messages=QUESTION, max_tokens=CAP)

    with pytest.raises(openai.InternalServerError) as caught:
        await in_thread(call)
    assert caught.value.status_code == 502
    assert "Invalid API Key" in str(caught.value)
    assert "sk-not-the-key" not in str(caught.value)
    assert LLAMA_KEY not in str(caught.value)
    gw.stop.set()


async def test_embeddings(gateway: Gateway) -> None:
    """`/v1/embeddings` passes through to the target's own `/v1/embeddings` (issue 12),
    never gated. ollama-proxy-plus, the Ollama stand-in, has no such route: its 404 comes
    back as it sent it, a `NotFoundError` the SDK does not retry (docs/e2e.md); the same
    vectors are covered on `/api/embed` in test_ollama_client.py."""

    def call() -> Any:
        with sdk(gateway) as client:
            return client.embeddings.create(model=EMBED_MODEL, input=["red", "green"])

    with pytest.raises(openai.NotFoundError) as caught:
        await in_thread(call)
    assert caught.value.status_code == 404
    assert gateway.services.gate.figures().granted_total == 0
