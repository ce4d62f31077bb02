"""The ledger's SQLite file: where it lives, its one table, and the statements run on it.

Plain blocking functions on stdlib `sqlite3`: the ledger runs them in a worker thread
(`trio.to_thread`), `gateway usage` runs them directly. WAL mode lets readers (the
`/v1/usage` route, the CLI) read while the gateway writes; `synchronous=NORMAL` makes a
commit a write to the WAL without an fsync, which survives a killed process (the data is
in the kernel's page cache) and loses at most the last commits on a power cut.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import quote

# (ts, client, route, provider, host, model, status, tokens_in, tokens_out, gpu_s,
#  queue_s, latency_s): one finished request; `ts` is its start, in Unix seconds.
Row = tuple[float, str, str, str, str, str, int, int, int, float, float, float]

COLUMNS = (
    "ts",
    "client",
    "route",
    "provider",
    "host",
    "model",
    "status",
    "tokens_in",
    "tokens_out",
    "gpu_s",
    "queue_s",
    "latency_s",
)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    client TEXT NOT NULL,
    route TEXT NOT NULL,
    provider TEXT NOT NULL,
    host TEXT NOT NULL,
    model TEXT NOT NULL,
    status INTEGER NOT NULL,
    tokens_in INTEGER NOT NULL,
    tokens_out INTEGER NOT NULL,
    gpu_s REAL NOT NULL,
    queue_s REAL NOT NULL,
    latency_s REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_ts ON requests (ts);
"""
_INSERT = f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
BUSY_TIMEOUT_MS = 1000  # a reader's or another writer's lock: wait this long in the thread

# The group-by keys of a report and the SQL expression of each.
GROUP_EXPRESSIONS = {
    "client": "client",
    "model": "model",
    "provider": "provider",
    "day": "strftime('%Y-%m-%d', ts, 'unixepoch')",
}
# The figures of a report, per group, in this order.
FIGURES = ("requests", "errors", "input_tokens", "output_tokens", "gpu_s", "queue_s")
_FIGURE_SQL = (
    "COUNT(*), COALESCE(SUM(status >= 400), 0), COALESCE(SUM(tokens_in), 0),"
    " COALESCE(SUM(tokens_out), 0), COALESCE(SUM(gpu_s), 0.0), COALESCE(SUM(queue_s), 0.0)"
)


def resolve_path(setting: str, environ: Mapping[str, str]) -> Path | None:
    """Where the ledger lives: None when off (`""`); "auto" is systemd's
    `$STATE_DIRECTORY` when set (the unit's `StateDirectory=`), else the user's state
    directory (`$XDG_STATE_HOME`, default `~/.local/state`) under `gateway/`."""
    if not setting:
        return None
    if setting != "auto":
        return Path(setting).expanduser()
    state = environ.get("STATE_DIRECTORY", "").split(":")[0]
    if state:
        return Path(state) / "usage.db"
    base = environ.get("XDG_STATE_HOME") or os.path.join(
        environ.get("HOME") or str(Path.home()), ".local", "state"
    )
    return Path(base) / "gateway" / "usage.db"


def open_writer(path: Path, *, max_db_bytes: int = 0) -> sqlite3.Connection:
    """Open (creating it and its directory) the ledger for writing, in WAL mode."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # The writer task serializes all use; its thread may differ from call to call.
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        _configure(conn, path, max_db_bytes)
    except BaseException:
        conn.close()
        raise
    return conn


def _configure(conn: sqlite3.Connection, path: Path, max_db_bytes: int) -> None:
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise sqlite3.OperationalError(f"cannot switch {path} to WAL mode (got {mode!r})")
    conn.execute("PRAGMA synchronous = NORMAL")
    if max_db_bytes:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {max(1, max_db_bytes // page_size)}")
    conn.executescript(_SCHEMA)


def insert(conn: sqlite3.Connection, rows: Sequence[Row]) -> None:
    """Append `rows` in one transaction: all or none."""
    conn.execute("BEGIN")
    try:
        conn.executemany(_INSERT, rows)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def prune(conn: sqlite3.Connection, before: float) -> int:
    """Delete the records that started before `before`; return how many."""
    cursor = conn.execute("DELETE FROM requests WHERE ts < ?", (before,))
    return cursor.rowcount


def open_reader(path: Path) -> sqlite3.Connection | None:
    """A read-only connection, or None when the file does not exist (nothing recorded)."""
    if not path.exists():
        return None
    conn = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return conn


def aggregate(
    path: Path, since: float, until: float, group_by: Sequence[str]
) -> list[tuple[object, ...]]:
    """Each group's keys then `FIGURES`, for records started in [since, until)."""
    keys = [GROUP_EXPRESSIONS[name] for name in group_by]
    conn = open_reader(path)
    if conn is None:
        return []
    try:
        sql = f"SELECT {', '.join([*keys, _FIGURE_SQL])} FROM requests WHERE ts >= ? AND ts < ?" + (
            f" GROUP BY {', '.join(keys)} ORDER BY {', '.join(keys)}" if keys else ""
        )
        return conn.execute(sql, (since, until)).fetchall()
    finally:
        conn.close()


def cloud_totals(
    conn: sqlite3.Connection, since: float, local: str
) -> dict[tuple[str, str], tuple[int, int]]:
    """Requests and tokens (in + out) per (client, cloud provider) since `since`: what
    the budgets start from, so that a restart does not reset the day."""
    rows = conn.execute(
        "SELECT client, provider, COUNT(*), COALESCE(SUM(tokens_in + tokens_out), 0)"
        " FROM requests WHERE ts >= ? AND provider != '' AND provider != ?"
        " GROUP BY client, provider",
        (since, local),
    ).fetchall()
    return {(client, provider): (requests, tokens) for client, provider, requests, tokens in rows}
