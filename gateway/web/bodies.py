"""Decoding JSON request bodies: strictly, and every failure a 400 that says what is wrong."""

from __future__ import annotations

from typing import TypeVar

import msgspec
from quart import Request

from gateway.errors import BadRequest
from gateway.web.content_coding import decoded

T = TypeVar("T")


async def request_body(request: Request, limit: int) -> bytes:
    """A Quart route's request body, decoded when it came with a `Content-Encoding`
    (ADR 0022); Quart has already held the coded bytes to `MAX_CONTENT_LENGTH`."""
    body = await request.get_data(False, False, False)
    encoding = request.headers.getlist("Content-Encoding")
    if not encoding:
        return body
    return await decoded(",".join(encoding), body, limit)


def decode_body(body: bytes, decoder: msgspec.json.Decoder[T]) -> T:
    """Decode with `decoder`; msgspec says "bad input" as DecodeError, and also as
    UnicodeDecodeError (invalid UTF-8 in a string) and RecursionError (deep nesting)."""
    if not body.strip():
        raise BadRequest("missing request body")
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        text = str(exc)
        if "missing required field `model`" in text:
            raise BadRequest("model is required") from None
        raise BadRequest(f"invalid request body: {text}") from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("request body is nested too deeply") from None
    except UnicodeDecodeError as exc:
        # msgspec checks UTF-8 only in the strings it decodes, and says so this way.
        raise BadRequest(
            f"request body is not valid UTF-8: {exc.reason} at byte {exc.start}"
        ) from None
