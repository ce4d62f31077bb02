"""The status page's memory: queue length and GPU busy over the last hour per host, and
since when each host is up or degraded.

A task started in `gateway.app.serve`'s nursery samples every host once a second. The
samples go into buckets of `BUCKET_S` (the longest queue, the mean busy fraction) in a
ring per host that holds the last hour: 360 small tuples per host, whatever the uptime.
`History` is pure (fed times and figures) and tested alone; `Sampler.run` wraps it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio

from gateway.status.snapshot import HostHistory, HostView

SAMPLE_S = 1.0
BUCKET_S = 10.0
SPAN_S = 3600.0


@dataclass(slots=True)
class _Bucket:
    index: int  # time // BUCKET_S
    queue_max: int = 0
    busy_sum: float = 0.0
    samples: int = 0


class History:
    """Per host: buckets of (longest queue, mean busy) over the last `SPAN_S`, and the
    time (wall clock) of its last status change."""

    def __init__(self) -> None:
        self._buckets: dict[str, deque[_Bucket]] = {}
        self._status: dict[str, tuple[str, float]] = {}

    def note(
        self, host: str, status: str, queue: int, busy: float, now: float, wall: float
    ) -> None:
        """One sample of `host` at `now` (trio clock): its status, queue, busy fraction."""
        seen = self._status.get(host)
        if seen is None or seen[0] != status:
            self._status[host] = (status, wall)
        ring = self._buckets.setdefault(host, deque(maxlen=int(SPAN_S / BUCKET_S)))
        index = int(now // BUCKET_S)
        if not ring or ring[-1].index != index:
            ring.append(_Bucket(index))
        bucket = ring[-1]
        bucket.queue_max = max(bucket.queue_max, queue)
        bucket.busy_sum += busy
        bucket.samples += 1

    def since(self, host: str) -> float | None:
        """Wall-clock time of `host`'s last status change (its first sample: start-up)."""
        seen = self._status.get(host)
        return None if seen is None else seen[1]

    def charts(self, hosts: Sequence[str], now: float) -> list[HostHistory]:
        charts = []
        for host in hosts:
            points = [
                (
                    max(0.0, round(now - (b.index + 0.5) * BUCKET_S, 1)),
                    b.queue_max,
                    round(b.busy_sum / b.samples, 3),
                )
                for b in self._buckets.get(host, ())
                if b.samples and now - b.index * BUCKET_S <= SPAN_S + BUCKET_S
            ]
            charts.append(HostHistory(name=host, span_s=SPAN_S, points=points))
        return charts


class Sampler:
    def __init__(
        self,
        views: Callable[[float], list[HostView]],
        history: History,
        wall: Callable[[], float],
    ) -> None:
        """`views(now)`: the hosts as `snapshot.host_views` sees them; `wall`: the clock
        of the "since" times people read."""
        self._views = views
        self.history = history
        self._wall = wall

    def sample(self) -> None:
        now = trio.current_time()
        wall = self._wall()
        for view in self._views(now):
            busy = len(view.generations) / max(1, view.capacity)
            self.history.note(view.name, view.status, view.queued, busy, now, wall)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sample at once (the page's "since" starts here), then every `SAMPLE_S`."""
        self.sample()
        task_status.started()
        while True:
            await trio.sleep(SAMPLE_S)
            self.sample()
