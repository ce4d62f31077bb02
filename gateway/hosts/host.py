"""One GPU host as a unit: its connection pool and client, its inventory poller, its gate
(the scheduler), its embedder warm-up, and the view placement takes of it (ADR 0020)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import trio

from gateway.config import ClientConfig, GateConfig, HostSpec, redact_url
from gateway.gate import ChatGate, gate_settings
from gateway.h1.client import ConnectionPool
from gateway.hosts.placement import HostView
from gateway.target.client import TargetClient, make_target_pool
from gateway.target.inventory import Inventory
from gateway.target.warmup import EmbedWarmer
from gateway.target.wire import canonical_model


class Host:
    """One Ollama host and everything the gateway runs for it. Start `run` in a nursery
    (inside `pool`'s `async with`)."""

    def __init__(
        self,
        spec: HostSpec,
        pool: ConnectionPool,
        *,
        token: str | None,
        gate_config: GateConfig,
        clients: Callable[[str], ClientConfig] | None = None,
    ) -> None:
        config = spec.ollama
        self.name = spec.name
        self.implicit = spec.implicit  # the one host of a configuration without hosts
        self.url = redact_url(config.url.rstrip("/"))
        self.pool = pool
        self.target = TargetClient(pool, config, token=token)
        self.inventory = Inventory(
            self.target,
            poll_interval_s=config.poll_interval_s,
            degraded_poll_interval_s=config.degraded_poll_interval_s,
            poll_timeout_s=min(10.0, config.first_byte_timeout_s),
        )
        self.warmer = (
            EmbedWarmer(self.target, self.inventory, config.embed_model)
            if config.embed_model
            else None
        )
        self.gate = ChatGate(
            spec.capacity,
            max_queue=gate_config.max_queue,
            max_wait_s=gate_config.max_wait_s,
            settings=gate_settings(gate_config),
            clients=clients,
            loaded=self.inventory.loaded_models,
        )

    @property
    def healthy(self) -> bool:
        return not self.inventory.degraded

    @property
    def ledger_host(self) -> str:
        """The usage ledger's host column: the name, or for the one host of a configuration
        without hosts its URL, as before several hosts existed (the history stays one)."""
        return self.url if self.implicit else self.name

    def has_model(self, model: str) -> bool:
        return self.inventory.has_model(model)

    def view(self, model: str) -> HostView:
        """This host as placement sees it, for `model`."""
        gate = self.gate
        return HostView(
            name=self.name,
            healthy=self.healthy,
            installed=self.inventory.has_model(model),
            resident=gate.is_resident(model),
            start_in_s=gate.start_in_s(model),
            swap_s=gate.estimates.load_s(canonical_model(model)),
        )

    def embed_view(self, model: str) -> HostView:
        """For an embedding: resident per `/api/ps` (embeddings never pass the gate)."""
        return HostView(
            name=self.name,
            healthy=self.healthy,
            installed=self.inventory.has_model(model),
            resident=self.inventory.is_loaded(model),
            start_in_s=float(self.gate.busy + self.gate.queued),
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The pool, the poller (started after its first poll) and the warm-up."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.pool.run)
            await nursery.start(self.inventory.run)
            if self.warmer is not None:
                nursery.start_soon(self.warmer.run)
            task_status.started()


def make_host(
    spec: HostSpec,
    environ: Mapping[str, str],
    *,
    gate_config: GateConfig,
    clients: Callable[[str], ClientConfig] | None,
    max_read_bytes: int,
) -> Host:
    pool = make_target_pool(spec.ollama, max_read_bytes=max_read_bytes)
    token = environ.get(spec.ollama.token_env) or None
    return Host(spec, pool, token=token, gate_config=gate_config, clients=clients)
