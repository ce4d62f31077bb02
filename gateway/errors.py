"""The gateway's one error tree, and the one place where an error becomes an HTTP status.

```
GatewayError                      status  meaning
├── BadRequest                      400   the client's body or query is wrong
│   ├── PayloadTooLarge             413   the body is over `max_body_bytes`
│   ├── UnsupportedMediaType        415   a request Content-Encoding the gateway cannot decode
│   └── ProtocolNotServed           400   the model's provider does not serve this client API
├── Unauthorized                    401   inbound bearer token missing or wrong
├── Forbidden                       403   a route this configuration refuses
├── MethodNotAllowed                405   the route exists, not with this method
├── ModelNotFound                   404   the target has no such model
├── ProviderNotRegistered           404   the model's provider has no key configured
├── LedgerOff                       404   usage asked of a gateway whose ledger is off
├── BudgetExceeded                  429   a client's daily cloud cap is reached
├── RouteMissing                    404   the Ollama target is older than the route
├── Unavailable                     503   the gateway cannot take the request now
│   ├── GateFull                    503   the chat queue is at `max_queue`
│   ├── GateTimeout                 503   waited `max_wait_s` for the chat gate
│   ├── ShuttingDown                503   a signal asked the gateway to stop
│   └── TargetDegraded              503   the Ollama target is known to be unreachable
└── UpstreamError                   502   an upstream call failed
    ├── UpstreamUnavailable         502   refused, DNS, connect timeout (retry-eligible)
    ├── UpstreamTimeout             504   an upstream deadline of ours fired
    ├── UpstreamStatus              502   the upstream answered 4xx/5xx (429 stays 429)
    └── UpstreamProtocol            502   bad JSON, a line over 4 MiB, a dropped connection
```

Transport failures are mapped into this tree once: by `gateway.h1.client` (the Ollama
target's own HTTP/1.1 client) and by `gateway.upstream.map_error` for the providers' httpx
client; nothing above those layers sees a socket or an httpx error.
"""

from __future__ import annotations

import msgspec

# What msgspec raises for bytes it cannot decode: `DecodeError`, but also
# `UnicodeDecodeError` (invalid UTF-8 inside a string it reads) and `RecursionError` (deep
# nesting, even inside a field it skips). Catch all three wherever bytes from a client or
# an upstream are decoded (ADR 0013).
DECODE_ERRORS: tuple[type[Exception], ...] = (
    msgspec.DecodeError,
    UnicodeDecodeError,
    RecursionError,
)


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose; carries its HTTP status."""

    status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def headers(self) -> dict[str, str]:
        """Extra response headers this error asks for (for example `Retry-After`)."""
        return {}


class BadRequest(GatewayError):
    status = 400


class PayloadTooLarge(BadRequest):
    status = 413

    def headers(self) -> dict[str, str]:
        # The rest of the body was never read: the connection cannot carry another request.
        return {"Connection": "close"}


class UnsupportedMediaType(BadRequest):
    """A request body in a content coding the gateway does not decode (br, compress...);
    `Accept-Encoding` says which it does (RFC 9110 15.5.16)."""

    status = 415

    def __init__(self, message: str, *, accept_encoding: str) -> None:
        super().__init__(message)
        self.accept_encoding = accept_encoding

    def headers(self) -> dict[str, str]:
        return {"Accept-Encoding": self.accept_encoding}


class ProtocolNotServed(BadRequest):
    """A client API (OpenAI Responses, Anthropic Messages...) the model's provider does
    not serve: said plainly, never converted into another protocol."""


class Unauthorized(GatewayError):
    status = 401

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class Forbidden(GatewayError):
    status = 403


class MethodNotAllowed(GatewayError):
    status = 405

    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}  # refused before its body was read


class ModelNotFound(GatewayError):
    """Worded exactly as Ollama words it, so Ollama clients recognise it."""

    status = 404

    def __init__(self, model: str) -> None:
        super().__init__(f'model "{model}" not found, try pulling it first')
        self.model = model


class ProviderNotRegistered(GatewayError):
    status = 404


class LedgerOff(GatewayError):
    status = 404


class BudgetExceeded(GatewayError):
    """A client's daily cap on a cloud provider is reached; `Retry-After` is the reset."""

    status = 429

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class RouteMissing(GatewayError):
    """The Ollama target answered 404 for a route it does not have (an older Ollama)."""

    status = 404


class Unavailable(GatewayError):
    status = 503

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class GateFull(Unavailable):
    pass


class GateTimeout(Unavailable):
    pass


class ShuttingDown(Unavailable):
    pass


class TargetDegraded(Unavailable):
    pass


class UpstreamError(GatewayError):
    status = 502


class UpstreamUnavailable(UpstreamError):
    """The upstream could not be reached at all; safe to retry, and a sign of degradation."""


class UpstreamTimeout(UpstreamError):
    status = 504


class UpstreamStatus(UpstreamError):
    """The upstream answered with an error status; `upstream_status` keeps what it said."""

    # What an upstream says about a body the client wrote itself (the OpenAI front door
    # forwards it): the client's to fix, so the status is kept. 401/403 are about our key.
    CLIENT_FAULTS = frozenset({400, 404, 409, 413, 415, 422})

    def __init__(
        self,
        message: str,
        *,
        upstream_status: int,
        retry_after: str | None = None,
        body_is_clients: bool = False,
    ) -> None:
        super().__init__(message)
        self.upstream_status = upstream_status
        self.retry_after = retry_after
        # A rate limit is the client's to see and honour; every other failure is ours (502).
        self.status = 429 if upstream_status == 429 else 502
        if body_is_clients and upstream_status in self.CLIENT_FAULTS:
            self.status = upstream_status

    def headers(self) -> dict[str, str]:
        return {"Retry-After": self.retry_after} if self.retry_after else {}


class UpstreamProtocol(UpstreamError):
    pass


class _ErrorBody(msgspec.Struct):
    error: str


_encode = msgspec.json.Encoder().encode


def error_body(message: str) -> bytes:
    """Ollama's error shape, `{"error": "..."}`, as bytes."""
    return _encode(_ErrorBody(message))


def error_line(message: str) -> bytes:
    """One NDJSON error line, as Ollama ends a stream that failed after it started."""
    return _encode(_ErrorBody(message)) + b"\n"
