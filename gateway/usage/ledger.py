"""The usage ledger: one record per finished request, appended to SQLite off the request
path.

A request's end only appends a tuple to a bounded in-memory buffer (never blocks, never
raises); one task drains the buffer and writes each batch in a worker thread. After a
quiet spell a record is written at once; under load the writer waits `flush_interval_s`
after each write, so one write (a thread hop and a commit, the real cost) carries many
records. A `kill -9` therefore loses the records of the requests in flight and of those
finished within the last interval. When the buffer is full, new records are dropped and
counted. A file that cannot be opened or written (read-only, full, locked, missing
directory) is a warning logged once, not a failed request: the batch goes back to the
buffer and is retried after `retry_s`; the ledger says when it writes again.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import trio

from gateway.record import RequestRecord
from gateway.usage import store
from gateway.usage.report import DAY_S, UsageQuery, build

log = logging.getLogger("gateway.usage")

LOCAL = "ollama"


class Ledger:
    def __init__(
        self,
        path: Path | None,
        *,
        local_host: str = "",
        host_labels: Mapping[str, str] | None = None,
        retention_days: int = 0,
        buffer_records: int = 10_000,
        flush_interval_s: float = 0.0,
        max_db_bytes: int = 0,
        clock: Callable[[], float] = time.time,
        retry_s: float = 5.0,
        prune_interval_s: float = 3600.0,
        final_flush_s: float = 5.0,
        run_sync: Callable[..., Awaitable[Any]] = trio.to_thread.run_sync,
    ) -> None:
        """`run_sync` runs the blocking SQLite calls: a worker thread; tests on the
        autojump clock run them inline, so virtual time stands still while they run."""
        self.path = path
        self.clock = clock
        self._local_host = local_host
        # The host column of local work: by the record's host name (ADR 0020).
        self._host_labels = dict(host_labels or {})
        self._retention_s = retention_days * DAY_S
        self._capacity = buffer_records
        self._flush_interval_s = flush_interval_s
        self._max_db_bytes = max_db_bytes
        self.retry_s = retry_s
        self._prune_interval_s = prune_interval_s
        self._final_flush_s = final_flush_s
        self._run_sync = run_sync
        self._buffer: list[store.Row] = []
        self._wake = trio.Event()
        self._conn: sqlite3.Connection | None = None
        self.written = 0
        self.writes = 0  # transactions that wrote records: `written / writes` is the batch
        self.dropped = 0
        self.write_failures = 0
        self.pruned = 0
        self.failing = False  # the last write failed (warned once, until it recovers)
        self._warned_drop = False

    @property
    def enabled(self) -> bool:
        return self.path is not None

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def note(self, record: RequestRecord, now: float) -> None:
        """Append `record`'s usage (`now` on the trio clock); drop it if the buffer is full."""
        if self.path is None:
            return
        if len(self._buffer) >= self._capacity:
            self._drop(1)
            return
        latency = max(0.0, now - record.started)
        provider = record.provider
        self._buffer.append(
            (
                self.clock() - latency,
                record.who,
                record.route,
                provider,
                self._host_column(record) if provider == LOCAL else "",
                record.model,
                record.status,
                record.tokens_in,
                record.tokens_out,
                record.gpu_s or 0.0,
                record.gate_wait_s or 0.0,
                latency,
            )
        )
        self._wake.set()

    def _host_column(self, record: RequestRecord) -> str:
        if not record.host:
            return self._local_host
        return self._host_labels.get(record.host, record.host)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the file, prune, report started; then write batches until cancelled, and
        write what is left (shielded, bounded by `final_flush_s`) on the way out."""
        if self.path is None:
            task_status.started()
            return
        try:
            await self._open()
            await self._prune()
            task_status.started()
            next_prune = trio.current_time() + self._prune_interval_s
            while True:
                if not self._buffer:
                    self._wake = trio.Event()
                    with trio.move_on_at(next_prune):
                        await self._wake.wait()
                if self._buffer:
                    await self._flush()
                    # What finishes meanwhile waits for the next write: one per interval
                    # under load, and a lone record after a quiet spell is written at once.
                    await trio.sleep(self._flush_interval_s)
                if trio.current_time() >= next_prune:
                    await self._prune()
                    next_prune = trio.current_time() + self._prune_interval_s
                if self.failing:
                    await trio.sleep(self.retry_s)
        finally:
            with trio.CancelScope(shield=True) as final:
                final.deadline = trio.current_time() + self._final_flush_s
                if self._buffer:
                    await self._flush()
                if self._conn is not None:
                    await self._run_sync(self._conn.close)
                    self._conn = None
            if self._buffer:
                log.warning(
                    "usage ledger: %d records not written to %s at shutdown",
                    len(self._buffer),
                    self.path,
                )

    async def report(self, query: UsageQuery) -> dict[str, Any]:
        """The report for `query`, read in a worker thread from its own connection."""
        assert self.path is not None
        rows = await self._run_sync(
            store.aggregate, self.path, query.since, query.until, query.group_by
        )
        return build(query, rows)

    async def cloud_totals(self, since: float) -> dict[tuple[str, str], tuple[int, int]]:
        """Cloud requests and tokens per (client, provider) since `since`; {} when the
        ledger is off or cannot be read (said in the log). Called at start-up, before
        any request: it shares the writer's connection."""
        if self.path is None:
            return {}
        try:
            totals: dict[tuple[str, str], tuple[int, int]]
            totals = await self._run_sync(self._cloud_totals, since)
            return totals
        except (sqlite3.Error, OSError) as exc:
            log.warning("usage ledger: cannot read today's cloud use from %s: %s", self.path, exc)
            return {}

    def _cloud_totals(self, since: float) -> dict[tuple[str, str], tuple[int, int]]:
        # Read on the writer's own connection when it is open: it sees every commit.
        if self._conn is not None:
            return store.cloud_totals(self._conn, since, LOCAL)
        assert self.path is not None
        conn = store.open_reader(self.path)
        if conn is None:
            return {}
        try:
            return store.cloud_totals(conn, since, LOCAL)
        finally:
            conn.close()

    async def _open(self) -> None:
        assert self.path is not None
        error = await self._run_sync(self._connect)
        if error is not None:
            self._failed(error)

    def _connect(self) -> Exception | None:
        assert self.path is not None
        try:
            self._conn = store.open_writer(self.path, max_db_bytes=self._max_db_bytes)
        except (sqlite3.Error, OSError) as exc:
            return exc
        return None

    async def _flush(self) -> None:
        batch, self._buffer = self._buffer, []
        error = await self._run_sync(self._write, batch)
        if error is None:
            self.written += len(batch)
            self.writes += 1
            if self.failing:
                self.failing = False
                log.info("usage ledger: writing to %s again", self.path)
            self._warned_drop = False
            return
        self._failed(error)
        # Kept for the retry, oldest first; what does not fit is dropped.
        kept = batch + self._buffer
        self._drop(max(0, len(kept) - self._capacity))
        self._buffer = kept[: self._capacity]

    def _write(self, batch: list[store.Row]) -> Exception | None:
        if self._conn is None:
            error = self._connect()
            if error is not None:
                return error
        assert self._conn is not None
        try:
            store.insert(self._conn, batch)
        except (sqlite3.Error, OSError) as exc:
            return exc
        return None

    async def _prune(self) -> None:
        if not self._retention_s or self._conn is None:
            return
        conn, before = self._conn, self.clock() - self._retention_s
        try:
            self.pruned += await self._run_sync(store.prune, conn, before)
        except (sqlite3.Error, OSError) as exc:
            self._failed(exc)

    def _failed(self, error: Exception) -> None:
        self.write_failures += 1
        if not self.failing:
            self.failing = True
            log.warning(
                "usage ledger: cannot write to %s (%s); requests are served as usual, their"
                " records wait in memory (up to %d) and are retried every %g s",
                self.path,
                error,
                self._capacity,
                self.retry_s,
            )

    def _drop(self, count: int) -> None:
        if not count:
            return
        self.dropped += count
        if not self._warned_drop:
            self._warned_drop = True
            log.warning(
                "usage ledger: %d records waiting to be written to %s; dropping new ones"
                " (counted in gateway_usage_records_dropped)",
                self._capacity,
                self.path,
            )
