"""The status page's pure builders: the gate's holders and queue as the page shows them
(tokens so far from the live record), the week's usage from ledger rows, hidden names."""

from __future__ import annotations

import re
from typing import Any

import trio

from gateway.gate import Ask, ChatGate
from gateway.record import RequestRecord
from gateway.status.snapshot import (
    Generation,
    HostView,
    Status,
    UsageRow,
    UsageView,
    Waiting,
    anonymize,
    anonymous_label,
    gate_lists,
    usage_range,
    usage_view,
)

DAY = 86400.0
NOW = 1_796_300_000.0  # 2026-12-03T10:13:20Z
TODAY, YESTERDAY = "2026-12-03", "2026-12-02"


def record(client: str) -> RequestRecord:
    return RequestRecord("id", "POST", "/api/chat", f"{client}:1", trio.current_time(), client)


async def test_holder_shows_its_live_token_count_and_rate(autojump_clock: trio.abc.Clock) -> None:
    gate = ChatGate(1)
    alice, bob = record("alice"), record("bob")
    holding, release = trio.Event(), trio.Event()

    async def hold(rec: RequestRecord, ready: trio.Event | None) -> None:
        async with gate.serve(rec, "llama3"):
            if ready is not None:
                ready.set()
            await release.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold, alice, holding)
        await holding.wait()
        alice.response_started = trio.current_time()
        await trio.sleep(2.0)
        nursery.start_soon(hold, bob, None)
        await trio.sleep(0.5)
        alice.frames_out = 50  # what the relay counts, line by line
        generations, queue = gate_lists(gate.figures(), trio.current_time())
        (held,) = generations
        assert (held.client, held.model, held.priority) == ("alice", "llama3:latest", "normal")
        assert held.elapsed_s == 2.5
        assert held.tokens == 50
        assert held.tokens_per_s == 20.0
        (waiting,) = queue
        assert (waiting.client, waiting.waited_s) == ("bob", 0.5)
        release.set()
    generations, queue = gate_lists(gate.figures(), trio.current_time())
    assert (generations, queue) == ([], [])


async def test_a_holder_without_a_record_shows_no_tokens(autojump_clock: trio.abc.Clock) -> None:
    gate = ChatGate(1)
    async with gate.hold(Ask("carol", "m")):
        await trio.sleep(1.0)
        (held,) = gate_lists(gate.figures(), trio.current_time())[0]
    assert (held.client, held.tokens, held.tokens_per_s, held.elapsed_s) == ("carol", 0, None, 1.0)


def row(day: str, provider: str, tokens_in: int, tokens_out: int, **keys: Any) -> dict[str, Any]:
    return {
        **keys,
        "provider": provider,
        "day": day,
        "requests": 1,
        "errors": 0,
        "input_tokens": tokens_in,
        "output_tokens": tokens_out,
        "gpu_s": 2.5 if provider == "ollama" else 0.0,
        "queue_s": 0.0,
    }


def test_the_week_starts_six_days_before_today() -> None:
    start, days = usage_range(NOW)
    assert days == [f"2026-11-{d}" for d in range(27, 31)] + ["2026-12-01", YESTERDAY, TODAY]
    assert start == NOW - NOW % DAY - 6 * DAY


def test_usage_per_client_today_week_cloud_and_per_day() -> None:
    by_client = [
        row(YESTERDAY, "ollama", 10, 90, client="alice"),
        row(TODAY, "ollama", 5, 45, client="alice"),
        row(TODAY, "kimi", 100, 200, client="alice"),
        row(TODAY, "ollama", 1, 1, client="bob"),
    ]
    by_model = [
        row(YESTERDAY, "ollama", 10, 90, model="llama3"),
        row(TODAY, "ollama", 6, 46, model="llama3"),
        row(TODAY, "kimi", 100, 200, model="kimi/k2"),
    ]
    view = usage_view(by_client, by_model, NOW)
    today = {r.name: r for r in view.clients_today}
    week = {r.name: r for r in view.clients_week}
    assert [r.name for r in view.clients_today] == ["alice", "bob"]  # most tokens first
    assert (today["alice"].requests, today["alice"].input_tokens) == (2, 105)
    assert today["alice"].cloud_tokens == {"kimi": 300}
    assert today["alice"].gpu_s == 2.5
    assert (week["alice"].requests, week["alice"].output_tokens, week["alice"].gpu_s) == (
        3,
        335,
        5.0,
    )
    assert view.tokens_per_day["alice"] == [0, 0, 0, 0, 0, 100, 350]
    assert view.tokens_per_day["bob"] == [0, 0, 0, 0, 0, 0, 2]
    assert [r.name for r in view.models_today] == ["kimi/k2", "llama3"]
    assert {r.name: r.requests for r in view.models_week} == {"kimi/k2": 1, "llama3": 2}
    assert view.days[-1] == TODAY


def status_with(clients: list[str]) -> Status:
    host = HostView(
        name="local",
        url="http://gpu:11434",
        status="up",
        generations=[
            Generation(
                client=clients[0],
                model="m",
                priority="normal",
                elapsed_s=1.0,
                tokens=3,
                tokens_per_s=None,
                loads=False,
            )
        ],
        queue=[
            Waiting(client=c, model="m", priority="batch", waited_s=1.0, starts_in_s=2.0)
            for c in clients[1:]
        ],
    )
    usage = UsageView(
        enabled=True,
        clients_today=[UsageRow(name=c) for c in clients],
        clients_week=[UsageRow(name=c) for c in clients],
        models_today=[UsageRow(name="m")],
        tokens_per_day={c: [1] * 7 for c in clients},
    )
    return Status(
        generated_at="t",
        viewer="alice",
        names_hidden=False,
        draining=False,
        hosts=[host],
        providers=[],
        usage=usage,
        history=[],
    )


def test_anonymize_keeps_ones_own_name_and_labels_the_others_stably() -> None:
    key = b"k" * 16
    hidden = anonymize(status_with(["bob", "alice", "carol"]), key, ["alice"])
    host = hidden.hosts[0]
    bob, carol = anonymous_label(key, "bob"), anonymous_label(key, "carol")
    assert re.fullmatch(r"client-[0-9a-f]{6}", bob)
    assert bob != carol
    assert host.generations[0].client == bob
    assert [w.client for w in host.queue] == ["alice", carol]
    assert [r.name for r in hidden.usage.clients_today] == [bob, "alice", carol]
    assert [r.name for r in hidden.usage.clients_week] == [bob, "alice", carol]
    assert set(hidden.usage.tokens_per_day) == {bob, "alice", carol}
    assert [r.name for r in hidden.usage.models_today] == ["m"]  # models are not names
    assert hidden.names_hidden
    # The same name gets the same label every time; another run's key, another label.
    assert anonymize(status_with(["bob", "alice"]), key, []).hosts[0].generations[0].client == bob
    assert anonymous_label(b"x" * 16, "bob") != bob
