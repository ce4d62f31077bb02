"""Load-option pinning: `[models."name"] num_ctx = ..., keep_alive = ...` (ADR 0017).

Ollama reloads a model whenever a request's load-time options differ from the ones it was
loaded with (ollama/ollama#8903; `needsReload` in server/sched.go): two clients that
disagree on `num_ctx` make it unload and load on every alternation. A pinned model gets the
configured values whatever the client sent. This is the one documented exception to
byte-faithful bodies, and only for configured models: their generation bodies are decoded
and re-encoded (same JSON values; spacing and escapes may differ).

Ollama's OpenAI (`/v1/chat/completions`, `/v1/completions`, `/v1/responses`) and Anthropic
(`/v1/messages`) routes accept no load-time option at all (openai/openai.go and
anthropic/anthropic.go convert only sampling fields into `options`): Ollama loads those
with its own defaults (`OLLAMA_CONTEXT_LENGTH`, `OLLAMA_KEEP_ALIVE`). Nothing in their
bodies can pin, so `pin_body` leaves them as they are; on a host serving pinned models to
those routes, set the host's defaults to the pinned values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import msgspec

from gateway.config import ModelConfig
from gateway.errors import DECODE_ERRORS
from gateway.target.wire import canonical_model

Protocol = Literal["ollama", "openai", "anthropic"]
Pins = Mapping[str, ModelConfig]  # by canonical model name

_decode = msgspec.json.Decoder(dict[str, Any]).decode
_encode = msgspec.json.Encoder().encode


def pins_of(models: Mapping[str, ModelConfig]) -> dict[str, ModelConfig]:
    """The configured pins, keyed as Ollama names models (`llama3` is `llama3:latest`)."""
    return {
        canonical_model(name): pin
        for name, pin in models.items()
        if pin.num_ctx is not None or pin.keep_alive is not None
    }


def pin_for(pins: Pins, model: str) -> ModelConfig | None:
    return pins.get(canonical_model(model)) if pins else None


def pin_body(body: bytes, pin: ModelConfig, protocol: Protocol = "ollama") -> bytes:
    """`body` with the pinned load options set; unchanged when nothing applies.

    Only Ollama's native generation bodies (`/api/chat`, `/api/generate`) carry load
    options; the compat protocols cannot (see the module docstring). A body that is not a
    JSON object is left for the route's own validation to refuse.
    """
    if protocol != "ollama" or (pin.num_ctx is None and pin.keep_alive is None):
        return body
    try:
        request = _decode(body)
    except DECODE_ERRORS:
        return body
    options = request.get("options")
    if options is not None and not isinstance(options, dict):
        return body  # Ollama's own 400 says what is wrong with it
    return _encode(pin_request(request, pin))


def pin_request(request: Mapping[str, Any], pin: ModelConfig) -> dict[str, Any]:
    """A native Ollama generation request (decoded) with the pinned load options set."""
    pinned = dict(request)
    if pin.num_ctx is not None:
        options = request.get("options")
        pinned["options"] = {
            **(options if isinstance(options, dict) else {}),
            "num_ctx": pin.num_ctx,
        }
    if pin.keep_alive is not None:
        pinned["keep_alive"] = pin.keep_alive
    return pinned
