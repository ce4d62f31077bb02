"""Ollama's ``/v1/chat/completions`` as ``middleware/openai.go`` (ChatWriter) and
``openai/openai.go`` serve it, and the OpenAI-shaped pieces its other routes share
(errors, tool calls, usage, reasoning effort, image URLs)."""

from __future__ import annotations

import base64
import binascii
import json
import random
import time
from typing import TYPE_CHECKING, Any

from .http import Exchange
from .middleware import Rewriter, field_error, go_bind, native_error, unix
from .wire import go_json

if TYPE_CHECKING:
    from .ollama import OllamaEmulator

FINGERPRINT = "fp_ollama"
_IMAGE_PREFIXES = tuple(f"data:image/{t};base64," for t in ("jpeg", "jpg", "png", "webp"))


def openai_error(status: int, message: str) -> bytes:
    """openai.NewError, written by json.Encoder (a trailing newline)."""
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    error = {"message": message, "type": kind, "param": None, "code": None}
    return go_json({"error": error}) + b"\n"


async def reject(exchange: Exchange, status: int, message: str) -> None:
    """c.AbortWithStatusJSON(status, openai.NewError(...)): gin's JSON, no newline."""
    body = openai_error(status, message).rstrip(b"\n")
    await exchange.respond(status, body, content_type="application/json; charset=utf-8")


def think_from_effort(effort: object) -> tuple[object, str | None]:
    """openai.thinkFromReasoningEffort: the think value (None = model default) or an error."""
    if effort in (None, ""):
        return None, None
    mapping: dict[object, object] = {
        "none": False,
        "minimal": "low",
        "low": "low",
        "medium": "medium",
        "high": "high",
        "max": "max",
        "xhigh": "max",
        "ultra": "max",
    }
    if effort in mapping:
        return mapping[effort], None
    return None, (
        f'invalid reasoning value: {json.dumps(effort)} (must be "minimal", "low", '
        '"medium", "high", "xhigh", "ultra", "max", or "none")'
    )


def decode_image_url(url: str) -> tuple[str | None, str | None]:
    """openai.decodeImageURL: base64 data of a data: URL, or the error Ollama gives."""
    if url.startswith(("http://", "https://")):
        return None, (
            "image URLs are not currently supported, please use base64 encoded data instead"
        )
    if url.startswith("data:;base64,"):
        data = url.removeprefix("data:;base64,")
    else:
        prefix = next((p for p in _IMAGE_PREFIXES if url.startswith(p)), None)
        if prefix is None:
            return None, "invalid image input"
        data = url.removeprefix(prefix)
    try:
        base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None, "invalid image input"
    return data, None


def _tool_calls_in(calls: object) -> tuple[list[dict[str, Any]], str | None]:
    """openai.FromCompletionToolCall: arguments go from a JSON string to an object."""
    out = []
    for call in calls if isinstance(calls, list) else []:
        if not isinstance(call, dict):
            return [], "invalid tool call arguments"
        function = call.get("function") if isinstance(call.get("function"), dict) else {}
        try:
            arguments = json.loads(function.get("arguments") or "")
        except (json.JSONDecodeError, TypeError):
            return [], "invalid tool call arguments"
        out.append({"id": call.get("id", ""), "function": {"name": function.get("name", "")}})
        out[-1]["function"]["arguments"] = arguments
    return out, None


def _messages_in(req: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
    """openai.FromChatRequest's message loop: content parts become messages of their own."""
    source = req.get("messages") or []
    messages: list[dict[str, Any]] = []
    for msg in source:
        role = str(msg.get("role", "")).lower()
        tool_name = ""
        if role == "tool":
            tool_name = msg.get("name") or ""
            if not tool_name and msg.get("tool_call_id"):
                for earlier in reversed(source):
                    for call in earlier.get("tool_calls") or []:
                        if call.get("id") == msg["tool_call_id"]:
                            tool_name = tool_name or call.get("function", {}).get("name", "")
        extra = {"thinking": msg.get("reasoning") or "", "tool_name": tool_name}
        extra["tool_call_id"] = msg.get("tool_call_id") or ""
        calls, err = _tool_calls_in(msg.get("tool_calls"))
        if err is not None:
            return [], err
        content = msg.get("content")
        if isinstance(content, str):
            messages.append({"role": role, "content": content, "tool_calls": calls, **extra})
        elif isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    messages.append({"role": role, "content": part["text"]})
                elif kind == "image_url":
                    image = part.get("image_url")
                    url = image.get("url") if isinstance(image, dict) else image
                    if not isinstance(url, str):
                        return [], "invalid message format"
                    data, err = decode_image_url(url)
                    if err is not None:
                        return [], err
                    messages.append({"role": role, "content": "", "images": [data]})
                else:
                    return [], "invalid message format"
            if messages and calls:
                messages[-1].update(tool_calls=calls, **extra)
        elif msg.get("tool_calls") is None:
            got = {dict: "map[string]interface {}", bool: "bool"}.get(type(content), "<nil>")
            return [], f"invalid message content type: {got}"
        else:
            messages.append({"role": role, "content": "", "tool_calls": calls, **extra})
    return [
        {k: v for k, v in m.items() if v not in ("", [], None) or k == "content"} for m in messages
    ], None


def sampling(req: dict[str, Any], options: dict[str, Any]) -> None:
    stop = req.get("stop")
    if isinstance(stop, str):
        options["stop"] = [stop]
    elif isinstance(stop, list):
        options["stop"] = [s for s in stop if isinstance(s, str)]
    if req.get("max_tokens") is not None:
        options["num_predict"] = req["max_tokens"]
    options["temperature"] = req["temperature"] if req.get("temperature") is not None else 1.0
    if req.get("seed") is not None:
        options["seed"] = req["seed"]


def from_chat_request(req: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """openai.FromChatRequest: the /api/chat request the middleware hands down."""
    messages, err = _messages_in(req)
    if err is not None:
        return {}, err
    options: dict[str, Any] = {}
    sampling(req, options)
    for name in ("frequency_penalty", "presence_penalty"):
        if req.get(name) is not None:
            options[name] = req[name]
    options["top_p"] = req["top_p"] if req.get("top_p") is not None else 1.0
    chat: dict[str, Any] = {"model": req.get("model", ""), "messages": messages}
    response_format = req.get("response_format")
    if isinstance(response_format, dict):
        kind = str(response_format.get("type", "")).strip().lower()
        schema = response_format.get("json_schema")
        if kind == "json_object":
            chat["format"] = "json"
        elif kind == "json_schema" and isinstance(schema, dict) and "schema" in schema:
            chat["format"] = schema["schema"]
    chat["options"] = options
    chat["stream"] = req.get("stream") is True
    if req.get("tools"):
        chat["tools"] = req["tools"]
    reasoning = req.get("reasoning")
    effort = reasoning.get("effort") if isinstance(reasoning, dict) else req.get("reasoning_effort")
    think, err = think_from_effort(effort)
    if err is not None:
        return {}, err
    if think is not None:
        chat["think"] = think
    if req.get("logprobs"):
        chat["logprobs"] = True
    if req.get("top_logprobs"):
        chat["top_logprobs"] = req["top_logprobs"]
    return chat, None


def tool_calls_out(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """openai.ToToolCalls: arguments back to a JSON string, the index on the call."""
    out = []
    for call in calls:
        function = call.get("function") or {}
        arguments = go_json(function.get("arguments") or {}).decode()
        out.append(
            {
                "id": call.get("id", ""),
                "index": function.get("index", 0),
                "type": "function",
                "function": {"name": function.get("name", ""), "arguments": arguments},
            }
        )
    return out


def usage_of(obj: dict[str, Any]) -> dict[str, int]:
    prompt, completion = obj.get("prompt_eval_count", 0), obj.get("eval_count", 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def from_native_error(status: int, body: bytes) -> bytes:
    """BaseWriter.writeError: a native ``{"error": ...}`` body as openai.NewError."""
    message = native_error(body) or (
        "something went wrong, please see the ollama server logs for details"
    )
    return openai_error(status, message)


class OpenAIWriter(Rewriter):
    """The writers of middleware/openai.go share their error conversion."""

    def error(self, status: int, body: bytes) -> bytes:
        return from_native_error(status, body)


class ChatWriter(OpenAIWriter):
    """middleware.ChatWriter: chat.completion, or chunks then ``data: [DONE]``."""

    def __init__(self, exchange: Exchange, body: bytes, *, include_usage: bool) -> None:
        super().__init__(exchange, body)
        self.id = f"chatcmpl-{random.randrange(999)}"
        self.include_usage = include_usage
        self.first_sent = False
        self.tool_call_sent = False
        self.created = 0

    def whole(self, obj: dict[str, Any]) -> bytes:
        msg = obj.get("message") or {}
        calls = tool_calls_out(msg.get("tool_calls") or [])
        reason = obj.get("done_reason") or None
        if reason == "stop" and calls:
            reason = "tool_calls"
        message: dict[str, Any] = {"role": msg.get("role", ""), "content": msg.get("content", "")}
        if msg.get("thinking"):
            message["reasoning"] = msg["thinking"]
        if calls:
            message["tool_calls"] = calls
        completion = {
            "id": self.id,
            "object": "chat.completion",
            "created": unix(obj.get("created_at")),
            "model": obj.get("model", ""),
            "system_fingerprint": FINGERPRINT,
            "choices": [{"index": 0, "message": message, "finish_reason": reason}],
            "usage": usage_of(obj),
        }
        if obj.get("logprobs"):
            completion["choices"][0]["logprobs"] = {"content": obj["logprobs"]}
        return go_json(completion) + b"\n"

    def _chunk(self, obj: dict[str, Any], delta: dict[str, Any], finish: str | None = None) -> Any:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": obj.get("model", ""),
            "system_fingerprint": FINGERPRINT,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    def _deltas(self, msg: dict[str, Any], include_role: bool) -> list[dict[str, Any]]:
        """openai.ToStreamChunks: thinking and content/tool calls in one line -> two chunks."""
        role = {"role": "assistant"} if include_role else {}
        thinking, content = msg.get("thinking") or "", msg.get("content") or ""
        calls = tool_calls_out(msg.get("tool_calls") or [])
        if thinking and (content or calls):
            second: dict[str, Any] = {"content": content}
            if calls:
                second["tool_calls"] = calls
            return [{**role, "reasoning": thinking}, second]
        delta: dict[str, Any] = {**role, "content": content}
        if thinking:
            delta["reasoning"] = thinking
        if calls:
            delta["tool_calls"] = calls
        return [delta]

    def line(self, obj: dict[str, Any]) -> list[bytes]:
        if not self.created:
            self.created = unix(obj.get("created_at")) or int(time.time())
        msg = obj.get("message") or {}
        done = obj.get("done") is True
        empty_trailer = (
            done
            and self.first_sent
            and not msg.get("content")
            and not msg.get("thinking")
            and not msg.get("tool_calls")
            and not obj.get("logprobs")
        )
        out = b""
        if not empty_trailer:
            for index, delta in enumerate(self._deltas(msg, not self.first_sent)):
                self.tool_call_sent = self.tool_call_sent or bool(delta.get("tool_calls"))
                chunk = self._chunk(obj, delta)
                if index == 0 and obj.get("logprobs"):  # the split-off content chunk has none
                    chunk["choices"][0]["logprobs"] = {"content": obj["logprobs"]}
                out += b"data: " + go_json(chunk) + b"\n\n"
            self.first_sent = True
        if done:
            reason = obj.get("done_reason") or "stop"
            if reason == "stop" and self.tool_call_sent:
                reason = "tool_calls"
            finish = self._chunk(obj, {}, reason)
            out += b"data: " + go_json(finish) + b"\n\n"
            if self.include_usage:
                finish.update(choices=[], usage=usage_of(obj))
                out += b"data: " + go_json(finish) + b"\n\n"
            out += b"data: [DONE]\n\n"
        return [out]


# ------------------------------------------------------------------ routes

_CHAT_FIELDS = {"model": str, "messages": list, "stream": bool, "tools": list}


async def chat_completions(emu: OllamaEmulator, exchange: Exchange) -> None:
    req, err = go_bind(exchange.request.body, "openai.ChatCompletionRequest")
    err = err or field_error(req, "ChatCompletionRequest", _CHAT_FIELDS)
    if err is None and not all(isinstance(m, dict) for m in req.get("messages") or []):
        err = (
            "json: cannot unmarshal string into Go struct field "
            "ChatCompletionRequest.messages of type openai.Message"
        )
    if err is None and not req.get("messages"):
        err = "[] is too short - 'messages'"
    chat: dict[str, Any] = {}
    if err is None:
        chat, err = from_chat_request(req)
    if err is not None:
        await reject(exchange, 400, err)
        return
    options = req.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    writer = ChatWriter(exchange, go_json(chat), include_usage=include_usage)
    await emu._complete(writer, chat=True)  # type: ignore[arg-type]
