"""Issue 5.6: no secret ever shows, and each upstream sees only its own credential.

Every credential is a unique marker: the Ollama target's bearer token, the four provider
keys (one of them read from a `.env` file), the inbound client and admin tokens, and a
wrong token a client presents. Every route is driven, then every error path (no token,
wrong token, admin refusals, bad bodies, unknown models, upstream errors that echo the
credential back, resets, hangs, a target that goes down, streams that die). Captured:
every response (status line, headers, body), every log record (rendered by both of the
gateway's formatters), `/health`, `/metrics`, and `gateway check-config`. No marker may
appear in any of them; each emulator must have seen exactly its own credential.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from gateway.logs import JsonFormatter, TextFormatter
from tests.conftest import StartGateway, eventually, make_config
from tests.emulators import Faults, OllamaEmulator, OpenAIEmulator
from tests.test_cli import GATEWAY, clean_environ

ROOT = Path(__file__).resolve().parent.parent
MESSAGES = [{"role": "user", "content": "why is the sky blue?"}]


def marker(name: str) -> str:
    return f"SECRET-{name}-{uuid.uuid4().hex}"


TARGET_TOKEN = marker("target")
CLOUD_KEY = marker("cloud")
OPENROUTER_KEY = marker("openrouter")
OPENCODE_KEY = marker("opencode")
KIMI_KEY = marker("kimi")  # from a .env file, not the environment
ALICE = marker("alice")
ADMIN = marker("admin")
WRONG = marker("wrong")  # a client's wrong token: not to be echoed or logged either
URL_PASSWORD = marker("urlpassword")
MARKERS = {
    "target token": TARGET_TOKEN,
    "ollama_cloud key": CLOUD_KEY,
    "openrouter key": OPENROUTER_KEY,
    "opencode key": OPENCODE_KEY,
    "kimi key": KIMI_KEY,
    "client token": ALICE,
    "admin token": ADMIN,
    "wrong token": WRONG,
    "URL password": URL_PASSWORD,
}
# The `-` markers could be split by a formatter; their hex tails are what must not show.
TAILS = {name: value.rsplit("-", 1)[1] for name, value in MARKERS.items()}


class Evidence:
    """Everything the gateway said, to search for markers."""

    def __init__(self) -> None:
        self.texts: list[tuple[str, str]] = []

    def add(self, where: str, text: str | bytes) -> None:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        self.texts.append((where, text))

    def response(self, where: str, response: httpx.Response) -> None:
        headers = "\n".join(f"{k}: {v}" for k, v in response.headers.items())
        self.add(where, f"{response.status_code}\n{headers}\n\n{response.text}")

    def logs(self, records: list[logging.LogRecord]) -> None:
        json_format, text_format = JsonFormatter(), TextFormatter()
        for record in records:
            self.add(f"log {record.name}", json_format.format(record))
            self.add(f"log {record.name}", text_format.format(record))

    def assert_clean(self) -> None:
        assert self.texts
        leaks = [
            (name, where, text)
            for where, text in self.texts
            for name, tail in TAILS.items()
            if tail in text
        ]
        places = sorted({f"{name} in {where}" for name, where, _ in leaks})
        sample = [text[max(0, text.find(TAILS[name]) - 200) :][:300] for name, _, text in leaks[:3]]
        assert not leaks, f"{len(leaks)} leaks: {places}; for example: {sample}"


@pytest.fixture
def evidence() -> Evidence:
    return Evidence()


def own_credential_only(emulator: OllamaEmulator | OpenAIEmulator, key: str) -> None:
    seen = {r.headers.get("authorization") for r in emulator.requests}
    assert emulator.requests, "never called"
    assert seen == {f"Bearer {key}"}, seen


async def test_no_secret_shows_on_any_route_or_error_path(
    start_gateway: StartGateway,
    nursery: trio.Nursery,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    evidence: Evidence,
) -> None:
    caplog.set_level(logging.DEBUG)
    target = OllamaEmulator(required_token=TARGET_TOKEN)
    cloud = OllamaEmulator(models=("kimi-k2:cloud",), required_token=CLOUD_KEY)
    openrouter = OpenAIEmulator(api_key=OPENROUTER_KEY)
    opencode = OpenAIEmulator(api_key=OPENCODE_KEY, models=("big-pickle",))
    kimi = OpenAIEmulator(api_key=KIMI_KEY, models=("kimi-for-coding",))
    for emulator in (target, cloud, openrouter, opencode, kimi):
        await nursery.start(emulator.run)
    kimi_env = tmp_path / "kimi.env"
    kimi_env.write_text(f"export KIMI_API_KEY='{KIMI_KEY}'\n", encoding="utf-8")
    providers = {
        "ollama_cloud": {"base_url": cloud.url, "timeout_s": 0.15},
        "openrouter": {"base_url": f"{openrouter.url}/api/v1", "timeout_s": 0.15},
        "opencode": {"base_url": f"{opencode.url}/zen/v1", "timeout_s": 0.15},
        "kimi": {"base_url": f"{kimi.url}/coding/v1", "timeout_s": 0.15, "env_file": str(kimi_env)},
    }
    config = make_config(
        target.url,
        ollama={"first_byte_timeout_s": 0.15, "idle_timeout_s": 0.15},
        providers=providers,
    )
    environ = {
        "GATEWAY_OLLAMA_TOKEN": TARGET_TOKEN,
        "OLLAMA_CLOUD_KEY": CLOUD_KEY,
        "OPENROUTER_API_KEY": OPENROUTER_KEY,
        "OPENCODE_API_KEY": OPENCODE_KEY,
        "GATEWAY_TOKENS": f"alice:{ALICE}",
        "GATEWAY_ADMIN_TOKENS": f"root:{ADMIN}",
    }
    gw = await start_gateway(config, environ=environ)
    listed = (await gw.client.get("/v1/chat/providers", headers=_auth(ALICE))).json()
    assert [p["name"] for p in listed["providers"]] == [
        "ollama",
        "ollama_cloud",
        "openrouter",
        "opencode",
        "kimi",
    ]

    async with httpx.AsyncClient(base_url=gw.url, timeout=10.0, trust_env=False) as client:

        async def call(method: str, path: str, token: str | None = ALICE, **kw: Any) -> None:
            with trio.fail_after(10):
                response = await client.request(method, path, headers=_auth(token), **kw)
            evidence.response(f"{method} {path}", response)

        # Every route, authorized.
        await _every_route(call)
        # No token, a wrong token, a client token where an admin one is needed.
        for token in (None, WRONG, f"{ALICE}x"):
            await call("POST", "/api/chat", token, json={"model": "llama3", "messages": []})
            await call("GET", "/v1/models", token)
            await call("POST", "/v1/chat/completions", token, json=_chat("llama3"))
        await call("POST", "/api/pull", ALICE, json={"model": "llama3"})
        await call("POST", "/api/pull", ADMIN, json={"model": "llama3"})
        # Bad bodies and unknown models and providers.
        for path in ("/api/chat", "/v1/chat", "/v1/chat/completions", "/v1/embeddings"):
            await call("POST", path, content=b"{not json")
            await call("POST", path, json=_chat("no-such-model"))
        await call("POST", "/v1/chat", json=_chat("openrouter/openai/no-such-model"))
        # Upstreams that echo the credential they were sent, in an error body.
        for emulator, key in (
            (target, TARGET_TOKEN),
            (cloud, CLOUD_KEY),
            (openrouter, OPENROUTER_KEY),
            (opencode, OPENCODE_KEY),
            (kimi, KIMI_KEY),
        ):
            echo = f'{{"error": "invalid credential Bearer {key}"}}'.encode()
            emulator.faults = Faults(status=401, status_body=echo)
            await _gateway_made_answers(call)
            emulator.faults = Faults(status=500, status_body=f"bad key {key}".encode())
            await _gateway_made_answers(call)
            emulator.faults = Faults()
        # Resets, hangs, streams dying midway, on every upstream at once.
        for faults in (
            Faults(reset_before_headers=True),
            Faults(hang_before_headers=True),
            Faults(die_mid_stream_after=1),
        ):
            for emulator in (target, cloud, openrouter, opencode, kimi):
                emulator.faults = faults
            await _every_route(call)
        for emulator in (target, cloud, openrouter, opencode, kimi):
            emulator.faults = Faults()
        # The target goes down: degraded answers, health and readiness say why.
        await target.set_down(True)
        await _every_route(call)
        await eventually(lambda: gw.services.inventory.degraded)
        await call("GET", "/health", None)
        await call("GET", "/ready")
        await call("GET", "/metrics")
        await target.set_down(False)
        await eventually(lambda: not gw.services.inventory.degraded)
        await _every_route(call)
        await call("GET", "/health", None)
        await call("GET", "/metrics")

    evidence.logs(caplog.records)
    evidence.assert_clean()
    assert any(r.name == "gateway.access" for r in caplog.records)
    own_credential_only(target, TARGET_TOKEN)
    own_credential_only(cloud, CLOUD_KEY)
    own_credential_only(openrouter, OPENROUTER_KEY)
    own_credential_only(opencode, OPENCODE_KEY)
    own_credential_only(kimi, KIMI_KEY)


def _auth(token: str | None) -> dict[str, str]:
    return {} if token is None else {"authorization": f"Bearer {token}"}


def _chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": MESSAGES, **extra}


MODELS = [
    "llama3",
    "kimi-k2:cloud",
    "openrouter/openai/gpt-4o-mini",
    "opencode/big-pickle",
    "kimi/kimi-for-coding",
]


async def _every_route(call: Any) -> None:
    for method, path in (
        ("GET", "/"),
        ("GET", "/api/version"),
        ("GET", "/api/tags"),
        ("GET", "/api/ps"),
        ("GET", "/v1/models"),
        ("GET", "/v1/chat/providers"),
        ("GET", "/health"),
        ("GET", "/ready"),
        ("GET", "/metrics"),
    ):
        await call(method, path)
    await call("POST", "/api/show", json={"model": "llama3"})
    await call("POST", "/api/chat", json=_chat("llama3"))
    await call("POST", "/api/chat", json=_chat("llama3", stream=False))
    await call("POST", "/api/generate", json={"model": "llama3", "prompt": "why?"})
    await call("POST", "/api/embed", json={"model": "nomic-embed-text", "input": "x"})
    await call("POST", "/api/embeddings", json={"model": "nomic-embed-text", "prompt": "x"})
    await call("POST", "/v1/embeddings", json={"model": "nomic-embed-text", "input": "x"})
    for model in MODELS:
        await call("POST", "/v1/chat", json=_chat(model))
        await call("POST", "/v1/chat/completions", json=_chat(model))
        await call("POST", "/v1/chat/completions", json=_chat(model, stream=True))


async def _gateway_made_answers(call: Any) -> None:
    """The routes whose error text the gateway writes itself (not the Ollama passthrough,
    which hands an upstream's answer on byte for byte, by design)."""
    await call("POST", "/v1/embeddings", json={"model": "nomic-embed-text", "input": "x"})
    for model in MODELS:
        await call("POST", "/v1/chat", json=_chat(model))
        await call("POST", "/v1/chat/completions", json=_chat(model))
        await call("POST", "/v1/chat/completions", json=_chat(model, stream=True))


async def test_check_config_shows_no_secret(tmp_path: Path, evidence: Evidence) -> None:
    """`gateway check-config` with every credential set (and a password in the target
    URL) prints where each comes from, never a value."""
    kimi_env = tmp_path / "kimi.env"
    kimi_env.write_text(f"KIMI_API_KEY={KIMI_KEY}\n", encoding="utf-8")
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice:{ALICE}\n", encoding="utf-8")
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[ollama]\nurl = "http://user:{URL_PASSWORD}@127.0.0.1:11434"\n'
        f'[auth]\ntokens_file = "{tokens}"\n'
        f'[providers.kimi]\nenv_file = "{kimi_env}"\n',
        encoding="utf-8",
    )
    env = clean_environ(
        GATEWAY_OLLAMA_TOKEN=TARGET_TOKEN,
        OLLAMA_CLOUD_KEY=CLOUD_KEY,
        OPENROUTER_API_KEY=OPENROUTER_KEY,
        OPENCODE_API_KEY=OPENCODE_KEY,
        GATEWAY_ADMIN_TOKENS=f"root:{ADMIN}",
    )
    with trio.fail_after(20):
        done = await trio.run_process(
            [*GATEWAY, "check-config", "--config", str(config)],
            env=env,
            cwd=ROOT,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert done.returncode == 0, done.stderr
    evidence.add("check-config stdout", done.stdout)
    evidence.add("check-config stderr", done.stderr)
    evidence.assert_clean()
    out = done.stdout.decode()
    assert "environment variable OPENROUTER_API_KEY" in out
    assert f"{kimi_env} (KIMI_API_KEY)" in out
    assert "ollama token: set" in out


async def test_a_password_in_the_target_url_never_shows(
    start_gateway: StartGateway, caplog: pytest.LogCaptureFixture, evidence: Evidence
) -> None:
    """The target URL may carry a password; with the target unreachable (the errors that
    name it most), it shows redacted in answers, /health, /metrics and the logs."""
    caplog.set_level(logging.DEBUG)
    with trio.socket.socket() as probe:
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    gw = await start_gateway(make_config(f"http://user:{URL_PASSWORD}@127.0.0.1:{port}"))
    await eventually(lambda: gw.services.inventory.poll_failures >= 1)
    for method, path, body in (
        ("POST", "/api/chat", _chat("llama3")),
        ("POST", "/v1/chat", _chat("llama3")),
        ("POST", "/v1/chat/completions", _chat("llama3", stream=True)),
        ("POST", "/v1/embeddings", {"model": "x", "input": "x"}),
        ("GET", "/api/tags", None),
        ("GET", "/api/version", None),
        ("GET", "/health", None),
        ("GET", "/ready", None),
        ("GET", "/metrics", None),
    ):
        response = await gw.client.request(method, path, json=body)
        evidence.response(f"{method} {path}", response)
    health = (await gw.client.get("/health")).json()
    assert health["degraded"] is True
    assert "user:***@127.0.0.1" in health["target"]
    evidence.logs(caplog.records)
    evidence.assert_clean()
