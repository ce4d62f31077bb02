"""The status page's sampler: a ring of 10 s buckets over the last hour per host (longest
queue, mean GPU busy) and since when each host is up or degraded, on the autojump clock."""

from __future__ import annotations

import trio

from gateway.status.sampler import BUCKET_S, SPAN_S, History, Sampler
from gateway.status.snapshot import Generation, HostView, Waiting


def test_buckets_keep_the_longest_queue_and_the_mean_busy() -> None:
    history = History()
    for second, (queue, busy) in enumerate([(1, 1.0), (3, 1.0), (0, 0.0), (2, 0.0)]):
        history.note("gpu", "up", queue, busy, 100.0 + second, 5000.0)
    (chart,) = history.charts(["gpu"], 104.0)
    assert chart.span_s == SPAN_S
    assert chart.points == [(0.0, 3, 0.5)]  # one bucket, [100, 110): 3 at most, half busy
    history.note("gpu", "up", 1, 1.0, 115.0, 5015.0)
    (chart,) = history.charts(["gpu"], 120.0)
    assert chart.points == [(15.0, 3, 0.5), (5.0, 1, 1.0)]


def test_an_hour_at_most_whatever_the_uptime() -> None:
    history = History()
    for step in range(3 * 3600):
        history.note("gpu", "up", step % 5, 1.0, float(step), 0.0)
    (chart,) = history.charts(["gpu"], 3 * 3600.0)
    assert len(chart.points) == SPAN_S / BUCKET_S
    assert max(ago for ago, _, _ in chart.points) <= SPAN_S
    assert history.charts(["other"], 0.0)[0].points == []


def test_since_is_the_last_change_of_status() -> None:
    history = History()
    assert history.since("gpu") is None
    history.note("gpu", "up", 0, 0.0, 1.0, 1000.0)
    history.note("gpu", "up", 0, 0.0, 2.0, 1001.0)
    assert history.since("gpu") == 1000.0
    history.note("gpu", "degraded", 0, 0.0, 3.0, 1002.0)
    history.note("gpu", "degraded", 0, 0.0, 4.0, 1003.0)
    assert history.since("gpu") == 1002.0
    history.note("gpu", "up", 0, 0.0, 5.0, 1004.0)
    assert history.since("gpu") == 1004.0


async def test_sampler_samples_at_start_then_every_second(autojump_clock: trio.abc.Clock) -> None:
    views: list[HostView] = []

    def current(now: float) -> list[HostView]:
        return views

    views.append(HostView(name="gpu", url="u", status="degraded", capacity=2))
    sampler = Sampler(current, History(), wall=trio.current_time)
    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        await nursery.start(sampler.run)
        assert sampler.history.since("gpu") == start  # known before the first page asks
        views[0] = HostView(
            name="gpu",
            url="u",
            status="up",
            capacity=2,
            generations=[
                Generation(
                    client="a",
                    model="m",
                    priority="normal",
                    elapsed_s=0.0,
                    tokens=0,
                    tokens_per_s=None,
                    loads=False,
                )
            ],
            queued=3,
            queue=[Waiting(client="b", model="m", priority="normal", waited_s=0.0, starts_in_s=1.0)]
            * 3,
        )
        await trio.sleep(1.5)
        assert sampler.history.since("gpu") == start + 1.0
        await trio.sleep(8.0)  # samples at 1..9 s: the rest of the first bucket
        nursery.cancel_scope.cancel()
    (chart,) = sampler.history.charts(["gpu"], trio.current_time())
    # Ten samples in the bucket: one degraded and idle, nine with a holder of two slots.
    assert [(queue, busy) for _, queue, busy in chart.points] == [(3, 0.45)]
