"""Embedder warm-up: keep the configured embedding model loaded on the target.

The embedder is pinned with `keep_alive: -1` (foreman's ADR-0013): loaded at start-up,
again after every recovery from degraded, and whenever `/api/ps` shows it evicted. It
never goes through the chat gate, since only chat is serialized.
"""

from __future__ import annotations

import logging

import trio

from gateway.errors import UpstreamError
from gateway.target.client import TargetClient
from gateway.target.inventory import Inventory

log = logging.getLogger("gateway.warmup")


class EmbedWarmer:
    def __init__(self, client: TargetClient, inventory: Inventory, model: str) -> None:
        self._client = client
        self._inventory = inventory
        self.model = model
        self.warmups = 0
        self.failures = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        warmed_for_recovery = -1
        while True:
            inventory = self._inventory
            if (
                not inventory.degraded
                and (
                    warmed_for_recovery != inventory.recoveries
                    or not inventory.is_loaded(self.model)
                )
                and await self._warm()
            ):
                warmed_for_recovery = inventory.recoveries
            await inventory.next_poll()

    async def _warm(self) -> bool:
        try:
            await self._client.embed(self.model, "warm-up", keep_alive=-1)
        except UpstreamError as exc:
            self.failures += 1
            log.warning("could not warm embedder %s: %s", self.model, exc.message)
            return False
        self.warmups += 1
        log.info("embedder %s loaded and pinned (keep_alive -1)", self.model)
        return True
