"""The ledger's file alone: where it lives, its statements, and the writer task's
retention and batching on the autojump clock."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from gateway.record import RequestRecord
from gateway.usage import Ledger, resolve_path, store

T0 = 1_796_256_000.0  # 2026-12-03T00:00:00Z
DAY = 86400.0


def test_resolve_path() -> None:
    assert resolve_path("", {"STATE_DIRECTORY": "/var/lib/gateway"}) is None
    assert resolve_path("auto", {"STATE_DIRECTORY": "/var/lib/gateway"}) == Path(
        "/var/lib/gateway/usage.db"
    )
    # systemd gives several directories separated by colons when asked for several.
    assert resolve_path("auto", {"STATE_DIRECTORY": "/var/lib/a:/var/lib/b"}) == Path(
        "/var/lib/a/usage.db"
    )
    assert resolve_path("auto", {"XDG_STATE_HOME": "/x/state", "HOME": "/home/u"}) == Path(
        "/x/state/gateway/usage.db"
    )
    assert resolve_path("auto", {"HOME": "/home/u"}) == Path(
        "/home/u/.local/state/gateway/usage.db"
    )
    assert resolve_path("/srv/usage.db", {"STATE_DIRECTORY": "/var/lib/gateway"}) == Path(
        "/srv/usage.db"
    )


def row(ts: float, client: str = "alice", provider: str = "openrouter") -> store.Row:
    return (ts, client, "/v1/chat", provider, "", "m", 200, 3, 4, 0.0, 0.0, 0.1)


def test_writer_creates_the_directory_in_wal_mode_and_prunes(tmp_path: Path) -> None:
    path = tmp_path / "state" / "gateway" / "usage.db"
    conn = store.open_writer(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert path.parent.stat().st_mode & 0o777 == 0o700
        store.insert(conn, [row(T0 - 2 * DAY), row(T0), row(T0 + 1, "bob"), row(T0, "x", "ollama")])
        assert store.prune(conn, T0 - DAY) == 1
        totals = store.cloud_totals(conn, T0, "ollama")
    finally:
        conn.close()
    assert totals == {("alice", "openrouter"): (1, 7), ("bob", "openrouter"): (1, 7)}
    assert store.aggregate(path, T0, T0 + 10, ["provider"]) == [
        ("ollama", 1, 0, 3, 4, 0.0, 0.0),
        ("openrouter", 2, 0, 6, 8, 0.0, 0.0),
    ]
    assert store.aggregate(tmp_path / "absent.db", T0, T0 + 1, ["client"]) == []


def test_an_insert_is_all_or_nothing(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    conn = store.open_writer(path)
    try:
        bad = (T0, "alice", "/v1/chat", "p", "", "m", 200, 1, 1, 0.0, 0.0)  # a column short
        try:
            store.insert(conn, [row(T0), bad])  # type: ignore[list-item]
        except sqlite3.Error:
            pass
        else:
            raise AssertionError("a short row was accepted")
        assert not conn.in_transaction
        assert conn.execute("SELECT COUNT(*) FROM requests").fetchone()[0] == 0
    finally:
        conn.close()


def record(who: str, started: float) -> RequestRecord:
    rec = RequestRecord("id", "POST", "/api/chat", "10.0.0.1:1", started, client_name=who)
    rec.provider, rec.model, rec.status = "ollama", "llama3", 200
    rec.tokens_in, rec.tokens_out, rec.gpu_s, rec.gate_wait_s = 5, 6, 0.25, 0.5
    return rec


async def inline(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a blocking call in the trio thread: virtual time stands still meanwhile."""
    await trio.lowlevel.checkpoint()
    return fn(*args)


async def test_the_writer_batches_and_prunes_in_the_background(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """A lone record is written at once; what comes during `flush_interval_s` after a
    write waits for one write; records past `retention_days` go at the hourly prune,
    with no request involved."""
    path = tmp_path / "usage.db"
    ledger = Ledger(
        path,
        local_host="http://gpu:11434",
        retention_days=1,
        flush_interval_s=100.0,
        clock=lambda: T0 + trio.current_time(),
        prune_interval_s=3600.0,
        run_sync=inline,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(ledger.run)
        start = trio.current_time()
        ledger.note(record("alice", start - 2.0), start)  # it started 2 s ago
        await trio.sleep(0.001)
        assert ledger.written == 1  # a lone record is written at once
        for _ in range(50):
            ledger.note(record("bob", trio.current_time()), trio.current_time())
            await trio.sleep(0.01)
        await trio.sleep(99.0)  # 99.5 s after the first write
        assert ledger.written == 1  # within the interval after a write: they wait
        await trio.sleep(1.0)
        assert (ledger.written, ledger.writes) == (51, 2)  # all in one more write
        conn = sqlite3.connect(path)
        [(ts, host, gpu, queue, latency)] = conn.execute(
            "SELECT ts, host, gpu_s, queue_s, latency_s FROM requests WHERE client = 'alice'"
        ).fetchall()
        conn.close()
        assert (host, gpu, queue) == ("http://gpu:11434", 0.25, 0.5)
        assert latency == 2.0
        assert abs(ts - (T0 + start - 2.0)) < 1e-6  # the request's start, on the wall clock
        # Hourly passes from the start: the one at 24 h keeps the records of the first
        # 0.5 s (they are 1 day old only just after it), the one at 25 h removes them.
        await trio.sleep(start + DAY + 1.0 - trio.current_time())
        assert ledger.pruned == 1  # alice's, which started 2 s before the others
        await trio.sleep(3600.0)
        assert ledger.pruned == 51
        nursery.cancel_scope.cancel()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT COUNT(*) FROM requests").fetchone()[0] == 0
    conn.close()
