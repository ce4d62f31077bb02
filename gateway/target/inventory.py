"""The model inventory: what the target has installed and loaded, polled in the background.

When the target stops answering, the last good inventory is kept and served, the
inventory is marked degraded (with the time of the last good poll and the error), polls
come faster, and the first good poll clears it: recovery needs nobody. A request that
meets a connection error flips the inventory to degraded at once and wakes the poller.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from gateway.errors import (
    GatewayError,
    ModelNotFound,
    TargetDegraded,
    UpstreamError,
    UpstreamProtocol,
    UpstreamUnavailable,
)
from gateway.target.client import TargetClient
from gateway.target.wire import ModelEntry, ModelList, canonical_model

log = logging.getLogger("gateway.inventory")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One good poll: installed models (`/api/tags`) and loaded models (`/api/ps`)."""

    installed: dict[str, ModelEntry] = field(default_factory=dict)
    loaded: dict[str, ModelEntry] = field(default_factory=dict)
    tags_body: bytes = b'{"models":[]}'
    ps_body: bytes = b'{"models":[]}'
    polled_at: float = 0.0  # wall clock, for people; 0 = never


def _index(models: ModelList) -> dict[str, ModelEntry]:
    return {canonical_model(entry.name or entry.model): entry for entry in models.models}


class Inventory:
    def __init__(
        self,
        client: TargetClient,
        *,
        poll_interval_s: float,
        degraded_poll_interval_s: float,
        poll_timeout_s: float = 10.0,
    ) -> None:
        self._client = client
        self._poll_interval_s = poll_interval_s
        self._degraded_poll_interval_s = degraded_poll_interval_s
        self._poll_timeout_s = poll_timeout_s
        self.snapshot = Snapshot()
        self.degraded = True  # until the first good poll says otherwise
        self.last_error = f"Ollama target {client.url} has not been polled yet"
        self.poll_failures = 0
        self.recoveries = 0
        self._ever_polled = False
        self._wake = trio.Event()
        self._poll_lock = trio.Lock()
        self._last_poll_started = -float("inf")
        self._polled = trio.Event()
        self._polled_clock = -float("inf")  # trio time of the last good poll
        self._loaded_set: frozenset[str] = frozenset()
        # Called when the target goes down or comes back (the hosts layer re-places the
        # requests queued for it).
        self.on_change: Callable[[], None] | None = None

    @property
    def target(self) -> str:
        return self._client.url

    def age_s(self) -> float | None:
        """Seconds since the last good poll, or None if there never was one."""
        if not self.snapshot.polled_at:
            return None
        return max(0.0, time.time() - self.snapshot.polled_at)

    def loaded_models(self) -> tuple[frozenset[str], float]:
        """The models `/api/ps` showed loaded (canonical names), and when (trio clock)."""
        return self._loaded_set, self._polled_clock

    def is_loaded(self, model: str) -> bool:
        return canonical_model(model) in self.snapshot.loaded

    def has_model(self, model: str) -> bool:
        return canonical_model(model) in self.snapshot.installed

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Poll forever; reports started after the first poll, good or not."""
        await self.refresh()
        task_status.started()
        while True:
            interval = self._degraded_poll_interval_s if self.degraded else self._poll_interval_s
            with trio.move_on_after(interval):
                await self._wake.wait()
            self._wake = trio.Event()
            await self.refresh()

    async def refresh(self) -> None:
        """Poll now, unless a poll that started after this call already finished."""
        asked_at = trio.current_time()
        async with self._poll_lock:
            if self._last_poll_started >= asked_at:
                return
            self._last_poll_started = trio.current_time()
            await self._poll_once()
        polled, self._polled = self._polled, trio.Event()
        polled.set()

    async def next_poll(self) -> None:
        """Wait until the next poll has finished, good or not."""
        await self._polled.wait()

    def mark_unreachable(self, error: UpstreamError) -> None:
        """A request could not reach the target: degrade now, and have the poller confirm."""
        self._set_degraded(error.message)
        self._wake.set()

    def note_failure(self, error: UpstreamError) -> GatewayError:
        """What a request's failed call means here, and the error its client should get.

        Unreachable: degrade now (the poller confirms and recovers) and answer 503.
        A dropped or garbled answer may be a target restarting: poll soon to find out.
        """
        if isinstance(error, UpstreamUnavailable):
            self.mark_unreachable(error)
            return self._degraded_error()
        if isinstance(error, UpstreamProtocol):
            self._wake.set()
        return error

    async def require_model(self, model: str) -> None:
        """Pass if the target has `model`; re-poll once on a miss; else Ollama's own 404."""
        self.require_reachable()
        if self.has_model(model):
            return
        await self.refresh()
        self.require_reachable()
        if not self.has_model(model):
            raise ModelNotFound(model)

    def require_reachable(self) -> None:
        if self.degraded:
            raise self._degraded_error()

    @property
    def retry_after_s(self) -> int:
        """What a 503 for a degraded target tells its client: the next poll."""
        return max(1, int(self._degraded_poll_interval_s))

    def _degraded_error(self) -> TargetDegraded:
        return TargetDegraded(
            f"{self.last_error}; the gateway retries by itself and recovers when it answers",
            retry_after_s=self.retry_after_s,
        )

    async def _poll_once(self) -> None:
        try:
            with trio.fail_after(self._poll_timeout_s):
                tags_body, tags = await self._client.tags_and_body()
                asked = trio.current_time()
                ps_body, ps = await self._client.ps_and_body()
        except trio.TooSlowError:
            self._poll_failed(
                f"Ollama target {self.target} did not answer a poll within"
                f" {self._poll_timeout_s:g} s"
            )
            return
        except UpstreamError as exc:
            self._poll_failed(exc.message)
            return
        self.snapshot = Snapshot(
            installed=_index(tags),
            loaded=_index(ps),
            tags_body=tags_body,
            ps_body=ps_body,
            polled_at=time.time(),
        )
        self._polled_clock = asked
        self._loaded_set = frozenset(self.snapshot.loaded)
        if self.degraded:
            self.degraded = False
            self.last_error = ""
            self._changed()
            if self._ever_polled:
                self.recoveries += 1
                log.warning("Ollama target %s answers again; degraded mode is over", self.target)
            else:
                log.info(
                    "Ollama target %s is up with %d models",
                    self.target,
                    len(self.snapshot.installed),
                )
        self._ever_polled = True

    def _poll_failed(self, reason: str) -> None:
        self.poll_failures += 1
        self._set_degraded(reason)
        self._ever_polled = True

    def _set_degraded(self, reason: str) -> None:
        if not self.degraded or not self._ever_polled:
            kept = len(self.snapshot.installed)
            log.warning("%s; serving degraded with %d known models until it answers", reason, kept)
        was_degraded, self.degraded = self.degraded, True
        self.last_error = reason
        if not was_degraded:
            self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()
