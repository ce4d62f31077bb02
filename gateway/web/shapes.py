"""Each client API's own error shapes, before and after the first byte of an answer.

SDKs raise their typed exceptions only for their protocol's envelope, so a refusal on
`/v1/messages` must look like Anthropic's and one on `/v1/chat/completions` like OpenAI's.
After the first byte the status is gone: a stream ends with the protocol's in-band error
(an OpenAI error chunk then `[DONE]`; a Responses `error` event; an Anthropic `error`
event), never with a silent cut.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from gateway.errors import GatewayError
from gateway.providers.protocols import MESSAGES, RESPONSES, Protocol, Shape
from gateway.providers.sse import DONE, sse_event
from gateway.record import RequestRecord
from gateway.web.asgi import Responder, Send

_encode = msgspec.json.Encoder().encode

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
}
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def openai_error(error: GatewayError) -> bytes:
    """`{"error": {"message", "type", "param", "code"}}`, as OpenAI's SDKs parse it."""
    kind = _OPENAI_TYPES.get(error.status, "api_error")
    code = "model_not_found" if error.status == 404 else None
    return _encode({"error": {"message": error.message, "type": kind, "param": None, "code": code}})


def anthropic_error(error: GatewayError) -> bytes:
    """`{"type": "error", "error": {"type", "message"}}`, as Anthropic's SDKs parse it."""
    kind = _ANTHROPIC_TYPES.get(error.status, "api_error")
    return _encode({"type": "error", "error": {"type": kind, "message": error.message}})


def sse_error_tail(error: GatewayError, mid_event: bool) -> bytes:
    """OpenAI chat and completions streams: an error chunk, then `[DONE]`."""
    return (b"\n\n" if mid_event else b"") + sse_event(openai_error(error)) + DONE


def responses_error_tail(error: GatewayError, mid_event: bool) -> bytes:
    """A Responses stream: its `error` event."""
    kind = _OPENAI_TYPES.get(error.status, "api_error")
    data = _encode({"type": "error", "code": kind, "message": error.message, "param": None})
    return (b"\n\n" if mid_event else b"") + b"event: error\n" + sse_event(data)


def anthropic_error_tail(error: GatewayError, mid_event: bool) -> bytes:
    """A Messages stream: Anthropic's `error` event."""
    return (b"\n\n" if mid_event else b"") + b"event: error\n" + sse_event(anthropic_error(error))


def error_body_for(protocol: Protocol) -> Callable[[GatewayError], bytes]:
    return anthropic_error if protocol.shape is Shape.ANTHROPIC else openai_error


def stream_tail_for(protocol: Protocol) -> Callable[[GatewayError, bool], bytes]:
    if protocol is MESSAGES:
        return anthropic_error_tail
    if protocol is RESPONSES:
        return responses_error_tail
    return sse_error_tail


def responder_for(protocol: Protocol, send: Send, record: RequestRecord) -> Responder:
    return Responder(
        send,
        error_body=error_body_for(protocol),
        stream_tail=stream_tail_for(protocol),
        record=record,
    )
