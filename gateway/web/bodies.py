"""Decoding JSON request bodies: strictly, and every failure a 400 that says what is wrong."""

from __future__ import annotations

from typing import TypeVar

import msgspec

from gateway.errors import BadRequest

T = TypeVar("T")


def decode_body(body: bytes, decoder: msgspec.json.Decoder[T]) -> T:
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
