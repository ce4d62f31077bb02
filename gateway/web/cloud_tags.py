"""`ollama_cloud.list_in_tags`: the cloud models the key can use, in `/api/tags`.

Ollama-only UIs pick models from `/api/tags`; with this option on, Ollama Cloud's own
`/api/tags` entries follow the local ones, named as a local Ollama names cloud models
(`gpt-oss:120b-cloud`, `name:cloud` without a tag), so picking one routes it to the cloud
(ADR 0018). Local entries keep their bytes; the cloud list is cached `TTL_S`; a cloud
that does not answer leaves the list local (and is logged).
"""

from __future__ import annotations

import logging

import msgspec
import trio

from gateway.errors import DECODE_ERRORS, UpstreamError
from gateway.providers.client_api import ClientAPI

log = logging.getLogger("gateway.cloud_tags")
TTL_S = 60.0

_local = msgspec.json.Decoder(dict[str, msgspec.Raw])
_models = msgspec.json.Decoder(list[msgspec.Raw])
_cloud = msgspec.json.Decoder(dict[str, list[dict[str, object]]])
_encode = msgspec.json.Encoder().encode


def cloud_name(name: str) -> str:
    """How a local Ollama lists a cloud model (`modelref.toLegacyCloudPullName`)."""
    slash, colon = name.rfind("/"), name.rfind(":")
    return f"{name}-cloud" if colon > slash else f"{name}:cloud"


def merged(local_body: bytes, cloud_entries: list[dict[str, object]]) -> bytes:
    """`local_body` (`{"models": [...]}`) with `cloud_entries` appended, local bytes kept."""
    try:
        fields = _local.decode(local_body)
        models = _models.decode(fields.get("models", msgspec.Raw(b"[]"))) or []
    except DECODE_ERRORS:
        return local_body
    extra = [msgspec.Raw(_encode(entry)) for entry in cloud_entries]
    fields["models"] = msgspec.Raw(_encode([*models, *extra]))
    return _encode(fields)


class CloudTags:
    """Ollama Cloud's `/api/tags`, renamed for listing, cached."""

    def __init__(self, api: ClientAPI) -> None:
        self._api = api
        self._entries: list[dict[str, object]] = []
        self._until = -1.0

    async def entries(self) -> list[dict[str, object]]:
        now = trio.current_time()
        if now < self._until:
            return self._entries
        try:
            answer = await self._api.http.get("/api/tags")
            if answer.status >= 400:
                raise self._api.http.status_error(answer)
            models = _cloud.decode(answer.body).get("models", [])
        except UpstreamError as exc:
            log.warning("ollama_cloud listed no models for /api/tags: %s", exc.message)
            return self._entries
        except DECODE_ERRORS:
            log.warning("ollama_cloud sent a model list that is not valid")
            return self._entries
        entries = []
        for entry in models:
            name = entry.get("name") or entry.get("model")
            if isinstance(name, str) and name:
                entries.append({**entry, "name": cloud_name(name), "model": cloud_name(name)})
        self._entries, self._until = entries, now + TTL_S
        return entries
