"""The shape of Ollama's compatibility middlewares (``middleware/*.go``), for the emulator.

Ollama serves ``/v1/*`` by converting the request into its own ``/api/chat`` (or generate,
embed, tags, show) request, running the native handler, and wrapping gin's response writer
so that every write of the native handler is converted on its way out. ``Rewriter`` is
that wrapped writer: it stands in for the ``Exchange`` the native handler writes to, so
the emulator's chat core (holds, faults, counters) serves the compatibility routes too.

One native NDJSON line is one ``Write``; a middleware that flushes per event (Anthropic,
Responses) sends each event as its own HTTP chunk, the OpenAI chat writer sends all the
events of one line in one chunk (gin flushes once per ``c.Stream`` step).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from datetime import datetime
from typing import Any, NoReturn

from .http import Exchange, Header
from .wire import decode_go_json

SSE = "text/event-stream"
JSON = "application/json"


def go_bind(body: bytes, type_name: str) -> tuple[dict[str, Any], str | None]:
    """Decode a body as gin's ShouldBindJSON into a Go struct would, with its error text."""
    return decode_go_json(body, type_name, empty="EOF", package="")


def field_error(req: dict[str, Any], type_name: str, fields: dict[str, type]) -> str | None:
    """The unmarshal error for the first field of the wrong JSON type, as Go words it."""
    go_names = {str: "string", bool: "bool", list: "array", dict: "object", int: "int"}
    for name, kind in fields.items():
        value = req.get(name)
        if value is None or (isinstance(value, kind) and not (kind is int and type(value) is bool)):
            continue
        got = {list: "array", dict: "object", str: "string", bool: "bool"}.get(
            type(value), f"number {value}" if isinstance(value, float) else "number"
        )
        return (
            f"json: cannot unmarshal {got} into Go struct field {type_name}.{name} "
            f"of type {go_names[kind]}"
        )
    return None


def unix(go_time_text: object) -> int:
    """Seconds since the epoch of a Go RFC 3339 time (0 when absent)."""
    if not isinstance(go_time_text, str) or not go_time_text:
        return 0
    return int(datetime.fromisoformat(go_time_text.replace("Z", "+00:00")).timestamp())


class Rewriter:
    """An ``Exchange`` whose writes are converted, as a gin middleware's writer does.

    Subclasses convert: ``error`` (a non-200 native body), ``whole`` (a non-streamed
    native body) and ``line`` (one native NDJSON line -> the HTTP chunks to send).
    """

    content_type = JSON
    stream_content_type = SSE
    relax_thinking = False

    def __init__(self, exchange: Exchange, body: bytes, headers: Iterable[Header] = ()) -> None:
        self.inner = exchange
        self.server = exchange.server
        self.peer_closed = exchange.peer_closed
        # the handler below reads the converted body, as after c.Request.Body = ...
        self.request = dataclasses.replace(exchange.request, body=body)
        self.headers = list(headers)

    # what the native handler reads
    @property
    def method(self) -> str:
        return self.inner.method

    @property
    def path(self) -> str:
        return self.inner.path

    @property
    def finished(self) -> bool:
        return self.inner.finished

    def header(self, name: str) -> str | None:
        return self.inner.header(name)

    def abort(self, *, rst: bool) -> NoReturn:
        self.inner.abort(rst=rst)

    # what the native handler writes
    async def respond(
        self,
        status: int,
        body: bytes = b"",
        *,
        content_type: str | None = None,
        headers: Iterable[Header] = (),
    ) -> None:
        if status != 200:
            out, kind = self.error(status, body), JSON
        else:
            out, kind = self.whole(json.loads(body)), self.content_type
        await self.inner.respond(status, out, content_type=kind, headers=self.headers)

    async def start_stream(
        self,
        status: int,
        *,
        content_type: str,
        headers: Iterable[Header] = (),
        faulty: bool = False,
    ) -> None:
        await self.inner.start_stream(
            status, content_type=self.stream_content_type, headers=self.headers, faulty=faulty
        )

    async def apply_stream_faults(self) -> None:
        await self.inner.apply_stream_faults()

    async def write_chunk(self, data: bytes) -> None:
        for chunk in self.line(json.loads(data)):
            await self.inner.write_chunk(chunk)

    async def end_stream(self) -> None:
        await self.inner.end_stream()

    # the conversions
    def error(self, status: int, body: bytes) -> bytes:
        raise NotImplementedError

    def whole(self, obj: dict[str, Any]) -> bytes:
        raise NotImplementedError

    def line(self, obj: dict[str, Any]) -> list[bytes]:
        raise NotImplementedError


def native_error(body: bytes) -> str:
    """The message of a native ``{"error": ...}`` body; the raw text when it is not JSON."""
    try:
        value = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return body.decode("utf-8", "replace")
    if isinstance(value, dict) and isinstance(value.get("error"), str):
        return value["error"]
    return ""
