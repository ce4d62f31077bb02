"""Ollama's other OpenAI-compatible routes (``middleware/openai.go``): ``/v1/completions``
(around /api/generate), ``/v1/embeddings`` (around /api/embed), ``/v1/models`` (around
/api/tags) and ``/v1/models/{model}`` (around /api/show)."""

from __future__ import annotations

import base64
import random
import struct
import time
from typing import TYPE_CHECKING, Any

from .http import Exchange
from .middleware import field_error, go_bind, unix
from .ollama_openai import FINGERPRINT, OpenAIWriter, reject, sampling, usage_of
from .wire import go_json

if TYPE_CHECKING:
    from .ollama import OllamaEmulator


class CompleteWriter(OpenAIWriter):
    """middleware.CompleteWriter: text_completion objects from /api/generate."""

    def __init__(self, exchange: Exchange, body: bytes, *, include_usage: bool) -> None:
        super().__init__(exchange, body)
        self.id = f"cmpl-{random.randrange(999)}"
        self.include_usage = include_usage

    def _choices(self, obj: dict[str, Any]) -> list[dict[str, Any]]:
        reason = obj.get("done_reason") or None
        return [{"text": obj.get("response", ""), "index": 0, "finish_reason": reason}]

    def whole(self, obj: dict[str, Any]) -> bytes:
        completion = {
            "id": self.id,
            "object": "text_completion",
            "created": unix(obj.get("created_at")),
            "model": obj.get("model", ""),
            "system_fingerprint": FINGERPRINT,
            "choices": self._choices(obj),
            "usage": usage_of(obj),
        }
        return go_json(completion) + b"\n"

    def line(self, obj: dict[str, Any]) -> list[bytes]:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "text_completion",
            "created": int(time.time()),
            "choices": self._choices(obj),
            "model": obj.get("model", ""),
            "system_fingerprint": FINGERPRINT,
        }
        if self.include_usage:  # a zero usage on every chunk, as Ollama does
            chunk["usage"] = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        out = b"data: " + go_json(chunk) + b"\n\n"
        if obj.get("done") is True:
            if self.include_usage:
                chunk.update(choices=[], usage=usage_of(obj))
                out += b"data: " + go_json(chunk) + b"\n\n"
            out += b"data: [DONE]\n\n"
        return [out]


class EmbedWriter(OpenAIWriter):
    """middleware.EmbedWriter: an embedding list, floats or little-endian float32 base64."""

    def __init__(self, exchange: Exchange, body: bytes, *, model: str, encoding: str) -> None:
        super().__init__(exchange, body)
        self.model, self.base64 = model, encoding.lower() == "base64"

    def whole(self, obj: dict[str, Any]) -> bytes:
        vectors = obj.get("embeddings")
        if vectors is None:
            empty = {"object": "", "data": None, "model": "", "usage": usage_of({})}
            return go_json(empty) + b"\n"
        data = []
        for index, vector in enumerate(vectors):
            value: object = vector
            if self.base64:
                value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "embedding": value, "index": index})
        tokens = obj.get("prompt_eval_count", 0)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        listing = {"object": "list", "data": data or None, "model": self.model, "usage": usage}
        return go_json(listing) + b"\n"


def namespace(model: str) -> str:
    """model.ParseName(name).Namespace: ``library`` unless the name carries one."""
    parts = model.rsplit(":", 1)[0].split("/")
    return parts[-2] if len(parts) >= 2 else "library"


class ListWriter(OpenAIWriter):
    """middleware.ListWriter: /api/tags as an OpenAI model list."""

    def whole(self, obj: dict[str, Any]) -> bytes:
        data = [
            {
                "id": m.get("model") or m.get("name"),
                "object": "model",
                "created": unix(m.get("modified_at")),
                "owned_by": namespace(m.get("model") or m.get("name") or ""),
            }
            for m in obj.get("models") or []
        ]
        return go_json({"object": "list", "data": data or None}) + b"\n"


class RetrieveWriter(OpenAIWriter):
    """middleware.RetrieveWriter: /api/show as one OpenAI model."""

    def __init__(self, exchange: Exchange, body: bytes, *, model: str) -> None:
        super().__init__(exchange, body)
        self.model = model

    def whole(self, obj: dict[str, Any]) -> bytes:
        created = unix(obj.get("modified_at"))
        model = {"id": self.model, "object": "model", "created": created}
        model["owned_by"] = namespace(self.model)
        return go_json(model) + b"\n"


# ------------------------------------------------------------------ routes

_COMPLETE_FIELDS = {"model": str, "prompt": str, "stream": bool, "suffix": str}


async def completions(emu: OllamaEmulator, exchange: Exchange) -> None:
    req, err = go_bind(exchange.request.body, "openai.CompletionRequest")
    err = err or field_error(req, "CompletionRequest", _COMPLETE_FIELDS)
    options: dict[str, Any] = {}
    stop = req.get("stop")
    if err is None and isinstance(stop, list):
        bad = next((s for s in stop if not isinstance(s, str)), None)
        if bad is not None:
            kind = {int: "float64", float: "float64", bool: "bool"}.get(type(bad), "<nil>")
            err = f"invalid type for 'stop' field: {kind}"
    if err is not None:
        await reject(exchange, 400, err)
        return
    sampling(req, options)
    options["frequency_penalty"] = req.get("frequency_penalty") or 0
    options["presence_penalty"] = req.get("presence_penalty") or 0
    options["top_p"] = req.get("top_p") or 1.0
    generate = {
        "model": req.get("model", ""),
        "prompt": req.get("prompt", ""),
        "suffix": req.get("suffix", ""),
        "options": options,
        "stream": req.get("stream") is True,
    }
    stream_options = req.get("stream_options")
    include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage")
    writer = CompleteWriter(exchange, go_json(generate), include_usage=include_usage is True)
    await emu._complete(writer, chat=False)  # type: ignore[arg-type]


async def embeddings(emu: OllamaEmulator, exchange: Exchange) -> None:
    req, err = go_bind(exchange.request.body, "openai.EmbedRequest")
    encoding = req.get("encoding_format") or ""
    if err is None and not isinstance(encoding, str):
        err = field_error(req, "EmbedRequest", {"encoding_format": str})
    elif err is None and encoding and encoding.lower() not in ("float", "base64"):
        err = (
            f"Invalid value for 'encoding_format' = {encoding}. "
            "Supported values: ['float', 'base64']."
        )
    inputs = req.get("input")
    if inputs == "":
        inputs = [""]
    if err is None and (inputs is None or inputs == []):
        err = "invalid input"
    if err is not None:
        await reject(exchange, 400, err)
        return
    embed: dict[str, Any] = {"model": req.get("model", ""), "input": inputs}
    if req.get("dimensions"):
        embed["dimensions"] = req["dimensions"]
    model = req.get("model") if isinstance(req.get("model"), str) else ""
    writer = EmbedWriter(exchange, go_json(embed), model=model or "", encoding=encoding)
    await emu._embed(writer)  # type: ignore[arg-type]


async def list_models(emu: OllamaEmulator, exchange: Exchange) -> None:
    await emu._tags(ListWriter(exchange, b""))  # type: ignore[arg-type]


async def retrieve_model(emu: OllamaEmulator, exchange: Exchange, model: str) -> None:
    body = go_json({"name": model})
    await emu._show(RetrieveWriter(exchange, body, model=model))  # type: ignore[arg-type]
