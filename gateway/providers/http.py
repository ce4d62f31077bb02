"""HTTP for cloud providers: one shared pool, the provider's own key, our deadlines,
httpx errors mapped once, and the key scrubbed from anything an upstream says back."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
import msgspec
import trio

from gateway.errors import UpstreamProtocol, UpstreamStatus, UpstreamTimeout
from gateway.providers.keys import Secret
from gateway.upstream import map_error, upstream_message

_encode = msgspec.json.Encoder().encode


def make_provider_client(max_connections: int = 256) -> httpx.AsyncClient:
    """The cloud providers' pool; timeouts are per call (`ProviderHTTP`), not global."""
    return httpx.AsyncClient(
        limits=httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        ),
        headers={"User-Agent": "trio-llm-gateway"},
        follow_redirects=False,
        trust_env=False,
    )


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: httpx.Headers
    body: bytes


class ProviderHTTP:
    """Calls to one provider, carrying only that provider's credential."""

    def __init__(
        self, http: httpx.AsyncClient, *, name: str, base_url: str, key: Secret, timeout_s: float
    ) -> None:
        self._http = http
        self._key = key
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._timeout = httpx.Timeout(timeout_s, connect=min(10.0, timeout_s))

    def scrub(self, text: str) -> str:
        """Remove this provider's key from text an upstream sent (some echo it back)."""
        key = self._key.reveal()
        return text.replace(key, "***") if key else text

    def scrub_bytes(self, data: bytes) -> bytes:
        """`scrub` for a body handed on as bytes: untouched unless it holds the key."""
        key = self._key.reveal().encode()
        return data.replace(key, b"***") if key and key in data else data

    def status_error(self, answer: Answer, *, body_is_clients: bool = False) -> UpstreamStatus:
        message = upstream_message(answer.body, answer.status, scrub=self.scrub)
        return UpstreamStatus(
            f"{self.name}: {message}",
            upstream_status=answer.status,
            retry_after=answer.headers.get("retry-after"),
            body_is_clients=body_is_clients,
        )

    def _request(
        self,
        path: str,
        body: bytes | None,
        headers: Sequence[tuple[bytes, bytes]] = (),
        *,
        method: str = "POST",
        key_header: bool = False,
    ) -> httpx.Request:
        own: dict[str, str] = {"Authorization": f"Bearer {self._key.reveal()}"}
        if key_header:
            # Anthropic-style endpoints read the key from `x-api-key` (Kimi's only so).
            own["x-api-key"] = self._key.reveal()
        if body is not None:
            own["Content-Type"] = "application/json"
        request = self._http.build_request(
            method, self.base_url + path, content=body, headers=own, timeout=self._timeout
        )
        for name, value in headers:
            request.headers[name.decode("latin-1")] = value.decode("latin-1")
        return request

    async def post(self, path: str, payload: object) -> Answer:
        """POST JSON and read the whole answer within `timeout_s`."""
        body = payload if isinstance(payload, bytes) else _encode(payload)
        try:
            with trio.fail_after(self.timeout_s):
                async with self.stream(path, body) as answer:
                    return await answer.read()
        except trio.TooSlowError:
            raise self._too_slow() from None

    def _too_slow(self) -> UpstreamTimeout:
        return UpstreamTimeout(f"{self.name} did not answer within {self.timeout_s:g} s")

    async def get(self, path: str) -> Answer:
        """GET and read the whole answer within `timeout_s`."""
        try:
            with trio.fail_after(self.timeout_s):
                async with self.stream(path, None, method="GET") as answer:
                    return await answer.read()
        except trio.TooSlowError:
            raise self._too_slow() from None

    @asynccontextmanager
    async def stream(
        self,
        path: str,
        body: bytes | None,
        headers: Sequence[tuple[bytes, bytes]] = (),
        *,
        method: str = "POST",
        key_header: bool = False,
    ) -> AsyncIterator[StreamAnswer]:
        """Send and yield the answer with its body unread; `timeout_s` bounds the wait for
        the first byte and each silence after it, never the whole stream. `headers` are
        the client's headers the protocol needs (never its credentials)."""
        request = self._request(path, body, headers, method=method, key_header=key_header)
        try:
            with trio.fail_after(self.timeout_s):
                response = await self._http.send(request, stream=True)
        except trio.TooSlowError:
            raise self._too_slow() from None
        except httpx.HTTPError as exc:
            raise self._mapped(exc) from exc
        answer = StreamAnswer(self, response)
        try:
            yield answer
        finally:
            with trio.CancelScope(shield=True):
                await answer.aclose()

    def _mapped(self, exc: httpx.HTTPError) -> Exception:
        mapped = map_error(exc, self.name)
        mapped.message = self.scrub(mapped.message)
        mapped.args = (mapped.message,)
        return mapped


class StreamAnswer:
    """A streaming answer: body bytes as they arrive (decoded), errors mapped."""

    def __init__(self, http: ProviderHTTP, response: httpx.Response) -> None:
        self._http = http
        self._response = response
        self._chunks = response.aiter_bytes()
        self.status = response.status_code
        self.headers = response.headers

    def __aiter__(self) -> StreamAnswer:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await anext(self._chunks)
        except httpx.HTTPError as exc:
            raise self._http._mapped(exc) from exc

    async def read(self) -> Answer:
        body = b"".join([chunk async for chunk in self])
        return Answer(self.status, self.headers, body)

    async def aclose(self) -> None:
        await self._chunks.aclose()  # type: ignore[attr-defined]
        await self._response.aclose()


__all__ = ["Answer", "ProviderHTTP", "StreamAnswer", "UpstreamProtocol", "make_provider_client"]
