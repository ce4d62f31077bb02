"""Request bodies with a `Content-Encoding` on the wire (ADR 0022): Codex posts
`/v1/responses` as zstd. Through the gateway on real sockets, every JSON route decodes
the body, routes on its `model`, and the upstream (local target or cloud provider) sees
the client's plain JSON bytes with no `Content-Encoding` and their own `Content-Length`.
Bombs, corrupt data and unknown codings are refused in the route's own error shape."""

from __future__ import annotations

import json
import time
import tracemalloc
from typing import Any

import pytest
import trio

from tests.conftest import RunningGateway, StartGateway, make_config
from tests.emulators import OllamaEmulator, OpenAIEmulator
from tests.test_client_apis import ROUTER_KEY, body_for, local_model
from tests.test_content_coding import ENCODERS, encode, zstd, zstd_bomb
from tests.test_openai_api import providers

LIMIT = 1 << 20

# Each JSON route, a local model's body for it, and its error shape.
OLLAMA = "ollama"
OPENAI = "openai"
ANTHROPIC = "anthropic"
ROUTES: dict[str, tuple[dict[str, Any], str]] = {
    "/api/chat": ({"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}, OLLAMA),
    "/api/generate": ({"model": "llama3", "prompt": "hi", "stream": False}, OLLAMA),
    "/api/embed": ({"model": "nomic-embed-text", "input": ["a"]}, OLLAMA),
    "/api/show": ({"model": "llama3"}, OLLAMA),
    **{
        path: (body_for(path, local_model(path)), ANTHROPIC if path == "/v1/messages" else OPENAI)
        for path in (
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/responses",
            "/v1/messages",
            "/v1/embeddings",
        )
    },
}
STACKS = ["zstd", "gzip", "x-gzip", "deflate", "zstd, gzip", "gzip, deflate, zstd", "identity"]


def coded(body: bytes, header: str) -> bytes:
    return encode(body, [c.strip() for c in header.split(",") if c.strip() != "identity"])


def error_message(shape: str, answer: Any) -> str:
    """The message of an error in `shape`, asserting the shape on the way."""
    if shape == OLLAMA:
        assert set(answer) == {"error"}
        assert isinstance(answer["error"], str)
        return str(answer["error"])
    if shape == ANTHROPIC:
        assert answer["type"] == "error"
        return str(answer["error"]["message"])
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    return str(answer["error"]["message"])


async def post(gw: RunningGateway, path: str, body: bytes, encoding: str) -> Any:
    headers = {"content-type": "application/json", "content-encoding": encoding}
    with trio.fail_after(5):
        return await gw.client.post(path, content=body, headers=headers)


@pytest.mark.parametrize("encoding", STACKS)
@pytest.mark.parametrize("path", sorted(ROUTES))
async def test_the_upstream_gets_the_plain_json(
    start_gateway: StartGateway, ollama: OllamaEmulator, path: str, encoding: str
) -> None:
    gw = await start_gateway(make_config(ollama.url, providers=providers()))
    plain = json.dumps(ROUTES[path][0], indent=1).encode()  # whitespace kept as sent
    response = await post(gw, path, coded(plain, encoding), encoding)
    assert response.status_code == 200, response.content
    sent = ollama.requests_to(path)[-1]
    assert sent.body == plain
    assert "content-encoding" not in sent.headers
    assert sent.headers["content-length"] == str(len(plain))


async def test_codex_responses_in_zstd_reach_a_cloud_provider_decoded(
    start_gateway: StartGateway, ollama: OllamaEmulator, nursery: trio.Nursery
) -> None:
    """OpenRouter's emulator gets the JSON (with `model` rewritten, the one rewrite), no
    `Content-Encoding`, the right length; the answer comes back as it sent it."""
    router = OpenAIEmulator(api_key=ROUTER_KEY, serves_messages=True, serves_responses=True)
    await nursery.start(router.run)
    config = make_config(ollama.url, providers=providers(openrouter=router.url + "/api/v1"))
    gw = await start_gateway(config, environ={"OPENROUTER_API_KEY": ROUTER_KEY})
    payload = body_for("/v1/responses", "openrouter/openai/gpt-4o-mini", stream=True)
    plain = json.dumps(payload).encode()
    response = await post(gw, "/v1/responses", zstd(plain), "zstd")
    assert response.status_code == 200, response.content
    sent = router.requests_to("/api/v1/responses")[-1]
    assert sent.json() == {**payload, "model": "openai/gpt-4o-mini"}
    assert "content-encoding" not in sent.headers
    assert sent.headers["content-length"] == str(len(sent.body))
    assert response.content == b"".join(chunk for _, chunk in sent.emitted)


async def test_the_router_route_decodes_too(
    start_gateway: StartGateway, ollama: OllamaEmulator
) -> None:
    """`/v1/chat` is a Quart route: same decoding, same refusals in Ollama's shape."""
    gw = await start_gateway(make_config(ollama.url, providers=providers()))
    chat = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}
    response = await post(gw, "/v1/chat", ENCODERS["gzip"](json.dumps(chat).encode()), "gzip")
    assert response.status_code == 200, response.content
    assert response.json()["content"]
    assert ollama.requests_to("/api/chat")[-1].json()["model"] == "llama3"
    response = await post(gw, "/v1/chat", b"\x1f\x8bnot gzip", "gzip")
    assert response.status_code == 400
    assert "gzip" in error_message(OLLAMA, response.json())
    response = await post(gw, "/v1/chat", b"{}", "br")
    assert response.status_code == 415
    assert response.headers["accept-encoding"] == "zstd, gzip, deflate"


# ------------------------------------------------------------------------ refusals

REFUSED = ["/api/chat", "/api/embed", "/v1/responses", "/v1/messages", "/v1/chat/completions"]


@pytest.mark.parametrize("path", REFUSED)
async def test_a_bomb_is_a_413_at_the_limit(
    start_gateway: StartGateway, ollama: OllamaEmulator, path: str
) -> None:
    """32 KB of zstd that expands to 1 GiB: refused once the decoded size passes
    `max_body_bytes`, with memory near that limit, not near 1 GiB, and nothing upstream."""
    gw = await start_gateway(make_config(ollama.url, providers=providers(), max_body_bytes=LIMIT))
    bomb = zstd_bomb()
    tracemalloc.start()
    started = time.perf_counter()
    try:
        response = await post(gw, path, bomb, "zstd")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert response.status_code == 413
    assert str(LIMIT) in error_message(ROUTES[path][1], response.json())
    # The whole process (gateway, client, emulator) stayed far below what the body
    # expands to; a full decode of 1 GiB alone takes seconds.
    assert peak < 8 * LIMIT
    assert time.perf_counter() - started < 2.0
    assert ollama.requests_to(path) == []


@pytest.mark.parametrize("path", REFUSED)
async def test_corrupt_data_is_a_400_naming_the_coding(
    gateway: RunningGateway, ollama: OllamaEmulator, path: str
) -> None:
    plain = json.dumps(ROUTES[path][0]).encode()
    for encoding, bad in [
        ("zstd", zstd(plain)[:-7]),  # cut short
        ("gzip", b"\x1f\x8b\x08\x00garbage"),
        ("deflate", b"not deflate at all"),
    ]:
        response = await post(gateway, path, bad, encoding)
        assert response.status_code == 400, response.content
        message = error_message(ROUTES[path][1], response.json())
        assert f"not valid {encoding} data" in message
    assert ollama.requests_to(path) == []


@pytest.mark.parametrize("path", REFUSED)
async def test_an_unknown_coding_is_a_415_naming_it(
    gateway: RunningGateway, ollama: OllamaEmulator, path: str
) -> None:
    response = await post(gateway, path, b"\x0b\x01\x80{}\x03", "br")
    assert response.status_code == 415
    assert response.headers["accept-encoding"] == "zstd, gzip, deflate"
    message = error_message(ROUTES[path][1], response.json())
    assert "br is not supported" in message
    assert "zstd, gzip, deflate" in message
    if ROUTES[path][1] == OPENAI:
        assert response.json()["error"]["type"] == "invalid_request_error"
    if ROUTES[path][1] == ANTHROPIC:
        assert response.json()["error"]["type"] == "invalid_request_error"
    assert ollama.requests_to(path) == []


async def test_the_connection_serves_the_next_request_after_a_refusal(
    gateway: RunningGateway, ollama: OllamaEmulator
) -> None:
    """A refused coded body was read whole: the keep-alive connection carries on."""
    response = await post(gateway, "/api/chat", b"junk", "zstd")
    assert response.status_code == 400
    plain = json.dumps(ROUTES["/api/chat"][0]).encode()
    response = await post(gateway, "/api/chat", zstd(plain), "zstd")
    assert response.status_code == 200
    assert ollama.requests_to("/api/chat")[-1].body == plain
