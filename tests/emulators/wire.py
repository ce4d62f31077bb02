"""Wire-format helpers: Go-style JSON and times, Ollama model metadata, tokens."""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

FOREVER_S = 9223372036.854775  # Go's math.MaxInt64 nanoseconds
DEFAULT_KEEP_ALIVE_S = 300.0
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
_GO_DURATION = re.compile(r"([0-9]*\.?[0-9]+|[0-9]+\.)(ns|us|µs|μs|ms|s|m|h)")


def dump(obj: object) -> bytes:
    """Compact JSON, like Go's json.Marshal."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def go_time(when: datetime | None = None) -> str:
    """RFC 3339 with trailing zeros trimmed, as Go marshals a UTC time.Time."""
    text = (when or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")
    return text.rstrip("0").rstrip(".") + "Z"


def ns(seconds: float) -> int:
    return max(1, int(seconds * 1e9))


def canonical(name: str) -> str:
    """``llama3`` and ``LLaMA3:latest`` both name ``llama3:latest``."""
    name = name.strip().lower()
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def split_tokens(text: str) -> list[str]:
    """Word-sized tokens, spaces kept (leading), so that ``"".join(tokens) == text``."""
    return re.findall(r"\s*\S+|\s+$", text)


def parse_keep_alive(value: object) -> float | None:
    """Seconds (inf for negative values) like ollama's api.Duration; None = default 5m."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"unsupported type: '{type(value).__name__}'")
    if isinstance(value, int | float):
        return math.inf if value < 0 else float(value)
    if not isinstance(value, str):
        raise ValueError(f"unsupported type: '{type(value).__name__}'")
    text = value.lstrip("+-")
    if text == "0":
        return 0.0
    if re.fullmatch(r"[0-9.]+", text):
        raise ValueError(f'time: missing unit in duration "{value}"')
    if not text or _GO_DURATION.sub("", text):
        raise ValueError(f'time: invalid duration "{value}"')
    total = sum(float(n) * _GO_UNITS[u] for n, u in _GO_DURATION.findall(text))
    return math.inf if value.startswith("-") and total > 0 else total


def decode_go_json(
    body: bytes, type_name: str, *, empty: str = "missing request body", package: str = "api."
) -> tuple[dict[str, Any], str | None]:
    """Decode a request body; the error text is what gin's ShouldBindJSON would say (an
    empty body is `empty`: Ollama's native handlers check it first, gin itself says EOF)."""
    if not body.strip():
        return {}, empty
    try:
        value = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        text = body.decode("utf-8", "replace")
        pos = getattr(exc, "pos", 0)
        if pos >= len(text.rstrip()):
            return {}, "unexpected EOF"
        return {}, f"invalid character '{text[pos]}' looking for beginning of value"
    if value is None:
        return {}, None
    if not isinstance(value, dict):
        kind = {list: "array", str: "string", bool: "bool"}.get(type(value), "number")
        return {}, f"json: cannot unmarshal {kind} into Go value of type {package}{type_name}"
    return value, None


def embedding_vector(text: str, *, normalize: bool) -> list[float]:
    """A deterministic 8-dim vector derived from the text."""
    raw = [(b - 127.5) / 127.5 for b in hashlib.sha256(text.encode()).digest()[:8]]
    if not normalize:
        return raw
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return [v / norm for v in raw]


@dataclass
class OllamaModel:
    """A locally 'pulled' model as /api/tags, /api/ps and /api/show describe it."""

    name: str
    family: str
    parameter_size: str
    quantization_level: str
    size: int
    digest: str
    embedding: bool
    modified_at: str

    @classmethod
    def describe(cls, name: str) -> OllamaModel:
        name = canonical(name)
        base, _, tag = name.rpartition(":")
        base = base.rsplit("/", 1)[-1]
        embedding = "embed" in base
        families = {"qwen": "qwen2", "llama": "llama", "mistral": "llama", "gemma": "gemma3"}
        family = next((f for key, f in families.items() if base.startswith(key)), base)
        if embedding:
            family = "nomic-bert" if base.startswith("nomic") else "bert"
        match = re.search(r"(\d+(?:\.\d+)?)b", tag)
        params = f"{match.group(1)}B" if match else ("137M" if embedding else "8.0B")
        digest = hashlib.sha256(name.encode()).hexdigest()
        return cls(
            name=name,
            family=family,
            parameter_size=params,
            quantization_level="F16" if embedding else "Q4_K_M",
            size=274302450 if embedding else 4661224676 + int(digest[:4], 16),
            digest=digest,
            embedding=embedding,
            modified_at=go_time(datetime(2025, 5, 10, 8, 6, 48, 639712, tzinfo=UTC)),
        )

    def details(self) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": [self.family],
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization_level,
        }

    def listing(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.name,
            "modified_at": self.modified_at,
            "size": self.size,
            "digest": self.digest,
            "details": self.details(),
        }


def _go_values(obj: object) -> object:
    """Floats as Go's encoding/json prints them: integral values without a fraction."""
    if isinstance(obj, float) and obj.is_integer() and abs(obj) < 1e21:
        return int(obj)
    if isinstance(obj, dict):
        return {k: _go_values(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_go_values(v) for v in obj]
    return obj


def go_json(obj: object, *, sort_keys: bool = False) -> bytes:
    """JSON as Go's json.Marshal writes it: compact, HTML characters escaped, integral
    floats bare; ``sort_keys`` for a Go map (encoding/json sorts map keys)."""
    text = json.dumps(
        _go_values(obj), separators=(",", ":"), ensure_ascii=False, sort_keys=sort_keys
    )
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(char, escaped)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").encode()
