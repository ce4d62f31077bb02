"""Listings over several hosts (ADR 0020): `/api/tags` and `/api/ps` as one list with one
entry per model, each entry's bytes as its host sent them; and the `?host=` parameter of
the model-management routes. Pure."""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import parse_qsl, urlencode

import msgspec

from gateway.errors import DECODE_ERRORS, BadRequest
from gateway.target.wire import canonical_model


class _Listing(msgspec.Struct):
    models: list[msgspec.Raw] = msgspec.field(default_factory=list)


class _Named(msgspec.Struct):
    name: str = ""
    model: str = ""


_listing = msgspec.json.Decoder(_Listing)
_named = msgspec.json.Decoder(_Named)


def merge_listings(bodies: Sequence[bytes]) -> bytes:
    """One `{"models": [...]}` from several: the first host's entry of each model (in host
    order, then each host's own order); a body that does not decode adds nothing."""
    seen: set[str] = set()
    entries: list[bytes] = []
    for body in bodies:
        try:
            listing = _listing.decode(body)
        except DECODE_ERRORS:
            continue
        for raw in listing.models:
            try:
                named = _named.decode(raw)
            except DECODE_ERRORS:
                continue
            key = canonical_model(named.name or named.model)
            if key and key not in seen:
                seen.add(key)
                entries.append(bytes(raw))
    return b'{"models":[' + b",".join(entries) + b"]}"


def host_param(query: bytes) -> tuple[str | None, str]:
    """The `host` parameter of a query string, and the query without it (for upstream).
    Given twice with different values it names no host: a 400, never a guess."""
    pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    hosts = {value for key, value in pairs if key == "host"}
    if len(hosts) > 1:
        raise BadRequest("?host= is given more than once with different hosts: name one host")
    rest = urlencode([(k, v) for k, v in pairs if k != "host"])
    return (hosts.pop() if hosts else None), rest
