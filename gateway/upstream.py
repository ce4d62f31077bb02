"""What every upstream call shares: httpx errors mapped into the gateway's tree (the one
place that knows httpx's exceptions, for the cloud providers; the Ollama target's own
client in `gateway.h1.client` raises the same texts), and the upstream's own error message
extracted."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import msgspec

from gateway.errors import (
    DECODE_ERRORS,
    UpstreamError,
    UpstreamProtocol,
    UpstreamTimeout,
    UpstreamUnavailable,
)


class _ErrorText(msgspec.Struct):
    """Ollama says `{"error": "..."}`; OpenAI-style APIs say `{"error": {"message": ...}}`."""

    error: str | dict[str, object] | None = None
    message: str | None = None


_error_decoder = msgspec.json.Decoder(_ErrorText)


MAX_MESSAGE_CHARS = 500


def cut(text: str) -> str:
    """An upstream's text as the gateway repeats it (errors, /health, the status page, the
    log, all read often): at most `MAX_MESSAGE_CHARS`, saying how long it was."""
    if len(text) <= MAX_MESSAGE_CHARS:
        return text
    return f"{text[:MAX_MESSAGE_CHARS]}... ({len(text)} characters)"


def upstream_message(body: bytes, status: int, *, scrub: Callable[[str], str]) -> str:
    """The upstream's own `{"error": ...}` text, or a short description of what it sent;
    scrubbed of the upstream's credential by `scrub` first, then cut (a cut first could
    leave part of a credential that `scrub` no longer recognises)."""
    try:
        decoded = _error_decoder.decode(body)
    except DECODE_ERRORS:
        decoded = _ErrorText()
    message = decoded.message or ""
    if isinstance(decoded.error, str):
        message = decoded.error
    elif isinstance(decoded.error, dict) and isinstance(decoded.error.get("message"), str):
        message = str(decoded.error["message"])
    if not message:
        text = body[:200].decode("utf-8", "replace").strip()
        message = text or "empty body"
    return f"{cut(scrub(message))} (upstream status {status})"


def map_error(exc: httpx.HTTPError, target: str) -> UpstreamError:
    """Translate one httpx error into the gateway's tree (the only place that knows httpx)."""
    if isinstance(exc, httpx.ConnectTimeout):
        return UpstreamUnavailable(f"{target} did not accept a connection in time")
    if isinstance(exc, httpx.ConnectError):
        return UpstreamUnavailable(f"{target} is unreachable: {_reason(exc)}")
    if isinstance(exc, httpx.PoolTimeout):
        return UpstreamUnavailable(f"no free connection to {target}")
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout(f"{target} sent nothing for too long ({type(exc).__name__})")
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError):
        return UpstreamProtocol(f"{target} dropped the connection: {_reason(exc)}")
    return UpstreamProtocol(f"{target}: {type(exc).__name__}: {_reason(exc)}")


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
