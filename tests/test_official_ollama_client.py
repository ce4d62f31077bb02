"""The official `ollama` Python client works unchanged through the gateway.

The client is synchronous (httpx.Client), so each call runs in a worker thread via
`trio.to_thread.run_sync`; its own timeout bounds the I/O, `trio.fail_after` the test.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

import pytest
import trio
from ollama import AsyncClient, Client, ResponseError

from tests.conftest import RunningGateway
from tests.emulators import OllamaEmulator
from tests.emulators.wire import embedding_vector

T = TypeVar("T")
MESSAGES = [{"role": "user", "content": "why is the sky blue?"}]


def client_for(gw: RunningGateway) -> Client:
    return Client(host=gw.url, timeout=5.0, trust_env=False)


async def in_thread(call: Callable[[], T]) -> T:
    with trio.fail_after(10):
        return await trio.to_thread.run_sync(call)


async def test_chat_not_streaming(gateway: RunningGateway, ollama: OllamaEmulator) -> None:
    """`Client.chat(stream=False)` gets the model's whole answer and its counters."""
    with client_for(gateway) as client:
        response = await in_thread(
            lambda: client.chat(model="llama3", messages=MESSAGES, stream=False)
        )
    assert response.message.role == "assistant"
    assert response.message.content == ollama.reply
    assert response.done is True
    assert response.done_reason == "stop"
    assert response.eval_count == len(ollama.reply.split())
    assert ollama.requests_to("/api/chat")[-1].json()["messages"] == MESSAGES


async def test_chat_streaming(gateway: RunningGateway, ollama: OllamaEmulator) -> None:
    """`Client.chat(stream=True)` yields one part per NDJSON line, the last one done."""
    with client_for(gateway) as client:
        parts = await in_thread(
            lambda: list(client.chat(model="llama3", messages=MESSAGES, stream=True))
        )
    assert len(parts) == len(ollama.reply.split()) + 1
    assert "".join(p.message.content or "" for p in parts) == ollama.reply
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert parts[-1].done_reason == "stop"


async def test_generate_not_streaming(gateway: RunningGateway, ollama: OllamaEmulator) -> None:
    """`Client.generate(stream=False)` gets the whole response text and the context."""
    with client_for(gateway) as client:
        response = await in_thread(
            lambda: client.generate(model="llama3", prompt="why is the sky blue?", stream=False)
        )
    assert response.response == ollama.reply
    assert response.done is True
    assert response.context is not None
    assert len(response.context) > 0


async def test_generate_streaming(gateway: RunningGateway, ollama: OllamaEmulator) -> None:
    """`Client.generate(stream=True)` yields the response word by word, the last one done."""
    with client_for(gateway) as client:
        parts = await in_thread(
            lambda: list(client.generate(model="qwen2.5:7b", prompt="sky?", stream=True))
        )
    assert "".join(p.response for p in parts) == ollama.reply
    assert parts[-1].done is True
    assert all(p.model == "qwen2.5:7b" for p in parts)


async def test_embed(gateway: RunningGateway, ollama: OllamaEmulator) -> None:
    """`Client.embed` returns one vector per input, exactly the target's vectors."""
    texts = ["first text", "second text"]
    with client_for(gateway) as client:
        response = await in_thread(lambda: client.embed(model="nomic-embed-text", input=texts))
    assert len(response.embeddings) == 2
    assert [len(v) for v in response.embeddings] == [8, 8]
    assert [list(v) for v in response.embeddings] == [
        embedding_vector(t, normalize=True) for t in texts
    ]
    assert ollama.active_embeds == 0


async def test_list_and_ps(gateway: RunningGateway, ollama: OllamaEmulator) -> None:
    """`Client.list` names every installed model; `Client.ps` shows a model once loaded."""
    with client_for(gateway) as client:
        listed = await in_thread(client.list)
        assert sorted(m.model or "" for m in listed.models) == sorted(ollama.models)
        assert all(m.size and m.size > 0 for m in listed.models)
        before = await in_thread(client.ps)
        assert before.models == []
        await in_thread(lambda: client.generate(model="llama3", prompt="hi", stream=False))
        after = await in_thread(client.ps)
    assert [m.model for m in after.models] == ["llama3:latest"]
    assert after.models[0].expires_at is not None


async def test_show(gateway: RunningGateway) -> None:
    """`Client.show` returns the model's details, modelfile and capabilities."""
    with client_for(gateway) as client:
        shown = await in_thread(lambda: client.show("llama3"))
        embedder = await in_thread(lambda: client.show("nomic-embed-text"))
    assert shown.modelfile is not None
    assert "FROM " in shown.modelfile
    assert shown.details is not None
    assert shown.details.family
    assert shown.capabilities == ["completion", "tools"]
    assert embedder.capabilities == ["embedding"]


@pytest.mark.parametrize("stream", [False, True])
async def test_unknown_model_raises_response_error_404(
    gateway: RunningGateway, ollama: OllamaEmulator, stream: bool
) -> None:
    """An unknown model is Ollama's 404, which the client raises as `ResponseError`."""

    def call() -> object:
        with client_for(gateway) as client:
            result = client.chat(model="nope:7b", messages=MESSAGES, stream=stream)
            return list(result) if stream else result  # type: ignore[arg-type]

    with pytest.raises(ResponseError) as caught:
        await in_thread(call)
    assert caught.value.status_code == 404
    assert caught.value.error == 'model "nope:7b" not found, try pulling it first'
    assert ollama.requests_to("/api/chat") == []


async def test_async_client_chat_streaming(gateway: RunningGateway, ollama: OllamaEmulator) -> None:
    """`ollama.AsyncClient` (asyncio, in its own thread and loop) streams a chat too."""

    async def chat() -> str:
        text = ""
        async with AsyncClient(host=gateway.url, timeout=5.0, trust_env=False) as client:
            async for part in await client.chat(model="llama3", messages=MESSAGES, stream=True):
                text += part.message.content or ""
        return text

    assert await in_thread(lambda: asyncio.run(chat())) == ollama.reply
