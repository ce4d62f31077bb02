"""The Ollama target client against the emulator: every call, and error classification."""

from __future__ import annotations

import socket
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing

import pytest
import trio

from gateway.config import OllamaConfig
from gateway.errors import (
    UpstreamProtocol,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.h1.client import ConnectionPool
from gateway.target.client import TargetClient, make_target_pool
from gateway.target.ndjson import LineTooLong
from tests.emulators import OllamaEmulator

MakeClient = Callable[..., Awaitable[TargetClient]]


async def read_all(stream: AsyncGenerator[object, None], into: list[object] | None = None) -> None:
    async with aclosing(stream) as chunks:
        async for chunk in chunks:
            if into is not None:
                into.append(chunk)


CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def client_for(nursery: trio.Nursery) -> AsyncIterator[MakeClient]:
    pools: list[ConnectionPool] = []

    async def make(url: str, **overrides: float) -> TargetClient:
        config = OllamaConfig(url=url, connect_timeout_s=1.0, **overrides)
        pool = make_target_pool(config)
        pools.append(pool)
        await nursery.start(pool.run)
        return TargetClient(pool, config, token="target-token")

    yield make
    for pool in pools:
        await pool.aclose()


async def test_every_typed_call(ollama: OllamaEmulator, client_for: MakeClient) -> None:
    client = await client_for(ollama.url)
    assert (await client.version()).version == ollama.version
    tags = await client.tags()
    assert sorted(m.name for m in tags.models) == sorted(ollama.models)
    chat = await client.chat(CHAT)
    assert chat.message.content == ollama.reply
    assert chat.done
    assert chat.done_reason == "stop"
    assert chat.eval_count == len(ollama.reply.split())
    generated = await client.generate({"model": "llama3", "prompt": "hi"})
    assert generated.response == ollama.reply
    assert (await client.ps()).models  # llama3 is loaded now
    show = await client.show("llama3")
    assert show.details.family
    embed = await client.embed("nomic-embed-text", ["a", "b"], keep_alive=-1)
    assert len(embed.embeddings) == 2
    assert ollama.keep_alive_seen["nomic-embed-text:latest"] == -1
    # The bearer token goes to the target on every call.
    assert {r.headers.get("authorization") for r in ollama.requests} == {"Bearer target-token"}


async def test_streaming_chat_and_generate(ollama: OllamaEmulator, client_for: MakeClient) -> None:
    client = await client_for(ollama.url)
    async with aclosing(client.chat_stream(CHAT)) as chunks:
        frames = [chunk async for chunk in chunks]
    assert "".join(f.message.content for f in frames) == ollama.reply
    assert frames[-1].done
    assert not any(f.done for f in frames[:-1])
    async with aclosing(client.generate_stream({"model": "llama3", "prompt": "x"})) as chunks:
        pieces = [chunk async for chunk in chunks]
    assert "".join(p.response for p in pieces) == ollama.reply
    assert pieces[-1].eval_count == len(pieces) - 1


async def test_refused_port_is_unavailable(client_for: MakeClient) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = await client_for(f"http://127.0.0.1:{port}")
    with pytest.raises(UpstreamUnavailable, match="unreachable"):
        await client.tags()


async def test_unknown_model_is_a_status_error_with_ollamas_message(
    ollama: OllamaEmulator,
    client_for: MakeClient,
) -> None:
    client = await client_for(ollama.url)
    with pytest.raises(UpstreamStatus) as error:
        await client.chat({**CHAT, "model": "nope"})
    assert error.value.upstream_status == 404
    assert error.value.status == 502
    assert "model 'nope' not found" in error.value.message


@pytest.mark.parametrize("body", [None, b""])
async def test_500_with_and_without_json(
    ollama: OllamaEmulator,
    client_for: MakeClient,
    body: bytes | None,
) -> None:
    client = await client_for(ollama.url)
    ollama.faults.status = 500
    ollama.faults.status_body = body
    with pytest.raises(UpstreamStatus) as error:
        await client.chat(CHAT)
    assert error.value.upstream_status == 500
    assert "upstream status 500" in error.value.message


async def test_hang_before_headers_is_our_timeout(
    ollama: OllamaEmulator,
    client_for: MakeClient,
) -> None:
    client = await client_for(ollama.url, first_byte_timeout_s=0.2)
    ollama.faults.hang_before_headers = True
    with trio.fail_after(5), pytest.raises(UpstreamTimeout, match=r"0\.2 s"):
        await client.chat(CHAT)


async def test_reset_before_headers_is_a_protocol_error(
    ollama: OllamaEmulator,
    client_for: MakeClient,
) -> None:
    client = await client_for(ollama.url)
    ollama.faults.reset_before_headers = True
    with pytest.raises(UpstreamProtocol, match="dropped the connection"):
        await client.chat(CHAT)


async def test_death_mid_stream_is_a_protocol_error(
    ollama: OllamaEmulator,
    client_for: MakeClient,
) -> None:
    client = await client_for(ollama.url)
    ollama.faults.die_mid_stream_after = 2
    seen: list[object] = []
    with pytest.raises(UpstreamProtocol):
        await read_all(client.chat_stream(CHAT), seen)
    assert len(seen) == 2


async def test_line_over_4_mib_is_a_protocol_error_not_a_hang(
    ollama: OllamaEmulator,
    client_for: MakeClient,
) -> None:
    client = await client_for(ollama.url)
    ollama.faults.overlong_line_bytes = 4 * 1024 * 1024 + 1
    with trio.fail_after(10), pytest.raises(LineTooLong):
        await read_all(client.chat_stream(CHAT))


async def test_garbage_answer_is_a_protocol_error(
    ollama: OllamaEmulator,
    client_for: MakeClient,
) -> None:
    client = await client_for(ollama.url)
    ollama.faults.garbage_body = True
    with pytest.raises(UpstreamProtocol, match="not valid"):
        await client.chat(CHAT)


async def test_idle_mid_stream_is_a_timeout(
    ollama: OllamaEmulator,
    client_for: MakeClient,
) -> None:
    client = await client_for(ollama.url, idle_timeout_s=0.2)
    ollama.faults.hang_mid_stream_after = 1
    with trio.fail_after(5), pytest.raises(UpstreamTimeout):
        await read_all(client.chat_stream(CHAT))


async def test_an_error_line_mid_stream_raises(
    ollama: OllamaEmulator,
    client_for: MakeClient,
) -> None:
    """A stream that ends with Ollama's `{"error": ...}` line raises with its message."""
    client = await client_for(ollama.url)
    ollama.faults.status = 200
    ollama.faults.status_body = (
        b'{"message":{"content":"a"},"done":false}\n{"error":"GPU fell off"}\n'
    )
    with pytest.raises(UpstreamProtocol, match="GPU fell off"):
        await read_all(client.chat_stream(CHAT))
