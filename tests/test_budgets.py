"""Daily cloud caps per client and provider: the policy alone, the day boundary on the
autojump clock, and the 429 through the gateway's router and OpenAI front door."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from gateway.config import ClientConfig, from_mapping
from gateway.errors import BudgetExceeded
from gateway.record import RequestRecord
from gateway.usage.budgets import Budgets, Used, reached
from tests.conftest import RunningGateway, StartGateway, eventually, make_config, stop_gateway
from tests.emulators import OllamaEmulator, OpenAIEmulator

MIDNIGHT = 1_796_256_000.0  # 2026-12-03T00:00:00Z
assert MIDNIGHT % 86400 == 0
ALICE, BOB = "tok-alice-budget", "tok-bob-budget"
KEYS = {"OPENROUTER_API_KEY": "sk-openrouter-budget", "GATEWAY_TOKENS": f"alice:{ALICE},bob:{BOB}"}
CLOUD = "openrouter/openai/gpt-4o-mini"


def chat(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# ---------------------------------------------------------------------- the policy


def test_reached_names_the_cap_that_is_reached() -> None:
    both = ClientConfig(cloud_requests_per_day=3, cloud_tokens_per_day=100)
    assert reached(both, Used(requests=2, tokens=99)) is None
    cap = reached(both, Used(requests=3, tokens=0))
    assert cap is not None
    assert (cap.kind, cap.limit, cap.used) == ("requests", 3, 3)
    cap = reached(both, Used(requests=0, tokens=150))
    assert cap is not None
    assert (cap.kind, cap.limit, cap.used) == ("tokens", 100, 150)
    assert reached(ClientConfig(), Used(requests=10**9, tokens=10**9)) is None  # 0: no cap


def budgets_for(clock: Any, **alice: int) -> Budgets:
    config = from_mapping({"clients": {"alice": alice, "bob": {}}})
    return Budgets(config, clock=clock)


def record(who: str, provider: str, tokens_in: int, tokens_out: int) -> RequestRecord:
    rec = RequestRecord("id", "POST", "/v1/chat", "10.0.0.9:5000", 0.0, client_name=who)
    rec.provider, rec.tokens_in, rec.tokens_out = provider, tokens_in, tokens_out
    return rec


async def test_request_cap_refuses_until_utc_midnight_then_resets(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Counted per provider; the refusal says which cap and when it resets, and its
    Retry-After runs to 00:00 UTC; past it the day starts afresh."""
    start = MIDNIGHT - 100.0
    budgets = budgets_for(lambda: start + trio.current_time(), cloud_requests_per_day=2)
    budgets.admit("alice", "openrouter")
    budgets.admit("alice", "openrouter")
    budgets.admit("alice", "kimi")  # another provider, another count
    budgets.admit("alice", "ollama")  # the local host is never capped here
    budgets.admit("bob", "openrouter")  # no cap for bob
    with pytest.raises(BudgetExceeded) as refused:
        budgets.admit("alice", "openrouter")
    error = refused.value
    assert error.status == 429
    assert error.headers() == {"Retry-After": "100"}
    assert error.message == (
        "daily cap reached: client 'alice' has used 2 of its 2 cloud requests per day on"
        " provider 'openrouter'; the cap resets at 00:00 UTC (2026-12-03T00:00:00Z, in 0h02m)"
    )
    await trio.sleep(99.0)
    with pytest.raises(BudgetExceeded):
        budgets.admit("alice", "openrouter")
    await trio.sleep(1.0)  # 00:00:00 UTC
    budgets.admit("alice", "openrouter")
    assert budgets.used("alice", "openrouter") == Used(requests=1, tokens=0)


async def test_token_cap_counts_finished_answers(autojump_clock: trio.abc.Clock) -> None:
    budgets = budgets_for(lambda: MIDNIGHT + 3600 + trio.current_time(), cloud_tokens_per_day=100)
    budgets.admit("alice", "openrouter")
    budgets.note(record("alice", "openrouter", 60, 30))
    budgets.note(record("alice", "ollama", 500, 500))  # local tokens are not cloud use
    budgets.admit("alice", "openrouter")  # 90 < 100
    budgets.note(record("alice", "openrouter", 5, 10))
    with pytest.raises(BudgetExceeded, match="used 105 of its 100 cloud tokens per day"):
        budgets.admit("alice", "openrouter")
    await trio.sleep(23 * 3600.0)
    budgets.admit("alice", "openrouter")


def test_load_starts_the_day_from_the_ledger_and_ignores_another_day() -> None:
    now = MIDNIGHT + 50.0
    budgets = budgets_for(lambda: now, cloud_requests_per_day=3)
    budgets.load({("alice", "openrouter"): (3, 40), ("carol", "openrouter"): (9, 9)}, MIDNIGHT)
    with pytest.raises(BudgetExceeded):
        budgets.admit("alice", "openrouter")
    stale = budgets_for(lambda: now, cloud_requests_per_day=3)
    stale.load({("alice", "openrouter"): (3, 40)}, MIDNIGHT - 86400)
    stale.admit("alice", "openrouter")


# -------------------------------------------------------------- through the gateway


class WallClock:
    """A settable wall clock for the gateway's ledger and budgets."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def capped_gateway(
    start_gateway: StartGateway,
    ollama: OllamaEmulator,
    openrouter: OpenAIEmulator,
    clock: WallClock,
    usage_path: Path | None = None,
    **alice: int,
) -> RunningGateway:
    config = make_config(
        ollama.url,
        providers={"openrouter": {"base_url": f"{openrouter.url}/api/v1"}},
        clients={"alice": alice},
        usage={"path": str(usage_path) if usage_path else ""},
    )
    return await start_gateway(config, environ=dict(KEYS), clock=clock)


@pytest.fixture
async def openrouter(nursery: trio.Nursery) -> OpenAIEmulator:
    emulator = OpenAIEmulator(api_key="sk-openrouter-budget")
    await nursery.start(emulator.run)
    return emulator


async def test_the_cap_answers_429_in_each_routes_shape_and_resets_at_midnight(
    start_gateway: StartGateway, ollama: OllamaEmulator, openrouter: OpenAIEmulator
) -> None:
    clock = WallClock(MIDNIGHT - 3600.0)
    gw = await capped_gateway(start_gateway, ollama, openrouter, clock, cloud_requests_per_day=2)
    client = gw.client
    assert (await client.post("/v1/chat", json=chat(CLOUD), headers=bearer(ALICE))).is_success
    completions = await client.post("/v1/chat/completions", json=chat(CLOUD), headers=bearer(ALICE))
    assert completions.is_success
    sent_upstream = len(openrouter.requests)

    refused = await client.post("/v1/chat", json=chat(CLOUD), headers=bearer(ALICE))
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "3600"
    message = refused.json()["error"]
    assert "client 'alice' has used 2 of its 2 cloud requests per day" in message
    assert "provider 'openrouter'" in message
    assert "resets at 00:00 UTC" in message

    openai_refused = await client.post(
        "/v1/chat/completions", json=chat(CLOUD), headers=bearer(ALICE)
    )
    assert openai_refused.status_code == 429
    assert openai_refused.headers["retry-after"] == "3600"
    error = openai_refused.json()["error"]
    assert error["type"] == "rate_limit_error"
    assert "resets at 00:00 UTC" in error["message"]
    assert len(openrouter.requests) == sent_upstream  # refused before any upstream call

    # Others, and alice's local model, are not held back.
    assert (await client.post("/v1/chat", json=chat(CLOUD), headers=bearer(BOB))).is_success
    local = await client.post("/v1/chat", json=chat("llama3"), headers=bearer(ALICE))
    assert local.is_success

    clock.now = MIDNIGHT + 1.0
    again = await client.post("/v1/chat", json=chat(CLOUD), headers=bearer(ALICE))
    assert again.status_code == 200, again.text


async def test_a_token_cap_stops_the_requests_after_the_one_that_crossed_it(
    start_gateway: StartGateway, ollama: OllamaEmulator, openrouter: OpenAIEmulator
) -> None:
    clock = WallClock(MIDNIGHT + 600.0)
    gw = await capped_gateway(start_gateway, ollama, openrouter, clock, cloud_tokens_per_day=5)
    first = await gw.client.post("/v1/chat", json=chat(CLOUD), headers=bearer(ALICE))
    assert first.is_success
    used = first.json()["input_tokens"] + first.json()["output_tokens"]
    assert used >= 5
    refused = await gw.client.post("/v1/chat", json=chat(CLOUD), headers=bearer(ALICE))
    assert refused.status_code == 429
    assert f"used {used} of its 5 cloud tokens per day" in refused.json()["error"]


async def test_a_restart_does_not_reset_the_day(
    start_gateway: StartGateway,
    ollama: OllamaEmulator,
    openrouter: OpenAIEmulator,
    tmp_path: Path,
) -> None:
    clock = WallClock(MIDNIGHT + 7200.0)
    path = tmp_path / "usage.db"
    gw = await capped_gateway(
        start_gateway, ollama, openrouter, clock, path, cloud_requests_per_day=2
    )
    for _ in range(2):
        assert (
            await gw.client.post("/v1/chat", json=chat(CLOUD), headers=bearer(ALICE))
        ).is_success
    await stop_gateway(gw)

    again = await capped_gateway(
        start_gateway, ollama, openrouter, clock, path, cloud_requests_per_day=2
    )
    refused = await again.client.post("/v1/chat", json=chat(CLOUD), headers=bearer(ALICE))
    assert refused.status_code == 429
    # The next day, from the same ledger, starts afresh.
    await eventually(lambda: again.services.ledger.written >= 1)
    await stop_gateway(again)
    clock.now = MIDNIGHT + 86400.0 + 5.0
    next_day = await capped_gateway(
        start_gateway, ollama, openrouter, clock, path, cloud_requests_per_day=2
    )
    assert (
        await next_day.client.post("/v1/chat", json=chat(CLOUD), headers=bearer(ALICE))
    ).is_success


async def test_the_cap_holds_on_the_anthropic_route_in_its_own_shape(
    start_gateway: StartGateway, ollama: OllamaEmulator, nursery: trio.Nursery
) -> None:
    openrouter = OpenAIEmulator(api_key="sk-openrouter-budget", serves_messages=True)
    await nursery.start(openrouter.run)
    clock = WallClock(MIDNIGHT + 60.0)
    gw = await capped_gateway(start_gateway, ollama, openrouter, clock, cloud_requests_per_day=1)
    body = {**chat(CLOUD), "max_tokens": 16}
    first = await gw.client.post("/v1/messages", json=body, headers=bearer(ALICE))
    assert first.status_code == 200, first.text
    sent_upstream = len(openrouter.requests)
    refused = await gw.client.post("/v1/messages", json=body, headers=bearer(ALICE))
    assert refused.status_code == 429
    assert refused.json()["type"] == "error"
    assert "resets at 00:00 UTC" in refused.json()["error"]["message"]
    assert len(openrouter.requests) == sent_upstream
