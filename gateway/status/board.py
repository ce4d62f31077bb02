"""The status page's state in the running gateway, and the snapshot it serves.

`StatusBoard` lives in `Services`: the providers' tally (fed at the end of every
request), the sampler's history, the usage read from the ledger (in a worker thread,
cached until the ledger writes again, at most `USAGE_MAX_AGE_S`), and the key of the
anonymous labels. `snapshot` assembles one `Status` for one viewer.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from gateway.record import RequestRecord
from gateway.status.sampler import History, Sampler
from gateway.status.snapshot import (
    Status,
    UsageView,
    anonymize,
    host_views,
    iso,
    provider_views,
    usage_range,
    usage_view,
)
from gateway.status.tally import ProviderTally
from gateway.usage.report import UsageQuery

if TYPE_CHECKING:
    from gateway.services import Services

USAGE_MAX_AGE_S = 30.0  # a new day, pruning: read again even when nothing was written


class StatusBoard:
    def __init__(
        self,
        tally: ProviderTally,
        *,
        show_client_names: bool = True,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.tally = tally
        self.history = History()
        self.show_client_names = show_client_names
        self._wall = wall
        self._key = secrets.token_bytes(16)  # anonymous labels: stable for this run
        self._usage: UsageView | None = None
        self._usage_key: tuple[int, int] | None = None
        self._usage_at = -float("inf")
        self._usage_lock = trio.Lock()

    def note(self, record: RequestRecord) -> None:
        """A finished request (the middleware's last step): count cloud ones."""
        self.tally.note(record, trio.current_time())

    def sampler(self, services: Services) -> Sampler:
        return Sampler(lambda now: host_views(services, now), self.history, self._wall)

    async def snapshot(self, services: Services, viewer: str, *, admin: bool) -> Status:
        """Everything the page shows, for `viewer` (a token's name, "" with auth off).
        Other clients' names are labels unless names are shown or the viewer is admin."""
        now = trio.current_time()
        hosts = host_views(services, now)
        for host in hosts:
            since = self.history.since(host.name)
            host.since = iso(since) if since is not None else None
        status = Status(
            generated_at=iso(self._wall()),
            viewer=viewer,
            names_hidden=False,
            draining=services.drain.draining,
            hosts=hosts,
            providers=provider_views(services, self.tally, now),
            usage=await self.usage(services),
            history=self.history.charts([h.name for h in hosts], now),
        )
        if self.show_client_names or admin:
            return status
        return anonymize(status, self._key, [viewer] if viewer else [])

    async def usage(self, services: Services) -> UsageView:
        """The week's usage from the ledger, read again only when it wrote since."""
        ledger = services.ledger
        if not ledger.enabled:
            return UsageView(enabled=False, error='the usage ledger is off (usage.path = "")')
        async with self._usage_lock:
            key = (ledger.written, ledger.writes)
            fresh = trio.current_time() - self._usage_at < USAGE_MAX_AGE_S
            if self._usage is not None and key == self._usage_key and fresh:
                return self._usage
            wall = ledger.clock()
            since, _ = usage_range(wall)
            try:
                clients = await ledger.report(
                    UsageQuery(since, wall + 1, ("client", "provider", "day"))
                )
                models = await ledger.report(
                    UsageQuery(since, wall + 1, ("model", "provider", "day"))
                )
            except (sqlite3.Error, OSError) as exc:
                return UsageView(enabled=True, error=f"the usage ledger cannot be read: {exc}")
            self._usage = usage_view(_rows(clients), _rows(models), wall)
            self._usage_key, self._usage_at = key, trio.current_time()
            return self._usage


def _rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = report["rows"]
    return rows
