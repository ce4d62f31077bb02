"""One request's facts, filled in by the layers it passes through and read once at the end
for its log line, its metrics and the timing headers of its response."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import msgspec

from gateway.errors import DECODE_ERRORS
from gateway.target.wire import Final

SCOPE_KEY = "gateway.record"

_final = msgspec.json.Decoder(Final)


def new_request_id() -> str:
    return secrets.token_hex(8)


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    method: str
    route: str  # the route's path when known, else "other": bounded, for metrics
    client: str
    started: float  # trio clock
    client_name: str = ""  # the inbound token's name, when auth is on
    model: str = ""
    provider: str = ""
    host: str = ""  # the GPU host's name, for local work (ADR 0020)
    status: int = 0
    gate_wait_s: float | None = None
    gate_ahead: int | None = None  # requests queued for the gate when this one arrived
    gpu_s: float | None = None  # time this request held the GPU host's gate (local generation)
    upstream_headers_s: float | None = None  # request sent -> upstream answer headers
    upstream_s: float | None = None  # request sent -> upstream answer complete
    response_started: float | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    load_s: float | None = None  # Ollama's load_duration: a cold model load
    eval_rate: float | None = None  # tokens/s from Ollama's final frame
    bytes_out: int = 0
    # Stream frames relayed so far (NDJSON lines, SSE events): the status page's live
    # "tokens so far", one frame per token on a generation stream. Set per chunk, never decoded.
    frames_out: int = 0
    error: str = ""

    @property
    def who(self) -> str:
        """The client as scheduling and usage know it: the inbound token's name when auth
        is on, else the client's address without its port."""
        if self.client_name:
            return self.client_name
        host, _, _ = self.client.rpartition(":")
        return host or self.client

    def overhead_s(self) -> float:
        """Time spent in the gateway itself up to the response start, excluding the gate
        queue and the upstream's own answer time."""
        if self.response_started is None:
            return 0.0
        own = self.response_started - self.started
        own -= self.gate_wait_s or 0.0
        own -= self.upstream_s if self.upstream_s is not None else (self.upstream_headers_s or 0.0)
        return max(0.0, own)

    def note_final_frame(self, line: bytes) -> None:
        """Read counts and timings from Ollama's final frame (the only frame decoded)."""
        try:
            frame = _final.decode(line)
        except DECODE_ERRORS:
            return
        if not frame.done and not frame.prompt_eval_count:
            return
        self.tokens_in = frame.prompt_eval_count
        self.tokens_out = frame.eval_count
        if frame.load_duration:
            self.load_s = frame.load_duration / 1e9
        if frame.eval_count and frame.eval_duration:
            self.eval_rate = frame.eval_count / (frame.eval_duration / 1e9)

    def log_fields(self, now: float) -> dict[str, Any]:
        def ms(value: float | None) -> float | None:
            return None if value is None else round(value * 1000, 1)

        first_byte = None if self.response_started is None else self.response_started - self.started
        return {
            "request_id": self.request_id,
            "method": self.method,
            "route": self.route,
            "model": self.model or None,
            "provider": self.provider or None,
            "host": self.host or None,
            "status": self.status,
            "client": self.client,
            "client_name": self.client_name or None,
            "gate_wait_ms": ms(self.gate_wait_s),
            "gpu_ms": ms(self.gpu_s),
            "ttfb_ms": ms(first_byte),
            "total_ms": ms(now - self.started),
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "bytes_out": self.bytes_out,
            "error": self.error or None,
        }


def record_of(scope: Any) -> RequestRecord:
    """The request's record, put in its scope by the middleware (a blank one without it)."""
    record = scope.get(SCOPE_KEY)
    if not isinstance(record, RequestRecord):
        record = scope[SCOPE_KEY] = RequestRecord(new_request_id(), "", "other", "", 0.0)
    return record
