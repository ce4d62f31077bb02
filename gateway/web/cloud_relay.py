"""A cloud provider's answer handed to the client as it arrives (client-API routes, and
Ollama's native routes for cloud models): status, content type and body bytes.

The body is the provider's own, except that its key is scrubbed if it echoes it. An error
status before the first byte is kept with its body (the client's SDK reads the
provider's own envelope), save 401/403, which are about the gateway's key: a 502 with the
provider's message. After the first byte a failure ends the stream in-band (the
responder's tail: SSE error event, or an NDJSON error line).
"""

from __future__ import annotations

from collections.abc import Sequence

import trio

from gateway.errors import UpstreamError
from gateway.providers.client_api import ClientAPI
from gateway.providers.http import StreamAnswer
from gateway.providers.protocols import UsageTally
from gateway.providers.sse import SseWatch
from gateway.record import RequestRecord
from gateway.target.ndjson import FrameWatch
from gateway.web.asgi import Headers, Responder

_OUR_KEY = frozenset({401, 403})


async def relay_cloud(
    api: ClientAPI,
    path: str,
    body: bytes,
    responder: Responder,
    record: RequestRecord,
    *,
    headers: Sequence[tuple[bytes, bytes]] = (),
    key_header: bool = False,
) -> None:
    """POST `body` to `path` at `api`'s provider and relay the answer to `responder`."""
    http = api.http
    sent = trio.current_time()
    try:
        async with http.stream(path, body, headers, key_header=key_header) as answer:
            record.upstream_headers_s = trio.current_time() - sent
            content_type = answer.headers.get("content-type", "application/json").encode()
            out: Headers = [(b"content-type", content_type)]
            if answer.status >= 400:
                whole = await answer.read()
                if whole.status in _OUR_KEY:
                    raise http.status_error(whole)
                retry_after = whole.headers.get("retry-after")
                if retry_after:
                    out.append((b"retry-after", retry_after.encode("latin-1")))
                await responder.full(whole.status, http.scrub_bytes(whole.body), out)
                return
            if content_type.startswith(b"text/event-stream"):
                await _stream(answer, responder, record, out, ndjson=False, api=api)
            elif content_type.startswith(b"application/x-ndjson"):
                await _stream(answer, responder, record, out, ndjson=True, api=api)
            else:
                whole = await answer.read()
                if whole.status == 200:
                    _note_whole(whole.body, record)
                await responder.full(whole.status, http.scrub_bytes(whole.body), out)
    finally:
        record.upstream_s = trio.current_time() - sent


async def _stream(
    answer: StreamAnswer,
    responder: Responder,
    record: RequestRecord,
    headers: Headers,
    *,
    ndjson: bool,
    api: ClientAPI,
) -> None:
    await responder.start(200, headers)
    sse = None if ndjson else SseWatch()
    frames = FrameWatch() if ndjson else None
    try:
        async for chunk in answer:
            if sse is not None:
                sse.feed(chunk)
            elif frames is not None:
                frames.feed(chunk)
            await responder.chunk(api.http.scrub_bytes(chunk))
    except UpstreamError as exc:
        mid = sse.mid_event if sse is not None else bool(frames and frames.mid_line)
        await responder.fail(exc, mid_line=mid)
        return
    finally:
        if sse is not None:
            record.tokens_in, record.tokens_out = sse.usage.tokens_in, sse.usage.tokens_out
        elif frames is not None and frames.last_line:
            record.note_final_frame(frames.last_line)
    await responder.end()


def _note_whole(body: bytes, record: RequestRecord) -> None:
    usage = UsageTally()
    usage.feed(body)
    if usage.tokens_in or usage.tokens_out:
        record.tokens_in, record.tokens_out = usage.tokens_in, usage.tokens_out
    else:
        record.note_final_frame(body)  # Ollama's native whole answer
