"""`GET /v1/models` and `GET /v1/models/{model}`: the models a client can name here.

Local models come from the inventory, shaped as Ollama shapes them (`id` the model,
`created` its modification time, `owned_by` its namespace); each registered cloud
provider's own listing follows, its ids under the prefix that routes to it
(`openrouter/<id>`, `ollama_cloud/<id>`...). Every id listed is usable as a model name:
no pseudo-entries. Provider listings are cached for `LISTING_TTL_S`; a provider that does
not answer is left out (and logged), never the whole listing failed.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

import msgspec
import trio

from gateway.errors import (
    DECODE_ERRORS,
    GatewayError,
    MethodNotAllowed,
    ModelNotFound,
    UpstreamError,
    UpstreamProtocol,
)
from gateway.providers.client_api import ClientAPI
from gateway.providers.protocols import MODELS_PATH
from gateway.providers.registry import LOCAL, resolve
from gateway.record import record_of
from gateway.services import Services
from gateway.target.wire import ModelEntry, canonical_model
from gateway.web.asgi import JSON, Receive, Responder, Scope, Send
from gateway.web.shapes import openai_error, sse_error_tail

log = logging.getLogger("gateway.models")
LISTING_TTL_S = 60.0

_encode = msgspec.json.Encoder().encode


class _Entry(msgspec.Struct):
    id: str


class _Listing(msgspec.Struct):
    data: list[_Entry] = msgspec.field(default_factory=list)


_listing = msgspec.json.Decoder(_Listing)


def namespace(name: str) -> str:
    """Ollama's `owned_by`: the name's namespace, `library` when it has none."""
    parts = name.split(":", 1)[0].split("/")
    return parts[-2] if len(parts) >= 2 else "library"


def _created(modified_at: str) -> int:
    """Unix seconds of an RFC 3339 time as Ollama writes it (nanoseconds allowed)."""
    text = modified_at.strip().replace("Z", "+00:00")
    head, dot, rest = text.partition(".")
    if dot:
        digits = len(rest) - len(rest.lstrip("0123456789"))
        text = f"{head}.{rest[:digits][:6]}{rest[digits:]}"
    try:
        return int(datetime.fromisoformat(text).timestamp())
    except ValueError:
        return 0


def local_model(name: str, entry: ModelEntry | None) -> dict[str, Any]:
    created = _created(entry.modified_at) if entry is not None else 0
    return {"id": name, "object": "model", "created": created, "owned_by": namespace(name)}


def cloud_model(api: ClientAPI, upstream_id: str) -> dict[str, Any]:
    return {
        "id": f"{api.name}/{upstream_id}",
        "object": "model",
        "created": 0,
        "owned_by": api.name,
    }


class ModelsRoutes:
    """The ASGI endpoint for the model listing and one model's entry."""

    def __init__(self, services: Services) -> None:
        self._s = services
        self._cache: dict[str, tuple[float, list[str]]] = {}

    @staticmethod
    def handles(path: str) -> bool:
        return path == MODELS_PATH or path.startswith(MODELS_PATH + "/")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        responder = Responder(
            send, error_body=openai_error, stream_tail=sse_error_tail, record=record_of(scope)
        )
        try:
            if scope["method"] not in ("GET", "HEAD"):
                raise MethodNotAllowed(f"{scope['method']} is not allowed on {scope['path']}")
            path: str = scope["path"]
            if path == MODELS_PATH:
                answer: dict[str, Any] = {"object": "list", "data": await self.listing()}
            else:
                answer = await self.one(path[len(MODELS_PATH) + 1 :])
            body = _encode(answer)
            await responder.full(
                200, body if scope["method"] == "GET" else b"", [(b"content-type", JSON)]
            )
        except GatewayError as exc:
            await responder.fail(exc)

    async def listing(self) -> list[dict[str, Any]]:
        installed: dict[str, ModelEntry] = {}
        for host in self._s.hosts:  # the union: the first host's entry of each model
            for key, entry in host.inventory.snapshot.installed.items():
                installed.setdefault(key, entry)
        data = [
            local_model(entry.model or entry.name or key, entry)
            for key, entry in sorted(installed.items())
        ]
        apis = self._s.registry.client_apis()
        found: dict[str, list[str]] = {}
        async with trio.open_nursery() as nursery:
            for api in apis:
                nursery.start_soon(self._fetch_into, api, found)
        for api in apis:
            data += [cloud_model(api, upstream_id) for upstream_id in found.get(api.name, [])]
        return data

    async def one(self, name: str) -> dict[str, Any]:
        resolved = resolve(name)
        if resolved.provider == LOCAL:
            await self._s.hosts.require_model(resolved.model)
            key = canonical_model(resolved.model)
            entry = next(
                (
                    h.inventory.snapshot.installed[key]
                    for h in self._s.hosts
                    if key in h.inventory.snapshot.installed
                ),
                None,
            )
            return local_model(name, entry)
        api = self._s.registry.client_api(resolved.provider, name)
        model = api.upstream_model(resolved.model)
        if model in await self._fetch(api):
            return {**cloud_model(api, model), "id": name}
        raise ModelNotFound(name)

    async def _fetch_into(self, api: ClientAPI, found: dict[str, list[str]]) -> None:
        try:
            found[api.name] = await self._fetch(api)
        except UpstreamError as exc:
            log.warning("%s listed no models: %s", api.name, exc.message)

    async def _fetch(self, api: ClientAPI) -> list[str]:
        """The provider's model ids, from its own `/v1/models`, cached a while."""
        now = trio.current_time()
        cached = self._cache.get(api.name)
        if cached is not None and cached[0] > now:
            return cached[1]
        answer = await api.http.get(api.route_path(MODELS_PATH))
        if answer.status >= 400:
            raise api.http.status_error(answer)
        try:
            ids = [entry.id for entry in _listing.decode(answer.body).data]
        except DECODE_ERRORS as exc:
            message = f"{api.name} sent a model list that is not valid: {exc}"
            raise UpstreamProtocol(message) from None
        self._cache[api.name] = (now + LISTING_TTL_S, ids)
        return ids
