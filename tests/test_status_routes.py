"""`GET /status`, `/status.json` and the login form through the whole gateway: what the
page shows live (holder, queue, usage, providers), who may see it, and what it never
shows (tokens, keys, other clients' names when hidden)."""

from __future__ import annotations

import io
import json
import re
import ssl
from pathlib import Path
from typing import Any

import httpx
import trio
import trustme

from gateway.gate import Ask
from gateway.status.routes import COOKIE
from gateway.status.snapshot import QUEUE_SHOWN
from tests.conftest import RunningGateway, StartGateway, eventually, make_config
from tests.emulators import OllamaEmulator, OpenAIEmulator
from tests.emulators.http import Faults

ALICE = "tok-alice-status"
BOB = "tok-bob-status"
ADMIN = "tok-root-status"
TARGET_TOKEN = "target-token-status"
KIMI_KEY = "sk-kimi-status-marker"
TOKENS = {"GATEWAY_TOKENS": f"alice:{ALICE},bob:{BOB}", "GATEWAY_ADMIN_TOKENS": f"root:{ADMIN}"}
SECRETS = (ALICE, BOB, ADMIN, TARGET_TOKEN, KIMI_KEY)


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def chat(text: str, *, stream: bool = False) -> dict[str, Any]:
    return {"model": "llama3", "messages": [{"role": "user", "content": text}], "stream": stream}


async def status_of(gw: RunningGateway, token: str | None = None) -> dict[str, Any]:
    response = await gw.client.get("/status.json", headers=bearer(token) if token else {})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_page_is_one_self_contained_html_answer(gateway: RunningGateway) -> None:
    response = await gateway.client.get("/status")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.headers["cache-control"] == "no-store"
    page = response.text
    # Script and style inline, nothing fetched from elsewhere (a LAN without internet).
    assert "<script>" in page
    assert 'fetch("/status.json"' in page
    assert "<style>" in page
    assert 'name="viewport"' in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    # The policy allows exactly the inline script and style, and connects only home.
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp
    assert "connect-src 'self'" in csp
    assert csp.count("'sha256-") == 2
    assert "unsafe-inline" not in csp


async def test_poll_endpoint_answers_fresh_json_every_time(gateway: RunningGateway) -> None:
    await gateway.services.inventory.refresh()
    response = await gateway.client.get("/status.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert set(body) == {
        "generated_at",
        "viewer",
        "names_hidden",
        "draining",
        "hosts",
        "providers",
        "usage",
        "history",
    }
    (host,) = body["hosts"]
    assert host["status"] == "up"
    assert host["since"] is not None
    assert "llama3:latest" in host["installed"]
    assert host["generations"] == []
    assert host["queue"] == []
    # Providers without a key: not registered, and the variable that is missing is named.
    providers = {p["name"]: p for p in body["providers"]}
    assert set(providers) == {"ollama_cloud", "openrouter", "opencode", "kimi"}
    assert not providers["kimi"]["registered"]
    assert "KIMI_API_KEY" in providers["kimi"]["missing"]
    assert body["usage"] == {**body["usage"], "enabled": False}
    assert body["history"][0]["name"] == host["name"]


async def test_page_shows_the_holder_the_queue_and_usage_live(
    start_gateway: StartGateway, ollama: OllamaEmulator, tmp_path: Path
) -> None:
    gw = await start_gateway(
        make_config(ollama.url, usage={"path": str(tmp_path / "usage.db")}), environ=TOKENS
    )
    ollama.hold = trio.Event()
    first_line = trio.Event()
    finished: list[int] = []

    async def stream(token: str, text: str, seen: trio.Event | None) -> None:
        async with gw.client.stream(
            "POST", "/api/chat", json=chat(text, stream=True), headers=bearer(token)
        ) as response:
            async for _ in response.aiter_lines():
                if seen is not None:
                    seen.set()
        finished.append(response.status_code)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream, ALICE, "long story", first_line)
        with trio.fail_after(5):
            await first_line.wait()
        nursery.start_soon(stream, BOB, "next please", None)
        await eventually(lambda: gw.services.gate.queued == 1)
        body = await status_of(gw, ADMIN)
        (host,) = body["hosts"]
        (holder,) = host["generations"]
        assert holder["client"] == "alice"
        assert holder["model"] == "llama3:latest"
        assert holder["tokens"] >= 1
        assert holder["elapsed_s"] >= 0
        (waiting,) = host["queue"]
        assert waiting["client"] == "bob"
        assert waiting["priority"] == "normal"
        assert waiting["starts_in_s"] >= 0
        assert body["usage"]["clients_today"] == []
        ollama.hold.set()
    assert finished == [200, 200]
    await eventually(lambda: gw.services.ledger.written >= 2)
    body = await status_of(gw, ADMIN)
    assert body["hosts"][0]["generations"] == []
    assert body["hosts"][0]["queue"] == []
    today = {row["name"]: row for row in body["usage"]["clients_today"]}
    assert today["alice"]["requests"] == 1
    assert today["bob"]["requests"] == 1
    assert today["alice"]["output_tokens"] > 0
    assert today["alice"]["gpu_s"] > 0
    assert sum(body["usage"]["tokens_per_day"]["alice"]) > 0
    assert [m["name"] for m in body["usage"]["models_week"]] == ["llama3"]
    # The page's own polls are not usage.
    assert gw.services.ledger.written == 2


async def test_browser_without_token_gets_the_login_form(
    start_gateway: StartGateway, ollama: OllamaEmulator
) -> None:
    gw = await start_gateway(make_config(ollama.url), environ=TOKENS)
    page = await gw.client.get("/status")
    assert page.status_code == 401
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert 'action="/status/login"' in page.text
    assert 'type="password"' in page.text
    polled = await gw.client.get("/status.json")
    assert polled.status_code == 401
    assert polled.json() == {
        "error": "a valid bearer token or the status page's login cookie is required"
    }
    wrong = await gw.client.get("/status", headers=bearer("nope"))
    assert wrong.status_code == 401
    assert "That token is not valid." in wrong.text
    assert (await gw.client.get("/status.json", headers=bearer("nope"))).status_code == 401
    # /health stays open; a bearer token opens the page and its data.
    assert (await gw.client.get("/health")).status_code == 200
    assert (await gw.client.get("/status", headers=bearer(BOB))).status_code == 200
    assert (await status_of(gw, BOB))["viewer"] == "bob"


async def test_login_sets_a_strict_cookie_and_logout_clears_it(
    start_gateway: StartGateway, ollama: OllamaEmulator, all_logs: io.StringIO
) -> None:
    gw = await start_gateway(make_config(ollama.url), environ=TOKENS)
    async with httpx.AsyncClient(base_url=gw.url, trust_env=False) as browser:
        bad = await browser.post("/status/login", data={"token": "guess"})
        assert bad.status_code == 401
        assert "That token is not valid." in bad.text
        assert COOKIE not in browser.cookies
        refused = [json.loads(line) for line in all_logs.getvalue().splitlines()]
        assert any("a login with a token that is not valid" in r["msg"] for r in refused)
        assert "guess" not in all_logs.getvalue()

        good = await browser.post("/status/login", data={"token": ALICE})
        assert good.status_code == 303
        assert good.headers["location"] == "/status"
        cookie = good.headers["set-cookie"]
        assert cookie.startswith(f"{COOKIE}=")
        assert "HttpOnly" in cookie
        assert "SameSite=Strict" in cookie
        assert "Path=/" in cookie
        assert "Secure" not in cookie  # plain HTTP: a Secure cookie would never come back
        assert ALICE not in cookie  # encoded, not in the clear in a header log

        assert (await browser.get("/status")).status_code == 200
        polled = await browser.get("/status.json")
        assert polled.status_code == 200
        assert polled.json()["viewer"] == "alice"

        out = await browser.post("/status/logout")
        assert out.status_code == 303
        assert COOKIE not in browser.cookies
        assert (await browser.get("/status.json")).status_code == 401
        assert (await browser.get("/status")).status_code == 401

        # A cookie whose token is no longer configured (or forged) opens nothing.
        browser.cookies.set(COOKIE, "Zm9yZ2Vk")
        assert (await browser.get("/status.json")).status_code == 401


async def test_hidden_names_are_stable_labels_except_ones_own(
    start_gateway: StartGateway, ollama: OllamaEmulator, tmp_path: Path
) -> None:
    gw = await start_gateway(
        make_config(
            ollama.url,
            usage={"path": str(tmp_path / "usage.db")},
            status={"show_client_names": False},
        ),
        environ=TOKENS,
    )
    for token in (ALICE, BOB):
        response = await gw.client.post("/api/chat", json=chat("hi"), headers=bearer(token))
        assert response.status_code == 200
    await eventually(lambda: gw.services.ledger.written >= 2)

    seen_by_alice = await status_of(gw, ALICE)
    names = {row["name"] for row in seen_by_alice["usage"]["clients_today"]}
    assert "alice" in names
    assert "bob" not in names
    (label,) = names - {"alice"}
    assert re.fullmatch(r"client-[0-9a-f]{6}", label)
    assert set(seen_by_alice["usage"]["tokens_per_day"]) == {"alice", label}
    assert seen_by_alice["names_hidden"] is True
    assert "bob" not in json.dumps(seen_by_alice)
    # Stable: the same label on the next poll, and for another viewer.
    again = await status_of(gw, ALICE)
    assert {row["name"] for row in again["usage"]["clients_today"]} == names
    seen_by_bob = await status_of(gw, BOB)
    names_bob = {row["name"] for row in seen_by_bob["usage"]["clients_today"]}
    assert "bob" in names_bob
    assert len(names_bob) == 2
    assert label not in names_bob
    assert "alice" not in json.dumps(seen_by_bob)
    # An admin token sees every name.
    admin = await status_of(gw, ADMIN)
    assert {row["name"] for row in admin["usage"]["clients_today"]} == {"alice", "bob"}
    assert admin["names_hidden"] is False


async def test_cloud_figures_and_secrets_never_on_the_page(
    start_gateway: StartGateway, ollama: OllamaEmulator, nursery: trio.Nursery
) -> None:
    openai_emu = OpenAIEmulator(api_key=KIMI_KEY, models=("kimi-for-coding",))
    await nursery.start(openai_emu.run)
    config = make_config(
        ollama.url, providers={"kimi": {"base_url": f"{openai_emu.url}/coding/v1"}}
    )
    environ = {**TOKENS, "GATEWAY_OLLAMA_TOKEN": TARGET_TOKEN, "KIMI_API_KEY": KIMI_KEY}
    gw = await start_gateway(config, environ=environ)
    kimi_chat = {"model": "kimi/kimi-for-coding", "messages": [{"role": "user", "content": "x"}]}
    ok = await gw.client.post("/v1/chat/completions", json=kimi_chat, headers=bearer(ALICE))
    assert ok.status_code == 200, ok.text
    # The provider echoes its key in an error: the page shows the error, never the key.
    openai_emu.faults = Faults(status=500, status_body=f"bad key {KIMI_KEY}".encode())
    failed = await gw.client.post("/v1/chat", json=kimi_chat, headers=bearer(ALICE))
    assert failed.status_code == 502
    openai_emu.faults = Faults()

    body = await status_of(gw, ADMIN)
    kimi = {p["name"]: p for p in body["providers"]}["kimi"]
    assert kimi["registered"]
    assert kimi["base_url"] == f"{openai_emu.url}/coding/v1"
    assert kimi["requests_1h"] == 2
    assert kimi["errors_1h"] == 1
    assert "***" in kimi["last_error"]
    assert kimi["last_error_ago_s"] >= 0
    for path in ("/status", "/status.json"):
        text = (await gw.client.get(path, headers=bearer(ADMIN))).text
        for secret in SECRETS:
            assert secret not in text, (path, secret)


async def test_a_degraded_host_says_why_and_since_when(
    start_gateway: StartGateway, ollama: OllamaEmulator
) -> None:
    gw = await start_gateway(make_config(ollama.url))
    await gw.services.inventory.refresh()
    up = (await status_of(gw))["hosts"][0]
    assert up["status"] == "up"
    assert up["why"] is None
    await ollama.set_down(True)
    await gw.services.inventory.refresh()
    # The sampler notes the change at its next sample (once a second).
    await eventually(
        lambda: gw.services.status.history.since("default") != up["since"], timeout_s=3
    )
    down = (await status_of(gw))["hosts"][0]
    assert down["status"] == "degraded"
    assert ollama.url.split("//")[1] in down["why"]
    assert down["since"] >= up["since"]
    assert "llama3:latest" in down["installed"]  # the last inventory is kept


async def test_an_open_page_does_not_hold_the_shutdown(
    start_gateway: StartGateway, ollama: OllamaEmulator
) -> None:
    """A page polls on a keep-alive connection; nothing long-lived stays open, so the
    gateway stops at once rather than after its grace period (2 s here)."""
    gw = await start_gateway(make_config(ollama.url))
    for _ in range(3):
        assert (await gw.client.get("/status.json")).status_code == 200
    gw.stop.set()
    with trio.fail_after(1.0):
        await gw.stopped.wait()


async def test_the_login_cookie_is_secure_under_tls(
    start_gateway: StartGateway, ollama: OllamaEmulator, tmp_path: Path
) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    gw = await start_gateway(
        make_config(ollama.url, tls={"certfile": str(certfile), "keyfile": str(keyfile)}),
        environ=TOKENS,
    )
    context = ssl.create_default_context()
    ca.configure_trust(context)
    async with httpx.AsyncClient(base_url=gw.url, verify=context) as browser:
        with trio.fail_after(10):
            good = await browser.post("/status/login", data={"token": BOB})
            assert good.status_code == 303
            assert "Secure" in good.headers["set-cookie"]
            polled = await browser.get("/status.json")
    assert polled.json()["viewer"] == "bob"


async def test_a_long_queue_is_counted_whole_and_listed_in_part(gateway: RunningGateway) -> None:
    gate = gateway.services.gate
    release = trio.Event()

    async def hold(n: int) -> None:
        async with gate.hold(Ask(f"c{n}", "llama3:latest")):
            await release.wait()

    async with trio.open_nursery() as nursery:
        for n in range(QUEUE_SHOWN + 6):  # one holder, the rest queued
            nursery.start_soon(hold, n)
        await eventually(lambda: gate.queued == QUEUE_SHOWN + 5)
        (host,) = (await status_of(gateway))["hosts"]
        assert host["queued"] == QUEUE_SHOWN + 5
        assert len(host["queue"]) == QUEUE_SHOWN
        # The first to arrive, in arrival order.
        arrived = [w.ask.client for w in gate.figures().waiters]
        assert [w["client"] for w in host["queue"]] == arrived[:QUEUE_SHOWN]
        release.set()


async def test_hidden_names_without_auth_hide_every_name(
    start_gateway: StartGateway, ollama: OllamaEmulator, tmp_path: Path
) -> None:
    """With auth off nobody has a name of their own: every client (an address) is a label."""
    gw = await start_gateway(
        make_config(
            ollama.url,
            usage={"path": str(tmp_path / "usage.db")},
            status={"show_client_names": False},
        )
    )
    assert (await gw.client.post("/api/chat", json=chat("hi"))).status_code == 200
    await eventually(lambda: gw.services.ledger.written >= 1)
    body = await status_of(gw)
    assert body["viewer"] == ""
    (row,) = body["usage"]["clients_today"]
    assert re.fullmatch(r"client-[0-9a-f]{6}", row["name"])
    assert "127.0.0.1" not in json.dumps(body["usage"])


async def test_every_gpu_host_is_on_the_page_with_its_own_holder(
    start_gateway: StartGateway, nursery: trio.Nursery
) -> None:
    """Several hosts (ADR 0020): one card each, in configuration order, each with the
    generation it runs; the request placed on a host shows there and nowhere else."""
    hosts = {}
    for name, model in (("mac", "llama3:latest"), ("tower", "qwen2.5:7b")):
        emulator = OllamaEmulator(["llama3:latest", "qwen2.5:7b"])
        emulator.loaded[model] = None  # resident before the first poll
        emulator.hold = trio.Event()
        await nursery.start(emulator.run)
        hosts[name] = emulator
    config = make_config(
        hosts["mac"].url, ollama={"hosts": {n: {"url": e.url} for n, e in hosts.items()}}
    )
    gw = await start_gateway(config, environ=TOKENS)

    async def generate(token: str, model: str) -> None:
        body = {**chat("hello"), "model": model}
        response = await gw.client.post("/api/chat", json=body, headers=bearer(token))
        assert response.status_code == 200

    async with trio.open_nursery() as clients:
        clients.start_soon(generate, ALICE, "llama3")
        clients.start_soon(generate, BOB, "qwen2.5:7b")
        with trio.fail_after(5):
            await eventually(lambda: all(e.active_generations == 1 for e in hosts.values()))
        body = await status_of(gw, ADMIN)
        assert [h["name"] for h in body["hosts"]] == ["mac", "tower"]
        by_name = {h["name"]: h for h in body["hosts"]}
        assert [g["client"] for g in by_name["mac"]["generations"]] == ["alice"]
        assert [g["client"] for g in by_name["tower"]["generations"]] == ["bob"]
        assert by_name["mac"]["url"] == hosts["mac"].url
        assert all(h["status"] == "up" for h in body["hosts"])
        for emulator in hosts.values():
            emulator.hold.set()
