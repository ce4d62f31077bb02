"""Load-option pinning: the pure body rewrite, and through a real gateway that a pinned
model is never reloaded by clients that disagree on `num_ctx`."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import trio

from gateway.config import ConfigError, ModelConfig, from_mapping, load
from gateway.pinning import pin_body, pin_for, pins_of
from tests.conftest import StartGateway, make_config
from tests.emulators import OllamaEmulator

PIN = ModelConfig(num_ctx=32768, keep_alive="30m")


def test_pin_sets_num_ctx_and_keep_alive_and_keeps_every_other_field() -> None:
    body = json.dumps(
        {
            "model": "llama3",
            "messages": [{"role": "user", "content": "hi \u2028 there"}],
            "options": {"num_ctx": 2048, "temperature": 0.2, "future": [1, 2]},
            "keep_alive": 0,
            "tools": [{"type": "function"}],
            "think": True,
        }
    ).encode()
    pinned = json.loads(pin_body(body, PIN))
    original = json.loads(body)
    assert pinned["options"] == {"num_ctx": 32768, "temperature": 0.2, "future": [1, 2]}
    assert pinned["keep_alive"] == "30m"
    for key in ("model", "messages", "tools", "think"):
        assert pinned[key] == original[key]


def test_pin_adds_options_when_absent_or_null() -> None:
    for body in (b'{"model":"m","prompt":"p"}', b'{"model":"m","prompt":"p","options":null}'):
        pinned = json.loads(pin_body(body, ModelConfig(num_ctx=4096)))
        assert pinned == {"model": "m", "prompt": "p", "options": {"num_ctx": 4096}}


@pytest.mark.parametrize(
    "body", [b"not json", b"[1]", b'{"model":"m","options":"x"}'], ids=["garbage", "list", "opts"]
)
def test_pin_leaves_a_bad_body_for_the_route_to_refuse(body: bytes) -> None:
    assert pin_body(body, PIN) == body


def test_compat_protocols_carry_no_load_options() -> None:
    # Ollama's /v1/* and /v1/messages ignore num_ctx and keep_alive in the body.
    body = b'{"model":"m","messages":[]}'
    assert pin_body(body, PIN, "openai") == body
    assert pin_body(body, PIN, "anthropic") == body


def test_pins_are_keyed_by_canonical_name_and_empty_tables_ignored() -> None:
    pins = pins_of({"llama3": PIN, "qwen:7b": ModelConfig()})
    assert pin_for(pins, "llama3:latest") is PIN
    assert pin_for(pins, "llama3") is PIN
    assert pin_for(pins, "qwen:7b") is None


def test_models_table_in_config() -> None:
    config = from_mapping({"models": {"qwen3-coder": {"num_ctx": 32768, "keep_alive": "30m"}}})
    assert config.models["qwen3-coder"].num_ctx == 32768
    with pytest.raises(ConfigError, match="unknown key"):
        from_mapping({"models": {"m": {"num_gpu_layers": 1}}})
    with pytest.raises(ConfigError, match="num_ctx"):
        from_mapping({"models": {"m": {"num_ctx": 0}}})


def test_keep_alive_must_be_a_duration(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    for good in ('"30m"', '"1h30m"', '"-1"', "-1", '"300"', '"2.5s"'):
        path.write_text(f'[models."m"]\nkeep_alive = {good}\n')
        load(path, {})
    path.write_text('[models."m"]\nkeep_alive = "forever"\n')
    with pytest.raises(ConfigError, match="keep_alive"):
        load(path, {})


async def chat_with_ctx(client: httpx.AsyncClient, num_ctx: int | None) -> None:
    body: dict[str, object] = {
        "model": "llama3",
        "messages": [{"role": "user", "content": f"ctx {num_ctx}"}],
        "stream": False,
    }
    if num_ctx is not None:
        body["options"] = {"num_ctx": num_ctx}
    with trio.fail_after(10):
        response = await client.post("/api/chat", json=body)
    assert response.status_code == 200


async def test_a_pinned_model_is_never_reloaded_by_clients_that_disagree(
    start_gateway: StartGateway, ollama: OllamaEmulator
) -> None:
    gw = await start_gateway(
        make_config(ollama.url, models={"llama3": {"num_ctx": 8192, "keep_alive": "30m"}})
    )
    for num_ctx in (2048, 16384, None, 2048, 4096):
        await chat_with_ctx(gw.client, num_ctx)
    assert ollama.loads == {"llama3:latest": 1}
    for request in ollama.requests_to("/api/chat"):
        sent = request.json()
        assert sent["options"]["num_ctx"] == 8192
        assert sent["keep_alive"] == "30m"
    # An unpinned model goes upstream byte for byte, and thrashes as Ollama makes it.
    for num_ctx in (2048, 4096):
        body = {"model": "qwen2.5:7b", "prompt": "p", "stream": False}
        body["options"] = {"num_ctx": num_ctx}
        raw = json.dumps(body).encode()
        with trio.fail_after(10):
            response = await gw.client.post("/api/generate", content=raw)
        assert response.status_code == 200
        assert ollama.requests_to("/api/generate")[-1].body == raw
    assert ollama.loads["qwen2.5:7b"] == 2


async def test_without_pinning_the_same_clients_make_ollama_reload(
    start_gateway: StartGateway, ollama: OllamaEmulator
) -> None:
    gw = await start_gateway(make_config(ollama.url))
    for num_ctx in (2048, 16384, None, 2048, 4096):
        await chat_with_ctx(gw.client, num_ctx)
    assert ollama.loads == {"llama3:latest": 5}


async def test_router_calls_to_a_pinned_local_model_carry_the_pin(
    start_gateway: StartGateway, ollama: OllamaEmulator
) -> None:
    gw = await start_gateway(make_config(ollama.url, models={"llama3": {"num_ctx": 8192}}))
    await chat_with_ctx(gw.client, 2048)  # loads llama3 with the pinned 8192
    messages = [{"role": "user", "content": "hi"}]
    for stream in (False, True):
        body = {"model": "ollama/llama3", "messages": messages, "max_tokens": 5, "stream": stream}
        with trio.fail_after(10):
            response = await gw.client.post("/v1/chat", json=body)
        assert response.status_code == 200
        sent = ollama.requests_to("/api/chat")[-1].json()
        assert sent["options"] == {"num_predict": 5, "num_ctx": 8192}
        assert "keep_alive" not in sent
    assert ollama.loads == {"llama3:latest": 1}
