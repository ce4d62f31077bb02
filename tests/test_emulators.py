"""The upstream emulators themselves, exercised with a real httpx.AsyncClient."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, TypeVar

import httpx
import pytest
import trio

from tests.emulators import EmulatorBase, OllamaEmulator, OpenAIEmulator

E = TypeVar("E", bound=EmulatorBase)
REPLY = "The sky is blue because of Rayleigh scattering."
CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "why is the sky blue?"}]}
OA_CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}]}
OA_AUTH = {"authorization": "Bearer sk-test"}


@asynccontextmanager
async def serving(emu: E) -> AsyncIterator[E]:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(emu.run)
        assert port == emu.port > 0
        assert emu.url == f"http://127.0.0.1:{port}"
        try:
            yield emu
        finally:
            nursery.cancel_scope.cancel()


def client(emu: EmulatorBase, *, read: float = 5.0) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=emu.url, timeout=httpx.Timeout(5.0, read=read))


async def stream_lines(
    c: httpx.AsyncClient, path: str, body: dict[str, Any], **kw: Any
) -> list[str]:
    async with c.stream("POST", path, json=body, **kw) as response:
        assert response.status_code == 200
        return [line async for line in response.aiter_lines() if line]


async def collect_lines(
    c: httpx.AsyncClient, path: str, body: dict[str, Any], into: list[str]
) -> None:
    """Like stream_lines, but keeps what arrived before a failure."""
    async with c.stream("POST", path, json=body) as response:
        async for line in response.aiter_lines():
            into.append(line)


async def raw_chunks(port: int, path: str, body: dict[str, Any], auth: str = "") -> list[bytes]:
    """POST over a bare socket and return the HTTP chunks exactly as framed on the wire."""
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(payload)}\r\n"
        f"Content-Type: application/json\r\nConnection: close\r\n{auth}\r\n"
    )
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    data = b""
    async with stream:
        await stream.send_all(head.encode() + payload)
        while chunk := await stream.receive_some(65536):
            data += chunk
    headers, _, rest = data.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in headers.lower()
    chunks: list[bytes] = []
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return chunks
        chunks.append(rest[:size])
        assert rest[size : size + 2] == b"\r\n"
        rest = rest[size + 2 :]


# ------------------------------------------------------------------ Ollama


async def test_ollama_root_version_head() -> None:
    with trio.fail_after(10):
        async with serving(OllamaEmulator(version="0.9.9")) as emu, client(emu) as c:
            r = await c.get("/")
            assert (r.status_code, r.text) == (200, "Ollama is running")
            assert r.headers["content-type"] == "text/plain; charset=utf-8"
            r = await c.head("/")
            assert (r.status_code, r.content, r.headers["content-length"]) == (200, b"", "17")
            r = await c.get("/api/version")
            assert r.json() == {"version": "0.9.9"}
            assert r.headers["content-type"] == "application/json; charset=utf-8"
            h = await c.head("/api/version")
            assert h.content == b""
            assert h.headers["content-length"] == str(len(r.content))
            assert [q.method for q in emu.requests] == ["GET", "HEAD", "GET", "HEAD"]


async def test_ollama_tags_show() -> None:
    with trio.fail_after(10):
        async with serving(OllamaEmulator()) as emu, client(emu) as c:
            models = (await c.get("/api/tags")).json()["models"]
            names = ["llama3:latest", "qwen2.5:7b", "nomic-embed-text:latest"]
            assert [m["name"] for m in models] == [m["model"] for m in models] == names
            keys = {"parent_model", "format", "family", "families", "parameter_size"}
            assert keys | {"quantization_level"} == set(models[0]["details"])
            assert {"modified_at", "size", "digest"} <= set(models[0])
            show = (await c.post("/api/show", json={"model": "llama3"})).json()
            assert {"modelfile", "parameters", "template", "details", "model_info"} <= set(show)
            assert show["capabilities"] == ["completion", "tools"]
            legacy = await c.post("/api/show", json={"name": "nomic-embed-text"})
            assert legacy.json()["capabilities"] == ["embedding"]
            r = await c.post("/api/show", json={"model": "nope"})
            assert (r.status_code, r.json()) == (404, {"error": "model 'nope' not found"})
            r = await c.post("/api/show", json={})
            assert (r.status_code, r.json()) == (400, {"error": "model is required"})


async def test_ollama_chat_stream() -> None:
    with trio.fail_after(10):
        async with serving(OllamaEmulator()) as emu, client(emu) as c:
            async with c.stream("POST", "/api/chat", json=CHAT) as r:
                assert r.headers["content-type"] == "application/x-ndjson"
                lines = [json.loads(x) async for x in r.aiter_lines() if x]
            *tokens, last = lines
            assert all(t["done"] is False and t["model"] == "llama3" for t in tokens)
            assert all(t["message"]["role"] == "assistant" for t in tokens)
            assert "".join(t["message"]["content"] for t in tokens) == REPLY
            assert len(tokens) == len(REPLY.split())
            assert last["done"] is True
            assert last["done_reason"] == "stop"
            assert last["message"] == {"role": "assistant", "content": ""}
            for key in ("total_duration", "load_duration", "prompt_eval_count"):
                assert isinstance(last[key], int)
            assert isinstance(last["prompt_eval_duration"], int)
            assert last["eval_count"] == len(tokens)
            assert isinstance(last["eval_duration"], int)
            assert "created_at" in last
            assert last["created_at"].endswith("Z")
            rec = emu.requests_to("/api/chat")[0]
            assert rec.json() == CHAT
            assert rec.headers["content-type"] == "application/json"
            assert emu.emitted is rec.emitted
            assert len(rec.emitted) == len(lines)
            assert emu.completed_generations == 1
            assert emu.active_generations == 0


async def test_ollama_each_line_is_its_own_chunk() -> None:
    with trio.fail_after(10):
        async with serving(OllamaEmulator()) as emu:
            chunks = await raw_chunks(emu.port, "/api/generate", {"model": "llama3", "prompt": "x"})
            assert len(chunks) == len(REPLY.split()) + 1
            assert all(ch.count(b"\n") == 1 and ch.endswith(b"\n") for ch in chunks)
            assert [json.loads(ch)["done"] for ch in chunks][-2:] == [False, True]


async def test_ollama_non_stream_and_generate() -> None:
    with trio.fail_after(10):
        async with serving(OllamaEmulator()) as emu, client(emu) as c:
            r = await c.post("/api/chat", json={**CHAT, "stream": False})
            assert r.headers["content-type"] == "application/json; charset=utf-8"
            body = r.json()
            assert body["message"] == {"role": "assistant", "content": REPLY}
            assert body["done"] is True
            assert body["done_reason"] == "stop"
            assert body["eval_count"] == len(REPLY.split())
            gen = {"model": "qwen2.5:7b", "prompt": "why?"}
            body = (await c.post("/api/generate", json={**gen, "stream": False})).json()
            assert body["response"] == REPLY
            assert body["model"] == "qwen2.5:7b"
            assert all(isinstance(i, int) for i in body["context"])
            assert body["context"]
            lines = [json.loads(x) for x in await stream_lines(c, "/api/generate", gen)]
            assert "".join(x["response"] for x in lines) == REPLY
            assert lines[-1]["done"]
            assert lines[-1]["context"]


async def test_ollama_num_predict_and_format_json() -> None:
    with trio.fail_after(10):
        async with serving(OllamaEmulator()) as emu, client(emu) as c:
            body = {**CHAT, "stream": False, "options": {"num_predict": 3}}
            r = (await c.post("/api/chat", json=body)).json()
            assert r["done_reason"] == "length"
            assert r["eval_count"] == 3
            assert r["message"]["content"] == "The sky is"
            lines = await stream_lines(c, "/api/chat", {**CHAT, "options": {"num_predict": 2}})
            assert len(lines) == 3
            assert json.loads(lines[-1])["done_reason"] == "length"
            r = (await c.post("/api/chat", json={**CHAT, "stream": False, "format": "json"})).json()
            assert isinstance(json.loads(r["message"]["content"]), dict)


async def test_ollama_errors() -> None:
    with trio.fail_after(10):
        async with serving(OllamaEmulator()) as emu, client(emu) as c:
            r = await c.post("/api/chat", json={**CHAT, "model": "gpt-x"})
            assert (r.status_code, r.json()) == (404, {"error": "model 'gpt-x' not found"})
            r = await c.post("/api/generate", json={"prompt": "hi"})
            assert (r.status_code, r.json()) == (400, {"error": "model is required"})
            cases = {
                b"": "missing request body",
                b"{": "unexpected EOF",
                b"?": "invalid character '?' looking for beginning of value",
                b"[]": "json: cannot unmarshal array into Go value of type api.ChatRequest",
            }
            for raw, message in cases.items():
                r = await c.post("/api/chat", content=raw)
                assert (r.status_code, r.json()) == (400, {"error": message})
                assert r.headers["content-type"] == "application/json; charset=utf-8"
            r = await c.post("/api/chat", json={**CHAT, "model": "nomic-embed-text"})
            assert r.json() == {"error": '"nomic-embed-text" does not support chat'}
            r = await c.post("/api/chat", json={**CHAT, "keep_alive": "-1"})
            assert r.json() == {"error": 'time: missing unit in duration "-1"'}
            r = await c.get("/api/nope")
            assert (r.status_code, r.text) == (404, "404 page not found")
            assert r.headers["content-type"] == "text/plain"
            r = await c.get("/api/chat")
            assert (r.status_code, r.text) == (405, "405 method not allowed")
            assert emu.active_generations == emu.completed_generations == 0
            assert len(emu.requests) == 10


async def test_ollama_embed() -> None:
    with trio.fail_after(10):
        async with serving(OllamaEmulator()) as emu, client(emu) as c:
            one = (
                await c.post("/api/embed", json={"model": "nomic-embed-text", "input": "a"})
            ).json()
            assert one["model"] == "nomic-embed-text"
            assert len(one["embeddings"]) == 1
            assert {"total_duration", "load_duration", "prompt_eval_count"} <= set(one)
            vec = one["embeddings"][0]
            assert len(vec) == 8
            assert abs(sum(v * v for v in vec) - 1) < 1e-9
            two = (await c.post("/api/embed", json={"model": "llama3", "input": ["a", "b"]})).json()
            assert two["embeddings"][0] == vec
            assert two["embeddings"][1] != vec
            legacy = await c.post(
                "/api/embeddings", json={"model": "nomic-embed-text", "prompt": "a"}
            )
            assert list(legacy.json()) == ["embedding"]
            assert len(legacy.json()["embedding"]) == 8
            r = await c.post("/api/embed", json={"model": "x", "input": "a"})
            want = {"error": 'model "x" not found, try pulling it first'}
            assert (r.status_code, r.json()) == (404, want)
            r = await c.post("/api/embed", json={"model": "llama3", "input": 3})
            assert (r.status_code, r.json()) == (400, {"error": "invalid input type"})
            assert emu.max_concurrent_embeds == 1
            assert emu.active_embeds == 0


async def test_ollama_required_token() -> None:
    with trio.fail_after(10):
        async with serving(OllamaEmulator(required_token="tok")) as emu, client(emu) as c:
            assert (await c.get("/")).status_code == 200
            r = await c.get("/api/tags")
            assert (r.status_code, r.json()) == (401, {"error": "unauthorized"})
            r = await c.get("/api/tags", headers={"Authorization": "Bearer nope"})
            assert r.status_code == 401
            r = await c.get("/api/tags", headers={"Authorization": "Bearer tok"})
            assert r.status_code == 200


async def test_ollama_model_management() -> None:
    with trio.fail_after(10):
        async with serving(OllamaEmulator()) as emu, client(emu) as c:
            lines = await stream_lines(c, "/api/pull", {"model": "gemma3:1b"})
            statuses = [json.loads(x)["status"] for x in lines]
            assert statuses[0] == "pulling manifest"
            assert statuses[-1] == "success"
            assert "gemma3:1b" in emu.models
            r = await c.post("/api/pull", json={"model": "phi3", "stream": False})
            assert r.json() == {"status": "success"}
            assert "phi3:latest" in emu.models
            r = await c.post("/api/copy", json={"source": "phi3", "destination": "phi4"})
            assert (r.status_code, r.content) == (200, b"")
            assert "phi4:latest" in emu.models
            r = await c.post("/api/copy", json={"source": "zzz", "destination": "y"})
            assert (r.status_code, r.json()) == (404, {"error": 'model "zzz" not found'})
            r = await c.request("DELETE", "/api/delete", json={"model": "phi4"})
            assert r.status_code == 200
            assert "phi4:latest" not in emu.models
            r = await c.request("DELETE", "/api/delete", json={"model": "phi4"})
            assert (r.status_code, r.json()) == (404, {"error": "model 'phi4' not found"})
            r = await c.post("/api/create", json={"model": "mine", "stream": False})
            assert r.json() == {"status": "success"}
            assert "mine:latest" in emu.models
            r = await c.post("/api/push", json={"model": "mine", "stream": False})
            assert r.json() == {"status": "success"}
            assert (await c.head("/api/blobs/sha256:ab")).status_code == 404
            assert (await c.post("/api/blobs/sha256:ab", content=b"x")).status_code == 201
            assert (await c.head("/api/blobs/sha256:ab")).status_code == 200
            assert len(emu.requests_to("/api/pull")) == 2


async def test_ollama_keep_alive_loaded_ps_evict() -> None:
    with trio.fail_after(10):
        async with serving(OllamaEmulator()) as emu, client(emu) as c:
            assert (await c.get("/api/ps")).json() == {"models": []}
            await c.post("/api/chat", json={**CHAT, "stream": False, "keep_alive": "10m"})
            assert emu.loaded == {"llama3:latest": "10m"}
            assert emu.keep_alive_seen == {"llama3:latest": "10m"}
            ps = (await c.get("/api/ps")).json()["models"]
            assert [m["name"] for m in ps] == ["llama3:latest"]
            assert {"expires_at", "size_vram", "context_length", "digest", "details"} <= set(ps[0])
            await c.post(
                "/api/embed", json={"model": "nomic-embed-text", "input": "x", "keep_alive": 0}
            )
            assert emu.keep_alive_seen["nomic-embed-text:latest"] == 0
            assert "nomic-embed-text:latest" not in emu.loaded
            emu.evict("llama3")
            assert emu.loaded == {}
            r = (await c.post("/api/generate", json={"model": "llama3", "keep_alive": -1})).json()
            assert (r["done"], r["done_reason"], r["response"]) == (True, "load", "")
            assert emu.loaded == {"llama3:latest": -1}
            assert emu.active_generations == 0
            r = (await c.post("/api/chat", json={"model": "llama3", "keep_alive": 0})).json()
            assert r["done_reason"] == "unload"
            assert emu.loaded == {}
            assert emu.completed_generations == 1


async def test_ollama_load_and_token_delays() -> None:
    emu = OllamaEmulator(load_delay_s=0.3, token_delay_s=0.02)
    with trio.fail_after(10):
        async with serving(emu), client(emu) as c:
            await stream_lines(c, "/api/chat", CHAT)
            first = emu.requests[0]
            assert first.emitted[0][0] - first.received_at >= 0.3
            gaps = [b[0] - a[0] for a, b in zip(first.emitted, first.emitted[1:], strict=False)]
            assert min(gaps) >= 0.02
            await stream_lines(c, "/api/chat", CHAT)
            second = emu.requests[1]
            assert second.emitted[0][0] - second.received_at < 0.3
            final = json.loads(first.emitted[-1][1])
            assert (
                final["load_duration"]
                >= 300_000_000
                > json.loads(second.emitted[-1][1])["load_duration"]
            )


async def test_ollama_hold_release_and_concurrency() -> None:
    emu = OllamaEmulator()
    emu.hold = trio.Event()
    results: dict[str, list[str]] = {}
    with trio.fail_after(10):
        async with serving(emu), client(emu) as c, trio.open_nursery() as nursery:

            async def run(name: str, body: dict[str, Any], headers: dict[str, str]) -> None:
                results[name] = await stream_lines(c, "/api/chat", body, headers=headers)

            nursery.start_soon(run, "a", CHAT, {"X-Test-Tag": "tag-a"})
            await emu.wait_until(lambda: emu.active_generations == 1 and len(emu.emitted) == 1)
            other = {**CHAT, "messages": [{"role": "user", "content": "tag-b"}]}
            nursery.start_soon(run, "b", other, {})
            await emu.wait_until(lambda: emu.active_generations == 2 and len(emu.emitted) == 1)
            assert emu.generation_order == ["tag-a", "tag-b"]
            assert results == {}
            emu.hold.set()
        assert emu.max_concurrent_generations == 2
        assert emu.completed_generations == 2
        assert len(results["a"]) == len(results["b"]) == len(REPLY.split()) + 1


async def test_ollama_disconnect_while_held_counts_cancelled() -> None:
    emu = OllamaEmulator()
    emu.hold = trio.Event()
    with trio.fail_after(10):
        async with serving(emu), client(emu) as c:
            for body in ({**CHAT, "stream": False}, CHAT):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(stream_lines, c, "/api/chat", body)
                    await emu.wait_until(lambda: emu.active_generations == 1)
                    nursery.cancel_scope.cancel()
                await emu.wait_until(lambda: emu.active_generations == 0)
            assert emu.cancelled_generations == 2
            assert emu.completed_generations == 0


async def test_ollama_embed_hold() -> None:
    emu = OllamaEmulator()
    emu.embed_hold = trio.Event()
    with trio.fail_after(10):
        async with serving(emu), client(emu) as c, trio.open_nursery() as nursery:
            for text in ("a", "b"):
                body = {"model": "nomic-embed-text", "input": text}
                nursery.start_soon(partial(c.post, json=body), "/api/embed")
            await emu.wait_until(lambda: emu.active_embeds == 2)
            emu.embed_hold.set()
        assert emu.max_concurrent_embeds == 2
        assert emu.active_embeds == 0


# ------------------------------------------------------------------ faults


async def test_fault_hang_before_headers() -> None:
    emu = OllamaEmulator()
    emu.faults.hang_before_headers = True
    with trio.fail_after(10):
        async with serving(emu):
            async with client(emu, read=0.2) as c:
                with pytest.raises(httpx.ReadTimeout):
                    await c.post("/api/chat", json=CHAT)
                assert (await c.get("/api/tags")).status_code == 200  # not a generation route
            await emu.wait_until(lambda: emu.open_connections == 0)
            assert emu.total_connections == 2
            assert emu.requests_to("/api/chat")


async def test_fault_reset_and_close_before_headers() -> None:
    emu = OllamaEmulator()
    with trio.fail_after(10):
        async with serving(emu), client(emu) as c:
            emu.faults.reset_before_headers = True
            with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
                await c.post("/api/embed", json={"model": "llama3", "input": "x"})
            emu.faults.reset_before_headers = False
            emu.faults.close_before_headers = True
            with pytest.raises(httpx.RemoteProtocolError):
                await c.post("/api/chat", json=CHAT)
            assert len(emu.requests) == 2


async def test_fault_die_and_hang_mid_stream() -> None:
    emu = OllamaEmulator()
    got: list[str] = []
    with trio.fail_after(10):
        async with serving(emu):
            async with client(emu) as c:
                emu.faults.die_mid_stream_after = 2
                with pytest.raises(httpx.RemoteProtocolError):
                    await collect_lines(c, "/api/chat", CHAT, got)
                assert len(got) == 2
            emu.faults.die_mid_stream_after = None
            emu.faults.hang_mid_stream_after = 1
            got.clear()
            async with client(emu, read=0.2) as c:
                with pytest.raises(httpx.ReadTimeout):
                    await collect_lines(c, "/api/generate", {"model": "llama3", "prompt": "x"}, got)
            assert len(got) == 1
            await emu.wait_until(lambda: emu.active_generations == 0)
            assert emu.completed_generations == 0
            assert emu.cancelled_generations == 1


async def test_fault_overlong_garbage_zero() -> None:
    emu = OllamaEmulator()
    with trio.fail_after(10):
        async with serving(emu), client(emu) as c:
            emu.faults.overlong_line_bytes = 100_000
            lines = await stream_lines(c, "/api/chat", CHAT)
            assert len(lines[0].encode()) == 100_000
            assert set(json.loads(lines[0])["message"]["content"]) == {"x"}
            assert json.loads(lines[-1])["done"] is True
            emu.faults.overlong_line_bytes = None
            emu.faults.garbage_body = True
            r = await c.post("/api/chat", json={**CHAT, "stream": False})
            assert (r.status_code, r.content) == (200, b"this is not json")
            assert r.headers["content-type"] == "application/json"


async def test_fault_status_and_fault_paths() -> None:
    emu = OllamaEmulator()
    with trio.fail_after(10):
        async with serving(emu), client(emu) as c:
            emu.faults.status, emu.faults.status_body = 500, b""
            r = await c.post("/api/chat", json=CHAT)
            assert (r.status_code, r.content) == (500, b"")
            emu.faults.status, emu.faults.status_body = 503, None
            emu.faults.retry_after = "7"
            r = await c.post("/api/embed", json={"model": "llama3", "input": "x"})
            assert r.status_code == 503
            assert r.headers["retry-after"] == "7"
            assert "server busy" in r.json()["error"]
            assert (await c.get("/api/tags")).status_code == 200
            emu.faults.fault_paths = frozenset({"/api/embed"})
            assert (await c.post("/api/chat", json={**CHAT, "stream": False})).status_code == 200
            r = await c.post("/api/embed", json={"model": "llama3", "input": "x"})
            assert r.status_code == 503


async def test_set_down_and_up_same_port() -> None:
    emu = OllamaEmulator()
    emu.hold = trio.Event()
    with trio.fail_after(10):
        async with serving(emu), client(emu) as c:
            port = emu.port
            async with trio.open_nursery() as nursery:

                async def held() -> None:
                    with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
                        await stream_lines(c, "/api/chat", CHAT)

                nursery.start_soon(held)
                await emu.wait_until(lambda: len(emu.emitted) == 1)
                await emu.set_down(True)
                assert emu.open_connections == 0
            with pytest.raises(httpx.ConnectError):
                await c.get("/api/version")
            await emu.set_down(False)
            assert emu.port == port
            assert (await c.get("/api/version")).status_code == 200
            assert emu.cancelled_generations == 1


async def test_keep_alive_connection_and_recording() -> None:
    with trio.fail_after(10):
        async with serving(OllamaEmulator()) as emu, client(emu) as c:
            await c.get("/api/tags?x=1&y=2", headers={"X-Custom": "v"})
            await c.post("/api/chat", json={**CHAT, "stream": False})
            await stream_lines(c, "/api/chat", CHAT)
            assert emu.total_connections == 1
            assert emu.open_connections == 1
            rec = emu.requests[0]
            assert (rec.method, rec.path, rec.query, rec.body) == (
                "GET",
                "/api/tags",
                "x=1&y=2",
                b"",
            )
            assert rec.headers["x-custom"] == "v"
            assert "host" in rec.headers
            assert rec.received_at <= emu.requests[1].received_at
        await emu.wait_until(lambda: emu.open_connections == 0)


# ------------------------------------------------------------------ OpenAI


async def test_openai_models_under_any_prefix() -> None:
    with trio.fail_after(10):
        async with serving(OpenAIEmulator()) as emu, client(emu) as c:
            for prefix in ("/v1", "/api/v1", "/coding/v1"):
                r = await c.get(f"{prefix}/models", headers=OA_AUTH)
                body = r.json()
                assert body["object"] == "list"
                assert [m["id"] for m in body["data"]] == ["openai/gpt-4o-mini", "moonshot/kimi-k2"]
            r = await c.get("/v1/models/moonshot/kimi-k2", headers=OA_AUTH)
            assert r.json()["id"] == "moonshot/kimi-k2"
            r = await c.get("/v1/nothing", headers=OA_AUTH)
            assert r.status_code == 404
            assert "Invalid URL" in r.json()["error"]["message"]


async def test_openai_auth() -> None:
    with trio.fail_after(10):
        async with serving(OpenAIEmulator(api_key="sk-right")) as emu, client(emu) as c:
            r = await c.post("/v1/chat/completions", json=OA_CHAT)
            assert r.status_code == 401
            assert r.json()["error"]["type"] == "invalid_request_error"
            wrong = "sk-wrong-secret-key-12345"
            r = await c.post(
                "/v1/chat/completions", json=OA_CHAT, headers={"authorization": f"Bearer {wrong}"}
            )
            error = r.json()["error"]
            assert r.status_code == 401
            assert error["code"] == "invalid_api_key"
            assert error["param"] is None
            assert error["message"].startswith("Incorrect API key provided")
            assert wrong not in r.text
            assert "2345" in r.text
            assert emu.active_generations == 0
            assert emu.generation_order == []


async def test_openai_non_stream() -> None:
    with trio.fail_after(10):
        async with serving(OpenAIEmulator()) as emu, client(emu) as c:
            r = await c.post("/api/v1/chat/completions", json=OA_CHAT, headers=OA_AUTH)
            assert r.headers["content-type"] == "application/json"
            assert "x-request-id" in r.headers
            body = r.json()
            assert body["id"].startswith("chatcmpl-")
            assert body["object"] == "chat.completion"
            assert isinstance(body["created"], int)
            assert body["model"] == "openai/gpt-4o-mini"
            (choice,) = body["choices"]
            assert choice["index"] == 0
            assert choice["finish_reason"] == "stop"
            assert choice["logprobs"] is None
            assert choice["message"]["role"] == "assistant"
            assert choice["message"]["content"] == "Hello from the emulator."
            usage = body["usage"]
            assert usage["completion_tokens"] == 4
            assert usage["total_tokens"] == usage["prompt_tokens"] + 4
            r = await c.post(
                "/v1/chat/completions", json={**OA_CHAT, "max_tokens": 2}, headers=OA_AUTH
            )
            choice = r.json()["choices"][0]
            assert choice["finish_reason"] == "length"
            assert choice["message"]["content"] == "Hello from"
            body = {
                **OA_CHAT,
                "max_completion_tokens": 1,
                "response_format": {"type": "json_object"},
            }
            r = await c.post(
                "/v1/chat/completions", json={**body, "max_completion_tokens": 100}, headers=OA_AUTH
            )
            assert isinstance(json.loads(r.json()["choices"][0]["message"]["content"]), dict)
            assert emu.completed_generations == 3


async def test_openai_stream() -> None:
    with trio.fail_after(10):
        async with serving(OpenAIEmulator()) as emu, client(emu) as c:
            body = {**OA_CHAT, "stream": True, "stream_options": {"include_usage": True}}
            async with c.stream(
                "POST", "/coding/v1/chat/completions", json=body, headers=OA_AUTH
            ) as r:
                assert r.headers["content-type"].startswith("text/event-stream")
                text = (await r.aread()).decode()
            events = [e for e in text.split("\n\n") if e]
            assert all(e.startswith("data: ") for e in events)
            assert events[-1] == "data: [DONE]"
            chunks = [json.loads(e[6:]) for e in events[:-1]]
            assert all(ch["object"] == "chat.completion.chunk" for ch in chunks)
            assert len({ch["id"] for ch in chunks}) == 1
            assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
            content = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks[1:-2])
            assert content == "Hello from the emulator."
            finish = chunks[-2]["choices"][0]
            assert finish["delta"] == {}
            assert finish["finish_reason"] == "stop"
            assert chunks[-1]["choices"] == []
            assert chunks[-1]["usage"]["completion_tokens"] == 4
            assert all(ch["usage"] is None for ch in chunks[:-1])
            wire = await raw_chunks(
                emu.port,
                "/v1/chat/completions",
                {**OA_CHAT, "stream": True},
                "Authorization: Bearer sk-test\r\n",
            )
            assert [w.count(b"data: ") for w in wire] == [1] * len(wire)
            assert all(w.endswith(b"\n\n") for w in wire)
            assert wire[-1] == b"data: [DONE]\n\n"
            assert "usage" not in json.loads(wire[1][6:])


async def test_openai_request_errors() -> None:
    with trio.fail_after(10):
        async with serving(OpenAIEmulator()) as emu, client(emu) as c:
            url = "/v1/chat/completions"
            r = await c.post(url, json={"messages": OA_CHAT["messages"]}, headers=OA_AUTH)
            assert r.status_code == 400
            assert r.json()["error"]["type"] == "invalid_request_error"
            r = await c.post(url, json={"model": "openai/gpt-4o-mini"}, headers=OA_AUTH)
            assert r.status_code == 400
            assert r.json()["error"]["param"] == "messages"
            r = await c.post(url, json={**OA_CHAT, "model": "x/y"}, headers=OA_AUTH)
            assert r.status_code == 404
            assert r.json()["error"]["code"] == "model_not_found"
            r = await c.post(url, content=b"{nope", headers=OA_AUTH)
            assert r.status_code == 400
            assert "could not parse the JSON" in r.json()["error"]["message"]
            assert emu.generation_order == []


async def test_openai_faults() -> None:
    emu = OpenAIEmulator()
    with trio.fail_after(10):
        async with serving(emu), client(emu) as c:
            url = "/v1/chat/completions"
            emu.faults.zero_choices = True
            r = await c.post(url, json=OA_CHAT, headers=OA_AUTH)
            assert r.status_code == 200
            assert r.json()["choices"] == []
            emu.faults.zero_choices = False
            emu.faults.status, emu.faults.retry_after = 429, "3"
            r = await c.post(url, json=OA_CHAT, headers=OA_AUTH)
            assert r.status_code == 429
            assert r.headers["retry-after"] == "3"
            assert r.json()["error"]["code"] == "rate_limit_exceeded"
            emu.faults.status, emu.faults.retry_after = 500, None
            r = await c.post(url, json=OA_CHAT, headers=OA_AUTH)
            error = r.json()["error"]
            assert error["type"] == "server_error"
            assert error["message"].startswith("The server had an error")
            emu.faults.status = None
            emu.faults.die_mid_stream_after = 3
            with pytest.raises(httpx.RemoteProtocolError):
                async with c.stream(
                    "POST", url, json={**OA_CHAT, "stream": True}, headers=OA_AUTH
                ) as r:
                    await r.aread()
            assert len(emu.requests[-1].emitted) == 3


async def test_openai_hold_and_disconnect() -> None:
    emu = OpenAIEmulator(token_delay_s=0.001)
    emu.hold = trio.Event()
    body = {**OA_CHAT, "stream": True}
    with trio.fail_after(10):
        async with serving(emu), client(emu) as c:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    partial(stream_lines, headers=OA_AUTH), c, "/v1/chat/completions", body
                )
                await emu.wait_until(lambda: len(emu.emitted) == 2)
                assert emu.active_generations == 1
                assert emu.generation_order == ["hello there"]
                nursery.cancel_scope.cancel()
            await emu.wait_until(lambda: emu.active_generations == 0)
            assert emu.cancelled_generations == 1
            emu.hold.set()
            lines = await stream_lines(c, "/v1/chat/completions", body, headers=OA_AUTH)
            assert lines[-1] == "data: [DONE]"
            assert emu.completed_generations == 1


async def test_openai_stream_faults() -> None:
    emu = OpenAIEmulator()
    body = {**OA_CHAT, "stream": True}
    with trio.fail_after(10):
        async with serving(emu), client(emu) as c:
            emu.faults.overlong_line_bytes = 70_000
            lines = await stream_lines(c, "/v1/chat/completions", body, headers=OA_AUTH)
            assert len(lines[0].encode()) == 70_000
            assert json.loads(lines[0][6:])["choices"][0]["delta"]["role"] == "assistant"
            assert lines[-1] == "data: [DONE]"
            emu.faults.overlong_line_bytes = None
            emu.faults.garbage_body = True
            r = await c.post("/v1/chat/completions", json=body, headers=OA_AUTH)
            assert r.content == b"this is not json"
            emu.faults.garbage_body = False
            emu.faults.reset_before_headers = True
            emu.faults.fault_paths = frozenset({"/models"})
            assert (await c.post("/v1/chat/completions", json=OA_CHAT, headers=OA_AUTH)).is_success
            with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
                await c.get("/v1/models", headers=OA_AUTH)
            assert emu.completed_generations == 2  # garbage_body answers before any generation
            assert emu.cancelled_generations == 0
