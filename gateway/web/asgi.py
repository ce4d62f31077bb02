"""Small raw-ASGI helpers for the byte-faithful routes: bounded body reads, answers, and
cancellation of a request's work when its client disconnects."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

import trio

from gateway.drain import Drain
from gateway.errors import (
    BadRequest,
    GatewayError,
    PayloadTooLarge,
    ShuttingDown,
    error_body,
    error_line,
)
from gateway.h1.serve import DISCONNECT_EXTENSION
from gateway.record import RequestRecord

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

JSON = b"application/json; charset=utf-8"


class ClientGone(Exception):
    """The client disconnected before its request body arrived; there is no one to answer."""


def header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole request body, refused with 413 as soon as it is known to exceed `limit`."""
    declared = header(scope, b"content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest("Content-Length is not a number")
        if int(declared) > limit:
            raise PayloadTooLarge(f"request body is larger than the limit of {limit} bytes")
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is larger than the limit of {limit} bytes")
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


async def send_response(
    send: Send,
    status: int,
    body: bytes,
    *,
    content_type: bytes = JSON,
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    response_headers = [(b"content-type", content_type), *headers]
    response_headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": response_headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def ndjson_error_tail(error: GatewayError, mid_line: bool) -> bytes:
    """How Ollama ends a stream that failed after it started: one `{"error": ...}` line."""
    return (b"\n" if mid_line else b"") + error_line(error.message)


class Responder:
    """Sends one answer, and knows whether its first byte has gone out, so a failure
    becomes a status before it (a 502/504 with a JSON error) and an in-band error
    (shaped by `stream_tail`) after it. `start` only records the head: it goes out with
    the first body bytes, so an upstream that fails before sending any still gets a
    clean status (issue 13)."""

    def __init__(
        self,
        send: Send,
        *,
        error_body: Callable[[GatewayError], bytes] = lambda e: error_body(e.message),
        stream_tail: Callable[[GatewayError, bool], bytes] = ndjson_error_tail,
        record: RequestRecord | None = None,
    ) -> None:
        self._send = send
        self._record = record
        self._error_body = error_body
        self._stream_tail = stream_tail
        self._head: Message | None = None
        self.started = False  # the head has been handed to the server

    async def start(self, status: int, headers: Headers) -> None:
        self._head = {"type": "http.response.start", "status": status, "headers": headers}

    async def _body(self, data: bytes, more: bool) -> None:
        head = self._head
        if head is not None:
            self._head = None
            self.started = True
            await self._send(head)
        await self._send({"type": "http.response.body", "body": data, "more_body": more})

    async def chunk(self, data: bytes) -> None:
        await self._body(data, True)

    async def end(self, data: bytes = b"") -> None:
        await self._body(data, False)

    async def full(
        self, status: int, body: bytes, headers: Iterable[tuple[bytes, bytes]] = ()
    ) -> None:
        self._head = None
        self.started = True
        await send_response(self._send, status, body, headers=headers)

    async def fail(self, error: GatewayError, *, mid_line: bool = False) -> None:
        if self._record is not None:
            self._record.error = error.message
        if not self.started:
            extra = [(k.lower().encode(), v.encode()) for k, v in error.headers().items()]
            await self.full(error.status, self._error_body(error), extra)
            return
        # After the first byte the status is gone: end the stream with an in-band error.
        await self.end(self._stream_tail(error, mid_line))


async def until_disconnect(receive: Receive, work: Callable[[], Awaitable[None]]) -> None:
    """Run `work`, cancelling it if the client disconnects first.

    The request body must already be read: from here on, `receive` yields only
    `http.disconnect`. A client that leaves while queued for the gate leaves the queue;
    one that leaves mid-stream cancels the upstream call and frees the gate at once.
    """
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch)
        await work()
        nursery.cancel_scope.cancel()


async def run_tracked(
    drain: Drain,
    scope: Scope,
    receive: Receive,
    responder: Responder,
    work: Callable[[], Awaitable[None]],
) -> None:
    """Run a request's upstream work under the drain (so shutdown can end it cleanly) and
    the disconnect watch, and answer what it raises, as a status or in-band.

    The gateway's own server watches for the disconnect itself when asked through the
    `gateway.cancel_on_disconnect` extension (no task per request); any other ASGI
    server gets a watcher task that reads `receive`."""
    with drain.track() as activity:

        async def guarded() -> None:
            failure: GatewayError | None = None
            try:
                with activity.scope:
                    await work()
            except GatewayError as exc:
                failure = exc
            if activity.ended_by_shutdown:
                failure = ShuttingDown("the gateway is shutting down; retry shortly")
            if failure is not None:
                await responder.fail(failure)

        cancel_on_disconnect = (scope.get("extensions") or {}).get(DISCONNECT_EXTENSION)
        if cancel_on_disconnect is None:
            await until_disconnect(receive, guarded)
            return
        with trio.CancelScope() as client:
            cancel_on_disconnect(client)
            await guarded()
