"""The ASGI application: Ollama routes as raw ASGI, everything else on Quart-Trio."""

from __future__ import annotations

from typing import Any

from quart import Quart, Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from gateway.errors import GatewayError, error_body
from gateway.record import record_of
from gateway.services import Services
from gateway.status import routes as status_routes
from gateway.web import health, router_api, usage_api
from gateway.web.asgi import Receive, Scope, Send
from gateway.web.client_api import ClientAPIRoutes
from gateway.web.middleware import Observed
from gateway.web.models_api import ModelsRoutes
from gateway.web.ollama_api import OllamaProxy


def json_error(error: GatewayError) -> Response:
    return Response(
        error_body(error.message),
        status=error.status,
        content_type="application/json; charset=utf-8",
        headers=error.headers(),
    )


def create_quart_app(services: Services) -> Quart:
    app = QuartTrio("gateway")
    # The gateway owns its deadlines (STACK-NOTES 1, 3): no 60 s cut, body limit from config.
    app.config["RESPONSE_TIMEOUT"] = None
    app.config["BODY_TIMEOUT"] = services.config.ollama.idle_timeout_s
    app.config["MAX_CONTENT_LENGTH"] = services.config.max_body_bytes
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = True

    @app.errorhandler(GatewayError)
    async def gateway_error(error: GatewayError) -> Response:
        record_of(request.scope).error = error.message
        return json_error(error)

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        status = error.code or 400
        if status == 413:
            message = (
                f"request body is larger than the limit of {services.config.max_body_bytes} bytes"
            )
        elif status == 404:
            message = f"no route {request.method} {request.path}"
        else:
            message = error.description or error.name
        # Refused before the body was read (413, 405): the connection cannot be reused.
        headers = {"Connection": "close"} if status in (405, 413) else {}
        return Response(
            error_body(message),
            status=status,
            content_type="application/json; charset=utf-8",
            headers=headers,
        )

    health.register(app, services)
    router_api.register(app, services)
    usage_api.register(app, services)
    status_routes.register(app, services)
    return app


class GatewayApp:
    """Dispatches each request: Ollama's routes and the client-API routes (OpenAI,
    Responses, Anthropic, model listings) to raw ASGI endpoints (ADR 0005, 0018),
    everything else to Quart."""

    def __init__(self, services: Services) -> None:
        # Typed loosely on purpose: Quart's signature wants hypercorn's TypedDict scopes.
        self.quart: Any = create_quart_app(services)
        self.proxy = OllamaProxy(services)
        self.client_api = ClientAPIRoutes(services)
        self.models = ModelsRoutes(services)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if self.proxy.handles(path):
                await self.proxy(scope, receive, send)
                return
            if self.client_api.handles(path):
                await self.client_api(scope, receive, send)
                return
            if self.models.handles(path):
                await self.models(scope, receive, send)
                return
        await self.quart(scope, receive, send)


def create_app(services: Services) -> Any:
    return Observed(GatewayApp(services), services)
