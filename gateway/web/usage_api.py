"""`GET /v1/usage?since=&until=&group_by=`: the usage ledger's report, as JSON.

Behind the inbound auth like every route but `/health`. Parameters as `gateway usage`
takes them (`gateway.usage.report`); a bad one is a 400 that says what is expected.
"""

from __future__ import annotations

import sqlite3

import msgspec
from quart import Quart, Response, request

from gateway.errors import LedgerOff, Unavailable
from gateway.services import Services
from gateway.usage import parse_query

_encode = msgspec.json.Encoder().encode


def register(app: Quart, services: Services) -> None:
    @app.get("/v1/usage")
    async def usage() -> Response:
        ledger = services.ledger
        if not ledger.enabled:
            raise LedgerOff('the usage ledger is off on this gateway (usage.path = "")')
        query = parse_query(request.args.to_dict(flat=False), ledger.clock())
        try:
            report = await ledger.report(query)
        except (sqlite3.Error, OSError) as exc:
            raise Unavailable(f"the usage ledger cannot be read: {exc}") from exc
        return Response(_encode(report), content_type="application/json")
