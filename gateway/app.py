"""`serve()`: the top-level nursery that owns the HTTP server, the GPU hosts (each with its
pool, inventory poller, gate and embedder warm-up) and the drain, and reports the bound
address through `task_status`."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import trio

from gateway.auth import Auth
from gateway.config import Config
from gateway.drain import Drain
from gateway.hosts import open_hosts
from gateway.metrics import Metrics
from gateway.pinning import pins_of
from gateway.providers.http import make_provider_client
from gateway.providers.local import LocalOllama
from gateway.providers.registry import build_registry
from gateway.server import hypercorn_config, serve_http
from gateway.services import Services
from gateway.status.board import StatusBoard
from gateway.status.tally import ProviderTally
from gateway.usage import Budgets, Ledger, resolve_path
from gateway.web.app import create_app

log = logging.getLogger("gateway")


@dataclass(frozen=True, slots=True)
class Started:
    """What `serve` reports once it accepts connections."""

    url: str  # the first bound URL, for example `http://127.0.0.1:40123`
    services: Services


async def serve(
    config: Config,
    *,
    environ: Mapping[str, str] | None = None,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    clock: Callable[[], float] = time.time,
    task_status: trio.TaskStatus[Started] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the gateway until `shutdown_trigger` returns (forever if None), then drain.

    Reports `Started` once it accepts connections, so tests can bind port 0 and start
    the whole gateway inside a nursery. `clock` is the wall clock (Unix seconds) of the
    usage ledger and the daily budgets; tests inject one to cross a day.
    """
    environ = os.environ if environ is None else environ
    auth = Auth.from_config(config.auth, environ)  # a bad token file stops us here
    async with (
        open_hosts(config, environ, max_read_bytes=config.max_body_bytes) as hosts,
        make_provider_client() as provider_http,
    ):
        local = LocalOllama(hosts, pins_of(config.models))
        ledger = Ledger(
            resolve_path(config.usage.path, environ),
            # Local work no host ran (a merged listing) names none with several hosts.
            local_host=hosts.first.ledger_host if hosts.single else "",
            host_labels={host.name: host.ledger_host for host in hosts},
            retention_days=config.usage.retention_days,
            buffer_records=config.usage.buffer_records,
            flush_interval_s=config.usage.flush_interval_s,
            max_db_bytes=config.usage.max_db_bytes,
            clock=clock,
        )
        registry = build_registry(config, environ, provider_http, local)
        status = StatusBoard(
            ProviderTally(
                frozenset(api.http.name for api in registry.client_apis()),
                {api.http.name: api.http.scrub for api in registry.client_apis()},
            ),
            show_client_names=config.status.show_client_names,
            wall=clock,
        )
        services = Services(
            config=config,
            hosts=hosts,
            drain=Drain(on_drain=[host.gate.refuse_waiters for host in hosts]),
            registry=registry,
            auth=auth,
            metrics=Metrics(hosts, ledger=ledger, clients=config.clients),
            ledger=ledger,
            budgets=Budgets(config, clock=clock),
            status=status,
        )
        hyper = hypercorn_config(
            config.bind,
            keep_alive_timeout_s=config.keep_alive_timeout_s,
            max_body_bytes=config.max_body_bytes,
            grace_s=config.shutdown_grace_s,
            certfile=config.tls.certfile,
            keyfile=config.tls.keyfile,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(hosts.run)
            await nursery.start(ledger.run)
            await nursery.start(status.sampler(services).run)
            # Today's cloud use so far, so that a restart does not reset the budgets' day.
            since = services.budgets.day_start()
            services.budgets.load(await ledger.cloud_totals(since), since)

            async def run_server(task_status: trio.TaskStatus[list[str]]) -> None:
                await serve_http(
                    create_app(services),
                    hyper,
                    drain=services.drain,
                    grace_s=config.shutdown_grace_s,
                    write_timeout_s=config.write_timeout_s,
                    request_body_timeout_s=config.request_body_timeout_s,
                    shutdown_trigger=shutdown_trigger or trio.sleep_forever,
                    task_status=task_status,
                )
                # Drained and closed: the poller and the warmer end with the server.
                nursery.cancel_scope.cancel()

            binds: list[str] = await nursery.start(run_server)
            # Degraded mode is said once, by the inventory, in its own words.
            log.info(
                "gateway listening on %s, Ollama %s; providers: %s; auth: %s",
                ", ".join(binds),
                (
                    f"target {hosts.first.url}"
                    if hosts.single
                    else "hosts " + ", ".join(f"{h.name} ({h.url})" for h in hosts)
                ),
                ", ".join(p.name for p in services.registry.listing()),
                auth.describe(),
            )
            task_status.started(Started(binds[0], services))
