"""Ollama's Anthropic Messages route ``POST /v1/messages``, as ``middleware/anthropic.go``
and ``anthropic/anthropic.go`` serve it: the request becomes an /api/chat request, the
chat handler's output becomes a message or its SSE events (each event its own flush; no
``ping``: Ollama sends none). Web search (server tools) is not emulated.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from typing import TYPE_CHECKING, Any

from .http import Exchange
from .middleware import SSE, Rewriter, field_error, go_bind, native_error
from .wire import go_json

if TYPE_CHECKING:
    from .ollama import OllamaEmulator

STREAM_HEADERS = [("cache-control", "no-cache"), ("connection", "keep-alive")]


def generate_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    """anthropic.NewError: the error type follows the status."""
    kinds = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        429: "rate_limit_error",
        503: "overloaded_error",
        529: "overloaded_error",
    }
    error = {"type": kinds.get(status, "api_error"), "message": message}
    return {"type": "error", "error": error, "request_id": generate_id("req")}


def from_native_error(status: int, body: bytes) -> bytes:
    """AnthropicWriter.writeError, written by json.Encoder (a trailing newline)."""
    return go_json(anthropic_error(status, native_error(body))) + b"\n"


async def reject(exchange: Exchange, status: int, message: str) -> None:
    """c.AbortWithStatusJSON(status, anthropic.NewError(...)): gin's JSON, no newline."""
    body = go_json(anthropic_error(status, message))
    await exchange.respond(status, body, content_type="application/json; charset=utf-8")


def _image(source: object) -> tuple[str | None, str | None]:
    """resolveImageSource: only base64 sources."""
    if not isinstance(source, dict):
        return None, "invalid image source"
    if source.get("type") != "base64":
        kind = source.get("type") or ""
        return None, f"invalid image source type: {kind}. Only base64 images are supported."
    data = source.get("data") or ""
    try:
        base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        return None, f"invalid base64 image data: {exc}"
    return data, None


def _tool_result(content: object) -> tuple[str, list[str], str | None]:
    """convertToolResultContent: text joined, images kept."""
    if isinstance(content, str):
        return content, [], None
    text, images = "", []
    for block in content if isinstance(content, list) else []:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text" and isinstance(block.get("text"), str):
            text += block["text"]
        elif block.get("type") == "image":
            data, err = _image(block.get("source"))
            if err is not None:
                return "", [], err
            images.append(str(data))
    return text, images, None


def _blocks(content: object) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [b for b in content if isinstance(b, dict)] if isinstance(content, list) else []


def convert_message(msg: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
    """anthropic.convertMessage: one Anthropic message -> native messages (tool results
    become ``tool`` messages, before the user's own text)."""
    role = str(msg.get("role", "")).lower()
    text, images, calls, thinking = "", [], [], ""
    results: list[dict[str, Any]] = []
    for block in _blocks(msg.get("content")):
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            text += block["text"]
        elif kind == "image":
            data, err = _image(block.get("source"))
            if err is not None:
                return [], err
            images.append(data)
        elif kind == "tool_use":
            if not block.get("id"):
                return [], "tool_use block missing required 'id' field"
            if not block.get("name"):
                return [], "tool_use block missing required 'name' field"
            function = {"name": block["name"], "arguments": block.get("input") or {}}
            calls.append({"id": block["id"], "function": function})
        elif kind == "tool_result":
            content, result_images, err = _tool_result(block.get("content"))
            if err is not None:
                return [], err
            result: dict[str, Any] = {"role": "tool", "content": content}
            if result_images:
                result["images"] = result_images
            result["tool_call_id"] = block.get("tool_use_id", "")
            results.append(result)
        elif kind == "thinking" and isinstance(block.get("thinking"), str):
            thinking = block["thinking"]
    out = results if role == "user" else []
    if text or images or calls or thinking:
        native: dict[str, Any] = {"role": role, "content": text}
        for key, value in (("thinking", thinking), ("images", images), ("tool_calls", calls)):
            if value:
                native[key] = value
        out = [*out, native]
    return (out if role == "user" else [*out, *results]), None


def from_messages_request(req: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """anthropic.FromMessagesRequest: the /api/chat request the middleware hands down."""
    messages: list[dict[str, Any]] = []
    system = req.get("system")
    if isinstance(system, list):
        system = "".join(
            b["text"]
            for b in system
            if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str)
        )
    if isinstance(system, str) and system:
        messages.append({"role": "system", "content": system})
    for msg in req.get("messages") or []:
        converted, err = convert_message(msg)
        if err is not None:
            return {}, err
        messages += converted
    options: dict[str, Any] = {"num_predict": req["max_tokens"]}
    for source, target in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k")):
        if req.get(source) is not None:
            options[target] = req[source]
    if req.get("stop_sequences"):
        options["stop"] = req["stop_sequences"]
    tools = [
        {
            "type": "function",
            "function": {
                "name": t.get("name", ""),
                "description": t.get("description", ""),
                "parameters": t.get("input_schema") or {},
            },
        }
        for t in req.get("tools") or []
        if isinstance(t, dict)
    ]
    chat: dict[str, Any] = {"model": req["model"], "messages": messages, "options": options}
    chat["stream"] = req.get("stream") is True
    if tools:
        chat["tools"] = tools
    thinking = req.get("thinking") if isinstance(req.get("thinking"), dict) else {}
    effort = str((req.get("output_config") or {}).get("effort") or "").strip().lower()
    effort = "high" if effort == "xhigh" else effort
    if thinking.get("type") in ("enabled", "disabled"):
        chat["think"] = thinking["type"] == "enabled"
    elif effort in ("high", "medium", "low", "max"):
        chat["think"] = effort
    return chat, None


def estimate_input_tokens(req: dict[str, Any]) -> int:
    """anthropic.EstimateInputTokens: about four characters per token."""

    def count(content: object) -> int:
        if isinstance(content, str):
            return len(content)
        total = 0
        for block in _blocks(content):
            for key in ("text", "thinking"):
                if isinstance(block.get(key), str):
                    total += len(block[key])
            if block.get("type") in ("tool_use", "tool_result"):
                total += len(go_json(block))
        return total

    system = req.get("system")
    total = count(system) if system is not None else 0
    messages = req.get("messages") or []
    for msg in messages:
        total += len(str(msg.get("role", ""))) + count(msg.get("content"))
    for tool in req.get("tools") or []:
        schema = tool.get("input_schema")
        total += len(tool.get("name", "")) + len(tool.get("description", ""))
        total += len(go_json(schema)) if schema is not None else 0
    tokens = total // 4
    return 1 if tokens == 0 and (messages or system is not None) else tokens


def stop_reason(reason: str, has_tool_calls: bool) -> str:
    if has_tool_calls:
        return "tool_use"
    return {"stop": "end_turn", "length": "max_tokens", "": ""}.get(reason, "stop_sequence")


def _blocks_out(msg: dict[str, Any]) -> list[dict[str, Any]] | None:
    blocks: list[dict[str, Any]] = []
    if msg.get("thinking"):
        blocks.append({"type": "thinking", "thinking": msg["thinking"]})
    if msg.get("content"):
        blocks.append({"type": "text", "text": msg["content"]})
    for call in msg.get("tool_calls") or []:
        function = call.get("function") or {}
        blocks.append(
            {
                "type": "tool_use",
                "id": call.get("id", ""),
                "name": function.get("name", ""),
                "input": function.get("arguments") or {},
            }
        )
    return blocks or None  # a Go nil slice: "content":null


class AnthropicWriter(Rewriter):
    """middleware.AnthropicWriter with anthropic.StreamConverter."""

    stream_content_type = SSE
    relax_thinking = True  # c.Set("relax_thinking"): think on a plain model is dropped

    def __init__(self, exchange: Exchange, body: bytes, req: dict[str, Any]) -> None:
        stream = req.get("stream") is True
        super().__init__(exchange, body, STREAM_HEADERS if stream else ())
        self.id = generate_id("msg")
        self.model = req["model"]
        self.estimated = estimate_input_tokens(req)
        self.first = True
        self.index = 0
        self.input_tokens = 0
        self.thinking_started = self.thinking_done = self.text_started = False
        self.tools_sent: set[str] = set()

    def error(self, status: int, body: bytes) -> bytes:
        return from_native_error(status, body)

    def whole(self, obj: dict[str, Any]) -> bytes:
        msg = obj.get("message") or {}
        response: dict[str, Any] = {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": obj.get("model", ""),
            "content": _blocks_out(msg),
        }
        reason = stop_reason(obj.get("done_reason") or "", bool(msg.get("tool_calls")))
        if reason:
            response["stop_reason"] = reason
        usage = {"input_tokens": obj.get("prompt_eval_count", 0)}
        usage["output_tokens"] = obj.get("eval_count", 0)
        response["usage"] = usage
        return go_json(response) + b"\n"

    def _stop(self) -> dict[str, Any]:
        return {"type": "content_block_stop", "index": self.index}

    def events(self, obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        """StreamConverter.Process: the events one native line turns into."""
        msg = obj.get("message") or {}
        events: list[tuple[str, dict[str, Any]]] = []
        if self.first:
            self.first = False
            self.input_tokens = obj.get("prompt_eval_count", 0) or self.estimated
            start = {
                "id": self.id,
                "type": "message",
                "role": "assistant",
                "model": self.model,
                "content": [],
                "usage": {"input_tokens": self.input_tokens, "output_tokens": 0},
            }
            events.append(("message_start", {"type": "message_start", "message": start}))
        if msg.get("thinking") and not self.thinking_done:
            if self.text_started:
                events.append(("content_block_stop", self._stop()))
                self.index += 1
                self.text_started = False
            if not self.thinking_started:
                self.thinking_started = True
                block = {"type": "thinking", "thinking": ""}
                events.append(("content_block_start", self._start(block)))
            delta = {"type": "thinking_delta", "thinking": msg["thinking"]}
            events.append(("content_block_delta", self._delta(delta)))
        if msg.get("content"):
            self._end_thinking(events)
            if not self.text_started:
                self.text_started = True
                events.append(("content_block_start", self._start({"type": "text", "text": ""})))
            delta = {"type": "text_delta", "text": msg["content"]}
            events.append(("content_block_delta", self._delta(delta)))
        for call in msg.get("tool_calls") or []:
            if call.get("id") in self.tools_sent:
                continue
            self._end_thinking(events)
            if self.text_started:
                events.append(("content_block_stop", self._stop()))
                self.index += 1
                self.text_started = False
            function = call.get("function") or {}
            block = {"type": "tool_use", "id": call.get("id", "")}
            block.update(name=function.get("name", ""), input={})
            events.append(("content_block_start", self._start(block)))
            arguments = go_json(function.get("arguments") or {}).decode()
            delta = {"type": "input_json_delta", "partial_json": arguments}
            events.append(("content_block_delta", self._delta(delta)))
            events.append(("content_block_stop", self._stop()))
            self.tools_sent.add(call.get("id", ""))
            self.index += 1
        if obj.get("done") is True:
            if self.text_started or (self.thinking_started and not self.thinking_done):
                events.append(("content_block_stop", self._stop()))
            reason = stop_reason(obj.get("done_reason") or "", bool(self.tools_sent))
            usage = {"input_tokens": obj.get("prompt_eval_count", 0)}
            usage["output_tokens"] = obj.get("eval_count", 0)
            delta = {"stop_reason": reason} if reason else {}
            events.append(
                ("message_delta", {"type": "message_delta", "delta": delta, "usage": usage})
            )
            events.append(("message_stop", {"type": "message_stop"}))
        return events

    def _end_thinking(self, events: list[tuple[str, dict[str, Any]]]) -> None:
        if self.thinking_started and not self.thinking_done:
            self.thinking_done = True
            events.append(("content_block_stop", self._stop()))
            self.index += 1

    def _start(self, block: dict[str, Any]) -> dict[str, Any]:
        return {"type": "content_block_start", "index": self.index, "content_block": block}

    def _delta(self, delta: dict[str, Any]) -> dict[str, Any]:
        return {"type": "content_block_delta", "index": self.index, "delta": delta}

    def line(self, obj: dict[str, Any]) -> list[bytes]:
        return [
            b"event: " + name.encode() + b"\ndata: " + go_json(data) + b"\n\n"
            for name, data in self.events(obj)
        ]


_FIELDS = {"model": str, "max_tokens": int, "messages": list, "stream": bool, "tools": list}


async def messages(emu: OllamaEmulator, exchange: Exchange) -> None:
    req, err = go_bind(exchange.request.body, "anthropic.MessagesRequest")
    err = err or field_error(req, "MessagesRequest", _FIELDS)
    if err is None and not req.get("model"):
        err = "model is required"
    if err is None and (req.get("max_tokens") or 0) <= 0:
        err = "max_tokens is required and must be positive"
    if err is None and not req.get("messages"):
        err = "messages is required"
    chat: dict[str, Any] = {}
    if err is None:
        chat, err = from_messages_request(req)
    if err is not None:
        await reject(exchange, 400, err)
        return
    writer = AnthropicWriter(exchange, go_json(chat), req)
    await emu._complete(writer, chat=True)  # type: ignore[arg-type]
