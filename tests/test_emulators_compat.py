"""The emulators' compatibility routes (Ollama's /v1/*, /v1/messages, /v1/responses, Ollama
Cloud, the OpenAI-family provider's extra protocols), driven directly with the official
`openai` and `anthropic` clients and with raw HTTP for the bytes on the wire."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import anthropic
import httpx
import openai
import pydantic
import pytest
import trio

from tests.emulators import EmulatorBase, OllamaEmulator, OpenAIEmulator
from tests.emulators.wire import split_tokens

E = TypeVar("E", bound=EmulatorBase)
T = TypeVar("T")

REPLY = "The sky is blue because of Rayleigh scattering."
WORDS = REPLY.split()
QUESTION = [{"role": "user", "content": "why is the sky blue?"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
PNG = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\nfake").decode()


@asynccontextmanager
async def serving(emu: E) -> AsyncIterator[E]:
    async with trio.open_nursery() as nursery:
        await nursery.start(emu.run)
        try:
            yield emu
        finally:
            nursery.cancel_scope.cancel()


@dataclass
class Raw:
    """A response as it came off the socket: status, headers, body, HTTP chunks."""

    status: int
    headers: dict[str, str]
    body: bytes
    chunks: list[bytes]

    def json(self) -> Any:
        return json.loads(self.body)

    def sse(self) -> list[tuple[str | None, Any]]:
        """(event name, data) of each SSE event; data ``[DONE]`` stays a string."""
        events: list[tuple[str | None, Any]] = []
        for block in self.body.decode().split("\n\n"):
            if not block:
                continue
            name, data = None, ""
            for line in block.split("\n"):
                field, _, value = line.partition(": ")
                if field == "event":
                    name = value
                elif field == "data":
                    data = value
            events.append((name, data if data == "[DONE]" else json.loads(data)))
        return events


async def raw(
    emu: EmulatorBase,
    path: str,
    body: object = None,
    *,
    method: str = "POST",
    headers: dict[str, str] | None = None,
    content: bytes | None = None,
) -> Raw:
    """One request over a bare socket (Connection: close); the response exactly as framed."""
    payload = content if content is not None else b"" if body is None else json.dumps(body).encode()
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"Content-Length: {len(payload)}", "Content-Type: application/json"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    stream = await trio.open_tcp_stream("127.0.0.1", emu.port)
    data = b""
    with trio.fail_after(10):
        async with stream:
            await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    chunks: list[bytes] = []
    if parsed.get("transfer-encoding") == "chunked":
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            chunks.append(rest[:size])
            rest = rest[size + 2 :]
        body_bytes = b"".join(chunks)
    else:
        body_bytes = rest
        assert len(body_bytes) == int(parsed["content-length"])
    return Raw(int(status_line.split()[1]), parsed, body_bytes, chunks)


async def with_openai(emu: EmulatorBase, call: Callable[[openai.OpenAI], T], **kw: Any) -> T:
    """Run ``call`` with the synchronous openai SDK in a worker thread, bounded in time."""
    base_url = kw.pop("base_url", emu.url + "/v1")

    def run() -> T:
        with openai.OpenAI(
            base_url=base_url, api_key=kw.pop("api_key", "ollama"), max_retries=0, timeout=5
        ) as client:
            return call(client)

    with trio.fail_after(10):
        return await trio.to_thread.run_sync(run, abandon_on_cancel=True)


async def with_anthropic(
    emu: EmulatorBase, call: Callable[[anthropic.Anthropic], T], **kw: Any
) -> T:
    """Run ``call`` with the synchronous anthropic SDK in a worker thread."""
    base_url = kw.pop("base_url", emu.url)

    def run() -> T:
        with anthropic.Anthropic(
            base_url=base_url, max_retries=0, timeout=5, **{"api_key": "ollama", **kw}
        ) as client:
            return call(client)

    with trio.fail_after(10):
        return await trio.to_thread.run_sync(run, abandon_on_cancel=True)


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "llama3", "messages": QUESTION, **extra}


# ------------------------------------------------- /v1/chat/completions


async def test_chat_completion_with_the_sdk() -> None:
    async with serving(OllamaEmulator()) as emu:
        answer = await with_openai(
            emu, lambda c: c.chat.completions.create(model="llama3", messages=QUESTION)
        )
        assert answer.object == "chat.completion"
        assert answer.id.startswith("chatcmpl-")
        assert answer.system_fingerprint == "fp_ollama"
        assert answer.model == "llama3"
        (choice,) = answer.choices
        assert choice.message.role == "assistant"
        assert choice.message.content == REPLY
        assert choice.finish_reason == "stop"
        assert answer.usage is not None
        assert answer.usage.completion_tokens == len(WORDS)
        assert answer.usage.total_tokens == answer.usage.prompt_tokens + len(WORDS)
        # what the middleware handed to the native chat handler
        (inner,) = emu.inner_requests
        assert inner["messages"] == [{"role": "user", "content": "why is the sky blue?"}]
        assert inner["options"] == {"temperature": 1.0, "top_p": 1.0}
        assert inner["stream"] is False
        assert emu.completed_generations == 1


async def test_chat_completion_bytes_non_stream() -> None:
    async with serving(OllamaEmulator()) as emu:
        r = await raw(emu, "/v1/chat/completions", chat())
        assert r.status == 200
        assert r.headers["content-type"] == "application/json"
        assert r.body.endswith(b"}\n")  # json.Encoder's newline
        assert r.body.startswith(b'{"id":"chatcmpl-')
        body = r.json()
        assert list(body) == [
            "id",
            "object",
            "created",
            "model",
            "system_fingerprint",
            "choices",
            "usage",
        ]
        assert body["choices"] == [
            {
                "index": 0,
                "message": {"role": "assistant", "content": REPLY},
                "finish_reason": "stop",
            }
        ]


async def test_chat_completion_stream_bytes_and_include_usage() -> None:
    async with serving(OllamaEmulator()) as emu:
        body = chat(stream=True, stream_options={"include_usage": True})
        r = await raw(emu, "/v1/chat/completions", body)
        assert r.status == 200
        assert r.headers["content-type"] == "text/event-stream"
        # one HTTP chunk per native line: the tokens, then finish + usage + [DONE] together
        assert len(r.chunks) == len(WORDS) + 1
        assert all(c.startswith(b"data: {") and c.endswith(b"}\n\n") for c in r.chunks[:-1])
        assert r.chunks[-1].count(b"data: ") == 3
        assert r.chunks[-1].endswith(b"data: [DONE]\n\n")
        events = [data for _, data in r.sse()]
        *tokens, finish, usage, done = events
        assert done == "[DONE]"
        assert tokens[0]["choices"][0]["delta"] == {"role": "assistant", "content": "The"}
        assert [t["choices"][0]["delta"] for t in tokens[1:]] == [
            {"content": f" {w}"} for w in WORDS[1:]
        ]
        assert all(t["choices"][0]["finish_reason"] is None for t in tokens)
        assert all("usage" not in t for t in tokens)  # no "usage": null as OpenAI sends
        assert finish["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
        assert usage["choices"] == []
        assert usage["usage"]["completion_tokens"] == len(WORDS)
        assert len({e["id"] for e in events[:-1]}) == 1
        assert len({e["created"] for e in events[:-1]}) == 1

        plain = await raw(emu, "/v1/chat/completions", chat(stream=True))
        assert plain.chunks[-1].count(b"data: ") == 2  # no usage chunk unless asked


async def test_chat_completion_stream_with_the_sdk() -> None:
    async with serving(OllamaEmulator()) as emu:

        def run(c: openai.OpenAI) -> list[Any]:
            stream = c.chat.completions.create(
                model="llama3",
                messages=QUESTION,
                stream=True,
                stream_options={"include_usage": True},
            )
            return list(stream)

        chunks = await with_openai(emu, run)
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == REPLY
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == len(WORDS)


async def test_tool_call_non_stream_and_round_trip() -> None:
    emu = OllamaEmulator()
    emu.tool_calls = {"get_weather": {"city": "Paris"}}
    async with serving(emu):

        def first(c: openai.OpenAI) -> Any:
            return c.chat.completions.create(
                model="llama3", messages=QUESTION, tools=[WEATHER_TOOL]
            )

        answer = await with_openai(emu, first)
        (choice,) = answer.choices
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content == ""
        (call,) = choice.message.tool_calls
        assert call.type == "function"
        assert call.id.startswith("call_")
        assert len(call.id) == len("call_") + 8
        assert call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Paris"}
        assert emu.inner_requests[-1]["tools"] == [WEATHER_TOOL]

        history = [
            *QUESTION,
            choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "18C and sunny"},
        ]

        def second(c: openai.OpenAI) -> Any:
            return c.chat.completions.create(model="llama3", messages=history, tools=[WEATHER_TOOL])

        final = await with_openai(emu, second)
        assert final.choices[0].message.content == REPLY
        assert final.choices[0].finish_reason == "stop"
        inner = emu.inner_requests[-1]["messages"]
        assert inner[1]["tool_calls"] == [
            {"id": call.id, "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
        ]
        # the tool message keeps its call id and gets the tool's name from the history
        assert inner[2] == {
            "role": "tool",
            "content": "18C and sunny",
            "tool_name": "get_weather",
            "tool_call_id": call.id,
        }


async def test_tool_call_streamed() -> None:
    emu = OllamaEmulator()
    emu.tool_calls = {"get_weather": {"city": "Paris"}}
    async with serving(emu):
        r = await raw(emu, "/v1/chat/completions", chat(stream=True, tools=[WEATHER_TOOL]))
        first, finish, done = (data for _, data in r.sse())
        (call,) = first["choices"][0]["delta"]["tool_calls"]
        assert first["choices"][0]["delta"]["role"] == "assistant"
        assert first["choices"][0]["delta"]["content"] == ""
        assert call["index"] == 0
        assert call["function"] == {"name": "get_weather", "arguments": '{"city":"Paris"}'}
        assert finish["choices"][0]["finish_reason"] == "tool_calls"
        assert done == "[DONE]"

        def run(c: openai.OpenAI) -> list[Any]:
            stream = c.chat.completions.create(
                model="llama3", messages=QUESTION, tools=[WEATHER_TOOL], stream=True
            )
            return list(stream)

        chunks = await with_openai(emu, run)
        calls = [tc for ch in chunks for tc in ch.choices[0].delta.tool_calls or []]
        assert [tc.function.name for tc in calls] == ["get_weather"]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_tools_not_scripted_answer_text() -> None:
    async with serving(OllamaEmulator()) as emu:
        r = await raw(emu, "/v1/chat/completions", chat(tools=[WEATHER_TOOL]))
        assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": REPLY}


class Weather(pydantic.BaseModel):
    city: str
    temperature_c: float
    sunny: bool
    tags: list[str]


async def test_structured_output_parse_with_pydantic() -> None:
    async with serving(OllamaEmulator()) as emu:

        def run(c: openai.OpenAI) -> Any:
            return c.chat.completions.parse(
                model="llama3", messages=QUESTION, response_format=Weather
            )

        answer = await with_openai(emu, run)
        parsed = answer.choices[0].message.parsed
        assert isinstance(parsed, Weather)
        assert parsed.city == REPLY
        schema = emu.inner_requests[-1]["format"]
        assert schema["properties"]["temperature_c"]["type"] == "number"
        emu.structured_reply = {"city": "Oslo", "temperature_c": -3.5, "sunny": False, "tags": []}
        answer = await with_openai(emu, run)
        assert answer.choices[0].message.parsed == Weather(
            city="Oslo", temperature_c=-3.5, sunny=False, tags=[]
        )
        r = await raw(emu, "/v1/chat/completions", chat(response_format={"type": "json_object"}))
        assert emu.inner_requests[-1]["format"] == "json"
        assert json.loads(r.json()["choices"][0]["message"]["content"]) == {"answer": REPLY}


async def test_images_as_content_parts() -> None:
    async with serving(OllamaEmulator()) as emu:
        parts = [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": PNG}},
        ]
        messages = [{"role": "user", "content": parts}]
        r = await raw(emu, "/v1/chat/completions", chat(messages=messages))
        assert r.status == 200
        inner = emu.inner_requests[-1]["messages"]
        assert inner == [
            {"role": "user", "content": "what is this?"},
            {"role": "user", "content": "", "images": [PNG.split(",", 1)[1]]},
        ]
        for url in ("https://example.com/cat.png", "http://example.com/cat.png"):
            bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
            r = await raw(emu, "/v1/chat/completions", chat(messages=bad))
            assert r.status == 400
            assert r.headers["content-type"] == "application/json; charset=utf-8"
            assert r.json() == {
                "error": {
                    "message": "image URLs are not currently supported, please use base64 "
                    "encoded data instead",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": None,
                }
            }
        bad = [{"role": "user", "content": [{"type": "image_url", "image_url": "data:x"}]}]
        r = await raw(emu, "/v1/chat/completions", chat(messages=bad))
        assert (r.status, r.json()["error"]["message"]) == (400, "invalid image input")
        assert emu.completed_generations == 1

        def sdk_call(c: openai.OpenAI) -> Any:
            url = {"url": "https://example.com/cat.png"}
            content = [{"type": "image_url", "image_url": url}]
            return c.chat.completions.create(
                model="llama3", messages=[{"role": "user", "content": content}]
            )

        with pytest.raises(openai.BadRequestError, match="image URLs are not currently"):
            await with_openai(emu, sdk_call)


async def test_reasoning_effort_to_think_and_reasoning_back() -> None:
    emu = OllamaEmulator(models=("gpt-oss:20b", "llama3"))
    emu.thinking_models = {"gpt-oss:20b"}
    async with serving(emu):

        def run(c: openai.OpenAI) -> Any:
            return c.chat.completions.create(
                model="gpt-oss:20b", messages=QUESTION, reasoning_effort="high"
            )

        answer = await with_openai(emu, run)
        assert emu.inner_requests[-1]["think"] == "high"
        message = answer.choices[0].message
        assert message.content == REPLY
        assert message.model_extra is not None
        assert message.model_extra["reasoning"] == emu.thinking
        mapping = {"none": False, "minimal": "low", "xhigh": "max", "medium": "medium"}
        for effort, think in mapping.items():
            await raw(
                emu, "/v1/chat/completions", chat(model="gpt-oss:20b", reasoning_effort=effort)
            )
            assert emu.inner_requests[-1]["think"] == think
        no_think = await raw(
            emu, "/v1/chat/completions", chat(model="gpt-oss:20b", reasoning_effort="none")
        )
        assert "reasoning" not in no_think.json()["choices"][0]["message"]

        # streamed: thinking tokens first as `reasoning` deltas, with "content": ""
        r = await raw(emu, "/v1/chat/completions", chat(model="gpt-oss:20b", stream=True))
        deltas = [d["choices"][0]["delta"] for _, d in r.sse() if d != "[DONE]"]
        assert deltas[0] == {"role": "assistant", "content": "", "reasoning": "Rayleigh"}
        thinking = "".join(d.get("reasoning", "") for d in deltas)
        assert thinking == emu.thinking
        assert "".join(d.get("content", "") for d in deltas) == REPLY

        r = await raw(emu, "/v1/chat/completions", chat(reasoning_effort="low"))
        assert r.status == 400
        assert r.json()["error"]["message"] == '"llama3" does not support thinking'
        r = await raw(emu, "/v1/chat/completions", chat(reasoning_effort="extreme"))
        assert r.status == 400
        assert r.json()["error"]["message"].startswith('invalid reasoning value: "extreme"')


async def test_sampling_options_stop_and_seed() -> None:
    async with serving(OllamaEmulator()) as emu:

        def run(c: openai.OpenAI) -> Any:
            return c.chat.completions.create(
                model="llama3",
                messages=QUESTION,
                stop=[" because"],
                seed=42,
                temperature=0.2,
                top_p=0.9,
                frequency_penalty=0.5,
                presence_penalty=0.25,
                max_tokens=100,
            )

        answer = await with_openai(emu, run)
        assert answer.choices[0].message.content == "The sky is blue"
        assert answer.choices[0].finish_reason == "stop"
        assert emu.inner_requests[-1]["options"] == {
            "stop": [" because"],
            "num_predict": 100,
            "temperature": 0.2,
            "seed": 42,
            "frequency_penalty": 0.5,
            "presence_penalty": 0.25,
            "top_p": 0.9,
        }
        r = await raw(emu, "/v1/chat/completions", chat(stop="sky", max_tokens=1))
        assert emu.inner_requests[-1]["options"]["stop"] == ["sky"]
        assert r.json()["choices"][0]["finish_reason"] == "length"
        assert r.json()["choices"][0]["message"]["content"] == "The"


async def test_chat_completion_errors() -> None:
    async with serving(OllamaEmulator()) as emu:
        r = await raw(emu, "/v1/chat/completions", chat(model="nope"))
        assert r.status == 404
        assert r.headers["content-type"] == "application/json"
        assert r.body == (
            b'{"error":{"message":"model \'nope\' not found","type":"not_found_error",'
            b'"param":null,"code":null}}\n'
        )
        with pytest.raises(openai.NotFoundError) as caught:
            await with_openai(
                emu, lambda c: c.chat.completions.create(model="nope", messages=QUESTION)
            )
        assert caught.value.status_code == 404
        r = await raw(emu, "/v1/chat/completions", chat(messages=[]))
        assert (r.status, r.json()["error"]["message"]) == (400, "[] is too short - 'messages'")
        r = await raw(emu, "/v1/chat/completions", content=b"[not json")
        assert r.status == 400
        assert r.json()["error"]["type"] == "invalid_request_error"
        assert r.json()["error"]["message"].startswith("invalid character 'n'")
        r = await raw(emu, "/v1/chat/completions", content=b"")
        assert (r.status, r.json()["error"]["message"]) == (400, "EOF")
        r = await raw(emu, "/v1/chat/completions", chat(model="nomic-embed-text"))
        assert r.status == 400
        assert r.json()["error"]["message"] == '"nomic-embed-text" does not support chat'
        r = await raw(emu, "/v1/chat/completions", method="GET")
        assert (r.status, r.body) == (405, b"405 method not allowed")
        emu.faults.status = 503
        r = await raw(emu, "/v1/chat/completions", chat())
        assert r.status == 503
        assert r.json()["error"]["type"] == "api_error"
        assert r.json()["error"]["message"].startswith("server busy")
        assert emu.completed_generations == 0


# ------------------------------------------------------ other /v1 routes


async def test_completions_route() -> None:
    async with serving(OllamaEmulator()) as emu:

        def run(c: openai.OpenAI) -> Any:
            return c.completions.create(model="llama3", prompt="why?", stop=["blue"], seed=7)

        answer = await with_openai(emu, run)
        assert answer.object == "text_completion"
        assert answer.id.startswith("cmpl-")
        assert answer.choices[0].text == "The sky is "
        assert answer.choices[0].finish_reason == "stop"
        assert answer.usage is not None
        assert answer.usage.completion_tokens == len(split_tokens("The sky is "))
        inner = emu.inner_requests[-1]
        assert inner["prompt"] == "why?"
        assert inner["options"]["seed"] == 7
        assert inner["options"]["stop"] == ["blue"]

        body = {"model": "llama3", "prompt": "why?", "stream": True}
        r = await raw(emu, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
        assert r.headers["content-type"] == "text/event-stream"
        assert len(r.chunks) == len(WORDS) + 1
        *tokens, last, usage, done = (data for _, data in r.sse())
        assert "".join(t["choices"][0]["text"] for t in tokens) == REPLY
        # Ollama puts a zero usage on every chunk when include_usage is on
        assert tokens[0]["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        assert last["choices"] == [{"text": "", "index": 0, "finish_reason": "stop"}]
        assert usage["choices"] == []
        assert usage["usage"]["completion_tokens"] == len(WORDS)
        assert done == "[DONE]"

        r = await raw(emu, "/v1/completions", {"model": "llama3", "prompt": "x", "stop": [1]})
        assert r.status == 400
        assert r.json()["error"]["message"] == "invalid type for 'stop' field: float64"
        r = await raw(emu, "/v1/completions", {"model": "nope", "prompt": "x"})
        assert (r.status, r.json()["error"]["type"]) == (404, "not_found_error")


async def test_embeddings_route() -> None:
    async with serving(OllamaEmulator()) as emu:

        def run(c: openai.OpenAI) -> Any:
            return c.embeddings.create(
                model="nomic-embed-text", input=["a", "b"], encoding_format="float"
            )

        answer = await with_openai(emu, run)
        assert [d.index for d in answer.data] == [0, 1]
        assert len(answer.data[0].embedding) == 8
        assert answer.model == "nomic-embed-text"
        assert answer.usage.prompt_tokens == 2
        # the SDK's default asks for base64: little-endian float32
        b64 = await with_openai(
            emu, lambda c: c.embeddings.create(model="nomic-embed-text", input="a")
        )
        floats = await raw(emu, "/v1/embeddings", {"model": "nomic-embed-text", "input": "a"})
        expected = floats.json()["data"][0]["embedding"]
        assert b64.data[0].embedding == pytest.approx(expected, rel=1e-6)
        r = await raw(emu, "/v1/embeddings", {"model": "nomic-embed-text", "input": []})
        assert (r.status, r.json()["error"]["message"]) == (400, "invalid input")
        body = {"model": "nomic-embed-text", "input": "a", "encoding_format": "int8"}
        r = await raw(emu, "/v1/embeddings", body)
        assert r.status == 400
        assert r.json()["error"]["message"] == (
            "Invalid value for 'encoding_format' = int8. Supported values: ['float', 'base64']."
        )
        r = await raw(emu, "/v1/embeddings", {"model": "nope", "input": "a"})
        assert r.status == 404
        assert r.json()["error"]["message"] == 'model "nope" not found, try pulling it first'
        assert emu.completed_generations == 0  # embeddings are not generations


async def test_models_list_and_retrieve() -> None:
    async with serving(OllamaEmulator(models=("llama3", "someone/custom:7b"))) as emu:
        listing = await with_openai(emu, lambda c: list(c.models.list()))
        assert [(m.id, m.owned_by) for m in listing] == [
            ("llama3:latest", "library"),
            ("someone/custom:7b", "someone"),
        ]
        assert listing[0].created == 1746864408
        model = await with_openai(emu, lambda c: c.models.retrieve("llama3"))
        assert (model.id, model.object, model.owned_by) == ("llama3", "model", "library")
        with pytest.raises(openai.NotFoundError, match="model 'nope' not found"):
            await with_openai(emu, lambda c: c.models.retrieve("nope"))
        r = await raw(emu, "/v1/models", method="GET")
        assert r.body.endswith(b"]}\n")
    async with serving(OllamaEmulator(models=())) as emu:
        r = await raw(emu, "/v1/models", method="GET")
        assert r.json() == {"object": "list", "data": None}  # a Go nil slice


# ------------------------------------------------------------ /v1/messages


def thinking_emulator() -> OllamaEmulator:
    emu = OllamaEmulator(models=("qwen3:8b", "llama3"))
    emu.thinking_models = {"qwen3:8b"}
    return emu


async def test_messages_with_the_sdk_and_system_prompt() -> None:
    async with serving(OllamaEmulator()) as emu:

        def run(c: anthropic.Anthropic) -> Any:
            return c.messages.create(
                model="llama3",
                max_tokens=64,
                system="Be brief.",
                messages=[{"role": "user", "content": "why is the sky blue?"}],
                stop_sequences=["END"],
                extra_body={"temperature": 0.5},
            )

        message = await with_anthropic(emu, run)
        assert message.id.startswith("msg_")
        assert len(message.id) == len("msg_") + 24
        assert message.type == "message"
        assert message.role == "assistant"
        assert message.model == "llama3"
        assert [b.type for b in message.content] == ["text"]
        assert message.content[0].text == REPLY
        assert message.stop_reason == "end_turn"
        assert message.usage.output_tokens == len(WORDS)
        assert message.usage.input_tokens == 2 + 5  # "Be brief." + the question, in words
        inner = emu.inner_requests[-1]
        assert inner["messages"] == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "why is the sky blue?"},
        ]
        assert inner["options"] == {"num_predict": 64, "temperature": 0.5, "stop": ["END"]}
        blocks = [{"type": "text", "text": "Be "}, {"type": "text", "text": "terse."}]
        body = {"model": "llama3", "max_tokens": 2, "system": blocks, "messages": QUESTION}
        r = await raw(emu, "/v1/messages", body)
        assert emu.inner_requests[-1]["messages"][0] == {"role": "system", "content": "Be terse."}
        assert r.json()["stop_reason"] == "max_tokens"
        assert r.headers["content-type"] == "application/json"
        assert r.body.endswith(b"}\n")
        assert list(r.json()) == ["id", "type", "role", "model", "content", "stop_reason", "usage"]


async def test_messages_stream_events_and_bytes() -> None:
    async with serving(OllamaEmulator()) as emu:
        body = {"model": "llama3", "max_tokens": 64, "messages": QUESTION, "stream": True}
        r = await raw(emu, "/v1/messages", body)
        assert r.status == 200
        assert r.headers["content-type"] == "text/event-stream"
        assert r.headers["cache-control"] == "no-cache"
        # every event is flushed on its own: one HTTP chunk each
        assert all(c.startswith(b"event: ") and c.count(b"\n\n") == 1 for c in r.chunks)
        names = [name for name, _ in r.sse()]
        assert len(r.chunks) == len(names)
        assert names == [
            "message_start",
            "content_block_start",
            *["content_block_delta"] * len(WORDS),
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]  # and no ping: Ollama sends none
        events = [data for _, data in r.sse()]
        assert all(data["type"] == name for name, data in r.sse())
        start = events[0]["message"]
        assert start["content"] == []
        assert start["usage"]["output_tokens"] == 0
        assert start["usage"]["input_tokens"] > 0  # estimated from the request
        assert events[1]["content_block"] == {"type": "text", "text": ""}
        assert events[2]["delta"] == {"type": "text_delta", "text": "The"}
        assert events[-2]["delta"] == {"stop_reason": "end_turn"}
        assert events[-2]["usage"]["output_tokens"] == len(WORDS)

        def run(c: anthropic.Anthropic) -> tuple[str, Any]:
            with c.messages.stream(model="llama3", max_tokens=64, messages=QUESTION) as stream:
                text = "".join(stream.text_stream)
                return text, stream.get_final_message()

        text, final = await with_anthropic(emu, run)
        assert text == REPLY
        assert final.stop_reason == "end_turn"
        assert final.usage.output_tokens == len(WORDS)


async def test_messages_tool_use_round_trip() -> None:
    emu = OllamaEmulator()
    emu.tool_calls = {"get_weather": {"city": "Paris"}}
    tool = {
        "name": "get_weather",
        "description": "The weather in a city.",
        "input_schema": WEATHER_TOOL["function"]["parameters"],  # type: ignore[index]
    }
    async with serving(emu):

        def first(c: anthropic.Anthropic) -> Any:
            return c.messages.create(model="llama3", max_tokens=64, messages=QUESTION, tools=[tool])

        message = await with_anthropic(emu, first)
        assert message.stop_reason == "tool_use"
        (use,) = message.content
        assert use.type == "tool_use"
        assert use.name == "get_weather"
        assert use.input == {"city": "Paris"}
        assert emu.inner_requests[-1]["tools"] == [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "The weather in a city.",
                    "parameters": tool["input_schema"],
                },
            }
        ]
        result = {"type": "tool_result", "tool_use_id": use.id, "content": "18C"}
        history = [
            *QUESTION,
            {"role": "assistant", "content": [use.model_dump()]},
            {"role": "user", "content": [result]},
        ]

        def second(c: anthropic.Anthropic) -> Any:
            return c.messages.create(model="llama3", max_tokens=64, messages=history, tools=[tool])

        answer = await with_anthropic(emu, second)  # the last native message is the tool's
        assert answer.content[0].text == REPLY
        assert answer.stop_reason == "end_turn"
        inner = emu.inner_requests[-1]["messages"]
        assert inner[1] == {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": use.id, "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
            ],
        }
        assert inner[2] == {"role": "tool", "content": "18C", "tool_call_id": use.id}
        # tool results go before the user's own text in the same message
        history[-1] = {"role": "user", "content": [{"type": "text", "text": "and?"}, result]}
        body = {"model": "llama3", "max_tokens": 8, "messages": history}
        await raw(emu, "/v1/messages", body)
        assert emu.inner_requests[-1]["messages"][2:] == [
            {"role": "tool", "content": "18C", "tool_call_id": use.id},
            {"role": "user", "content": "and?"},
        ]

        # streamed: a tool_use block with input {} then the arguments as one input_json_delta
        body = {"model": "llama3", "max_tokens": 64, "messages": QUESTION, "tools": [tool]}
        r = await raw(emu, "/v1/messages", {**body, "stream": True})
        events = [data for _, data in r.sse()]
        assert [e["type"] for e in events] == [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
        assert events[1]["content_block"]["input"] == {}
        assert events[1]["content_block"]["name"] == "get_weather"
        assert events[2]["delta"] == {
            "type": "input_json_delta",
            "partial_json": '{"city":"Paris"}',
        }
        assert events[4]["delta"] == {"stop_reason": "tool_use"}


async def test_messages_thinking() -> None:
    async with serving(thinking_emulator()) as emu:

        def run(c: anthropic.Anthropic) -> Any:
            return c.messages.create(
                model="qwen3:8b",
                max_tokens=64,
                messages=QUESTION,
                thinking={"type": "enabled", "budget_tokens": 1024},
            )

        message = await with_anthropic(emu, run)
        assert emu.inner_requests[-1]["think"] is True
        assert [b.type for b in message.content] == ["thinking", "text"]
        assert message.content[0].thinking == emu.thinking
        body = {"model": "qwen3:8b", "max_tokens": 64, "messages": QUESTION, "stream": True}
        events = [d for _, d in (await raw(emu, "/v1/messages", body)).sse()]
        starts = [e["content_block"] for e in events if e["type"] == "content_block_start"]
        assert starts == [{"type": "thinking", "thinking": ""}, {"type": "text", "text": ""}]
        stops = [e["index"] for e in events if e["type"] == "content_block_stop"]
        assert stops == [0, 1]
        # a model without thinking: Ollama drops `think` on this route instead of a 400
        plain = {"model": "llama3", "max_tokens": 8, "messages": QUESTION}
        r = await raw(emu, "/v1/messages", {**plain, "thinking": {"type": "enabled"}})
        assert r.status == 200
        body = {**plain, "thinking": {"type": "disabled"}, "model": "qwen3:8b"}
        r = await raw(emu, "/v1/messages", body)
        assert [b["type"] for b in r.json()["content"]] == ["text"]


async def test_messages_errors() -> None:
    async with serving(OllamaEmulator()) as emu:
        body = {"model": "nope", "max_tokens": 8, "messages": QUESTION}
        r = await raw(emu, "/v1/messages", body)
        assert r.status == 404
        assert r.headers["content-type"] == "application/json"
        error = r.json()
        assert error["type"] == "error"
        assert error["error"] == {"type": "not_found_error", "message": "model 'nope' not found"}
        assert error["request_id"].startswith("req_")
        with pytest.raises(anthropic.NotFoundError):
            await with_anthropic(
                emu, lambda c: c.messages.create(model="nope", max_tokens=8, messages=QUESTION)
            )
        for bad, message in [
            ({"max_tokens": 8, "messages": QUESTION}, "model is required"),
            (
                {"model": "llama3", "messages": QUESTION},
                "max_tokens is required and must be positive",
            ),
            ({"model": "llama3", "max_tokens": 8, "messages": []}, "messages is required"),
        ]:
            r = await raw(emu, "/v1/messages", bad)
            assert r.status == 400
            assert r.json()["error"] == {"type": "invalid_request_error", "message": message}
        url_image = {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}
        body = {
            "model": "llama3",
            "max_tokens": 8,
            "messages": [{"role": "user", "content": [url_image]}],
        }
        r = await raw(emu, "/v1/messages", body)
        assert r.status == 400
        assert r.json()["error"]["message"] == (
            "invalid image source type: url. Only base64 images are supported."
        )
        emu.faults.status = 503
        r = await raw(
            emu, "/v1/messages", {"model": "llama3", "max_tokens": 8, "messages": QUESTION}
        )
        assert r.status == 503
        assert r.json()["error"]["type"] == "overloaded_error"


# ----------------------------------------------------------- /v1/responses


async def test_responses_with_the_sdk() -> None:
    async with serving(OllamaEmulator()) as emu:

        def run(c: openai.OpenAI) -> Any:
            return c.responses.create(
                model="llama3", input="why is the sky blue?", instructions="Be brief."
            )

        response = await with_openai(emu, run)
        assert response.id.startswith("resp_")
        assert response.status == "completed"
        assert response.output_text == REPLY
        assert response.instructions == "Be brief."
        assert response.usage is not None
        assert response.usage.output_tokens == len(WORDS)
        assert response.completed_at is not None
        assert emu.inner_requests[-1]["messages"] == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "why is the sky blue?"},
        ]
        r = await raw(emu, "/v1/responses", {"model": "llama3", "input": "hi"})
        assert r.headers["content-type"] == "application/json"
        assert list(r.json())[:6] == [
            "id",
            "object",
            "created_at",
            "completed_at",
            "status",
            "incomplete_details",
        ]
        assert r.json()["top_p"] == 1  # Go prints a whole float64 without a fraction
        assert b'"top_p":1,' in r.body


async def test_responses_stream_events_and_bytes() -> None:
    async with serving(OllamaEmulator()) as emu:
        body = {"model": "llama3", "input": "hi", "stream": True}
        r = await raw(emu, "/v1/responses", body)
        assert r.headers["content-type"] == "text/event-stream"
        assert r.headers["cache-control"] == "no-cache"
        events = r.sse()
        assert len(r.chunks) == len(events)  # one flush per event
        names = [name for name, _ in events]
        assert names == [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            *["response.output_text.delta"] * len(WORDS),
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
        assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
        assert all(data["type"] == name for name, data in events)
        # Go maps: keys sorted on the wire
        for chunk in r.chunks:
            data = json.loads(chunk.split(b"data: ", 1)[1])
            assert list(data) == sorted(data)
        completed = events[-1][1]["response"]
        assert completed["status"] == "completed"
        assert completed["usage"]["output_tokens"] == len(WORDS)
        assert completed["output"][0]["content"][0]["text"] == REPLY

        def run(c: openai.OpenAI) -> tuple[str, Any]:
            text, final = "", None
            for event in c.responses.create(model="llama3", input="hi", stream=True):
                if event.type == "response.output_text.delta":
                    text += event.delta
                if event.type == "response.completed":
                    final = event.response
            return text, final

        text, final = await with_openai(emu, run)
        assert text == REPLY
        assert final is not None
        assert final.output_text == REPLY


async def test_responses_function_call_round_trip_and_reasoning() -> None:
    emu = thinking_emulator()
    emu.tool_calls = {"get_weather": {"city": "Paris"}}
    tool = {
        "type": "function",
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": WEATHER_TOOL["function"]["parameters"],  # type: ignore[index]
    }
    async with serving(emu):

        def first(c: openai.OpenAI) -> Any:
            return c.responses.create(
                model="qwen3:8b", input="weather?", tools=[tool], reasoning={"effort": "low"}
            )

        response = await with_openai(emu, first)
        assert emu.inner_requests[-1]["think"] == "low"
        assert response.reasoning is not None
        assert response.reasoning.effort == "low"
        assert [item.type for item in response.output] == ["reasoning", "function_call"]
        call = response.output[1]
        assert call.name == "get_weather"
        assert json.loads(call.arguments) == {"city": "Paris"}
        assert call.call_id.startswith("call_")
        history = [
            {"role": "user", "content": "weather?"},
            {"type": "function_call", "call_id": call.call_id, "name": call.name},
            {"type": "function_call_output", "call_id": call.call_id, "output": "18C"},
        ]
        history[1]["arguments"] = call.arguments

        def second(c: openai.OpenAI) -> Any:
            return c.responses.create(model="qwen3:8b", input=history, tools=[tool])

        final = await with_openai(emu, second)
        assert final.output_text == REPLY
        assert emu.inner_requests[-1]["messages"][1:] == [
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": call.call_id,
                        "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                    }
                ],
            },
            {"role": "tool", "content": "18C", "tool_call_id": call.call_id},
        ]
        body = {"model": "qwen3:8b", "input": "weather?", "tools": [tool], "stream": True}
        names = [name for name, _ in (await raw(emu, "/v1/responses", body)).sse()]
        assert names == [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            *["response.reasoning_summary_text.delta"] * len(emu.thinking.split()),
            "response.reasoning_summary_text.done",
            "response.output_item.done",
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed",
        ]


async def test_responses_structured_output_and_errors() -> None:
    async with serving(OllamaEmulator()) as emu:

        def run(c: openai.OpenAI) -> Any:
            return c.responses.parse(model="llama3", input="weather?", text_format=Weather)

        parsed = await with_openai(emu, run)
        assert isinstance(parsed.output_parsed, Weather)
        assert emu.inner_requests[-1]["format"]["type"] == "object"
        r = await raw(emu, "/v1/responses", {"model": "nope", "input": "hi"})
        assert r.status == 404
        assert r.json()["error"] == {
            "message": "model 'nope' not found",
            "type": "not_found_error",
            "param": None,
            "code": None,
        }
        bad = {"model": "llama3", "input": [{"type": "input_file", "file_id": "f"}]}
        r = await raw(emu, "/v1/responses", bad)
        assert r.status == 400
        assert r.json()["error"]["message"] == 'input[0]: unknown input item type: "input_file"'
        file_part = [{"type": "input_file", "file_data": "x"}]
        bad = {"model": "llama3", "input": [{"role": "user", "content": file_part}]}
        r = await raw(emu, "/v1/responses", bad)
        assert r.json()["error"]["message"] == "file inputs are not currently supported"


async def test_routes_newer_than_the_emulated_version_are_404() -> None:
    async with serving(OllamaEmulator(version="0.13.2")) as emu:
        r = await raw(emu, "/v1/responses", {"model": "llama3", "input": "hi"})
        assert (r.status, r.body) == (404, b"404 page not found")
        r = await raw(
            emu, "/v1/messages", {"model": "llama3", "max_tokens": 8, "messages": QUESTION}
        )
        assert (r.status, r.body) == (404, b"404 page not found")
        assert (await raw(emu, "/v1/chat/completions", chat())).status == 200
    async with serving(OllamaEmulator(version="0.13.5")) as emu:
        assert (await raw(emu, "/v1/responses", {"model": "llama3", "input": "hi"})).status == 200
        body = {"model": "llama3", "max_tokens": 8, "messages": QUESTION}
        assert (await raw(emu, "/v1/messages", body)).status == 404


# ------------------------------------------------------------- Ollama Cloud


async def test_cloud_requires_the_key_in_each_routes_shape() -> None:
    async with serving(OllamaEmulator.cloud(api_key="ck-1")) as emu:
        assert "gpt-oss:120b" in emu.models
        r = await raw(emu, "/api/chat", {"model": "gpt-oss:120b", "messages": QUESTION})
        assert (r.status, r.json()) == (401, {"error": "unauthorized"})
        r = await raw(emu, "/v1/chat/completions", chat(model="gpt-oss:120b"))
        assert r.status == 401
        assert r.json() == {
            "error": {"message": "unauthorized", "type": "api_error", "param": None, "code": None}
        }
        body = {"model": "gpt-oss:120b", "max_tokens": 8, "messages": QUESTION}
        r = await raw(emu, "/v1/messages", body)
        assert r.status == 401
        assert r.json()["error"] == {"type": "authentication_error", "message": "unauthorized"}
        r = await raw(emu, "/v1/models", method="GET", headers={"Authorization": "Bearer wrong"})
        assert r.status == 401
        assert emu.completed_generations == 0
        with pytest.raises(openai.AuthenticationError):
            await with_openai(emu, lambda c: list(c.models.list()))


async def test_cloud_serves_every_route_with_the_key() -> None:
    async with serving(OllamaEmulator.cloud(api_key="ck-1")) as emu:

        def run(c: openai.OpenAI) -> Any:
            return c.chat.completions.create(model="gpt-oss:120b", messages=QUESTION)

        answer = await with_openai(emu, run, api_key="ck-1")
        assert answer.choices[0].message.content == REPLY
        assert answer.choices[0].message.model_extra == {"reasoning": emu.thinking}
        response = await with_openai(
            emu, lambda c: c.responses.create(model="gpt-oss:120b", input="hi"), api_key="ck-1"
        )
        assert response.output_text == REPLY
        message = await with_anthropic(
            emu,
            lambda c: c.messages.create(model="gpt-oss:120b", max_tokens=64, messages=QUESTION),
            api_key=None,
            auth_token="ck-1",  # Authorization: Bearer, as Claude Code's ANTHROPIC_AUTH_TOKEN
        )
        assert [b.type for b in message.content] == ["thinking", "text"]
        auth = {"Authorization": "Bearer ck-1"}
        r = await raw(
            emu, "/api/chat", {"model": "gpt-oss:120b", "messages": QUESTION}, headers=auth
        )
        assert r.status == 200
        # the cloud names its models without the local -cloud tag: that one is unknown there
        r = await raw(emu, "/v1/chat/completions", chat(model="gpt-oss:120b-cloud"), headers=auth)
        assert r.status == 404
        assert r.json()["error"]["message"] == "model 'gpt-oss:120b-cloud' not found"
        listing = await with_openai(emu, lambda c: list(c.models.list()), api_key="ck-1")
        assert [m.id for m in listing] == list(emu.models)


# ------------------------------------------- an OpenAI-family provider's protocols


async def test_provider_protocols_are_off_unless_switched_on() -> None:
    async with serving(OpenAIEmulator()) as emu:
        auth = {"Authorization": "Bearer sk-test"}
        body = {"model": "openai/gpt-4o-mini", "input": "hi"}
        r = await raw(emu, "/api/v1/responses", body, headers=auth)
        assert r.status == 404
        assert r.json()["error"]["message"] == "Invalid URL (POST /api/v1/responses)"
        body = {"model": "openai/gpt-4o-mini", "max_tokens": 8, "messages": QUESTION}
        r = await raw(emu, "/api/v1/messages", body, headers=auth)
        assert r.status == 404
        emu.serves_messages = True
        assert (await raw(emu, "/api/v1/messages", body, headers=auth)).status == 200


async def test_provider_responses_route() -> None:
    emu = OpenAIEmulator(serves_responses=True, api_key="sk-or")
    emu.tool_calls = {"get_weather": {"city": "Paris"}}
    async with serving(emu):
        base = emu.url + "/api/v1"

        def run(c: openai.OpenAI) -> Any:
            return c.responses.create(model="openai/gpt-4o-mini", input="hi")

        response = await with_openai(emu, run, base_url=base, api_key="sk-or")
        assert response.output_text == "Hello from the emulator."
        assert response.usage is not None
        assert response.usage.output_tokens == 4
        with pytest.raises(openai.AuthenticationError):
            await with_openai(emu, run, base_url=base, api_key="sk-wrong")
        with pytest.raises(openai.NotFoundError):
            await with_openai(
                emu,
                lambda c: c.responses.create(model="nope", input="hi"),
                base_url=base,
                api_key="sk-or",
            )
        auth = {"Authorization": "Bearer sk-or"}
        body = {"model": "openai/gpt-4o-mini", "input": "hi", "stream": True}
        r = await raw(emu, "/api/v1/responses", body, headers=auth)
        assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
        events = r.sse()
        assert len(r.chunks) == len(events)
        assert events[0][0] == "response.created"
        assert events[-1][0] == "response.completed"
        assert events[-1][1]["response"]["usage"]["output_tokens"] == 4
        assert all(list(data)[:2] == ["type", "sequence_number"] for _, data in events)
        tool = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}
        r = await raw(emu, "/api/v1/responses", {**body, "tools": [tool]}, headers=auth)
        names = [name for name, _ in r.sse()]
        assert "response.function_call_arguments.done" in names
        assert emu.completed_generations == 3  # the refused requests generate nothing


async def test_provider_messages_route() -> None:
    emu = OpenAIEmulator(serves_messages=True, api_key="sk-kimi", models=("kimi-k2",))
    emu.tool_calls = {"get_weather": {"city": "Paris"}}
    async with serving(emu):
        base = emu.url + "/anthropic"

        def run(c: anthropic.Anthropic) -> Any:
            return c.messages.create(model="kimi-k2", max_tokens=64, messages=QUESTION)

        message = await with_anthropic(emu, run, base_url=base, api_key="sk-kimi")
        assert message.content[0].text == "Hello from the emulator."
        assert message.stop_reason == "end_turn"
        assert message.stop_sequence is None
        assert message.usage.output_tokens == 4
        assert emu.requests[-1].path == "/anthropic/v1/messages"
        assert emu.requests[-1].headers["authorization"] == "Bearer sk-kimi"  # this SDK's way
        bearer = await with_anthropic(emu, run, base_url=base, api_key=None, auth_token="sk-kimi")
        assert bearer.content[0].text == "Hello from the emulator."
        with pytest.raises(anthropic.AuthenticationError, match="invalid x-api-key"):
            await with_anthropic(emu, run, base_url=base, api_key="sk-wrong")
        r = await raw(emu, "/anthropic/v1/messages", {"model": "kimi-k2", "messages": QUESTION})
        assert r.status == 401
        assert r.json() == {
            "type": "error",
            "error": {"type": "authentication_error", "message": "x-api-key header is required"},
        }

        def stream(c: anthropic.Anthropic) -> tuple[str, Any]:
            with c.messages.stream(model="kimi-k2", max_tokens=64, messages=QUESTION) as s:
                return "".join(s.text_stream), s.get_final_message()

        text, final = await with_anthropic(emu, stream, base_url=base, api_key="sk-kimi")
        assert text == "Hello from the emulator."
        assert final.usage.output_tokens == 4
        body = {"model": "kimi-k2", "max_tokens": 64, "messages": QUESTION, "stream": True}
        r = await raw(emu, "/anthropic/v1/messages", body, headers={"x-api-key": "sk-kimi"})
        names = [name for name, _ in r.sse()]
        assert names[:3] == ["message_start", "content_block_start", "ping"]
        assert names[-2:] == ["message_delta", "message_stop"]
        assert r.sse()[-2][1]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}

        tool = {"name": "get_weather", "input_schema": {"type": "object"}}

        def tool_use(c: anthropic.Anthropic) -> Any:
            return c.messages.create(
                model="kimi-k2", max_tokens=64, messages=QUESTION, tools=[tool]
            )

        used = await with_anthropic(emu, tool_use, base_url=base, api_key="sk-kimi")
        assert used.stop_reason == "tool_use"
        assert used.content[0].input == {"city": "Paris"}
        result = {"type": "tool_result", "tool_use_id": used.content[0].id, "content": "18C"}
        history = [
            *QUESTION,
            {"role": "assistant", "content": [used.content[0].model_dump()]},
            {"role": "user", "content": [result]},
        ]

        def answer(c: anthropic.Anthropic) -> Any:
            return c.messages.create(model="kimi-k2", max_tokens=64, messages=history, tools=[tool])

        final_answer = await with_anthropic(emu, answer, base_url=base, api_key="sk-kimi")
        assert final_answer.content[0].text == "Hello from the emulator."
        r = await raw(
            emu,
            "/anthropic/v1/messages",
            {"model": "nope", "max_tokens": 8, "messages": QUESTION},
            headers={"x-api-key": "sk-kimi"},
        )
        assert r.status == 404
        assert r.json()["error"] == {"type": "not_found_error", "message": "model: nope"}


# -------------------------------------------- holds, faults and disconnects


async def test_hold_and_disconnect_on_compat_routes() -> None:
    emu = OllamaEmulator()
    emu.hold = trio.Event()
    bodies = {
        "/v1/chat/completions": chat(stream=True),
        "/v1/messages": {"model": "llama3", "max_tokens": 8, "messages": QUESTION, "stream": True},
        "/v1/responses": {"model": "llama3", "input": "hi", "stream": True},
    }
    with trio.fail_after(10):
        async with serving(emu), httpx.AsyncClient(base_url=emu.url) as c:
            for path, body in bodies.items():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(partial(c.post, json=body), path)
                    # the first native line went out (as its events), then the hold
                    await emu.wait_until(lambda: emu.active_generations == 1 and emu.emitted)
                    nursery.cancel_scope.cancel()
                await emu.wait_until(lambda: emu.active_generations == 0)
            assert emu.cancelled_generations == 3
            emu.hold.set()
            r = await c.post("/v1/messages", json={**bodies["/v1/messages"], "stream": False})
            assert r.status_code == 200
            assert emu.completed_generations == 1
    question = "why is the sky blue?"
    assert emu.generation_order == [question, question, "hi", question]


async def test_die_mid_stream_on_compat_routes() -> None:
    emu = OllamaEmulator()
    emu.faults.die_mid_stream_after = 2
    with trio.fail_after(10):
        async with serving(emu), httpx.AsyncClient(base_url=emu.url) as c:
            got: list[str] = []

            async def collect() -> None:
                async with c.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as r:
                    async for line in r.aiter_lines():
                        got.extend([line] if line else [])

            with pytest.raises(httpx.RemoteProtocolError):
                await collect()
            assert len(got) == 2  # two HTTP chunks, one event each, then the connection died
            assert all(line.startswith("data: {") for line in got)
            assert emu.completed_generations == 0


async def test_provider_protocols_hold_and_faults() -> None:
    emu = OpenAIEmulator(serves_messages=True, serves_responses=True)
    emu.hold = trio.Event()
    body = {"model": "openai/gpt-4o-mini", "max_tokens": 8, "messages": QUESTION, "stream": True}
    with trio.fail_after(10):
        async with serving(emu), httpx.AsyncClient(base_url=emu.url) as c:
            headers = {"x-api-key": "sk-test"}
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(c.post, json=body, headers=headers), "/v1/messages")
                await emu.wait_until(lambda: emu.active_generations == 1 and emu.emitted)
                nursery.cancel_scope.cancel()
            await emu.wait_until(lambda: emu.active_generations == 0)
            assert emu.cancelled_generations == 1
            emu.faults.status = 529
            emu.faults.status_body = b'{"type":"error","error":{"type":"overloaded_error"}}'
            r = await c.post("/v1/messages", json=body, headers=headers)
            assert r.status_code == 529


async def test_logprobs_requested_and_returned() -> None:
    async with serving(OllamaEmulator()) as emu:

        def run(c: openai.OpenAI) -> Any:
            return c.chat.completions.create(
                model="llama3", messages=QUESTION, logprobs=True, top_logprobs=2
            )

        answer = await with_openai(emu, run)
        assert emu.inner_requests[-1]["logprobs"] is True
        assert emu.inner_requests[-1]["top_logprobs"] == 2
        logprobs = answer.choices[0].logprobs
        assert logprobs is not None
        assert logprobs.content is not None
        assert [p.token for p in logprobs.content] == split_tokens(REPLY)
        assert len(logprobs.content[0].top_logprobs) == 2
        r = await raw(emu, "/v1/chat/completions", chat(stream=True, logprobs=True))
        chunks = [d for _, d in r.sse() if d != "[DONE]"]
        tokens = [c["choices"][0]["logprobs"]["content"][0]["token"] for c in chunks[:-1]]
        assert tokens == split_tokens(REPLY)
        assert "logprobs" not in chunks[-1]["choices"][0]  # the finish chunk
        plain = await raw(emu, "/v1/chat/completions", chat())
        assert "logprobs" not in plain.json()["choices"][0]
        native = await raw(emu, "/api/chat", {**chat(stream=False), "logprobs": True})
        assert list(native.json())[:7] == [
            "model",
            "created_at",
            "message",
            "done",
            "done_reason",
            "logprobs",
            "total_duration",
        ]


async def test_provider_chat_completions_tools_and_structured_output() -> None:
    emu = OpenAIEmulator(api_key="sk-or")
    emu.tool_calls = {"get_weather": {"city": "Paris"}}
    async with serving(emu):
        base, model = emu.url + "/api/v1", "openai/gpt-4o-mini"

        def first(c: openai.OpenAI) -> Any:
            return c.chat.completions.create(model=model, messages=QUESTION, tools=[WEATHER_TOOL])

        answer = await with_openai(emu, first, base_url=base, api_key="sk-or")
        (choice,) = answer.choices
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        (call,) = choice.message.tool_calls
        assert json.loads(call.function.arguments) == {"city": "Paris"}
        history = [
            *QUESTION,
            choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "18C"},
        ]

        def second(c: openai.OpenAI) -> Any:
            return c.chat.completions.create(model=model, messages=history, tools=[WEATHER_TOOL])

        final = await with_openai(emu, second, base_url=base, api_key="sk-or")
        assert final.choices[0].message.content == "Hello from the emulator."

        def streamed(c: openai.OpenAI) -> list[Any]:
            return list(
                c.chat.completions.create(
                    model=model, messages=QUESTION, tools=[WEATHER_TOOL], stream=True
                )
            )

        chunks = await with_openai(emu, streamed, base_url=base, api_key="sk-or")
        opening = chunks[0].choices[0].delta.tool_calls[0]
        assert opening.id.startswith("call_")
        assert opening.function.name == "get_weather"
        arguments = "".join(
            tc.function.arguments or ""
            for ch in chunks
            for tc in ch.choices[0].delta.tool_calls or []
        )
        assert json.loads(arguments) == {"city": "Paris"}
        assert len(chunks) > 3  # the arguments arrive in pieces, as OpenAI streams them
        assert chunks[-1].choices[0].finish_reason == "tool_calls"

        def parse(c: openai.OpenAI) -> Any:
            return c.chat.completions.parse(model=model, messages=QUESTION, response_format=Weather)

        parsed = await with_openai(emu, parse, base_url=base, api_key="sk-or")
        assert parsed.choices[0].message.parsed == Weather(
            city="Hello from the emulator.",
            temperature_c=1,
            sunny=True,
            tags=["Hello from the emulator."],
        )


async def test_field_types_are_checked_as_go_binds_them() -> None:
    async with serving(OllamaEmulator()) as emu:
        r = await raw(emu, "/v1/chat/completions", chat(stream="yes"))
        assert r.status == 400
        assert r.json()["error"]["message"] == (
            "json: cannot unmarshal string into Go struct field ChatCompletionRequest.stream "
            "of type bool"
        )
        body = {"model": "llama3", "max_tokens": True, "messages": QUESTION}
        r = await raw(emu, "/v1/messages", body)
        prefix = "json: cannot unmarshal"
        field = "into Go struct field MessagesRequest.max_tokens of type int"
        assert r.json()["error"]["message"] == f"{prefix} bool {field}"
        r = await raw(emu, "/v1/messages", {**body, "max_tokens": 8.5})
        assert r.json()["error"]["message"] == f"{prefix} number 8.5 {field}"
        r = await raw(emu, "/v1/chat/completions", content=b"[1]")
        assert r.json()["error"]["message"] == (
            "json: cannot unmarshal array into Go value of type openai.ChatCompletionRequest"
        )


async def test_json_is_written_as_go_writes_it() -> None:
    emu = OllamaEmulator(reply="a<b & c>d")
    async with serving(emu):
        r = await raw(emu, "/v1/chat/completions", chat())
        assert b'"content":"a\\u003cb \\u0026 c\\u003ed"' in r.body  # HTML-safe escapes
        assert r.json()["choices"][0]["message"]["content"] == "a<b & c>d"
        body = {"model": "llama3", "max_tokens": 8, "messages": QUESTION, "stream": True}
        r = await raw(emu, "/v1/messages", body)
        assert b'"text":"a\\u003cb"' in r.body
