"""The official `openai` and `anthropic` SDKs through the gateway (issue 12), to a local
model (the Ollama emulator's compatibility routes), to Ollama Cloud, and to an
OpenAI-family provider where it serves the protocol; SDK retries stay on (`max_retries`
at its default) so a 404 that an SDK retried would show as extra upstream requests."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anthropic
import openai
import pydantic
import pytest
import trio

from tests.conftest import RunningGateway, StartGateway, make_config
from tests.emulators import OllamaEmulator, OpenAIEmulator
from tests.test_openai_api import providers

T = TypeVar("T")

CLOUD_KEY = "cloud-key-marker"
ROUTER_KEY = "sk-router-marker"
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
ANTHROPIC_TOOL = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": TOOL["function"]["parameters"],  # type: ignore[index]
}
PNG = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
    "+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


@dataclass
class Target:
    name: str
    model: str
    emulator: OllamaEmulator | OpenAIEmulator
    prefix: str  # where the emulator serves the routes


@dataclass
class Stack:
    gw: RunningGateway
    targets: dict[str, Target]


@pytest.fixture
async def stack(
    start_gateway: StartGateway, ollama: OllamaEmulator, nursery: trio.Nursery
) -> Stack:
    cloud = OllamaEmulator.cloud(api_key=CLOUD_KEY)
    router = OpenAIEmulator(api_key=ROUTER_KEY, serves_messages=True, serves_responses=True)
    for emulator in (cloud, router):
        await nursery.start(emulator.run)
    for emulator in (ollama, cloud, router):
        emulator.tool_calls = {"get_weather": {"city": "Paris"}}
    config = make_config(
        ollama.url,
        providers=providers(ollama_cloud=cloud.url, openrouter=router.url + "/api/v1"),
    )
    environ = {"OLLAMA_CLOUD_KEY": CLOUD_KEY, "OPENROUTER_API_KEY": ROUTER_KEY}
    gw = await start_gateway(config, environ=environ)
    targets = {
        "local": Target("local", "llama3", ollama, ""),
        "cloud": Target("cloud", "gpt-oss:120b-cloud", cloud, ""),
        "openrouter": Target("openrouter", "openrouter/openai/gpt-4o-mini", router, "/api"),
    }
    return Stack(gw, targets)


async def with_openai(gw: RunningGateway, call: Callable[[openai.OpenAI], T]) -> T:
    def run() -> T:
        with openai.OpenAI(base_url=gw.url + "/v1", api_key="client-key", timeout=5) as c:
            return call(c)

    with trio.fail_after(10):
        return await trio.to_thread.run_sync(run, abandon_on_cancel=True)


async def with_anthropic(gw: RunningGateway, call: Callable[[anthropic.Anthropic], T]) -> T:
    def run() -> T:
        with anthropic.Anthropic(base_url=gw.url, api_key="client-key", timeout=5) as c:
            return call(c)

    with trio.fail_after(10):
        return await trio.to_thread.run_sync(run, abandon_on_cancel=True)


ALL = ["local", "cloud", "openrouter"]


# ------------------------------------------------------------------------- openai


@pytest.mark.parametrize("target", ALL)
@pytest.mark.parametrize("stream", [False, True])
async def test_openai_tool_call_and_round_trip(stack: Stack, target: str, stream: bool) -> None:
    t = stack.targets[target]
    messages: list[Any] = [{"role": "user", "content": "weather in Paris?"}]

    def call(client: openai.OpenAI) -> tuple[str, str, str, str | None]:
        if stream:
            chunks = list(
                client.chat.completions.create(
                    model=t.model, messages=messages, tools=[TOOL], stream=True
                )
            )
            calls = [
                tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])
            ]
            call_id = next(tc.id for tc in calls if tc.id)
            name = next(tc.function.name for tc in calls if tc.function and tc.function.name)
            args = "".join(tc.function.arguments or "" for tc in calls if tc.function)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        else:
            answer = client.chat.completions.create(model=t.model, messages=messages, tools=[TOOL])
            tool_call = answer.choices[0].message.tool_calls[0]  # type: ignore[index]
            assert tool_call.type == "function"
            call_id, name = tool_call.id, tool_call.function.name
            args, finish = tool_call.function.arguments, answer.choices[0].finish_reason
        history = [
            *messages,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": name, "arguments": args},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call_id, "content": "sunny, 21 C"},
        ]
        reply = client.chat.completions.create(model=t.model, messages=history, tools=[TOOL])
        return name, args, reply.choices[0].message.content or "", finish

    name, args, reply, finish = await with_openai(stack.gw, call)
    assert name == "get_weather"
    assert json.loads(args) == {"city": "Paris"}
    assert finish == "tool_calls"
    assert reply == t.emulator.reply


@pytest.mark.parametrize("target", ALL)
async def test_openai_parse_with_pydantic(stack: Stack, target: str) -> None:
    t = stack.targets[target]

    class Answer(pydantic.BaseModel):
        answer: str

    def call(client: openai.OpenAI) -> Answer | None:
        parsed = client.chat.completions.parse(
            model=t.model,
            messages=[{"role": "user", "content": "why is the sky blue?"}],
            response_format=Answer,
        )
        return parsed.choices[0].message.parsed

    parsed = await with_openai(stack.gw, call)
    assert isinstance(parsed, Answer)
    sent = json.loads(t.emulator.requests_to(t.prefix + "/v1/chat/completions")[-1].body)
    assert sent["response_format"]["type"] == "json_schema"


@pytest.mark.parametrize("target", ALL)
async def test_openai_image_reasoning_stop_seed(stack: Stack, target: str) -> None:
    """An image part, `reasoning_effort`, `stop` and `seed` reach the upstream as sent."""
    t = stack.targets[target]
    content: Any = [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": PNG}},
    ]

    def call(client: openai.OpenAI) -> str:
        answer = client.chat.completions.create(
            model=t.model,
            messages=[{"role": "user", "content": content}],
            stop=["zzz"],
            seed=7,
            **({"reasoning_effort": "low"} if target != "local" else {}),
        )
        return answer.choices[0].message.content or ""

    assert await with_openai(stack.gw, call)
    sent = json.loads(t.emulator.requests_to(t.prefix + "/v1/chat/completions")[-1].body)
    assert sent["messages"][0]["content"] == content
    assert sent["stop"] == ["zzz"]
    assert sent["seed"] == 7


@pytest.mark.parametrize("target", ["local", "cloud"])
async def test_openai_completions_and_models_retrieve(stack: Stack, target: str) -> None:
    t = stack.targets[target]

    def call(client: openai.OpenAI) -> tuple[str, str]:
        done = client.completions.create(model=t.model, prompt="why is the sky blue?")
        return done.choices[0].text, client.models.retrieve(t.model).id

    text, model_id = await with_openai(stack.gw, call)
    assert text == t.emulator.reply
    assert model_id == t.model


@pytest.mark.parametrize("target", ALL)
@pytest.mark.parametrize("stream", [False, True])
async def test_openai_responses_create(stack: Stack, target: str, stream: bool) -> None:
    t = stack.targets[target]

    def call(client: openai.OpenAI) -> str:
        if stream:
            events = list(
                client.responses.create(model=t.model, input="why is the sky blue?", stream=True)
            )
            done = [e for e in events if e.type == "response.completed"]
            return done[-1].response.output_text  # type: ignore[union-attr]
        return client.responses.create(model=t.model, input="why is the sky blue?").output_text

    assert await with_openai(stack.gw, call) == t.emulator.reply


@pytest.mark.parametrize("target", ["local", "cloud", "openrouter"])
async def test_openai_404_is_not_retried(stack: Stack, target: str) -> None:
    """An unknown model is a NotFoundError, asked of the upstream at most once."""
    t = stack.targets[target]
    model = {"local": "nope", "cloud": "nope:cloud", "openrouter": "openrouter/x/nope"}[target]
    path = t.prefix + "/v1/chat/completions"
    before = len(t.emulator.requests_to(path))

    def call(client: openai.OpenAI) -> None:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])

    with pytest.raises(openai.NotFoundError):
        await with_openai(stack.gw, call)
    assert len(t.emulator.requests_to(path)) - before == (0 if target == "local" else 1)


# ---------------------------------------------------------------------- anthropic


@pytest.mark.parametrize("target", ALL)
async def test_anthropic_message_with_system_prompt(stack: Stack, target: str) -> None:
    t = stack.targets[target]

    def call(client: anthropic.Anthropic) -> str:
        message = client.messages.create(
            model=t.model,
            max_tokens=64,
            system="be brief",
            messages=[{"role": "user", "content": "why is the sky blue?"}],
        )
        # (gpt-oss on Ollama Cloud thinks: a thinking block comes first.)
        return "".join(b.text for b in message.content if b.type == "text")

    assert await with_anthropic(stack.gw, call) == t.emulator.reply
    sent = json.loads(t.emulator.requests_to(t.prefix + "/v1/messages")[-1].body)
    assert sent["system"] == "be brief"


@pytest.mark.parametrize("target", ALL)
async def test_anthropic_stream(stack: Stack, target: str) -> None:
    t = stack.targets[target]

    def call(client: anthropic.Anthropic) -> str:
        with client.messages.stream(
            model=t.model,
            max_tokens=64,
            messages=[{"role": "user", "content": "why is the sky blue?"}],
        ) as events:
            return "".join(events.text_stream)

    assert await with_anthropic(stack.gw, call) == t.emulator.reply


@pytest.mark.parametrize("target", ALL)
async def test_anthropic_tool_use_round_trip(stack: Stack, target: str) -> None:
    t = stack.targets[target]

    def call(client: anthropic.Anthropic) -> tuple[dict[str, Any], str]:
        first = client.messages.create(
            model=t.model,
            max_tokens=64,
            tools=[ANTHROPIC_TOOL],  # type: ignore[list-item]
            messages=[{"role": "user", "content": "weather in Paris?"}],
        )
        use = next(b for b in first.content if b.type == "tool_use")
        assert first.stop_reason == "tool_use"
        second = client.messages.create(
            model=t.model,
            max_tokens=64,
            tools=[ANTHROPIC_TOOL],  # type: ignore[list-item]
            messages=[
                {"role": "user", "content": "weather in Paris?"},
                {"role": "assistant", "content": first.content},
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}],
                },
            ],
        )
        text = "".join(b.text for b in second.content if b.type == "text")
        return dict(use.input), text  # type: ignore[call-overload]

    arguments, text = await with_anthropic(stack.gw, call)
    assert arguments == {"city": "Paris"}
    assert text == t.emulator.reply


@pytest.mark.parametrize("target", ALL)
async def test_anthropic_404_is_not_retried(stack: Stack, target: str) -> None:
    t = stack.targets[target]
    model = {"local": "nope", "cloud": "nope:cloud", "openrouter": "openrouter/x/nope"}[target]
    path = t.prefix + "/v1/messages"
    before = len(t.emulator.requests_to(path))

    def call(client: anthropic.Anthropic) -> None:
        client.messages.create(
            model=model, max_tokens=8, messages=[{"role": "user", "content": "x"}]
        )

    with pytest.raises(anthropic.NotFoundError):
        await with_anthropic(stack.gw, call)
    assert len(t.emulator.requests_to(path)) - before == (0 if target == "local" else 1)
