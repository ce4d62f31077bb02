"""What the emulated model says: text, thinking, tool calls and structured output.

Ollama's chat handler turns model output into ``message`` parts: thinking first (for a
thinking model with ``think`` on), then content, or, when the tool parser recognises a
call, one part carrying ``tool_calls`` (``server/routes.go``: the tool parser buffers
content until it can tell). The emulator scripts that output from a few knobs on
``OllamaEmulator`` instead of running a model.
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass, field
from typing import Any

from .wire import split_tokens

_ID_CHARS = string.ascii_lowercase + string.digits


def tool_call_id() -> str:
    """``call_`` and 8 lower-case letters or digits, as ollama's toolCallId()."""
    return "call_" + "".join(secrets.choice(_ID_CHARS) for _ in range(8))


@dataclass
class Answer:
    """The model's output for one request, split the way the chat handler streams it."""

    thinking: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    done_reason: str = "stop"

    @property
    def eval_count(self) -> int:
        calls = sum(len(json.dumps(c["function"]["arguments"]).split()) for c in self.tool_calls)
        return len(self.thinking) + len(self.content) + calls


def think_on(think: object, *, thinking_model: bool) -> bool:
    """Whether a request's ``think`` (bool, "low"/"medium"/"high"/"max", or absent) turns
    thinking on: a thinking model thinks unless told not to (routes.go ChatHandler)."""
    if think is None:
        return thinking_model
    return think is not False and think != ""


def schema_instance(schema: object, text: str, defs: dict[str, Any] | None = None) -> Any:
    """A value that satisfies a JSON schema (enough of it for Pydantic models): strings
    get ``text``, numbers 1, booleans true, arrays one item, ``$ref`` is followed."""
    if not isinstance(schema, dict):
        return text
    defs = {**(defs or {}), **schema.get("$defs", {}), **schema.get("definitions", {})}
    if "$ref" in schema:
        return schema_instance(defs.get(str(schema["$ref"]).rsplit("/", 1)[-1]), text, defs)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        options = [s for s in schema.get(key) or [] if s != {"type": "null"}]
        if options:
            return schema_instance(options[0], text, defs)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or "properties" in schema:
        props = schema.get("properties") or {}
        return {name: schema_instance(sub, text, defs) for name, sub in props.items()}
    if kind == "array":
        count = max(1, int(schema.get("minItems") or 1))
        return [schema_instance(schema.get("items"), text, defs) for _ in range(count)]
    simple: dict[object, Any] = {"integer": 1, "number": 1, "boolean": True, "null": None}
    return simple.get(kind, text)


def cut_at_stop(text: str, stops: object) -> str:
    """The runner stops before the first stop sequence and does not emit it."""
    if isinstance(stops, str):
        stops = [stops]
    if not isinstance(stops, list):
        return text
    cuts = [text.find(s) for s in stops if isinstance(s, str) and s and s in text]
    return text[: min(cuts)] if cuts else text


def token_logprobs(req: dict[str, Any], token: str) -> dict[str, Any]:
    """``{"logprobs": [api.Logprob]}`` for one token when the request asks, else ``{}``."""
    if req.get("logprobs") is not True:
        return {}
    raw = list(token.encode())
    entry: dict[str, Any] = {"token": token, "logprob": -0.25, "bytes": raw}
    top = req.get("top_logprobs")
    if type(top) is int and top > 0:
        alternatives = [{"token": token, "logprob": -0.25, "bytes": raw}]
        alternatives += [{"token": "x", "logprob": -4.0, "bytes": [120]}] * (top - 1)
        entry["top_logprobs"] = alternatives
    return {"logprobs": [entry]}


def plan_answer(
    req: dict[str, Any],
    *,
    chat: bool,
    reply: str,
    thinking: str,
    thinking_model: bool,
    tool_calls: dict[str, dict[str, Any]],
    structured: object,
) -> Answer:
    """Decide the model's output for a decoded /api/chat or /api/generate request."""
    options = req.get("options") or {}
    answer = Answer()
    if chat and thinking_model and think_on(req.get("think"), thinking_model=True):
        answer.thinking = split_tokens(thinking)
    messages = [m for m in req.get("messages") or [] if isinstance(m, dict)]
    offered = [
        t["function"]["name"]
        for t in req.get("tools") or []
        if isinstance(t, dict)
        and isinstance(t.get("function"), dict)
        and isinstance(t["function"].get("name"), str)
    ]
    last_role = str(messages[-1].get("role", "")).lower() if messages else ""
    scripted = [name for name in offered if name in tool_calls]
    if chat and scripted and last_role != "tool":
        name = scripted[0]
        answer.tool_calls = [
            {
                "id": tool_call_id(),
                "function": {"index": 0, "name": name, "arguments": tool_calls[name]},
            }
        ]
        return answer
    fmt = req.get("format")
    text = reply
    if isinstance(fmt, dict):
        value = structured if structured is not None else schema_instance(fmt, reply)
        text = json.dumps(value)
    elif fmt is not None and fmt != "":
        text = json.dumps({"answer": reply})
    text = cut_at_stop(text, options.get("stop") if isinstance(options, dict) else None)
    answer.content = split_tokens(text)
    num_predict = options.get("num_predict") if isinstance(options, dict) else None
    if type(num_predict) is int and 0 <= num_predict < len(answer.content):
        answer.content, answer.done_reason = answer.content[:num_predict], "length"
    return answer
