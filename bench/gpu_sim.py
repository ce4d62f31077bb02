"""A GPU host simulator for the scheduling benchmark (`bench.sched`): Ollama as the
scheduler sees it, not as the wire-level emulators in tests/ see it.

One chat model resident at a time (a request for another one unloads it and loads the new
one, which costs `load_s`), generations one at a time in arrival order (Ollama with
`OLLAMA_NUM_PARALLEL=1`: a FIFO lock), tokens at `tokens_per_s`, answers that carry
`load_duration` like Ollama's, `/api/ps` that says truthfully what is loaded, and an
embedding model that stays loaded beside the chat model and never waits for it.

It runs on trio, on whatever clock the caller's `trio.run` has: the benchmark runs it on
a `MockClock`, so minutes of simulated GPU time take a fraction of a second. HTTP/1.1
through h11, `Content-Length` bodies, keep-alive; `"stream"` is ignored (one JSON answer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import h11
import msgspec
import trio

_decode = msgspec.json.decode
_encode = msgspec.json.encode
CREATED_AT = "2025-01-01T00:00:00Z"


@dataclass
class GpuSim:
    chat_models: tuple[str, ...]
    embed_model: str = "embed:latest"
    load_s: float = 10.0  # one swap: unload the resident chat model, load another
    tokens_per_s: float = 40.0
    prompt_s: float = 0.3  # prompt evaluation, per request
    embed_s: float = 0.05
    resident: str | None = None
    swaps: int = 0  # loads of a chat model (the first one included)
    busy_s: float = 0.0  # time the GPU spent loading or generating chat
    generations: int = 0
    loads: list[tuple[float, str]] = field(default_factory=list)  # (when, model) of each swap
    served: dict[str, int] = field(default_factory=dict)  # generations, by model
    port: int = 0
    _lock: trio.Lock = field(default_factory=trio.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, self._connection, listeners)
            task_status.started(self.port)

    # ------------------------------------------------------------------ the model

    async def generate(self, model: str, tokens: int) -> dict[str, Any]:
        """One generation, in arrival order; a load first if `model` is not resident."""
        async with self._lock:
            started = trio.current_time()
            load = 0.0
            if model != self.resident:
                self.resident = None  # unloaded: /api/ps shows nothing while loading
                await trio.sleep(self.load_s)
                load, self.resident = self.load_s, model
                self.swaps += 1
                self.loads.append((started, model))
            await trio.sleep(self.prompt_s)
            eval_s = tokens / self.tokens_per_s
            await trio.sleep(eval_s)
            total = trio.current_time() - started
            self.busy_s += total
            self.generations += 1
            self.served[model] = self.served.get(model, 0) + 1
        return {
            "total_duration": int(total * 1e9),
            "load_duration": int(load * 1e9),
            "prompt_eval_count": 20,
            "prompt_eval_duration": int(self.prompt_s * 1e9),
            "eval_count": tokens,
            "eval_duration": int(eval_s * 1e9),
        }

    def _entry(self, name: str) -> dict[str, Any]:
        return {"name": name, "model": name, "size": 1, "digest": "0" * 64, "details": {}}

    async def _answer(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        if method == "GET" and path == "/api/tags":
            models = [*self.chat_models, self.embed_model]
            return 200, _encode({"models": [self._entry(m) for m in models]})
        if method == "GET" and path == "/api/ps":
            loaded = [self.embed_model] + ([self.resident] if self.resident else [])
            return 200, _encode({"models": [self._entry(m) for m in loaded]})
        if method == "GET" and path in ("/", "/api/version"):
            return 200, _encode({"version": "0.12.6"})
        if method != "POST":
            return 404, _encode({"error": "not found"})
        request = _decode(body) if body else {}
        model = request.get("model", "")
        if path in ("/api/embed", "/api/embeddings"):
            await trio.sleep(self.embed_s)
            return 200, _encode({"model": model, "embeddings": [[0.0, 1.0]]})
        if path not in ("/api/chat", "/api/generate"):
            return 404, _encode({"error": "not found"})
        if model not in self.chat_models:
            return 404, _encode({"error": f"model '{model}' not found"})
        tokens = int((request.get("options") or {}).get("num_predict", 100))
        timings = await self.generate(model, tokens)
        answer = {"model": model, "created_at": CREATED_AT, "done": True, "done_reason": "stop"}
        if path == "/api/chat":
            answer["message"] = {"role": "assistant", "content": "x " * min(tokens, 50)}
        else:
            answer["response"] = "x " * min(tokens, 50)
        return 200, _encode({**answer, **timings})

    # ------------------------------------------------------------------ HTTP/1.1

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request: h11.Request | None = None
                body = b""
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await stream.receive_some(65536)
                        conn.receive_data(data)
                        if not data and conn.their_state is not h11.DONE:
                            return
                        continue
                    if isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    elif isinstance(event, h11.ConnectionClosed):
                        return
                assert request is not None
                status, payload = await self._answer(
                    request.method.decode(), request.target.decode().split("?")[0], body
                )
                headers = [
                    ("content-type", "application/json; charset=utf-8"),
                    ("content-length", str(len(payload))),
                ]
                out = conn.send(h11.Response(status_code=status, headers=headers))
                out += conn.send(h11.Data(data=payload)) or b""
                out += conn.send(h11.EndOfMessage()) or b""
                await stream.send_all(out or b"")
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return
        finally:
            await trio.aclose_forcefully(stream)
