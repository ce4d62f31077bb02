"""`GET /health` (always 200, for people and dashboards), `GET /ready` (503 while
degraded or draining, for load balancers; also `/health?ready`), `GET /metrics`."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
import trio
from quart import Quart, Response, request

from gateway.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from gateway.services import Services

_encode = msgspec.json.Encoder().encode


def snapshot(services: Services) -> dict[str, Any]:
    inventory = services.inventory
    gate = services.gate.figures()
    now = trio.current_time()
    polled_at = inventory.snapshot.polled_at
    age = inventory.age_s()
    body: dict[str, Any] = {
        "status": "degraded" if inventory.degraded else "ok",
        "degraded": inventory.degraded,
        "draining": services.drain.draining,
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
        "in_flight": services.drain.active,
    }
    if services.warmer is not None:
        body["embed_model"] = {
            "name": services.warmer.model,
            "loaded": inventory.is_loaded(services.warmer.model),
            "warmups": services.warmer.warmups,
        }
    return body


def is_ready(services: Services) -> bool:
    return not services.inventory.degraded and not services.drain.draining


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
        body = {"ready": ok, "status": "degraded" if services.inventory.degraded else "ok"}
        return Response(_encode(body), status=200 if ok else 503, content_type="application/json")
