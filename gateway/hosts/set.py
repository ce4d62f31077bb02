"""The set of GPU hosts, and what the routes ask of it (ADR 0020): is this model served,
where may a generation queue (placement, bound late), where does an embedding go, which
host answers the rest. Routes talk to this set, never to one host's internals.

With one host (every configuration without `[ollama.hosts]`) each call is the single
host's own, exactly as before several hosts existed.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager

import trio

from gateway.config import Config, host_specs
from gateway.errors import (
    BadRequest,
    GateFull,
    ModelNotFound,
    ShuttingDown,
    TargetDegraded,
    UpstreamUnavailable,
)
from gateway.gate import ChatGate, Claim, noted
from gateway.hosts.bind import hold_first
from gateway.hosts.host import Host, make_host
from gateway.hosts.placement import pick_embedder, place
from gateway.record import RequestRecord

log = logging.getLogger("gateway.hosts")

Work = Callable[[Host], Awaitable[None]]


class Hosts:
    """The configured GPU hosts, in configuration order; iterate it for each `Host`."""

    def __init__(self, hosts: Sequence[Host]) -> None:
        if not hosts:
            raise ValueError("at least one GPU host")
        self.all = tuple(hosts)
        self._by_name = {h.name: h for h in self.all}
        self._by_gate: dict[ChatGate, Host] = {h.gate: h for h in self.all}
        self._claims: set[Claim] = set()  # requests waiting at several gates
        for host in self.all:
            host.inventory.on_change = self._nudge
            if not self.single:
                host.gate.peers = self._serving_gates
                host.gate.on_switch = self._poke

    def __iter__(self) -> Iterator[Host]:
        return iter(self.all)

    def __len__(self) -> int:
        return len(self.all)

    @property
    def first(self) -> Host:
        return self.all[0]

    @property
    def single(self) -> bool:
        return len(self.all) == 1

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._by_name)

    def get(self, name: str) -> Host | None:
        return self._by_name.get(name)

    @property
    def ready(self) -> bool:
        """At least one host serves."""
        return any(h.healthy for h in self.all)

    def has_model(self, model: str) -> bool:
        return any(h.has_model(model) for h in self.all)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Every host's pool, poller and warm-up; started once each host has polled once
        (concurrently: a host that hangs does not hold up the others' first poll)."""
        async with trio.open_nursery() as nursery:
            pending = len(self.all)
            all_up = trio.Event()

            async def start(host: Host) -> None:
                nonlocal pending
                await nursery.start(host.run)
                pending -= 1
                if not pending:
                    all_up.set()

            for host in self.all:
                nursery.start_soon(start, host)
            await all_up.wait()
            task_status.started()

    def _nudge(self) -> None:
        """A host went down or came back: the requests waiting at gates place themselves
        again (a degraded host's queued requests move to the other hosts with the model)."""
        for claim in list(self._claims):
            claim.nudge()

    def _serving_gates(self) -> list[ChatGate]:
        return [h.gate for h in self.all if h.healthy]

    def _poke(self) -> None:
        """A host loaded another model: the gates that left a waiter for another host
        (placement at grant time) look at it again."""
        for claim in self._claims:
            claim.poke()

    # ------------------------------------------------------------------ the model

    async def require_model(self, model: str) -> None:
        """Pass if a healthy host has `model`. Else, after one re-poll of every host: 503
        naming the hosts that have it if they are all down, Ollama's 404 if none has it."""
        if self.single:
            await self.first.inventory.require_model(model)
            return
        if self._served(model):
            return
        async with trio.open_nursery() as nursery:
            for host in self.all:
                nursery.start_soon(host.inventory.refresh)
        if self._served(model):
            return
        raise self._unavailable(model)

    def _served(self, model: str) -> bool:
        return any(h.healthy and h.has_model(model) for h in self.all)

    def _unavailable(self, model: str) -> TargetDegraded | ModelNotFound:
        having = [h for h in self.all if h.has_model(model) and not h.healthy]
        if not having and self.ready:
            return ModelNotFound(model)
        down = having or list(self.all)
        reasons = "; ".join(f"{h.name}: {h.inventory.last_error}" for h in down)
        names = ", ".join(h.name for h in down)
        return TargetDegraded(
            f"no GPU host with {model!r} answers ({names}): {reasons}; the gateway retries by"
            " itself and recovers when one answers",
            retry_after_s=min(h.inventory.retry_after_s for h in down),
        )

    # ------------------------------------------------------------------ generation

    def candidates(self, model: str, exclude: frozenset[str] = frozenset()) -> list[Host]:
        """Placement's candidates for a generation of `model`, best first."""
        views = [h.view(model) for h in self.all if h.name not in exclude]
        return [self._by_name[name] for name in place(views).hosts]

    def check_admission(self, model: str) -> None:
        """Refuse now (before a response starts) if no candidate host can queue one more."""
        if self.single:
            self.first.gate.check_admission()
            return
        hosts = self.candidates(model)
        if not hosts:
            raise self._unavailable(model)
        refusals: list[GateFull | ShuttingDown] = []
        for host in hosts:
            try:
                host.gate.check_admission()
            except (GateFull, ShuttingDown) as exc:
                refusals.append(exc)
            else:
                return
        raise refusals[0]

    @asynccontextmanager
    async def serve(
        self, record: RequestRecord, model: str, *, exclude: frozenset[str] = frozenset()
    ) -> AsyncIterator[Host]:
        """Hold a generation slot on the first candidate host that grants one (late
        binding); note the wait, the GPU time and the host in the request's record."""
        if self.single:
            host = self.first
            record.host = host.name
            async with host.gate.serve(record, model):
                yield host
            return

        def gates() -> list[ChatGate]:
            return [h.gate for h in self.candidates(model, exclude)]

        if not gates():
            raise self._unavailable(model)
        ask = self.first.gate.ask_for(record, model)
        max_wait_s = self.first.gate.max_wait_s
        async with hold_first(gates, ask, watch=self._claims, max_wait_s=max_wait_s) as bound:
            gate, grant = bound
            host = self._by_gate[gate]
            record.host = host.name
            async with noted(record, grant):
                gate.attach(grant, record)
                yield host

    async def generate(self, record: RequestRecord, model: str, work: Work) -> None:
        """Run `work` on a host placed for `model`, holding its gate. `work` raises
        `UpstreamUnavailable` only when nothing reached the host (connection refused):
        then that host is degraded and the request goes to the next candidate at once.
        Never after the upstream may have acted."""
        tried: set[str] = set()
        while True:
            used: list[Host] = []
            try:
                async with self.serve(record, model, exclude=frozenset(tried)) as host:
                    used.append(host)
                    await work(host)
                return
            except UpstreamUnavailable as exc:
                if not used:
                    raise
                host = used[0]
                error = host.inventory.note_failure(exc)
                tried.add(host.name)
                if self.single or not self.candidates(model, frozenset(tried)):
                    raise error from exc
                log.warning("%s; request %s goes to another host", exc.message, record.request_id)

    # ------------------------------------------------------------------ the rest

    async def embed(self, record: RequestRecord, model: str, work: Work) -> None:
        """Run an embedding (ungated) on a host with the model resident, else installed;
        a host that refuses the connection is degraded and the next one is tried."""
        tried: set[str] = set()
        while True:
            host = self.first if self.single else self._embedder(model, tried)
            record.host = host.name
            try:
                await work(host)
                return
            except UpstreamUnavailable as exc:
                error = host.inventory.note_failure(exc)
                tried.add(host.name)
                if self.single or self._embedder_or_none(model, tried) is None:
                    raise error from exc
                log.warning("%s; request %s goes to another host", exc.message, record.request_id)

    def _embedder_or_none(self, model: str, tried: set[str]) -> Host | None:
        name = pick_embedder([h.embed_view(model) for h in self.all if h.name not in tried])
        return None if name is None else self._by_name[name]

    def _embedder(self, model: str, tried: set[str]) -> Host:
        host = self._embedder_or_none(model, tried)
        if host is None:
            raise self._unavailable(model)
        return host

    def for_model(self, model: str) -> Host:
        """A host to ask about `model` (`/api/show`): a healthy one that has it, else a
        healthy one, else the first."""
        healthy = [h for h in self.all if h.healthy]
        with_model = [h for h in healthy if h.has_model(model)]
        return (with_model or healthy or [self.first])[0]

    def any_host(self) -> Host:
        """A host for what any host answers (`/`, `/api/version`): the first healthy."""
        return next((h for h in self.all if h.healthy), self.first)

    def named(self, name: str | None, path: str) -> Host:
        """The host `?host=<name>` names (model management); required with several hosts."""
        if name is None and self.single:
            return self.first
        host = None if name is None else self._by_name.get(name)
        if host is None:
            shown = name if name is None or len(name) <= 64 else name[:64] + "..."
            said = "needs" if shown is None else f"has no host {shown!r}; it needs"
            raise BadRequest(
                f"{path} changes the models of one GPU host: this gateway {said}"
                f" ?host=<name>, one of {', '.join(self.names)}"
            )
        return host


@asynccontextmanager
async def open_hosts(
    config: Config, environ: Mapping[str, str], *, max_read_bytes: int
) -> AsyncIterator[Hosts]:
    """The configured hosts, their connection pools open (closed when the block ends)."""
    async with AsyncExitStack() as stack:
        hosts = []
        for spec in host_specs(config):
            host = make_host(
                spec,
                environ,
                gate_config=config.gate,
                clients=config.client,
                max_read_bytes=max_read_bytes,
            )
            await stack.enter_async_context(host.pool)
            hosts.append(host)
        yield Hosts(hosts)
