"""The client of the local Ollama target: typed calls, and raw calls for passthrough.

One shared `httpx.AsyncClient` carries every call. Its read timeout is the idle deadline
(longest silence between two reads); the first-byte deadline is ours, a `trio.fail_after`
around sending the request, so a cold model load is not mistaken for a hang. httpx's errors
are mapped into `gateway.errors` here, once.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import httpx
import msgspec
import trio

from gateway.config import OllamaConfig, redact_url
from gateway.errors import UpstreamProtocol, UpstreamStatus, UpstreamTimeout
from gateway.target.ndjson import MAX_LINE_BYTES, NdjsonSplitter
from gateway.target.wire import (
    ChatChunk,
    EmbedResponse,
    GenerateChunk,
    ModelList,
    ShowResponse,
    VersionResponse,
)
from gateway.upstream import map_error, upstream_message

T = TypeVar("T", bound=msgspec.Struct)

_encode = msgspec.json.Encoder().encode
_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}


def _decoder(kind: type[T]) -> msgspec.json.Decoder[T]:
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    return decoder


def make_http_client(config: OllamaConfig) -> httpx.AsyncClient:
    """The one upstream connection pool, sized above any concurrency the gateway admits."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(
            connect=config.connect_timeout_s,
            read=config.idle_timeout_s,
            write=config.idle_timeout_s,
            pool=config.connect_timeout_s,
        ),
        limits=httpx.Limits(
            max_connections=config.max_connections,
            max_keepalive_connections=config.max_connections,
            keepalive_expiry=30.0,
        ),
        # Ask for identity encoding so raw bytes are the bytes a client should see.
        headers={"Accept-Encoding": "identity", "User-Agent": "trio-llm-gateway"},
        follow_redirects=False,
        trust_env=False,
    )


class RawResponse:
    """An upstream answer whose body is handed on untouched, chunk by chunk.

    Iterating it yields body chunks as they arrive, with errors mapped to the gateway's
    tree. It is an iterator object rather than an async generator, so abandoning it
    midway (a client that left) needs no finalizer: `raw()` closes it.
    """

    def __init__(self, response: httpx.Response, target: str) -> None:
        self._response = response
        self._target = target
        # A body already read (httpx.MockTransport answers) is handed on as one chunk.
        self._chunks = (
            _one_chunk(response.content) if response.is_stream_consumed else response.aiter_raw()
        )
        self.status = response.status_code
        self.headers = response.headers

    def __aiter__(self) -> RawResponse:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await anext(self._chunks)
        except httpx.HTTPError as exc:
            raise map_error(exc, self._target) from exc

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self])

    async def aclose(self) -> None:
        await self._chunks.aclose()  # type: ignore[attr-defined]
        await self._response.aclose()


async def _one_chunk(data: bytes) -> AsyncGenerator[bytes, None]:
    yield data


class TargetClient:
    """Calls to one Ollama host. Typed calls raise `UpstreamError`s; raw calls never
    raise on an HTTP status, so passthrough can hand a 404 on exactly as Ollama sent it."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        config: OllamaConfig,
        *,
        token: str | None,
        max_line_bytes: int = MAX_LINE_BYTES,
    ) -> None:
        self._http = http
        self._base = config.url.rstrip("/")
        self._first_byte_timeout_s = config.first_byte_timeout_s
        self._auth = [(b"authorization", f"Bearer {token}".encode())] if token else []
        self._token = token or ""
        self._max_line_bytes = max_line_bytes
        self.url = redact_url(self._base)
        self.name = f"Ollama target {self.url}"

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
        headers: list[tuple[bytes, bytes]] = list(self._auth)
        if body is not None and content_type:
            value = content_type if isinstance(content_type, bytes) else content_type.encode()
            headers.append((b"content-type", value))
        request = self._http.build_request(method, self._base + path, content=body, headers=headers)
        deadline_s = first_byte_timeout_s or self._first_byte_timeout_s
        try:
            with trio.fail_after(deadline_s):
                response = await self._http.send(request, stream=True)
        except trio.TooSlowError:
            raise UpstreamTimeout(f"{self.name} sent no answer within {deadline_s:g} s") from None
        except httpx.HTTPError as exc:
            raise map_error(exc, self.name) from exc
        raw = RawResponse(response, self.name)
        try:
            yield raw
        finally:
            # Closing is a socket close; shielded so a cancelled caller still frees it.
            with trio.CancelScope(shield=True):
                await raw.aclose()

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
                f"{self.name}: {self.scrub(upstream_message(data, response.status))}",
                upstream_status=response.status,
                retry_after=response.headers.get("retry-after"),
            )
        try:
            return data, _decoder(kind).decode(data)
        except msgspec.DecodeError as exc:
            raise UpstreamProtocol(f"{self.name} sent an answer that is not valid: {exc}") from None

    async def _stream(self, path: str, payload: Any, kind: type[T]) -> AsyncGenerator[T, None]:
        async with self.raw("POST", path, _encode(payload)) as response:
            if response.status >= 400:
                data = await response.read()
                raise UpstreamStatus(
                    f"{self.name}: {self.scrub(upstream_message(data, response.status))}",
                    upstream_status=response.status,
                    retry_after=response.headers.get("retry-after"),
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
        except msgspec.DecodeError as exc:
            raise UpstreamProtocol(f"{self.name} sent a line that is not JSON: {exc}") from None
        error = getattr(frame, "error", None)
        if isinstance(error, str):
            raise UpstreamProtocol(f"{self.name} failed mid-answer: {self.scrub(error)}")
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
