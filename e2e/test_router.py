"""The router, `/v1/chat`, against a real model.

OpenRouter is configured with llama-server's base URL and key, so `openrouter/llama/smollm2`
crosses the gateway's OpenAI-compatible client for real; `ollama/llama/smollm2` goes the
local way (chat gate, `/api/chat`) through ollama-proxy-plus to the same llama-server.
SmolLM2 rambles: answers are capped and only their shape is asserted.
"""

from __future__ import annotations

import trio

from e2e.conftest import (
    LLAMA_KEY,
    OLLAMA_MODEL,
    ROUTER_MODEL,
    Gateway,
    Service,
    async_client,
    released,
    start_gateway,
)

MESSAGES = [{"role": "user", "content": "Name three colours."}]
CAP = 16


async def test_openrouter_style_provider_answers(gateway: Gateway) -> None:
    """Content, token counts, finish reason and latency come back from llama-server."""
    async with async_client() as client:
        started = trio.current_time()
        answer = await client.post(
            gateway.url + "/v1/chat",
            json={"model": ROUTER_MODEL, "messages": MESSAGES, "max_tokens": CAP},
        )
        wall_ms = (trio.current_time() - started) * 1000
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["provider"] == "openrouter"
    assert body["model"] == "llama/smollm2"
    assert isinstance(body["content"], str)
    assert body["content"].strip()
    assert body["input_tokens"] > 0
    assert 0 < body["output_tokens"] <= CAP
    assert body["finish_reason"] in ("stop", "length")
    if body["finish_reason"] == "length":  # (a last token that is EOS says "stop" at CAP)
        assert body["output_tokens"] == CAP
    assert 0 < body["latency_ms"] <= wall_ms + 1


async def test_providers_listing_shows_the_configured_base_url(
    gateway: Gateway, llama_chat: Service
) -> None:
    async with async_client() as client:
        listing = (await client.get(gateway.url + "/v1/chat/providers")).json()
    by_name = {p["name"]: p for p in listing["providers"]}
    assert by_name["openrouter"]["base_url"] == f"{llama_chat.url}/v1"
    assert by_name["openrouter"]["available"] is True
    assert "ollama" in by_name
    assert LLAMA_KEY not in str(listing)


async def test_wrong_key_is_an_upstream_failure(
    nursery: trio.Nursery, proxy: Service, llama_chat: Service
) -> None:
    """llama-server refuses the key with 401; the gateway says 502 (the upstream failed,
    not the client's credentials), keeps the upstream's words, never shows the key."""
    wrong = "sk-wrong-key-0123456789"
    gw = await start_gateway(nursery, proxy, llama_chat, key=wrong)
    async with async_client() as client:
        answer = await client.post(
            gw.url + "/v1/chat",
            json={"model": ROUTER_MODEL, "messages": MESSAGES, "max_tokens": CAP},
        )
    assert answer.status_code == 502, answer.text
    error = answer.json()["error"]
    assert "Invalid API Key" in error
    assert "401" in error
    assert wrong not in answer.text
    gw.stop.set()


async def test_local_route_goes_through_the_gate(gateway: Gateway) -> None:
    """`ollama/<m>` is local Ollama: ollama-proxy-plus, under the chat gate."""
    granted = gateway.services.gate.figures().granted_total
    async with async_client() as client:
        answer = await client.post(
            gateway.url + "/v1/chat",
            json={"model": f"ollama/{OLLAMA_MODEL}", "messages": MESSAGES, "max_tokens": CAP},
        )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["provider"] == "ollama"
    assert body["model"] == OLLAMA_MODEL
    assert body["content"].strip()
    # ollama-proxy-plus counts words, not tokens, and always says "stop" (see docs/e2e.md).
    assert body["output_tokens"] > 0
    assert body["finish_reason"] == "stop"
    assert body["latency_ms"] > 0
    assert gateway.services.gate.figures().granted_total == granted + 1
    await released(gateway.services.gate)
