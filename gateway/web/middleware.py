"""Around every HTTP request: request id, inbound auth, timing headers, one log line,
and the request's metrics, all from its `RequestRecord`."""

from __future__ import annotations

import logging
import re
from typing import Any

import trio

from gateway.auth import SELF_CHECKED_PATHS as STATUS_ROUTES
from gateway.errors import Forbidden, GatewayError
from gateway.providers.protocols import MODELS_PATH, PROTOCOLS
from gateway.record import SCOPE_KEY, RequestRecord, new_request_id
from gateway.services import Services
from gateway.web.asgi import Message, Receive, Responder, Scope, Send, header
from gateway.web.host_guard import HostGuard
from gateway.web.ollama_api import ROUTES, Kind, route_for
from gateway.web.shapes import openai_error, responder_for, sse_error_tail

access_log = logging.getLogger("gateway.access")

KNOWN_ROUTES = frozenset(
    {
        *ROUTES,
        *PROTOCOLS,
        "/health",
        "/ready",
        "/metrics",
        "/v1/chat",
        "/v1/chat/providers",
        "/v1/embeddings",
        "/v1/usage",
        MODELS_PATH,
        *STATUS_ROUTES,
    }
)
# Probes, scrapes and the status page's polls: not usage, and logged at debug level only.
QUIET_ROUTES = frozenset({"/health", "/ready", "/metrics", *STATUS_ROUTES})
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,64}")
CLIENT_CLOSED = 499  # nginx's code for "the client left before the answer", for logs only


def route_label(path: str) -> str:
    if path in KNOWN_ROUTES:
        return path
    if path.startswith("/api/blobs/"):
        return "/api/blobs"
    return "/v1/models/{model}" if path.startswith(MODELS_PATH + "/") else "other"


class Observed:
    def __init__(self, inner: Any, services: Services) -> None:
        self._inner = inner
        self._s = services
        self._hosts = HostGuard(services.config.bind_host_port()[0], services.config.allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._inner(scope, receive, send)
            return
        path: str = scope["path"]
        given = header(scope, b"x-request-id")
        request_id = given.decode() if given and _REQUEST_ID.fullmatch(given) else new_request_id()
        client = scope.get("client") or ("", 0)
        record = RequestRecord(
            request_id=request_id,
            method=scope["method"],
            route=route_label(path),
            client=f"{client[0]}:{client[1]}",
            started=trio.current_time(),
        )
        scope[SCOPE_KEY] = record
        completed = trio.Event()

        async def observed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                record.response_started = trio.current_time()
                queue_ms = (record.gate_wait_s or 0.0) * 1000
                message = {
                    **message,
                    "headers": [
                        *message.get("headers", []),
                        (b"x-request-id", request_id.encode()),
                        (b"x-gateway-queue-ms", b"%.1f" % queue_ms),
                        (b"x-gateway-overhead-ms", b"%.1f" % (record.overhead_s() * 1000)),
                    ],
                }
                if record.gate_ahead is not None:  # a gated route: how many were ahead
                    message["headers"].append((b"x-gateway-queue-ahead", b"%d" % record.gate_ahead))
            elif message["type"] == "http.response.body":
                record.bytes_out += len(message.get("body", b""))
                if not message.get("more_body", False):
                    completed.set()
            await send(message)

        try:
            try:
                if not self._hosts.allowed(header(scope, b"host")):
                    raise Forbidden(
                        "the Host header names neither this machine nor a local address;"
                        " the gateway listens on loopback only and refuses it (DNS"
                        " rebinding). Add the name to allowed_hosts to accept it"
                    )
                route = route_for(path)
                admin = route is not None and route.kind is Kind.MANAGE
                record.client_name = self._s.auth.check(
                    path, header(scope, b"authorization"), admin=admin
                )
            except GatewayError as exc:
                protocol = PROTOCOLS.get(path)
                if protocol is not None:
                    responder = responder_for(protocol, observed_send, record)
                elif path == MODELS_PATH or path.startswith(MODELS_PATH + "/"):
                    responder = Responder(
                        observed_send,
                        error_body=openai_error,
                        stream_tail=sse_error_tail,
                        record=record,
                    )
                else:
                    responder = Responder(observed_send, record=record)
                await responder.fail(exc)
                return
            await self._inner(scope, receive, observed_send)
        finally:
            self._finish(record, path, completed.is_set())

    def _finish(self, record: RequestRecord, path: str, completed: bool) -> None:
        if not completed:
            # The client left before the answer ended: what it got is not what was sent.
            record.status = CLIENT_CLOSED
        self._s.metrics.observe(record)
        self._s.budgets.note(record)
        self._s.status.note(record)
        if path not in QUIET_ROUTES:  # probes and scrapes are not usage
            self._s.ledger.note(record, trio.current_time())
        level = logging.DEBUG if path in QUIET_ROUTES else logging.INFO
        if access_log.isEnabledFor(level):
            # `makeRecord` + `handle` is `log()` without its search of the call stack
            # for a source line that the access log never shows.
            entry = access_log.makeRecord(
                access_log.name,
                level,
                __file__,
                0,
                "%s %s %d",
                (record.method, record.route, record.status),
                None,
                extra={"fields": record.log_fields(trio.current_time())},
            )
            access_log.handle(entry)
