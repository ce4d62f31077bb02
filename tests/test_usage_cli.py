"""The ledger and `gateway usage` with `gateway serve` as a real process: a `kill -9`
mid-burst, and the table printed in a terminal."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
from pathlib import Path

import httpx
import pytest
import trio

from gateway.cli import main
from gateway.usage import store
from tests.emulators import OllamaEmulator
from tests.test_cli import GATEWAY, ROOT, clean_environ, free_port, running, wait_for_health

CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}], "stream": False}
WORKERS = 8
KILL_AFTER = 300
FLUSH_INTERVAL_S = 0.05  # the default
COMMIT_MARGIN_S = 0.1


def count(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        found: int = conn.execute("SELECT COUNT(*) FROM requests").fetchone()[0]
    conn.close()
    return found


async def test_kill_9_mid_burst_loses_at_most_the_requests_in_flight(
    tmp_path: Path, ollama: OllamaEmulator
) -> None:
    """`WORKERS` clients send chats back to back; after `KILL_AFTER` answers the gateway
    gets SIGKILL. The file is intact, and the records missing are at most those of the
    requests in flight at the kill (one per worker) and of the requests answered within
    the last write interval (`usage.flush_interval_s`, plus `COMMIT_MARGIN_S` for the
    write under way), which the ledger had not written yet by design."""
    path = tmp_path / "usage.db"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = clean_environ(
        GATEWAY_BIND=f"127.0.0.1:{port}",
        GATEWAY_OLLAMA_URL=ollama.url,
        GATEWAY_USAGE_PATH=str(path),
        GATEWAY_GATE_CAPACITY="4",
        GATEWAY_USAGE_FLUSH_INTERVAL_S=str(FLUSH_INTERVAL_S),
    )
    answered = 0
    answered_at: list[float] = []
    killed = trio.Event()
    async with running([*GATEWAY, "serve"], env, url, tmp_path) as gw:
        await wait_for_health(gw)
        async with httpx.AsyncClient(base_url=url, timeout=10.0, trust_env=False) as client:

            async def worker() -> None:
                nonlocal answered
                while not killed.is_set():
                    try:
                        response = await client.post("/api/chat", json=CHAT)
                    except httpx.TransportError:
                        return  # the gateway is gone
                    if killed.is_set():
                        return  # answered after the kill was decided: not counted
                    assert response.status_code == 200
                    answered += 1
                    answered_at.append(trio.current_time())
                    if answered == KILL_AFTER:
                        killed.set()
                        gw.process.send_signal(signal.SIGKILL)

            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    for _ in range(WORKERS):
                        nursery.start_soon(worker)
                await gw.process.wait()
        assert gw.process.returncode == -signal.SIGKILL
    recorded = count(path)  # the /health probes of the start are not usage
    kill_at = answered_at[-1]
    recent = sum(1 for t in answered_at if t >= kill_at - FLUSH_INTERVAL_S - COMMIT_MARGIN_S)
    assert recorded <= KILL_AFTER + WORKERS  # nothing recorded twice or made up
    assert recorded >= KILL_AFTER - WORKERS - recent, (recorded, KILL_AFTER, recent)


def usage_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GATEWAY, "usage", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def fill(path: Path, now: float) -> None:
    conn = store.open_writer(path)
    day = 86400.0
    GPU = "http://gpu:11434"
    rows: list[store.Row] = [
        (now - 60, "alice", "/api/chat", "ollama", GPU, "llama3", 200, 10, 20, 1.5, 0.1, 2.0),
        (now - 50, "alice", "/v1/chat", "openrouter", "", "gpt-4o", 200, 5, 7, 0.0, 0.0, 0.5),
        (now - 40, "bob", "/api/chat", "ollama", GPU, "llama3", 503, 0, 0, 0.0, 0.0, 0.01),
        (now - 3 * day, "bob", "/api/chat", "ollama", GPU, "llama3", 200, 1, 2, 0.5, 0.0, 0.6),
    ]  # fmt: skip
    store.insert(conn, rows)
    conn.close()


def test_gateway_usage_prints_the_table_and_the_json(tmp_path: Path) -> None:
    import time

    path = tmp_path / "usage.db"
    fill(path, time.time())
    env = clean_environ(GATEWAY_USAGE_PATH=str(path))
    table = usage_cli("--since", "1h", env=env)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].startswith("usage from ")
    assert lines[1].split() == [
        "client",
        "requests",
        "errors",
        "input_tokens",
        "output_tokens",
        "gpu_s",
        "queue_s",
    ]
    assert lines[3].split() == ["alice", "2", "0", "15", "27", "1.5", "0.1"]
    assert lines[4].split() == ["bob", "1", "1", "0", "0", "0.0", "0.0"]
    assert lines[6].split() == ["total", "3", "1", "15", "27", "1.5", "0.1"]

    week = usage_cli("--since", "7d", "--group-by", "client,provider", "--json", env=env)
    assert week.returncode == 0, week.stderr
    report = json.loads(week.stdout)
    assert [(r["client"], r["provider"], r["requests"]) for r in report["rows"]] == [
        ("alice", "ollama", 1),
        ("alice", "openrouter", 1),
        ("bob", "ollama", 2),
    ]

    bad = usage_cli("--group-by", "user", env=env)
    assert bad.returncode == 2
    assert "group_by: 'user' is not one of client, model, provider, day" in bad.stderr
    off = usage_cli(env=clean_environ())
    assert off.returncode == 1
    assert "the usage ledger is off" in off.stderr
    missing = usage_cli(env=clean_environ(GATEWAY_USAGE_PATH=str(tmp_path / "none.db")))
    assert missing.returncode == 1
    assert "no usage ledger at" in missing.stderr
    assert "Traceback" not in bad.stderr + off.stderr + missing.stderr


def test_check_config_says_where_the_ledger_is(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in [k for k in os.environ if k.startswith("GATEWAY_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/gateway")
    assert main(["check-config"]) == 0
    assert "# usage ledger: /var/lib/gateway/usage.db" in capsys.readouterr().out
    monkeypatch.setenv("GATEWAY_USAGE_PATH", "")
    assert main(["check-config"]) == 0
    assert "# usage ledger: off" in capsys.readouterr().out
