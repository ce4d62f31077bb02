"""The client of the local Ollama target: typed calls, and raw calls for passthrough.

Every call goes through one `gateway.h1.client.ConnectionPool` (a small HTTP/1.1 client of
our own, cheaper per request and per streamed line than httpx), which raises its errors
already in the gateway's tree. The first-byte deadline (sending the request until the
answer's head) is per call, so a cold model load is not mistaken for a hang; the idle
deadline (longest silence between two reads) is the pool's. `TargetClient` depends only on
the small `Transport` protocol, so tests can hand it a fake.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol, TypeVar

import msgspec

from gateway.config import OllamaConfig, redact_url
from gateway.errors import DECODE_ERRORS, UpstreamProtocol, UpstreamStatus
from gateway.h1.client import MAX_READ_BYTES, ConnectionPool
from gateway.target.ndjson import MAX_LINE_BYTES, NdjsonSplitter
from gateway.target.wire import (
    ChatChunk,
    EmbedResponse,
    GenerateChunk,
    ModelList,
    ShowResponse,
    VersionResponse,
)
from gateway.upstream import cut, upstream_message

T = TypeVar("T", bound=msgspec.Struct)

_encode = msgspec.json.Encoder().encode
_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}


def _decoder(kind: type[T]) -> msgspec.json.Decoder[T]:
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    return decoder


class UpstreamResponse(Protocol):
    """An answer as a `Transport` gives it: head read, body not yet."""

    status: int
    headers: list[tuple[bytes, bytes]]  # lowercased names, values as sent

    def header(self, name: bytes) -> bytes | None: ...

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def read(self) -> bytes: ...

    async def aclose(self) -> None: ...


class Transport(Protocol):
    """What `TargetClient` needs from its connection pool (`ConnectionPool` in service).

    Errors are `gateway.errors.UpstreamError`s; an HTTP error status is not an error.
    """

    def request(
        self,
        method: str,
        path: str,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes | None,
        first_byte_timeout_s: float,
    ) -> AbstractAsyncContextManager[UpstreamResponse]: ...


def target_name(config: OllamaConfig) -> str:
    """How errors and logs name the target: its URL, any password hidden."""
    return f"Ollama target {redact_url(config.url.rstrip('/'))}"


def make_target_pool(
    config: OllamaConfig, *, max_read_bytes: int = MAX_READ_BYTES
) -> ConnectionPool:
    """The one upstream connection pool, sized above any concurrency the gateway admits;
    an answer read whole is bounded by `max_read_bytes` (the server's `max_body_bytes`).
    Start its `run` task in a nursery; `async with` closes it."""
    return ConnectionPool(
        config.url,
        max_read_bytes=max_read_bytes,
        name=target_name(config),
        connect_timeout_s=config.connect_timeout_s,
        idle_timeout_s=config.idle_timeout_s,
        max_connections=config.max_connections,
        keepalive_expiry_s=30.0,
        # Ask for identity encoding so raw bytes are the bytes a client should see.
        default_headers=[(b"User-Agent", b"trio-llm-gateway"), (b"Accept-Encoding", b"identity")],
    )


class RawResponse:
    """An upstream answer whose body is handed on untouched, chunk by chunk.

    Iterating it yields body chunks as they arrive (errors already in the gateway's
    tree). Abandoning it midway (a client that left) needs no finalizer: `raw()` closes
    the connection when its block ends.
    """

    __slots__ = ("_response", "headers", "status")

    def __init__(self, response: UpstreamResponse) -> None:
        self._response = response
        self.status = response.status
        self.headers = response.headers

    def header(self, name: bytes) -> bytes | None:
        """The first value of header `name` (lowercase), or None."""
        return self._response.header(name)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._response.__aiter__()

    async def read(self) -> bytes:
        return await self._response.read()

    async def aclose(self) -> None:
        await self._response.aclose()


class TargetClient:
    """Calls to one Ollama host. Typed calls raise `UpstreamError`s; raw calls never
    raise on an HTTP status, so passthrough can hand a 404 on exactly as Ollama sent it."""

    def __init__(
        self,
        transport: Transport,
        config: OllamaConfig,
        *,
        token: str | None,
        max_line_bytes: int = MAX_LINE_BYTES,
    ) -> None:
        self._transport = transport
        self._first_byte_timeout_s = config.first_byte_timeout_s
        self._auth = [(b"authorization", f"Bearer {token}".encode())] if token else []
        self._token = token or ""
        self._max_line_bytes = max_line_bytes
        self.url = redact_url(config.url.rstrip("/"))
        self.name = target_name(config)

    @asynccontextmanager
    async def raw(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        content_type: bytes | str | None = "application/json",
        first_byte_timeout_s: float | None = None,
    ) -> AsyncIterator[RawResponse]:
        """Send `body` as received and yield the answer with its body still unread."""
        headers = self._auth
        if body is not None and content_type:
            value = content_type if isinstance(content_type, bytes) else content_type.encode()
            headers = [*headers, (b"content-type", value)]
        deadline_s = first_byte_timeout_s or self._first_byte_timeout_s
        async with self._transport.request(method, path, headers, body, deadline_s) as response:
            yield RawResponse(response)

    async def _call(self, method: str, path: str, payload: Any, kind: type[T]) -> T:
        return (await self._call_keeping_body(method, path, payload, kind))[1]

    async def _call_keeping_body(
        self, method: str, path: str, payload: Any, kind: type[T]
    ) -> tuple[bytes, T]:
        body = None if payload is None else _encode(payload)
        async with self.raw(method, path, body) as response:
            data = await response.read()
        if response.status >= 400:
            raise UpstreamStatus(
                f"{self.name}: {upstream_message(data, response.status, scrub=self.scrub)}",
                upstream_status=response.status,
                retry_after=_text(response.header(b"retry-after")),
            )
        try:
            return data, _decoder(kind).decode(data)
        except DECODE_ERRORS as exc:
            raise UpstreamProtocol(f"{self.name} sent an answer that is not valid: {exc}") from None

    async def _stream(self, path: str, payload: Any, kind: type[T]) -> AsyncGenerator[T, None]:
        async with self.raw("POST", path, _encode(payload)) as response:
            if response.status >= 400:
                data = await response.read()
                raise UpstreamStatus(
                    f"{self.name}: {upstream_message(data, response.status, scrub=self.scrub)}",
                    upstream_status=response.status,
                    retry_after=_text(response.header(b"retry-after")),
                )
            splitter = NdjsonSplitter(self._max_line_bytes)
            decoder = _decoder(kind)
            async for chunk in response:
                for line in splitter.feed(chunk):
                    yield self._frame(decoder, line)
            if (rest := splitter.close()) is not None:
                yield self._frame(decoder, rest)

    def scrub(self, text: str) -> str:
        """Remove the target's token from text the target sent back (it may echo it)."""
        return text.replace(self._token, "***") if self._token else text

    def _frame(self, decoder: msgspec.json.Decoder[T], line: bytes) -> T:
        try:
            frame = decoder.decode(line)
        except DECODE_ERRORS as exc:
            raise UpstreamProtocol(f"{self.name} sent a line that is not JSON: {exc}") from None
        error = getattr(frame, "error", None)
        if isinstance(error, str):
            raise UpstreamProtocol(f"{self.name} failed mid-answer: {cut(self.scrub(error))}")
        return frame

    # Typed calls -----------------------------------------------------------------

    async def chat(self, request: Mapping[str, Any]) -> ChatChunk:
        return await self._call("POST", "/api/chat", {**request, "stream": False}, ChatChunk)

    def chat_stream(self, request: Mapping[str, Any]) -> AsyncGenerator[ChatChunk, None]:
        return self._stream("/api/chat", {**request, "stream": True}, ChatChunk)

    async def generate(self, request: Mapping[str, Any]) -> GenerateChunk:
        return await self._call(
            "POST", "/api/generate", {**request, "stream": False}, GenerateChunk
        )

    def generate_stream(self, request: Mapping[str, Any]) -> AsyncGenerator[GenerateChunk, None]:
        return self._stream("/api/generate", {**request, "stream": True}, GenerateChunk)

    async def embed(
        self, model: str, inputs: str | list[str], *, keep_alive: int | str | None = None
    ) -> EmbedResponse:
        payload: dict[str, Any] = {"model": model, "input": inputs}
        if keep_alive is not None:
            payload["keep_alive"] = keep_alive
        return await self._call("POST", "/api/embed", payload, EmbedResponse)

    async def tags(self) -> ModelList:
        return await self._call("GET", "/api/tags", None, ModelList)

    async def ps(self) -> ModelList:
        return await self._call("GET", "/api/ps", None, ModelList)

    async def tags_and_body(self) -> tuple[bytes, ModelList]:
        """`/api/tags` decoded, plus the bytes as sent, to serve verbatim while degraded."""
        return await self._call_keeping_body("GET", "/api/tags", None, ModelList)

    async def ps_and_body(self) -> tuple[bytes, ModelList]:
        return await self._call_keeping_body("GET", "/api/ps", None, ModelList)

    async def show(self, model: str) -> ShowResponse:
        return await self._call("POST", "/api/show", {"model": model}, ShowResponse)

    async def version(self) -> VersionResponse:
        return await self._call("GET", "/api/version", None, VersionResponse)


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")
