"""An OpenAI Chat Completions emulator (also fits OpenRouter, Moonshot and kin).

Served under any path prefix: ``.../chat/completions`` and ``.../models``.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

import trio

from . import openai_protocols as protocols
from .http import EmulatorBase, Exchange, GenerationOutcome
from .ollama_script import schema_instance
from .wire import split_tokens

JSON = "application/json"
SSE = "text/event-stream; charset=utf-8"


def error_json(
    message: str, type_: str, *, param: str | None = None, code: str | None = None
) -> bytes:
    """OpenAI's error envelope (pretty-printed, as the API sends it)."""
    error = {"message": message, "type": type_, "param": param, "code": code}
    return json.dumps({"error": error}, indent=2).encode()


def mask_key(key: str) -> str:
    """The way OpenAI shows a wrong key: a few characters each side, never all of it."""
    if len(key) <= 8:
        return "*" * len(key)
    return f"{key[:3]}{'*' * (len(key) - 7)}{key[-4:]}"


def message_text(content: object) -> str:
    """Text of a message's content: a string or a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, dict)]
        return "".join(p for p in parts if isinstance(p, str))
    return ""


class OpenAIEmulator(EmulatorBase):
    """See tests/emulators/README.md."""

    def __init__(
        self,
        *,
        api_key: str = "sk-test",
        models: Sequence[str] = ("openai/gpt-4o-mini", "moonshot/kimi-k2"),
        reply: str = "Hello from the emulator.",
        token_delay_s: float = 0.0,
        serves_responses: bool = False,
        serves_messages: bool = False,
    ) -> None:
        super().__init__()
        self.api_key = api_key
        self.models = list(models)
        self.reply = reply
        self.token_delay_s = token_delay_s
        # Protocols besides Chat Completions (openai_protocols.py), off unless switched on:
        self.serves_responses = serves_responses
        self.serves_messages = serves_messages
        self.tool_calls: dict[str, dict[str, Any]] = {}  # tool name -> arguments to call it with

    def is_generation_path(self, path: str) -> bool:
        return path.endswith(("/chat/completions", "/responses", "/messages"))

    def is_embed_path(self, path: str) -> bool:
        return path.endswith("/embeddings")

    def error_body(self, status: int) -> bytes:
        if status == 401:
            return error_json(
                "Incorrect API key provided.", "invalid_request_error", code="invalid_api_key"
            )
        if status == 429:
            message = "Rate limit reached for requests. Please try again in 1s."
            return error_json(message, "requests", code="rate_limit_exceeded")
        if status == 500:
            message = "The server had an error while processing your request. Sorry about that!"
            return error_json(message, "server_error")
        if status == 503:
            return error_json(
                "The engine is currently overloaded, please try again later", "server_error"
            )
        phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
        return error_json(phrase, "server_error" if status >= 500 else "invalid_request_error")

    async def _error(self, exchange: Exchange, status: int, body: bytes) -> None:
        await exchange.respond(status, body, content_type=JSON, headers=self._ids())

    def _ids(self) -> list[tuple[str, str]]:
        return [("x-request-id", f"req_{secrets.token_hex(16)}")]

    async def handle(self, exchange: Exchange) -> None:
        path, method = exchange.path, exchange.method
        if self.serves_messages and method == "POST" and path.endswith("/messages"):
            await protocols.messages(self, exchange)  # Anthropic's own key header and errors
            return
        auth = exchange.header("authorization") or ""
        if not auth.startswith("Bearer ") or not auth[7:].strip():
            message = (
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
            await self._error(exchange, 401, error_json(message, "invalid_request_error"))
            return
        if auth[7:].strip() != self.api_key:
            message = (
                f"Incorrect API key provided: {mask_key(auth[7:].strip())}. You can find "
                "your API key at https://platform.openai.com/account/api-keys."
            )
            body = error_json(message, "invalid_request_error", code="invalid_api_key")
            await self._error(exchange, 401, body)
            return
        if method == "POST" and path.endswith("/chat/completions"):
            await self._completions(exchange)
        elif self.serves_responses and method == "POST" and path.endswith("/responses"):
            await self._responses(exchange)
        elif method == "GET" and path.endswith("/models"):
            data = [self._model_object(m) for m in self.models]
            body = json.dumps({"object": "list", "data": data}, indent=2).encode()
            await exchange.respond(200, body, content_type=JSON, headers=self._ids())
        elif method == "GET" and "/models/" in path:
            model_id = path.split("/models/", 1)[1]
            if model_id in self.models:
                body = json.dumps(self._model_object(model_id), indent=2).encode()
                await exchange.respond(200, body, content_type=JSON, headers=self._ids())
            else:
                await self._error(exchange, 404, self._unknown_model(model_id))
        else:
            message = f"Invalid URL ({method} {path})"
            await self._error(exchange, 404, error_json(message, "invalid_request_error"))

    async def _responses(self, exchange: Exchange) -> None:
        req, status, error = self._validate(exchange.request.body, needs="input")
        if error is not None:
            await self._error(exchange, status, error)
            return
        await protocols.responses(self, exchange, req)

    def _model_object(self, model_id: str) -> dict[str, Any]:
        owner = model_id.split("/", 1)[0] if "/" in model_id else "openai"
        return {"id": model_id, "object": "model", "created": 1715367049, "owned_by": owner}

    def _unknown_model(self, model: str) -> bytes:
        message = f"The model `{model}` does not exist or you do not have access to it."
        return error_json(message, "invalid_request_error", code="model_not_found")

    def _validate(
        self, body: bytes, needs: str = "messages"
    ) -> tuple[dict[str, Any], int, bytes | None]:
        """The request, or the status and error body OpenAI would answer with."""
        try:
            req = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            req = None
        if not isinstance(req, dict):
            message = (
                "We could not parse the JSON body of your request. (HINT: This likely means "
                "you aren't using your HTTP library correctly. The OpenAI API expects a JSON "
                "payload, but what was sent was not valid JSON.)"
            )
            return {}, 400, error_json(message, "invalid_request_error")
        model, messages = req.get("model"), req.get(needs)
        if not isinstance(model, str) or not model:
            return (
                req,
                400,
                error_json("you must provide a model parameter", "invalid_request_error"),
            )
        if messages is None:
            message = f"Missing required parameter: '{needs}'."
            err = error_json(
                message,
                "invalid_request_error",
                param=needs,
                code="missing_required_parameter",
            )
            return req, 400, err
        if needs == "messages" and (not isinstance(messages, list) or not messages):
            message = (
                "Invalid 'messages': empty array. Expected an array with minimum length 1, "
                "but got an empty array instead."
            )
            return (
                req,
                400,
                error_json(message, "invalid_request_error", param="messages", code="empty_array"),
            )
        if model not in self.models:
            return req, 404, self._unknown_model(model)
        return req, 200, None

    async def _completions(self, exchange: Exchange) -> None:
        req, status, error = self._validate(exchange.request.body)
        if error is not None:
            await self._error(exchange, status, error)
            return
        messages = [m for m in req["messages"] if isinstance(m, dict)]
        users = [message_text(m.get("content")) for m in messages if m.get("role") == "user"]
        tag = exchange.header("x-test-tag") or (users[0] if users else "")
        prompt_tokens = max(1, sum(len(message_text(m.get("content")).split()) for m in messages))
        text = self.reply
        response_format = req.get("response_format")
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        schema = (response_format or {}).get("json_schema") if kind == "json_schema" else None
        if isinstance(schema, dict) and isinstance(schema.get("schema"), dict):
            text = json.dumps(schema_instance(schema["schema"], self.reply))
        elif kind in ("json_object", "json_schema"):
            text = json.dumps({"answer": self.reply})
        tokens = split_tokens(text)
        finish_reason = "stop"
        limit = req.get("max_completion_tokens", req.get("max_tokens"))
        if isinstance(limit, int) and not isinstance(limit, bool) and 0 <= limit < len(tokens):
            tokens, finish_reason = tokens[:limit], "length"
        call = self._tool_call(req, messages)
        if call is not None:
            arguments = call["function"]["arguments"]
            tokens, finish_reason = (
                [arguments[i : i + 8] for i in range(0, len(arguments), 8)],
                "tool_calls",
            )
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(tokens),
            "total_tokens": prompt_tokens + len(tokens),
        }
        head = {
            "id": f"chatcmpl-{secrets.token_hex(12)}",
            "created": int(time.time()),
            "model": req["model"],
            "system_fingerprint": "fp_emulator",
        }
        zero = self.faults.zero_choices and self.fault_applies(exchange.path)
        async with self.generation(tag) as outcome:
            if req.get("stream") is True:
                options = req.get("stream_options")
                include_usage = isinstance(options, dict) and options.get("include_usage") is True
                await self._stream(
                    outcome,
                    exchange,
                    head,
                    tokens,
                    finish_reason,
                    usage if include_usage else None,
                    zero,
                    call,
                )
            else:
                await self.wait_hold(self.hold)
                if self.token_delay_s > 0:
                    await trio.sleep(self.token_delay_s * len(tokens))
                message = {"role": "assistant", "content": "".join(tokens), "refusal": None}
                if call is not None:
                    message.update(content=None, tool_calls=[call])
                choice = {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
                body = {
                    **head,
                    "object": "chat.completion",
                    "choices": [] if zero else [choice],
                    "usage": usage,
                }
                outcome.complete()
                await exchange.respond(
                    200, json.dumps(body, indent=2).encode(), content_type=JSON, headers=self._ids()
                )

    def _tool_call(
        self, req: dict[str, Any], messages: list[dict[str, Any]]
    ) -> dict[str, Any] | None:
        """A call to the first scripted tool the request offers, unless a tool just answered."""
        offered = [
            t["function"].get("name")
            for t in req.get("tools") or []
            if isinstance(t, dict) and isinstance(t.get("function"), dict)
        ]
        name = next((n for n in offered if n in self.tool_calls), None)
        if name is None or (messages and messages[-1].get("role") == "tool"):
            return None
        arguments = json.dumps(self.tool_calls[name])
        call_id = "call_" + secrets.token_urlsafe(18).replace("-", "x").replace("_", "y")[:24]
        function = {"name": name, "arguments": arguments}
        return {"id": call_id, "type": "function", "function": function}

    async def _stream(
        self,
        outcome: GenerationOutcome,
        exchange: Exchange,
        head: dict[str, Any],
        tokens: list[str],
        finish_reason: str,
        usage: dict[str, int] | None,
        zero: bool,
        call: dict[str, Any] | None = None,
    ) -> None:
        await exchange.start_stream(
            200, content_type=SSE, headers=self._ids(), faulty=self.fault_applies(exchange.path)
        )
        base = {**head, "object": "chat.completion.chunk"}
        events = 0

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            obj: dict[str, Any] = {**base, "choices": [choice]}
            if usage is not None:
                obj["usage"] = None
            return obj

        async def emit(payload: str, *, settle: bool = False) -> None:
            nonlocal events
            if events and self.token_delay_s > 0:
                await trio.sleep(self.token_delay_s)
            if settle:  # the end is in sight for the client: settle the counters first
                await exchange.apply_stream_faults()
                outcome.complete()
            await exchange.write_chunk(f"data: {payload}\n\n".encode())
            events += 1

        def encode(obj: dict[str, Any]) -> str:
            return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)

        if zero:
            await emit(encode({**base, "choices": [], **({"usage": usage} if usage else {})}))
        else:
            first: dict[str, Any] = {"role": "assistant", "content": ""}
            if call is not None:  # OpenAI: the call's id and name first, then its arguments
                function = {"name": call["function"]["name"], "arguments": ""}
                opening = {"index": 0, "id": call["id"], "type": "function", "function": function}
                first = {"role": "assistant", "content": None, "tool_calls": [opening]}
            overlong = self.overlong_bytes(exchange)
            if overlong is not None:
                pad = overlong - len(f"data: {encode(chunk(first))}".encode())
                first = {"role": "assistant", "content": "x" * max(pad, 0)}
            await emit(encode(chunk(first)))
            for index, token in enumerate(tokens):
                if call is not None:
                    piece = {"index": 0, "function": {"arguments": token}}
                    await emit(encode(chunk({"tool_calls": [piece]})))
                else:
                    await emit(encode(chunk({"content": token})))
                if index == 0:
                    await self.wait_hold(self.hold)
            if not tokens:
                await self.wait_hold(self.hold)
            await emit(encode(chunk({}, finish_reason)), settle=True)
            if usage is not None:
                await emit(encode({**base, "choices": [], "usage": usage}))
        await emit("[DONE]", settle=True)
        await exchange.end_stream()
