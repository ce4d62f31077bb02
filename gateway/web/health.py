"""`GET /health` (always 200, for people and dashboards), `GET /ready` (503 while
degraded or draining, for load balancers; also `/health?ready`), `GET /metrics`."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
import trio
from quart import Quart, Response, request

from gateway.hosts import Host
from gateway.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from gateway.services import Services

_encode = msgspec.json.Encoder().encode


def host_snapshot(host: Host, now: float) -> dict[str, Any]:
    """One GPU host: its inventory, its gate and its embedder."""
    inventory = host.inventory
    gate = host.gate.figures()
    polled_at = inventory.snapshot.polled_at
    age = inventory.age_s()
    body: dict[str, Any] = {
        "status": "degraded" if inventory.degraded else "ok",
        "degraded": inventory.degraded,
        "target": inventory.target,
        "last_good_poll": (
            datetime.fromtimestamp(polled_at, UTC).isoformat(timespec="seconds")
            if polled_at
            else None
        ),
        "inventory_age_s": None if age is None else round(age, 1),
        "last_error": inventory.last_error or None,
        "poll_failures": inventory.poll_failures,
        "models": len(inventory.snapshot.installed),
        "loaded": sorted(inventory.snapshot.loaded),
        "gate": {
            "capacity": gate.capacity,
            "busy": gate.busy,
            "queued": gate.queued,
            "max_queue": gate.max_queue,
            "granted_total": gate.granted_total,
            "order": gate.order,
            "resident": list(gate.resident),
            "holders": [
                {
                    "client": h.ask.client,
                    "model": h.ask.model,
                    "priority": h.ask.priority,
                    "held_s": round(max(0.0, now - h.since), 3),
                }
                for h in gate.holders
            ],
            "waiters": [
                {
                    "client": w.ask.client,
                    "model": w.ask.model,
                    "priority": w.ask.priority,
                    "waited_s": round(max(0.0, now - w.arrived), 3),
                    "estimated_start_s": round(w.start_in_s, 1),
                }
                for w in gate.waiters
            ],
        },
    }
    if host.warmer is not None:
        body["embed_model"] = {
            "name": host.warmer.model,
            "loaded": inventory.is_loaded(host.warmer.model),
            "warmups": host.warmer.warmups,
        }
    return body


def snapshot(services: Services) -> dict[str, Any]:
    """With one host, its figures at the top level as before several hosts existed; with
    several, the totals there. Either way each host's own under `hosts` (ADR 0020)."""
    now = trio.current_time()
    hosts = services.hosts
    each = {host.name: host_snapshot(host, now) for host in hosts}
    if hosts.single:
        # The one host's figures at the top level, in the order of before.
        host = dict(each[hosts.first.name])
        embed = host.pop("embed_model", None)
        status, degraded = host.pop("status"), host.pop("degraded")
        body = {"status": status, "degraded": degraded, "draining": services.drain.draining}
        body.update(host)
        body["in_flight"] = services.drain.active
        if embed is not None:
            body["embed_model"] = embed
    else:
        degraded = [h.name for h in hosts if not h.healthy]
        body = {
            "status": "degraded" if degraded else "ok",
            "degraded": bool(degraded),
            "draining": services.drain.draining,
            "degraded_hosts": degraded,
            "models": len({m for h in hosts for m in h.inventory.snapshot.installed}),
            "loaded": sorted({m for h in hosts for m in h.inventory.snapshot.loaded}),
            "in_flight": services.drain.active,
        }
    body["hosts"] = each
    return body


def is_ready(services: Services) -> bool:
    """Ready while at least one GPU host serves and the gateway is not draining."""
    return services.hosts.ready and not services.drain.draining


def _status(services: Services) -> str:
    return "ok" if all(h.healthy for h in services.hosts) else "degraded"


def register(app: Quart, services: Services) -> None:
    @app.get("/health")
    async def health() -> Response:
        status = 200
        if "ready" in request.args and not is_ready(services):
            status = 503
        return Response(_encode(snapshot(services)), status=status, content_type="application/json")

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(services.metrics.render(), content_type=METRICS_CONTENT_TYPE)

    @app.get("/ready")
    async def ready() -> Response:
        ok = is_ready(services)
        body = {"ready": ok, "status": _status(services)}
        return Response(_encode(body), status=200 if ok else 503, content_type="application/json")
