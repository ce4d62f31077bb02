"""Ollama's Responses route ``POST /v1/responses`` (since v0.13.3), as ``middleware/openai.go``
(ResponsesWriter) and ``openai/responses.go`` serve it: the request becomes an /api/chat
request; the answer is a ``response`` object, or its SSE events, each flushed on its own.
The stream's objects are Go maps, so their keys come out sorted. Web search is not emulated.
"""

from __future__ import annotations

import json
import random
import time
from typing import TYPE_CHECKING, Any

from .http import Exchange
from .middleware import SSE, go_bind, unix
from .ollama_openai import (
    OpenAIWriter,
    decode_image_url,
    reject,
    think_from_effort,
    tool_calls_out,
)
from .wire import go_json

if TYPE_CHECKING:
    from .ollama import OllamaEmulator

STREAM_HEADERS = [("cache-control", "no-cache"), ("connection", "keep-alive")]


def _content(parts: object) -> tuple[str, list[str], str | None]:
    """convertResponsesContent: text joined, data: images kept, files refused."""
    if isinstance(parts, str):
        return parts, [], None
    text, images = "", []
    for part in parts if isinstance(parts, list) else []:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text"):
            text += str(part.get("text", ""))
        elif kind == "input_image" and part.get("image_url"):
            data, err = decode_image_url(str(part["image_url"]))
            if err is not None:
                return "", [], err
            images.append(str(data))
        elif kind == "input_file":
            return "", [], "file inputs are not currently supported"
    return text, images, None


def _items(req: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
    """FromResponsesRequest's input loop: messages, function calls and their outputs."""
    messages: list[dict[str, Any]] = []
    if req.get("instructions"):
        messages.append({"role": "system", "content": req["instructions"]})
    source = req.get("input")
    if isinstance(source, str):
        if source:
            messages.append({"role": "user", "content": source})
        return messages, None
    pending = ""
    for index, item in enumerate(source if isinstance(source, list) else []):
        kind = item.get("type") or ("message" if item.get("role") else "")
        if kind == "reasoning":
            pending = str(item.get("encrypted_content") or "")
        elif kind == "message":
            text, images, err = _content(item.get("content"))
            if err is not None:
                return [], err
            msg: dict[str, Any] = {"role": item.get("role", ""), "content": text}
            if images:
                msg["images"] = images
            if msg["role"] == "assistant" and pending:
                msg["thinking"], pending = pending, ""
            messages.append(msg)
        elif kind == "function_call":
            try:
                arguments = json.loads(item["arguments"]) if item.get("arguments") else {}
            except json.JSONDecodeError as exc:
                return [], f"failed to parse function call arguments: {exc.msg}"
            call = {"id": item.get("call_id", ""), "function": {"name": item.get("name", "")}}
            call["function"]["arguments"] = arguments
            if messages and messages[-1]["role"] == "assistant":
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
            if pending:
                messages[-1]["thinking"], pending = pending, ""
        elif kind == "function_call_output":
            text, images, err = _content(item.get("output"))
            if err is not None:
                return [], err
            out = {"role": "tool", "content": text, "tool_call_id": item.get("call_id", "")}
            messages.append({**out, **({"images": images} if images else {})})
        elif kind != "web_search_call":
            what = f"unknown input item type: {json.dumps(kind)}"
            return [], f"input[{index}]: " + (
                what if kind else "input item missing required 'type' field"
            )
    if pending:
        messages.append({"role": "assistant", "content": "", "thinking": pending})
    return messages, None


def from_responses_request(req: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """openai.FromResponsesRequest: the /api/chat request the middleware hands down."""
    messages, err = _items(req)
    if err is not None:
        return {}, err
    options: dict[str, Any] = {}
    options["temperature"] = req["temperature"] if req.get("temperature") is not None else 1.0
    if req.get("top_p") is not None:
        options["top_p"] = req["top_p"]
    if req.get("max_output_tokens") is not None:
        options["num_predict"] = req["max_output_tokens"]
    reasoning = req.get("reasoning") if isinstance(req.get("reasoning"), dict) else {}
    think, err = think_from_effort(reasoning.get("effort"))
    if err is not None:
        return {}, err
    chat: dict[str, Any] = {"model": req.get("model", ""), "messages": messages}
    chat["options"] = options
    tools = [
        {
            "type": t.get("type", ""),
            "function": {
                "name": t.get("name", ""),
                "description": t.get("description") or "",
                "parameters": t.get("parameters") or {},
            },
        }
        for t in req.get("tools") or []
        if isinstance(t, dict) and t.get("type") != "web_search"
    ]
    if tools:
        chat["tools"] = tools
    fmt = (req.get("text") or {}).get("format") if isinstance(req.get("text"), dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema" and fmt.get("schema"):
        chat["format"] = fmt["schema"]
    if think is not None:
        chat["think"] = think
    chat["stream"] = req.get("stream") is True
    return chat, None


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _usage(obj: dict[str, Any]) -> dict[str, Any]:
    prompt, output = obj.get("prompt_eval_count", 0), obj.get("eval_count", 0)
    return {
        "input_tokens": prompt,
        "output_tokens": output,
        "total_tokens": prompt + output,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0},
    }


class ResponsesWriter(OpenAIWriter):
    """middleware.ResponsesWriter with openai.ResponsesStreamConverter."""

    stream_content_type = SSE

    def __init__(self, exchange: Exchange, body: bytes, req: dict[str, Any]) -> None:
        stream = req.get("stream") is True
        super().__init__(exchange, body, STREAM_HEADERS if stream else ())
        self.req = req
        self.response_id = f"resp_{random.randrange(999999)}"
        self.item_id = f"msg_{random.randrange(999999)}"
        self.sequence = 0
        self.first = True
        self.output_index = 0
        self.text = ""
        self.content_started = self.tool_calls_sent = False
        self.thinking = ""
        self.reasoning_id = ""
        self.completed: list[dict[str, Any]] = []

    # ------------------------------------------------------- not streamed

    def whole(self, obj: dict[str, Any]) -> bytes:
        """openai.ToResponse, completed_at set by the writer."""
        msg, req = obj.get("message") or {}, self.req
        output: list[dict[str, Any]] = []
        if msg.get("thinking"):
            summary = [{"type": "summary_text", "text": msg["thinking"]}]
            output.append(
                {
                    "id": f"rs_{self.response_id}",
                    "type": "reasoning",
                    "summary": summary,
                    "encrypted_content": msg["thinking"],
                }
            )
        calls = tool_calls_out(msg.get("tool_calls") or [])
        for i, call in enumerate(calls):
            output.append(
                {
                    "id": f"fc_{self.response_id}_{i}",
                    "type": "function_call",
                    "status": "completed",
                    "call_id": call["id"],
                    "name": call["function"]["name"],
                    "arguments": call["function"]["arguments"],
                }
            )
        if not calls:
            text = msg.get("content", "")
            output.append(
                {
                    "id": self.item_id,
                    "type": "message",
                    "status": "completed",
                    "role": "assistant",
                    "content": [_text_part(text)],
                }
            )
        fmt = (req.get("text") or {}).get("format") or {"type": "text"}
        reasoning = {
            k: v
            for k, v in (req.get("reasoning") or {}).items()
            if k in ("effort", "summary") and v
        }
        response = {
            "id": self.response_id,
            "object": "response",
            "created_at": unix(obj.get("created_at")),
            "completed_at": int(time.time()),
            "status": "completed",
            "incomplete_details": None,
            "model": req.get("model", ""),
            "previous_response_id": None,
            "instructions": req.get("instructions") or None,
            "output": output,
            "error": None,
            "tools": [self._tool(t) for t in req.get("tools") or []],
            "tool_choice": "auto",
            "truncation": req.get("truncation") or "disabled",
            "parallel_tool_calls": True,
            "text": {"format": fmt},
            "top_p": req.get("top_p") if req.get("top_p") is not None else 1.0,
            "presence_penalty": 0,
            "frequency_penalty": 0,
            "top_logprobs": 0,
            "temperature": req.get("temperature") if req.get("temperature") is not None else 1.0,
            "reasoning": reasoning or None,
            "usage": _usage(obj),
            "max_output_tokens": req.get("max_output_tokens"),
            "max_tool_calls": None,
            "store": False,
            "background": req.get("background") is True,
            "service_tier": "default",
            "metadata": {},
            "safety_identifier": None,
            "prompt_cache_key": None,
        }
        return go_json(response) + b"\n"

    @staticmethod
    def _tool(tool: dict[str, Any]) -> dict[str, Any]:
        out = {k: tool.get(k) for k in ("type", "name", "description", "strict", "parameters")}
        out["name"] = out["name"] or ""
        return out

    # ------------------------------------------------------------ streamed

    def _event(self, kind: str, data: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        data.update(type=kind, sequence_number=self.sequence)
        self.sequence += 1
        return kind, data

    def _response(self, status: str, output: list[Any], usage: object) -> dict[str, Any]:
        """buildResponseObject: a Go map, keys sorted when marshalled."""
        req = self.req
        fmt = (req.get("text") or {}).get("format") or {"type": "text"}
        effort, summary = ((req.get("reasoning") or {}).get(k) for k in ("effort", "summary"))
        reasoning = {"effort": effort or None, "summary": summary or None}
        return {
            "id": self.response_id,
            "object": "response",
            "created_at": int(time.time()),
            "completed_at": None,
            "status": status,
            "incomplete_details": None,
            "model": req.get("model", ""),
            "previous_response_id": None,
            "instructions": req.get("instructions") or None,
            "output": output,
            "error": None,
            "tools": [self._tool(t) for t in req.get("tools") or []],
            "tool_choice": "auto",
            "truncation": req.get("truncation") or "disabled",
            "parallel_tool_calls": True,
            "text": {"format": fmt},
            "top_p": req.get("top_p") if req.get("top_p") is not None else 1.0,
            "presence_penalty": 0,
            "frequency_penalty": 0,
            "top_logprobs": 0,
            "temperature": req.get("temperature") if req.get("temperature") is not None else 1.0,
            "reasoning": reasoning if effort or summary else None,
            "usage": usage,
            "max_output_tokens": req.get("max_output_tokens"),
            "max_tool_calls": None,
            "store": False,
            "background": req.get("background") is True,
            "service_tier": "default",
            "metadata": {},
            "safety_identifier": None,
            "prompt_cache_key": None,
        }

    def _finish_reasoning(self) -> list[tuple[str, dict[str, Any]]]:
        if not self.reasoning_id:
            return []
        item = {
            "id": self.reasoning_id,
            "type": "reasoning",
            "summary": [{"type": "summary_text", "text": self.thinking}],
            "encrypted_content": self.thinking,
        }
        self.completed.append(item)
        index, item_id, text = self.output_index, self.reasoning_id, self.thinking
        self.reasoning_id, self.thinking = "", ""
        self.output_index += 1
        done = {"item_id": item_id, "output_index": index, "summary_index": 0, "text": text}
        return [
            self._event("response.reasoning_summary_text.done", done),
            self._event("response.output_item.done", {"output_index": index, "item": item}),
        ]

    def _message_item(self) -> dict[str, Any]:
        return {
            "id": self.item_id,
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [_text_part(self.text)],
        }

    def _message_done(self) -> list[tuple[str, dict[str, Any]]]:
        index = self.output_index
        where = {"item_id": self.item_id, "output_index": index, "content_index": 0}
        text = {**where, "text": self.text, "logprobs": []}
        item = {"output_index": index, "item": self._message_item()}
        return [
            self._event("response.output_text.done", text),
            self._event("response.content_part.done", {**where, "part": _text_part(self.text)}),
            self._event("response.output_item.done", item),
        ]

    def events(self, obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        """ResponsesStreamConverter.Process: the events one native line turns into."""
        msg = obj.get("message") or {}
        events: list[tuple[str, dict[str, Any]]] = []
        if self.first:
            self.first = False
            for kind in ("response.created", "response.in_progress"):
                response = self._response("in_progress", [], None)
                events.append(self._event(kind, {"response": response}))
        if msg.get("thinking"):
            if not self.reasoning_id:
                self.reasoning_id = f"rs_{random.randrange(999999)}"
                item = {"id": self.reasoning_id, "type": "reasoning", "summary": []}
                added = {"output_index": self.output_index, "item": item}
                events.append(self._event("response.output_item.added", added))
            self.thinking += msg["thinking"]
            delta = {"item_id": self.reasoning_id, "output_index": self.output_index}
            delta.update(summary_index=0, delta=msg["thinking"])
            events.append(self._event("response.reasoning_summary_text.delta", delta))
        calls = tool_calls_out(msg.get("tool_calls") or [])
        if calls:
            events += self._finish_reasoning()
            for i, call in enumerate(calls):
                index, item_id = self.output_index + i, f"fc_{random.randrange(999999)}_{i}"
                name, arguments = call["function"]["name"], call["function"]["arguments"]
                item = {"id": item_id, "type": "function_call", "call_id": call["id"]}
                item.update(name=name)
                done_item = {**item, "status": "completed", "arguments": arguments}
                self.completed.append(done_item)
                where = {"item_id": item_id, "output_index": index}
                added = {**item, "status": "in_progress", "arguments": ""}
                events += [
                    self._event(
                        "response.output_item.added", {"output_index": index, "item": added}
                    ),
                    self._event(
                        "response.function_call_arguments.delta", {**where, "delta": arguments}
                    ),
                    self._event(
                        "response.function_call_arguments.done", {**where, "arguments": arguments}
                    ),
                    self._event(
                        "response.output_item.done", {"output_index": index, "item": done_item}
                    ),
                ]
            self.output_index += len(calls)
            self.tool_calls_sent = True
        if not calls and not self.tool_calls_sent and msg.get("content"):
            events += self._finish_reasoning()
            where = {"item_id": self.item_id, "output_index": self.output_index}
            if not self.content_started:
                self.content_started = True
                item = {"id": self.item_id, "type": "message", "status": "in_progress"}
                item.update(role="assistant", content=[])
                added = {"output_index": self.output_index, "item": item}
                events.append(self._event("response.output_item.added", added))
                part = {**where, "content_index": 0, "part": _text_part("")}
                events.append(self._event("response.content_part.added", part))
            self.text += msg["content"]
            delta = {**where, "content_index": 0, "delta": msg["content"], "logprobs": []}
            events.append(self._event("response.output_text.delta", delta))
        if obj.get("done") is True:
            events += self._finish_reasoning()
            output = list(self.completed)
            if not self.tool_calls_sent and self.content_started:
                events += self._message_done()
            if self.content_started:
                output.append(self._message_item())
            response = self._response("completed", output, _usage(obj))
            response["completed_at"] = int(time.time())
            events.append(self._event("response.completed", {"response": response}))
        return events

    def line(self, obj: dict[str, Any]) -> list[bytes]:
        return [
            b"event: " + kind.encode() + b"\ndata: " + go_json(data, sort_keys=True) + b"\n\n"
            for kind, data in self.events(obj)
        ]


async def responses(emu: OllamaEmulator, exchange: Exchange) -> None:
    req, err = go_bind(exchange.request.body, "openai.ResponsesRequest")
    source = req.get("input")
    if err is None and source is not None and not isinstance(source, str | list):
        err = "input must be a string or array"
    if err is None and isinstance(source, list) and not all(isinstance(i, dict) for i in source):
        err = "input[0]: json: cannot unmarshal string into Go value of type struct"
    chat: dict[str, Any] = {}
    if err is None:
        chat, err = from_responses_request(req)
    if err is not None:
        await reject(exchange, 400, err)
        return
    writer = ResponsesWriter(exchange, go_json(chat), req)
    await emu._complete(writer, chat=True)  # type: ignore[arg-type]
