"""The other protocols an OpenAI-family provider may serve besides Chat Completions: the
OpenAI Responses API (``…/responses``) and the Anthropic Messages API (``…/messages``, as
Moonshot's ``/anthropic`` or OpenRouter serve it). Each is switched on per
``OpenAIEmulator`` instance (``serves_responses``, ``serves_messages``).

The events follow the OpenAI and Anthropic API references; they are produced by the same
converters as the Ollama emulator's routes, fed with the provider's own tokens, with the
differences of the real APIs on top: Anthropic's ``ping`` after the first block start and
``stop_sequence: null``, OpenAI's ``type`` first in each event and unsorted keys.
"""

from __future__ import annotations

import json
import secrets
from typing import TYPE_CHECKING, Any

import trio

from .http import Exchange
from .ollama_anthropic import AnthropicWriter, anthropic_error
from .ollama_responses import ResponsesWriter
from .ollama_script import tool_call_id
from .wire import go_json, split_tokens

if TYPE_CHECKING:
    from .openai import OpenAIEmulator

JSON = "application/json"
SSE = "text/event-stream; charset=utf-8"


def _plan(
    emu: OpenAIEmulator, req: dict[str, Any], tool_names: list[str], last_is_result: bool
) -> tuple[list[dict[str, Any]], str]:
    """The native-shaped message parts the provider's model answers with, and why it stops."""
    scripted = [n for n in tool_names if n in emu.tool_calls]
    if scripted and not last_is_result:
        function = {"index": 0, "name": scripted[0], "arguments": emu.tool_calls[scripted[0]]}
        call = {"id": tool_call_id(), "function": function}
        return [{"role": "assistant", "content": "", "tool_calls": [call]}], "stop"
    tokens = split_tokens(emu.reply)
    limit = req.get("max_tokens", req.get("max_output_tokens"))
    reason = "stop"
    if isinstance(limit, int) and not isinstance(limit, bool) and 0 <= limit < len(tokens):
        tokens, reason = tokens[:limit], "length"
    return [{"role": "assistant", "content": t} for t in tokens], reason


async def _serve(
    emu: OpenAIEmulator,
    exchange: Exchange,
    writer: AnthropicWriter | ResponsesWriter,
    req: dict[str, Any],
    parts: list[dict[str, Any]],
    reason: str,
    prompt_tokens: int,
    frame: Any,
) -> None:
    """Answer whole or as events (each its own HTTP chunk), with holds, faults, counters."""
    head = {"model": req["model"], "created_at": "2026-01-01T00:00:00Z"}
    completion = sum(
        len(json.dumps(p["tool_calls"]).split()) if p.get("tool_calls") else 1 for p in parts
    )
    final = {**head, "done": True, "done_reason": reason}
    final.update(prompt_eval_count=prompt_tokens, eval_count=completion)
    ids = [("request-id", f"req_{secrets.token_hex(12)}")]
    async with emu.generation(exchange.header("x-test-tag") or "") as outcome:
        if req.get("stream") is not True:
            await emu.wait_hold(emu.hold)
            message = {"role": "assistant", "content": "".join(p["content"] for p in parts)}
            calls = [c for p in parts for c in p.get("tool_calls") or []]
            if calls:
                message["tool_calls"] = calls
            outcome.complete()
            body = writer.whole({**final, "message": message})
            await exchange.respond(200, body, content_type=JSON, headers=ids)
            return
        faulty = emu.fault_applies(exchange.path)
        await exchange.start_stream(200, content_type=SSE, headers=ids, faulty=faulty)
        lines = [{**head, "message": p, "done": False} for p in parts]
        lines.append({**final, "message": {"role": "assistant", "content": ""}})
        for index, line in enumerate(lines):
            if index and emu.token_delay_s > 0:
                await trio.sleep(emu.token_delay_s)
            events = frame(writer.events(line))
            for number, (name, data) in enumerate(events):
                if index == len(lines) - 1 and number == len(events) - 1:
                    await exchange.apply_stream_faults()
                    outcome.complete()
                await exchange.write_chunk(f"event: {name}\ndata: ".encode() + data + b"\n\n")
            if index == 0:
                await emu.wait_hold(emu.hold)
        await exchange.end_stream()


# ------------------------------------------------------- Anthropic Messages


def _anthropic_frame(events: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    for name, data in events:
        if name == "message_start":
            data["message"].update(stop_reason=None, stop_sequence=None)
        if name == "message_delta":
            data["delta"] = {"stop_reason": data["delta"].get("stop_reason"), "stop_sequence": None}
        out.append((name, go_json(data)))
        if name == "content_block_start" and data["index"] == 0:
            out.append(("ping", b'{"type": "ping"}'))
    return out


async def _anthropic_reject(exchange: Exchange, status: int, message: str) -> None:
    error = anthropic_error(status, message)
    del error["request_id"]
    await exchange.respond(status, go_json(error), content_type=JSON)


async def messages(emu: OpenAIEmulator, exchange: Exchange) -> None:
    """POST …/messages: key in ``x-api-key`` or ``Authorization: Bearer``."""
    key = exchange.header("x-api-key")
    auth = exchange.header("authorization") or ""
    key = key or (auth[7:].strip() if auth.startswith("Bearer ") else None)
    if not key:
        await _anthropic_reject(exchange, 401, "x-api-key header is required")
        return
    if key != emu.api_key:
        await _anthropic_reject(exchange, 401, "invalid x-api-key")
        return
    try:
        req = json.loads(exchange.request.body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        req = None
    if not isinstance(req, dict):
        await _anthropic_reject(exchange, 400, "The request body is not valid JSON.")
        return
    for required in ("model", "max_tokens", "messages"):
        if required not in req:
            await _anthropic_reject(exchange, 400, f"{required}: Field required")
            return
    if req["model"] not in emu.models:
        await _anthropic_reject(exchange, 404, f"model: {req['model']}")
        return
    messages = [m for m in req["messages"] if isinstance(m, dict)]
    last = messages[-1].get("content") if messages else None
    last_is_result = isinstance(last, list) and any(
        isinstance(b, dict) and b.get("type") == "tool_result" for b in last
    )
    names = [t.get("name", "") for t in req.get("tools") or [] if isinstance(t, dict)]
    parts, reason = _plan(emu, req, names, last_is_result)
    prompt = max(1, len(json.dumps(req["messages"]).split()))
    writer = AnthropicWriter(exchange, b"", req)
    await _serve(emu, exchange, writer, req, parts, reason, prompt, _anthropic_frame)


# ------------------------------------------------------------ OpenAI Responses


def _responses_frame(events: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, bytes]]:
    out = []
    for name, data in events:
        data = {"type": data.pop("type"), "sequence_number": data.pop("sequence_number"), **data}
        out.append((name, go_json(data)))
    return out


async def responses(emu: OpenAIEmulator, exchange: Exchange, req: dict[str, Any]) -> None:
    """POST …/responses (the key was checked by the emulator, as for chat completions)."""
    items = req.get("input")
    last_is_result = (
        isinstance(items, list)
        and bool(items)
        and (isinstance(items[-1], dict) and items[-1].get("type") == "function_call_output")
    )
    names = [t.get("name", "") for t in req.get("tools") or [] if isinstance(t, dict)]
    parts, reason = _plan(emu, req, names, last_is_result)
    prompt = max(1, len(json.dumps(items).split()))
    writer = ResponsesWriter(exchange, b"", req)
    await _serve(emu, exchange, writer, req, parts, reason, prompt, _responses_frame)
