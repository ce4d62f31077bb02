"""The usage ledger through the whole gateway: one row per finished request, kept across
restarts, reported by `GET /v1/usage`, and never the cause of a failed request."""

from __future__ import annotations

import io
import json
import sqlite3
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import trio

from gateway.usage import store
from tests.conftest import RunningGateway, StartGateway, eventually, make_config, stop_gateway
from tests.emulators import OllamaEmulator

ALICE, BOB = "tok-alice-ledger", "tok-bob-ledger"
TOKENS = {"GATEWAY_TOKENS": f"alice:{ALICE},bob:{BOB}"}
CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}], "stream": False}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def rows(path: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(path) as conn:
        conn.row_factory = sqlite3.Row
        found = [dict(row) for row in conn.execute("SELECT * FROM requests ORDER BY id")]
    conn.close()
    return found


async def ledgered(
    start_gateway: StartGateway, ollama: OllamaEmulator, path: Path, **usage: Any
) -> RunningGateway:
    config = make_config(
        ollama.url,
        usage={"path": str(path), **usage},
        clients={"alice": {}},
    )
    return await start_gateway(config, environ=dict(TOKENS))


async def test_each_finished_request_is_one_row_with_its_figures(
    start_gateway: StartGateway, ollama: OllamaEmulator, tmp_path: Path
) -> None:
    path = tmp_path / "usage.db"
    gw = await ledgered(start_gateway, ollama, path)
    answer = await gw.client.post("/api/chat", json=CHAT, headers=bearer(ALICE))
    assert answer.status_code == 200
    missing = await gw.client.post("/api/chat", json={**CHAT, "model": "nope"}, headers=bearer(BOB))
    assert missing.status_code == 404
    await gw.client.get("/health")  # probes are not usage
    await eventually(lambda: gw.services.ledger.written >= 2)
    first, second = rows(path)
    frame = answer.json()
    assert first["client"] == "alice"
    assert first["route"] == "/api/chat"
    assert (first["provider"], first["host"], first["model"]) == ("ollama", ollama.url, "llama3")
    assert first["status"] == 200
    assert first["tokens_in"] == frame["prompt_eval_count"] > 0
    assert first["tokens_out"] == frame["eval_count"] > 0
    assert first["gpu_s"] > 0
    assert first["queue_s"] >= 0
    assert first["latency_s"] >= first["gpu_s"]
    assert (second["client"], second["status"], second["model"]) == ("bob", 404, "nope")
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


async def test_a_restart_keeps_the_records(
    start_gateway: StartGateway, ollama: OllamaEmulator, tmp_path: Path
) -> None:
    """Records written before a shutdown are read back by the next gateway; the ones
    still buffered at the signal are written by the shutdown itself."""
    path = tmp_path / "usage.db"
    gw = await ledgered(start_gateway, ollama, path)
    for _ in range(5):
        assert (await gw.client.post("/api/chat", json=CHAT, headers=bearer(ALICE))).is_success
    await stop_gateway(gw)
    assert len(rows(path)) == 5

    again = await ledgered(start_gateway, ollama, path)
    assert (await again.client.post("/api/chat", json=CHAT, headers=bearer(BOB))).is_success
    report = (await again.client.get("/v1/usage", headers=bearer(BOB))).json()
    by_client = {row["client"]: row for row in report["rows"]}
    assert by_client["alice"]["requests"] == 5
    # Bob's chat is counted once written; his /v1/usage call itself is still in flight.
    await eventually(lambda: again.services.ledger.written >= 2)
    report = (await again.client.get("/v1/usage", headers=bearer(BOB))).json()
    assert {row["client"]: row["requests"] for row in report["rows"]}["bob"] >= 1


async def test_usage_groups_by_client_model_provider_and_day(
    start_gateway: StartGateway, ollama: OllamaEmulator, tmp_path: Path
) -> None:
    path = tmp_path / "usage.db"
    gw = await ledgered(start_gateway, ollama, path)
    for token, model in [(ALICE, "llama3"), (ALICE, "qwen2.5:7b"), (BOB, "llama3")]:
        sent = await gw.client.post(
            "/api/chat", json={**CHAT, "model": model}, headers=bearer(token)
        )
        assert sent.is_success
    await eventually(lambda: gw.services.ledger.written >= 3)
    # The /v1/usage calls below are usage too: leave them out of the ranges asked.
    cut = datetime.now(UTC).isoformat().replace("+00:00", "Z")

    async def usage(query: str) -> dict[str, Any]:
        response = await gw.client.get(f"/v1/usage?{query}", headers=bearer(ALICE))
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    by_model = await usage(f"group_by=model&since=1h&until={cut}")
    assert [(r["model"], r["requests"]) for r in by_model["rows"]] == [
        ("llama3", 2),
        ("qwen2.5:7b", 1),
    ]
    assert by_model["totals"]["requests"] == 3
    assert by_model["totals"]["output_tokens"] == sum(r["output_tokens"] for r in by_model["rows"])
    both = await usage(f"group_by=client,provider&until={cut}")
    assert [(r["client"], r["provider"], r["requests"]) for r in both["rows"]] == [
        ("alice", "ollama", 2),
        ("bob", "ollama", 1),
    ]
    by_day = await usage(f"group_by=day&since=7d&until={cut}")
    [today] = by_day["rows"]
    assert today["day"] == by_day["until"][:10]
    assert today["requests"] == 3
    assert today["gpu_s"] > 0
    # A range that holds none of them.
    empty = await usage("since=2001-01-01&until=2001-01-02")
    assert empty["rows"] == []
    assert empty["totals"]["requests"] == 0


async def test_usage_refuses_bad_parameters_and_wants_a_token(
    start_gateway: StartGateway, ollama: OllamaEmulator, tmp_path: Path
) -> None:
    gw = await ledgered(start_gateway, ollama, tmp_path / "usage.db")
    cases = {
        "group_by=user": "group_by: 'user' is not one of client, model, provider, day",
        "since=yesterday": "since: expected an ISO 8601 date or time",
        "since=2h&until=3h": "must be before until",
        "group_by=day,day": "repeated",
        "limit=5": "unknown parameter 'limit'",
        "since=1h&since=2h": "since is given 2 times",
    }
    for query, message in cases.items():
        response = await gw.client.get(f"/v1/usage?{query}", headers=bearer(ALICE))
        assert response.status_code == 400, query
        assert message in response.json()["error"], (query, response.json())
    assert (await gw.client.get("/v1/usage")).status_code == 401


async def test_usage_says_when_the_ledger_is_off(gateway: RunningGateway) -> None:
    response = await gateway.client.get("/v1/usage")
    assert response.status_code == 404
    assert response.json() == {"error": 'the usage ledger is off on this gateway (usage.path = "")'}


def warnings_in(logs: io.StringIO) -> list[str]:
    found = []
    for line in logs.getvalue().splitlines():
        entry = json.loads(line)
        if entry.get("logger") == "gateway.usage" and entry.get("level") == "warning":
            found.append(entry["msg"])
    return found


async def test_a_ledger_that_cannot_be_opened_never_fails_a_request(
    start_gateway: StartGateway, ollama: OllamaEmulator, tmp_path: Path, all_logs: io.StringIO
) -> None:
    """The ledger's directory cannot exist (its parent is a file): every request is
    served, the problem is said once, and the records wait in the bounded buffer."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    gw = await ledgered(start_gateway, ollama, blocker / "usage.db", buffer_records=3)
    for _ in range(6):
        response = await gw.client.post("/api/chat", json=CHAT, headers=bearer(ALICE))
        assert response.status_code == 200
    ledger = gw.services.ledger
    assert ledger.failing
    assert ledger.written == 0
    assert ledger.dropped == 3
    said = warnings_in(all_logs)
    assert len([m for m in said if "cannot write" in m]) == 1, said
    assert len([m for m in said if "dropping new ones" in m]) == 1, said
    metrics = (await gw.client.get("/metrics", headers=bearer(ALICE))).text
    assert "gateway_usage_failing 1.0" in metrics
    assert "gateway_usage_records_dropped_total 3.0" in metrics


async def test_a_full_database_never_fails_a_request(
    start_gateway: StartGateway, ollama: OllamaEmulator, tmp_path: Path, all_logs: io.StringIO
) -> None:
    """SQLite's `max_page_count` (usage.max_db_bytes) makes the file full after a page
    of rows: requests are served, the ledger says so once and keeps counting."""
    path = tmp_path / "usage.db"
    gw = await ledgered(start_gateway, ollama, path, max_db_bytes=4096 * 3)
    ledger = gw.services.ledger
    # Three pages: the schema's, then one page of rows (a few dozen) fills the file.
    for _ in range(150):
        sent = await gw.client.post("/api/chat", json=CHAT, headers=bearer(ALICE))
        assert sent.status_code == 200
    await eventually(lambda: ledger.write_failures > 0)
    assert 0 < ledger.written < 150
    assert ledger.failing
    said = warnings_in(all_logs)
    assert len([m for m in said if "cannot write" in m]) == 1, said
    assert any("full" in m for m in said), said


async def test_a_locked_database_delays_records_without_losing_them(
    start_gateway: StartGateway, ollama: OllamaEmulator, tmp_path: Path, all_logs: io.StringIO
) -> None:
    """Another process holds the write lock: requests go on, the records wait and are
    written once the lock is released, and the ledger says when it writes again."""
    path = tmp_path / "usage.db"
    store.open_writer(path).close()
    gw = await ledgered(start_gateway, ollama, path)
    gw.services.ledger.retry_s = 0.05  # retry soon after the lock goes
    locker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        for _ in range(3):
            sent = await gw.client.post("/api/chat", json=CHAT, headers=bearer(ALICE))
            assert sent.status_code == 200
        await eventually(lambda: gw.services.ledger.failing)
        locker.execute("ROLLBACK")
    finally:
        locker.close()
    await eventually(lambda: gw.services.ledger.written == 3)
    assert gw.services.ledger.dropped == 0
    assert len(rows(path)) == 3
    assert "locked" in " ".join(warnings_in(all_logs))
    assert "writing to" in all_logs.getvalue()


async def test_per_client_counters_name_configured_clients_only(
    start_gateway: StartGateway, ollama: OllamaEmulator, tmp_path: Path
) -> None:
    gw = await ledgered(start_gateway, ollama, tmp_path / "usage.db")
    alice = (await gw.client.post("/api/chat", json=CHAT, headers=bearer(ALICE))).json()
    bob = (await gw.client.post("/api/chat", json=CHAT, headers=bearer(BOB))).json()
    metrics = (await gw.client.get("/metrics", headers=bearer(ALICE))).text
    out = 'gateway_client_tokens_total{client="%s",direction="out",provider="ollama"} %.1f'
    assert out % ("alice", alice["eval_count"]) in metrics
    # bob is not a configured [clients.*] name: counted as "other", never by name.
    assert out % ("other", bob["eval_count"]) in metrics
    assert 'gateway_client_tokens_total{client="bob"' not in metrics
    assert 'gateway_client_gpu_seconds_total{client="alice"}' in metrics


async def test_the_shutdown_writes_what_is_buffered(
    start_gateway: StartGateway, ollama: OllamaEmulator, tmp_path: Path
) -> None:
    """Records appended after the writer's last batch are written on the way out."""
    path = tmp_path / "usage.db"
    gw = await ledgered(start_gateway, ollama, path)
    ledger = gw.services.ledger
    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(partial(gw.client.post, "/api/chat", json=CHAT))
    await stop_gateway(gw)
    assert ledger.pending == 0
    assert len(rows(path)) == 8
