"""Inbound bearer tokens: who may call, which client called, and secrets kept out of sight."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from gateway import cli
from gateway.auth import Auth
from gateway.config import AuthConfig
from gateway.errors import Unauthorized
from tests.conftest import RunningGateway, StartGateway, eventually, make_config
from tests.emulators import OllamaEmulator, OpenAIEmulator

ALICE = "tok-alice-marker"
BOB = "tok-bob-marker"
ADMIN = "tok-admin-marker"
TARGET_TOKEN = "target-token-marker"
KIMI_KEY = "sk-kimi-key-marker"
ENVIRON = {
    "GATEWAY_TOKENS": f"alice:{ALICE},bob:{BOB}",
    "GATEWAY_ADMIN_TOKENS": f"root:{ADMIN}",
    "GATEWAY_OLLAMA_TOKEN": TARGET_TOKEN,
    "KIMI_API_KEY": KIMI_KEY,
}
SECRETS = (ALICE, BOB, ADMIN, TARGET_TOKEN, KIMI_KEY)
CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}], "stream": False}

# (method, path, body, status with a good client token)
PROTECTED: list[tuple[str, str, Any, int]] = [
    ("GET", "/", None, 200),
    ("GET", "/api/version", None, 200),
    ("GET", "/api/tags", None, 200),
    ("GET", "/api/ps", None, 200),
    ("POST", "/api/show", {"model": "llama3"}, 200),
    ("POST", "/api/chat", CHAT, 200),
    ("POST", "/api/generate", {"model": "llama3", "prompt": "x", "stream": False}, 200),
    ("POST", "/api/embed", {"model": "nomic-embed-text", "input": "x"}, 200),
    ("POST", "/v1/chat", CHAT, 200),
    ("GET", "/v1/chat/providers", None, 200),
    ("GET", "/v1/models", None, 200),
    ("POST", "/v1/chat/completions", CHAT, 200),
    ("POST", "/v1/embeddings", {"model": "nomic-embed-text", "input": "x"}, 200),
    ("GET", "/metrics", None, 200),
    ("GET", "/ready", None, 200),
    ("GET", "/no/such/route", None, 404),
]


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


@pytest.fixture
async def kimi(nursery: trio.Nursery) -> OpenAIEmulator:
    emulator = OpenAIEmulator(api_key=KIMI_KEY, models=("k2",))
    await nursery.start(emulator.run)
    return emulator


@pytest.fixture
async def guarded(
    start_gateway: StartGateway, ollama: OllamaEmulator, kimi: OpenAIEmulator
) -> RunningGateway:
    config = make_config(
        ollama.url,
        ollama={"allow_management": True},
        providers={"kimi": {"base_url": kimi.url}},
    )
    return await start_gateway(config, environ=dict(ENVIRON))


async def call(
    gw: RunningGateway, method: str, path: str, body: Any, headers: dict[str, str] | None = None
) -> httpx.Response:
    with trio.fail_after(10):
        return await gw.client.request(method, path, json=body, headers=headers)


@pytest.mark.parametrize(("method", "path", "body", "ok"), PROTECTED)
async def test_every_route_but_health_needs_a_valid_token(
    guarded: RunningGateway, method: str, path: str, body: Any, ok: int
) -> None:
    refusals = [
        await call(guarded, method, path, body),
        await call(guarded, method, path, body, bearer("wrong-token-marker")),
        await call(guarded, method, path, body, bearer(ALICE[:-1])),  # a prefix
        await call(guarded, method, path, body, bearer(ALICE + "x")),
        await call(guarded, method, path, body, {"authorization": ALICE}),  # no scheme
        await call(guarded, method, path, body, {"authorization": f"Basic {ALICE}"}),
        await call(guarded, method, path, body, {"authorization": "Bearer"}),
    ]
    for refused in refusals:
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"] == "Bearer"
        assert "x-request-id" in refused.headers
        assert "wrong-token-marker" not in refused.text
        error = refused.json()["error"]
        # OpenAI's shape on the OpenAI routes, so SDKs raise AuthenticationError.
        if (
            path.startswith("/v1/")
            and not path.startswith("/v1/chat/providers")
            and path != "/v1/chat"
        ):
            assert error["type"] == "authentication_error"
            assert "bearer token" in error["message"]
        else:  # Ollama's shape
            assert "bearer token" in error
    for token in (ALICE, BOB, ADMIN, f"  {ALICE}"):
        allowed = await call(guarded, method, path, body, bearer(token))
        assert allowed.status_code == ok, allowed.text
    lower_scheme = await call(guarded, method, path, body, {"authorization": f"bearer {BOB}"})
    assert lower_scheme.status_code == ok


async def test_health_is_open_and_says_nothing_secret(guarded: RunningGateway) -> None:
    for path in ("/health", "/health?ready"):
        response = await call(guarded, "GET", path, None)
        assert response.status_code == 200
        assert response.json()["status"] == "ok"
        assert not any(secret in response.text for secret in SECRETS)
    # A wrong token on /health is not an error either.
    assert (await call(guarded, "GET", "/health", None, bearer("nope"))).status_code == 200


async def test_management_routes_need_an_admin_token(
    guarded: RunningGateway, ollama: OllamaEmulator
) -> None:
    copy = {"source": "llama3", "destination": "llama3-copy"}
    assert (await call(guarded, "POST", "/api/copy", copy)).status_code == 401
    wrong = await call(guarded, "POST", "/api/copy", copy, bearer("nope"))
    assert wrong.status_code == 401
    assert wrong.headers["www-authenticate"] == "Bearer"
    client = await call(guarded, "POST", "/api/copy", copy, bearer(ALICE))
    assert client.status_code == 403
    assert "admin token" in client.json()["error"]
    blobs = await call(guarded, "HEAD", "/api/blobs/sha256:abc", None, bearer(BOB))
    assert blobs.status_code == 403
    assert ollama.requests_to("/api/copy") == []
    admin = await call(guarded, "POST", "/api/copy", copy, bearer(ADMIN))
    assert admin.status_code == 200
    assert len(ollama.requests_to("/api/copy")) == 1


async def test_without_admin_tokens_client_tokens_manage(
    start_gateway: StartGateway, ollama: OllamaEmulator
) -> None:
    config = make_config(ollama.url, ollama={"allow_management": True})
    gw = await start_gateway(config, environ={"GATEWAY_TOKENS": f"alice:{ALICE}"})
    copy = {"source": "llama3", "destination": "llama3-copy"}
    assert (await call(gw, "POST", "/api/copy", copy)).status_code == 401
    assert (await call(gw, "POST", "/api/copy", copy, bearer(ALICE))).status_code == 200


async def test_auth_is_off_without_tokens(gateway: RunningGateway) -> None:
    assert gateway.services.auth.enabled is False
    assert (await call(gateway, "POST", "/api/chat", CHAT)).status_code == 200
    assert (await call(gateway, "GET", "/metrics", None, bearer("anything"))).status_code == 200


async def test_the_clients_authorization_is_never_forwarded(
    guarded: RunningGateway, ollama: OllamaEmulator, kimi: OpenAIEmulator
) -> None:
    for method, path, body, ok in PROTECTED:
        assert (await call(guarded, method, path, body, bearer(ALICE))).status_code == ok
    kimi_chat = {**CHAT, "model": "kimi/k2"}
    assert (await call(guarded, "POST", "/v1/chat", kimi_chat, bearer(ALICE))).status_code == 200
    completions = await call(guarded, "POST", "/v1/chat/completions", kimi_chat, bearer(BOB))
    assert completions.status_code == 200
    assert len(ollama.requests) > 10
    for request in ollama.requests:
        # Each upstream gets its own credential only.
        assert request.headers.get("authorization") == f"Bearer {TARGET_TOKEN}"
        assert not any(ALICE in v or BOB in v for v in request.headers.values())
    # Two chats, and `/v1/models` asking Kimi for its model list.
    assert sorted(r.path for r in kimi.requests) == [
        "/chat/completions",
        "/chat/completions",
        "/models",
    ]
    for request in kimi.requests:
        assert request.headers.get("authorization") == f"Bearer {KIMI_KEY}"


def scrape_requests(text: str) -> dict[tuple[str, str, str], float]:
    """`gateway_requests_total` by (client, route, status)."""
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "gateway_requests_total":
                found[(s.labels["client"], s.labels["route"], s.labels["status"])] = s.value
    return found


async def test_metrics_and_access_log_name_the_client(
    guarded: RunningGateway, all_logs: io.StringIO
) -> None:
    for token in (ALICE, ALICE, BOB):
        assert (await call(guarded, "POST", "/api/chat", CHAT, bearer(token))).status_code == 200
    assert (await call(guarded, "POST", "/api/chat", CHAT)).status_code == 401
    assert (await call(guarded, "GET", "/api/tags", None, bearer(ADMIN))).status_code == 200
    await eventually(lambda: all_logs.getvalue().count('"logger":"gateway.access"') == 5)
    metrics = await call(guarded, "GET", "/metrics", None, bearer(BOB))
    counts = scrape_requests(metrics.text)
    assert counts[("alice", "/api/chat", "200")] == 2
    assert counts[("bob", "/api/chat", "200")] == 1
    assert counts[("", "/api/chat", "401")] == 1
    assert counts[("root", "/api/tags", "200")] == 1
    entries = [json.loads(line) for line in all_logs.getvalue().splitlines()]
    # The /metrics call's own record may or may not be written yet: leave it out.
    access = [e for e in entries if e["logger"] == "gateway.access" and e["route"] != "/metrics"]
    # A record is written once its answer is complete, which may be after the client has
    # read it and sent the next request: compare as a set of (name, route, status).
    seen = sorted((e["client_name"] or "", e["route"], e["status"]) for e in access)
    assert seen == [
        ("", "/api/chat", 401),
        ("alice", "/api/chat", 200),
        ("alice", "/api/chat", 200),
        ("bob", "/api/chat", 200),
        ("root", "/api/tags", 200),
    ]
    [refused] = [e for e in access if e["status"] == 401]
    assert refused["error"]  # the refusal says why, in the log


async def test_no_secret_in_logs_health_metrics_or_check_config(
    start_gateway: StartGateway,
    ollama: OllamaEmulator,
    kimi: OpenAIEmulator,
    all_logs: io.StringIO,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text("# clients\ncarol:tok-carol-file-marker\n", encoding="utf-8")
    secrets = (*SECRETS, "tok-carol-file-marker")
    config = make_config(
        ollama.url,
        ollama={"allow_management": True, "embed_model": "nomic-embed-text"},
        providers={"kimi": {"base_url": kimi.url}},
        auth={"tokens_file": str(tokens_file)},
    )
    gw = await start_gateway(config, environ=dict(ENVIRON))
    assert gw.services.warmer is not None
    await eventually(lambda: gw.services.warmer is not None and gw.services.warmer.warmups == 1)
    texts: list[str] = []
    # Every kind of answer: allowed, refused, forbidden, failed upstream, degraded.
    for method, path, body, _ in PROTECTED:
        for token in (ALICE, ADMIN, "tok-carol-file-marker", KIMI_KEY):
            texts.append((await call(gw, method, path, body, bearer(token))).text)
        texts.append((await call(gw, method, path, body)).text)
    copy = {"source": "llama3", "destination": "copy"}
    for token in (ALICE, ADMIN, "tok-carol-file-marker"):
        texts.append((await call(gw, "POST", "/api/copy", copy, bearer(token))).text)
    kimi.faults.status = 401
    texts.append(
        (await call(gw, "POST", "/v1/chat", {**CHAT, "model": "kimi/k2"}, bearer(BOB))).text
    )
    await ollama.set_down(True)
    texts.append((await call(gw, "POST", "/api/chat", CHAT, bearer(ALICE))).text)
    await eventually(lambda: gw.services.inventory.poll_failures > 0)
    texts.append((await call(gw, "GET", "/health", None)).text)
    texts.append((await call(gw, "GET", "/metrics", None, bearer(ADMIN))).text)

    monkeypatch.delenv("GATEWAY_CONFIG", raising=False)
    for name, value in ENVIRON.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("GATEWAY_AUTH_TOKENS_FILE", str(tokens_file))
    assert cli.main(["check-config"]) == 0
    printed = capsys.readouterr()
    assert "# inbound auth: 3 client tokens, 1 admin tokens" in printed.out

    logged = all_logs.getvalue()
    assert '"logger":"gateway.access"' in logged
    assert "serving degraded" in logged
    for secret in secrets:
        assert secret not in logged
        assert secret not in printed.out
        assert secret not in printed.err
        for text in texts:
            assert secret not in text


async def test_tokens_from_a_file_with_comments_and_the_environment(
    start_gateway: StartGateway, ollama: OllamaEmulator, tmp_path: Path, all_logs: io.StringIO
) -> None:
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(
        "# gateway clients, one name:token a line\n"
        "\n"
        "carol:tok-carol-marker\n"
        "  dave : tok-dave-marker  \n"
        "# retired:tok-retired-marker\n"
        "tok-bare-marker\n",
        encoding="utf-8",
    )
    config = make_config(ollama.url, auth={"tokens_file": str(tokens_file)})
    gw = await start_gateway(config, environ={"GATEWAY_TOKENS": f"alice:{ALICE}"})
    assert gw.services.auth.describe() == "4 client tokens, 0 admin tokens"
    for token in ("tok-carol-marker", "tok-dave-marker", "tok-bare-marker", ALICE):
        assert (await call(gw, "GET", "/api/tags", None, bearer(token))).status_code == 200
    for token in ("tok-retired-marker", "# retired:tok-retired-marker", "carol", "-"):
        assert (await call(gw, "GET", "/api/tags", None, bearer(token))).status_code == 401
    await eventually(lambda: all_logs.getvalue().count('"logger":"gateway.access"') == 8)
    entries = [json.loads(line) for line in all_logs.getvalue().splitlines()]
    names = [e["client_name"] for e in entries if e["logger"] == "gateway.access"]
    assert names[:2] == ["carol", "dave"]
    assert names[2].startswith("token-")
    assert names[3] == "alice"
    logged = all_logs.getvalue()
    for marker in ("tok-carol-marker", "tok-dave-marker", "tok-bare-marker", "tok-retired"):
        assert marker not in logged


@pytest.mark.parametrize(
    ("setting", "fragment"),
    [
        ("missing", "No such file or directory"),
        ("directory", "Is a directory"),
    ],
)
def test_an_unreadable_tokens_file_fails_check_config_clearly(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    setting: str,
    fragment: str,
) -> None:
    path = tmp_path / "no-such-tokens" if setting == "missing" else tmp_path
    config = tmp_path / "gateway.toml"
    config.write_text(f'[auth]\ntokens_file = "{path}"\n', encoding="utf-8")
    monkeypatch.delenv("GATEWAY_CONFIG", raising=False)
    monkeypatch.setenv("GATEWAY_TOKENS", f"alice:{ALICE}")
    assert cli.main(["check-config", "--config", str(config)]) == 1
    printed = capsys.readouterr()
    assert printed.out == ""
    assert printed.err.startswith("gateway: configuration error: auth.tokens_file: cannot read")
    assert str(path) in printed.err
    assert fragment in printed.err
    assert ALICE not in printed.err


def test_an_unreadable_admin_tokens_file_from_the_environment_fails_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("GATEWAY_CONFIG", raising=False)
    monkeypatch.setenv("GATEWAY_AUTH_ADMIN_TOKENS_FILE", str(tmp_path / "absent"))
    assert cli.main(["check-config"]) == 1
    err = capsys.readouterr().err
    assert "auth.admin_tokens_file: cannot read" in err
    assert str(tmp_path / "absent") in err


def test_an_empty_token_is_a_configuration_error_that_shows_no_token(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("GATEWAY_CONFIG", raising=False)
    monkeypatch.setenv("GATEWAY_TOKENS", f"alice:{ALICE},bob:")
    assert cli.main(["check-config"]) == 1
    err = capsys.readouterr().err
    assert "GATEWAY_TOKENS" in err
    assert "'bob'" in err
    assert "empty token" in err
    assert ALICE not in err


def test_tokens_are_matched_whole_and_named() -> None:
    auth = Auth.from_config(
        AuthConfig(), {"GATEWAY_TOKENS": "a:same-length-1,b:same-length-2,bare-one"}
    )
    assert auth.check("/api/tags", b"Bearer same-length-1", admin=False) == "a"
    assert auth.check("/api/tags", b"Bearer same-length-2", admin=False) == "b"
    assert auth.check("/api/tags", b"Bearer bare-one", admin=False) == "token-3"
    assert auth.check("/health", None, admin=False) == ""
    for presented in (b"Bearer same-length-3", b"Bearer same-length-", b"Bearer ", b"", None):
        with pytest.raises(Unauthorized, match="bearer token"):
            auth.check("/api/tags", presented, admin=False)
