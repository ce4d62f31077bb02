"""A minimal, fast Ollama-compatible upstream for the benchmark.

Run as `python -m bench.upstream [--host H] [--port P] [--embed-dims N]`; it prints
`PORT <n>` on stdout once it listens and serves until SIGTERM/SIGINT.

It is as cheap as plain Python allows, so that what the benchmark measures is the
gateway: asyncio protocols (no streams), a hand-rolled HTTP/1.1 request parser with
keep-alive and pipelining, TCP_NODELAY, and answers encoded once at start. No artificial
delay anywhere, unless a request asks for pacing.

Routes:
- `GET /`, `GET /api/version`, `GET /api/tags`, `GET /api/ps`: fixed answers; the model
  list holds `bench-chat` (a chat model, also loaded) and `bench-embed`.
- `POST /api/chat`, `POST /api/generate`: `"stream": false` gets one JSON answer
  (Content-Length); otherwise a chunked NDJSON stream of N lines, one chunk per line, the
  last one `"done": true`. N is `options.num_predict` (default 200). Each line carries
  `"bench_t"`: the CLOCK_MONOTONIC time in ns at which it was written, so a client on the
  same machine can compute per-line latency. `options.bench_pace_us` > 0 spaces the lines
  that many microseconds apart (scheduled at absolute times, so lateness does not add up);
  0 (default) writes them back to back, each with its own socket write, like Ollama's
  per-token flush. `options.bench_delay_us` > 0 delays a `"stream": false` answer that
  long, as a model's generation does (the gateway then sleeps and wakes per request).
- `POST /api/embed`, `POST /api/embeddings`: one vector of `--embed-dims` floats.
- `POST /api/show`: a small fixed answer. Anything else: 404 in Ollama's shape.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import socket
import sys
import time
from typing import Any

try:
    import msgspec

    _decode: Any = msgspec.json.decode
    _encode: Any = msgspec.json.encode
except ImportError:  # pragma: no cover - the project's venv has msgspec
    import json

    _decode = json.loads

    def _encode(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()


CHAT_MODEL = "bench-chat:latest"
EMBED_MODEL = "bench-embed:latest"
DEFAULT_LINES = 200
CREATED_AT = "2025-01-01T00:00:00.000000000Z"
DATE = b"Date: Wed, 01 Jan 2025 00:00:00 GMT\r\n"
JSON_CT = b"Content-Type: application/json; charset=utf-8\r\n"
NDJSON_CT = b"Content-Type: application/x-ndjson\r\n"


def _full(status: bytes, body: bytes, content_type: bytes = JSON_CT) -> bytes:
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\n"
        + content_type
        + DATE
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )


def _model_entry(name: str, family: str, size: int) -> dict[str, Any]:
    return {
        "name": name,
        "model": name,
        "modified_at": "2025-01-01T00:00:00Z",
        "size": size,
        "digest": "0" * 64,
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": family,
            "families": [family],
            "parameter_size": "8.0B",
            "quantization_level": "Q4_K_M",
        },
    }


class Answers:
    """Every answer, encoded once."""

    def __init__(self, embed_dims: int) -> None:
        chat = _model_entry(CHAT_MODEL, "llama", 4_920_000_000)
        embed = _model_entry(EMBED_MODEL, "nomic-bert", 274_000_000)
        loaded = {**chat, "expires_at": "2099-01-01T00:00:00Z", "size_vram": 4_920_000_000}
        self.tags = _full(b"200 OK", _encode({"models": [chat, embed]}))
        self.ps = _full(b"200 OK", _encode({"models": [loaded]}))
        self.version = _full(b"200 OK", b'{"version":"0.9.0"}')
        self.root = _full(b"200 OK", b"Ollama is running", b"Content-Type: text/plain\r\n")
        self.show = _full(
            b"200 OK",
            _encode(
                {
                    "modelfile": "FROM bench",
                    "parameters": "",
                    "template": "{{ .Prompt }}",
                    "details": chat["details"],
                    "capabilities": ["completion"],
                    "model_info": {},
                }
            ),
        )
        self.not_found = _full(b"404 Not Found", b'{"error":"404 page not found"}')
        self.bad_request = _full(b"400 Bad Request", b'{"error":"invalid request body"}')
        rng = random.Random(7)
        vector = [round(rng.uniform(-1, 1), 8) for _ in range(embed_dims)]
        self.embed = _full(
            b"200 OK",
            _encode(
                {
                    "model": EMBED_MODEL,
                    "embeddings": [vector],
                    "total_duration": 14_000_000,
                    "load_duration": 1_000_000,
                    "prompt_eval_count": 8,
                }
            ),
        )
        self.embeddings = _full(b"200 OK", _encode({"embedding": vector}))
        final = {
            "total_duration": 250_000_000,
            "load_duration": 1_000_000,
            "prompt_eval_count": 26,
            "prompt_eval_duration": 20_000_000,
            "eval_count": 42,
            "eval_duration": 200_000_000,
        }
        self.chat = _full(
            b"200 OK",
            _encode(
                {
                    "model": CHAT_MODEL,
                    "created_at": CREATED_AT,
                    "message": {
                        "role": "assistant",
                        "content": "The sky is blue because of Rayleigh scattering of sunlight"
                        " by the molecules of the air, which scatters short wavelengths most.",
                    },
                    "done_reason": "stop",
                    "done": True,
                    **final,
                }
            ),
        )
        self.generate = _full(
            b"200 OK",
            _encode(
                {
                    "model": CHAT_MODEL,
                    "created_at": CREATED_AT,
                    "response": "The sky is blue because of Rayleigh scattering.",
                    "done_reason": "stop",
                    "done": True,
                    **final,
                }
            ),
        )
        self.stream_head = (
            b"HTTP/1.1 200 OK\r\n" + NDJSON_CT + DATE + b"Transfer-Encoding: chunked\r\n\r\n"
        )
        # Lines are `prefix + 19-digit timestamp + suffix`: a fixed length, so the chunk
        # header is fixed too. `{"...","bench_t":"0000000001234567890"}`.
        self.chat_line = self._template(
            {
                "model": CHAT_MODEL,
                "created_at": CREATED_AT,
                "message": {"role": "assistant", "content": " token"},
                "done": False,
            }
        )
        self.generate_line = self._template(
            {"model": CHAT_MODEL, "created_at": CREATED_AT, "response": " token", "done": False}
        )
        self.chat_final = self._template(
            {
                "model": CHAT_MODEL,
                "created_at": CREATED_AT,
                "message": {"role": "assistant", "content": ""},
                "done_reason": "stop",
                "done": True,
                **final,
            }
        )
        self.generate_final = self._template(
            {
                "model": CHAT_MODEL,
                "created_at": CREATED_AT,
                "response": "",
                "done_reason": "stop",
                "done": True,
                **final,
            }
        )

        # Ollama's compatibility routes (issue 12), answered as fixed bytes.
        text = "The sky is blue because of Rayleigh scattering."
        self.oai_chat = _full(
            b"200 OK",
            _encode(
                {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "created": 1735689600,
                    "model": CHAT_MODEL,
                    "system_fingerprint": "fp_ollama",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 26, "completion_tokens": 42, "total_tokens": 68},
                }
            ),
        )
        self.messages = _full(
            b"200 OK",
            _encode(
                {
                    "id": "msg_1",
                    "type": "message",
                    "role": "assistant",
                    "model": CHAT_MODEL,
                    "content": [{"type": "text", "text": text}],
                    "stop_reason": "end_turn",
                    "stop_sequence": None,
                    "usage": {"input_tokens": 26, "output_tokens": 42},
                }
            ),
        )
        self.sse_head = (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            + DATE
            + b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 1735689600,
            "model": CHAT_MODEL,
            "system_fingerprint": "fp_ollama",
            "choices": [{"index": 0, "delta": {"content": " token"}, "finish_reason": None}],
        }
        self.oai_event = _chunk(b"data: " + _encode(chunk) + b"\n\n")
        last = {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        self.oai_end = _chunk(b"data: " + _encode(last) + b"\n\ndata: [DONE]\n\n")
        self.msg_start = _chunk(
            b"event: message_start\ndata: "
            + _encode(
                {
                    "type": "message_start",
                    "message": {
                        "id": "msg_1",
                        "type": "message",
                        "role": "assistant",
                        "model": CHAT_MODEL,
                        "content": [],
                        "stop_reason": None,
                        "usage": {"input_tokens": 26, "output_tokens": 0},
                    },
                }
            )
            + b"\n\n"
        )
        delta = {"type": "content_block_delta", "index": 0}
        self.msg_event = _chunk(
            b"event: content_block_delta\ndata: "
            + _encode({**delta, "delta": {"type": "text_delta", "text": " token"}})
            + b"\n\n"
        )
        self.msg_end = _chunk(
            b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":'
            b'"end_turn"},"usage":{"output_tokens":42}}\n\n'
            b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
        )

    @staticmethod
    def _template(obj: dict[str, Any]) -> tuple[bytes, bytes]:
        text = _encode(obj)
        assert text.endswith(b"}")
        prefix = text[:-1] + b',"bench_t":"'
        suffix = b'"}\n'
        size = len(prefix) + 19 + len(suffix)
        return b"%x\r\n" % size + prefix, suffix + b"\r\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n"


def _line(template: tuple[bytes, bytes]) -> bytes:
    return template[0] + b"%019d" % time.monotonic_ns() + template[1]


class Stats:
    requests = 0
    lines = 0


class UpstreamProtocol(asyncio.Protocol):
    def __init__(self, answers: Answers, loop: asyncio.AbstractEventLoop) -> None:
        self.a = answers
        self.loop = loop
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.busy = False  # a paced stream is being written; later requests wait
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.closing = True

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self.process()

    def process(self) -> None:
        buf = self.buf
        while not self.busy and not self.closing:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end])
            lower = head.lower()
            length = 0
            at = lower.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = lower.find(b"\r\n", at + 2)
                length = int(head[at + 17 : stop if stop >= 0 else None])
            if len(buf) < end + 4 + length:
                return
            body = bytes(buf[end + 4 : end + 4 + length])
            del buf[: end + 4 + length]
            line_end = head.find(b"\r\n")
            method, target, _ = (head if line_end < 0 else head[:line_end]).split(b" ", 2)
            self.closing = b"\r\nconnection: close" in lower
            Stats.requests += 1
            self.handle(method, target.split(b"?", 1)[0], body)
            if self.closing and not self.busy and self.transport is not None:
                self.transport.close()

    def handle(self, method: bytes, path: bytes, body: bytes) -> None:
        a = self.a
        write = self.transport.write if self.transport is not None else None
        if write is None:
            return
        if path == b"/api/chat" or path == b"/api/generate":
            try:
                request = _decode(body)
                options = request.get("options") or {}
                stream = request.get("stream", True) is not False
                lines = max(1, int(options.get("num_predict", DEFAULT_LINES)))
                pace_us = int(options.get("bench_pace_us", 0))
                delay_us = int(options.get("bench_delay_us", 0))
            except (ValueError, TypeError, AttributeError):
                write(a.bad_request)
                return
            chat = path == b"/api/chat"
            if not stream:
                answer = a.chat if chat else a.generate
                if delay_us > 0:  # as a model does: the answer comes after a while
                    self.loop.call_later(delay_us / 1e6, self._late, answer)
                else:
                    write(answer)
                return
            line = a.chat_line if chat else a.generate_line
            final = a.chat_final if chat else a.generate_final
            write(a.stream_head)
            if pace_us <= 0:
                for _ in range(lines - 1):
                    write(_line(line))
                write(_line(final) + b"0\r\n\r\n")
                Stats.lines += lines
                return
            self.busy = True
            start = self.loop.time()
            self._paced(line, final, 0, lines, start, pace_us / 1e6)
        elif path == b"/v1/chat/completions" or path == b"/v1/messages":
            try:
                request = _decode(body)
                stream = request.get("stream") is True
                lines = max(1, int(request.get("max_tokens") or DEFAULT_LINES))
            except (ValueError, TypeError, AttributeError):
                write(a.bad_request)
                return
            chat = path == b"/v1/chat/completions"
            if not stream:
                write(a.oai_chat if chat else a.messages)
                return
            event = a.oai_event if chat else a.msg_event
            write(
                a.sse_head
                + (b"" if chat else a.msg_start)
                + event * (lines - 1)
                + (a.oai_end if chat else a.msg_end)
                + b"0\r\n\r\n"
            )
            Stats.lines += lines
        elif path == b"/api/embed":
            write(a.embed)
        elif path == b"/api/embeddings":
            write(a.embeddings)
        elif path == b"/api/tags":
            write(a.tags)
        elif path == b"/api/ps":
            write(a.ps)
        elif path == b"/api/version":
            write(a.version)
        elif path == b"/":
            write(a.root)
        elif path == b"/api/show" and method == b"POST":
            write(a.show)
        else:
            write(a.not_found)

    def _late(self, answer: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(answer)

    def _paced(
        self,
        line: tuple[bytes, bytes],
        final: tuple[bytes, bytes],
        index: int,
        lines: int,
        start: float,
        pace_s: float,
    ) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            self.busy = False
            return
        if index < lines - 1:
            transport.write(_line(line))
            self.loop.call_at(
                start + (index + 1) * pace_s,
                self._paced,
                line,
                final,
                index + 1,
                lines,
                start,
                pace_s,
            )
            return
        transport.write(_line(final) + b"0\r\n\r\n")
        Stats.lines += lines
        self.busy = False
        if self.closing:
            transport.close()
        elif self.buf:
            self.process()


async def serve(host: str, port: int, embed_dims: int) -> None:
    loop = asyncio.get_running_loop()
    answers = Answers(embed_dims)
    server = await loop.create_server(
        lambda: UpstreamProtocol(answers, loop), host, port, backlog=4096, reuse_address=True
    )
    bound = server.sockets[0].getsockname()[1]
    print(f"PORT {bound}", flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()
    print(f"STATS requests={Stats.requests} lines={Stats.lines}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.upstream", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--embed-dims", type=int, default=768)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.host, args.port, args.embed_dims))
    return 0


if __name__ == "__main__":
    sys.exit(main())
