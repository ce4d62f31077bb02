"""Cloud providers' requests and errors over the last hour, and each one's last error,
for the status page.

Per provider, one bucket a minute (requests, errors) in a ring of 60: bounded memory
whatever the traffic, and figures for "the last hour" to the minute. `note` runs at the
end of every request (one dict lookup and two additions for a cloud one); the error
message is kept only after the provider's own scrubber has removed its key.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from gateway.record import RequestRecord

BUCKET_S = 60.0
BUCKETS = 60  # an hour
CLIENT_CLOSED = 499  # the client left: not the provider's error


@dataclass(slots=True)
class LastError:
    at: float  # trio clock
    status: int
    message: str


@dataclass(frozen=True, slots=True)
class ProviderFigures:
    requests: int
    errors: int
    last_error: LastError | None


class _Ring:
    __slots__ = ("counts", "last_error", "minutes")

    def __init__(self) -> None:
        self.minutes = [-1] * BUCKETS  # the minute each bucket counts, -1: never used
        self.counts = [[0, 0] for _ in range(BUCKETS)]
        self.last_error: LastError | None = None

    def add(self, minute: int, error: bool) -> None:
        index = minute % BUCKETS
        if self.minutes[index] != minute:
            self.minutes[index] = minute
            self.counts[index] = [0, 0]
        counts = self.counts[index]
        counts[0] += 1
        if error:
            counts[1] += 1

    def totals(self, minute: int) -> tuple[int, int]:
        requests = errors = 0
        for index in range(BUCKETS):
            if minute - BUCKETS < self.minutes[index] <= minute:
                requests += self.counts[index][0]
                errors += self.counts[index][1]
        return requests, errors


class ProviderTally:
    """Requests per cloud provider, from the finished requests' records."""

    def __init__(
        self,
        providers: frozenset[str],
        scrubbers: Mapping[str, Callable[[str], str]] | None = None,
    ) -> None:
        """`providers`: the names counted (the cloud ones); `scrubbers`: per provider,
        the function that removes its key from a text (`ProviderHTTP.scrub`)."""
        self._rings = {name: _Ring() for name in providers}
        self._scrubbers = dict(scrubbers or {})

    def note(self, record: RequestRecord, now: float) -> None:
        ring = self._rings.get(record.provider)
        if ring is None:
            return
        error = record.status >= 400 and record.status != CLIENT_CLOSED
        ring.add(int(now // BUCKET_S), error)
        if error:
            message = record.error or f"HTTP {record.status}"
            scrub = self._scrubbers.get(record.provider)
            if scrub is not None:
                message = scrub(message)
            ring.last_error = LastError(now, record.status, message[:500])

    def figures(self, provider: str, now: float) -> ProviderFigures:
        ring = self._rings.get(provider)
        if ring is None:
            return ProviderFigures(0, 0, None)
        requests, errors = ring.totals(int(now // BUCKET_S))
        return ProviderFigures(requests, errors, ring.last_error)
