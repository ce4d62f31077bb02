"""`/api/tags` and `/api/ps` with several GPU hosts (ADR 0020): the union of every host's
inventory, one entry per model, polled afresh on the healthy hosts first; a degraded
host's last inventory stays in, as it does for one host."""

from __future__ import annotations

import trio

from gateway.hosts import Hosts
from gateway.hosts.listing import merge_listings
from gateway.web.asgi import Responder
from gateway.web.cloud_tags import CloudTags, merged


async def serve_union(
    hosts: Hosts, path: str, method: str, responder: Responder, cloud: CloudTags | None = None
) -> None:
    """Answer `path` (`/api/tags` or `/api/ps`) over every host; with `cloud`, Ollama
    Cloud's models follow the local ones (`list_in_tags`)."""
    async with trio.open_nursery() as nursery:
        for host in hosts:
            if host.healthy:
                nursery.start_soon(host.inventory.refresh)
    bodies = [
        h.inventory.snapshot.tags_body if path == "/api/tags" else h.inventory.snapshot.ps_body
        for h in hosts
    ]
    body = merge_listings(bodies)
    if cloud is not None and method == "GET":
        body = merged(body, await cloud.entries())
    await responder.full(
        200,
        body if method == "GET" else b"",
        [(b"content-type", b"application/json; charset=utf-8")],
    )
