"""The client APIs the gateway passes through, and what it needs to know of each: pure.

| route                       | protocol           | gated | error shape | Ollama since |
|-----------------------------|--------------------|-------|-------------|--------------|
| `POST /v1/chat/completions` | `chat_completions` | yes   | OpenAI      | v0.1.24      |
| `POST /v1/completions`      | `completions`      | yes   | OpenAI      | v0.2.0       |
| `POST /v1/responses`        | `responses`        | yes   | OpenAI      | v0.13.3      |
| `POST /v1/messages`         | `messages`         | yes   | Anthropic   | v0.14.0      |
| `POST /v1/embeddings`       | `embeddings`       | no    | OpenAI      | v0.2.6       |

The versions are those of the first Ollama release whose `server/routes.go` registers the
route (found with `git log -S` in ollama/ollama), so a target older than a route can be
named in the error. Also here: Ollama's cloud tags (`internal/modelref`), the one rewrite
of a forwarded body (`model`), and token counts from each protocol's usage object.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import msgspec

from gateway.errors import BadRequest


class Shape(enum.Enum):
    OPENAI = "openai"
    ANTHROPIC = "anthropic"


@dataclass(frozen=True, slots=True)
class Protocol:
    name: str  # the configuration's name for it (`providers.<p>.protocols`)
    title: str  # how errors name it
    path: str  # the gateway's route, and the path on an Ollama host
    gated: bool
    shape: Shape
    ollama_since: str


CHAT_COMPLETIONS = Protocol(
    "chat_completions", "OpenAI Chat Completions", "/v1/chat/completions", True, Shape.OPENAI,
    "v0.1.24",
)  # fmt: skip
COMPLETIONS = Protocol(
    "completions", "OpenAI Completions", "/v1/completions", True, Shape.OPENAI, "v0.2.0"
)
RESPONSES = Protocol(
    "responses", "OpenAI Responses", "/v1/responses", True, Shape.OPENAI, "v0.13.3"
)  # fmt: skip
MESSAGES = Protocol(
    "messages", "Anthropic Messages", "/v1/messages", True, Shape.ANTHROPIC, "v0.14.0"
)
EMBEDDINGS = Protocol(
    "embeddings", "OpenAI Embeddings", "/v1/embeddings", False, Shape.OPENAI, "v0.2.6"
)

PROTOCOLS: dict[str, Protocol] = {
    p.path: p for p in (CHAT_COMPLETIONS, COMPLETIONS, RESPONSES, MESSAGES, EMBEDDINGS)
}
PROTOCOL_NAMES = frozenset(p.name for p in PROTOCOLS.values())
MODELS_PATH = "/v1/models"
MODELS_SINCE = "v0.2.0"


def strip_cloud_tag(name: str) -> str | None:
    """The base name of a cloud-tagged model, as Ollama's `modelref.parseSourceSuffix`
    reads it (`gpt-oss:120b-cloud` -> `gpt-oss:120b`, `kimi-k2:cloud` -> `kimi-k2`), or
    None when `name` carries no cloud tag."""
    name = name.strip()
    colon = name.rfind(":")
    if colon < 0:
        return None
    tag = name[colon + 1 :].strip()
    lowered = tag.lower()
    if lowered == "cloud":
        return name[:colon]
    if "/" not in tag and lowered.endswith("-cloud"):
        return name[: colon + 1] + tag[: -len("-cloud")]
    return None


_object = msgspec.json.Decoder(dict[str, msgspec.Raw])
_encode = msgspec.json.Encoder().encode


def with_model(body: bytes, model: str) -> bytes:
    """`body` with its top-level `model` replaced; every other value keeps its bytes
    (decoded as `Raw`), as Ollama's `replaceJSONModelField` does for cloud models."""
    try:
        fields = _object.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise BadRequest(f"request body is not a JSON object: {exc}") from None
    fields["model"] = msgspec.Raw(_encode(model))
    return _encode(fields)


class _Counts(msgspec.Struct):
    prompt_tokens: int | None = None  # OpenAI chat, completions, embeddings
    completion_tokens: int | None = None
    input_tokens: int | None = None  # Responses, Anthropic
    output_tokens: int | None = None


class _Holder(msgspec.Struct):
    usage: _Counts | None = None


class _Usage(msgspec.Struct):
    """Where each protocol puts its counts: `usage` at the top (whole answers, OpenAI's
    last chunk, Anthropic's `message_delta`), under `response` (Responses'
    `response.completed`) or under `message` (Anthropic's `message_start`)."""

    usage: _Counts | None = None
    response: _Holder | None = None
    message: _Holder | None = None


_usage = msgspec.json.Decoder(_Usage)


class UsageTally:
    """Token counts read from a protocol's usage objects; later counts replace earlier."""

    def __init__(self) -> None:
        self.tokens_in = 0
        self.tokens_out = 0

    def feed(self, data: bytes) -> None:
        """One JSON document (a whole answer, or one SSE event's data); no `usage`, no work."""
        if b'"usage"' not in data:
            return
        try:
            found = _usage.decode(data)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            return  # telemetry only: an odd answer is the client's to judge
        for holder in (found, found.response, found.message):
            counts = holder.usage if holder is not None else None
            if counts is None:
                continue
            tokens_in = (
                counts.prompt_tokens if counts.prompt_tokens is not None else counts.input_tokens
            )
            tokens_out = (
                counts.completion_tokens
                if counts.completion_tokens is not None
                else counts.output_tokens
            )
            if tokens_in is not None:
                self.tokens_in = tokens_in
            if tokens_out is not None:
                self.tokens_out = tokens_out
