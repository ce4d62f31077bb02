"""An Ollama server emulator, faithful to ollama's docs/api.md and server/routes.go."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import trio

from .http import Exchange
from .ollama_compat import compat_error, compat_routes, is_compat_path
from .ollama_models import NDJSON, OllamaModelStore
from .ollama_script import plan_answer, think_on, token_logprobs
from .wire import (
    OllamaModel,
    canonical,
    decode_go_json,
    dump,
    embedding_vector,
    go_time,
    ns,
    parse_keep_alive,
)

Handler = Callable[[Exchange], Awaitable[None]]
GENERATION_PATHS = frozenset(
    {
        "/api/chat",
        "/api/generate",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/responses",
        "/v1/messages",
    }
)


def message(
    *, content: str = "", thinking: str = "", tool_calls: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """An api.Message as Ollama marshals it (thinking and tool_calls omitted when empty)."""
    msg: dict[str, Any] = {"role": "assistant", "content": content}
    if thinking:
        msg["thinking"] = thinking
    if tool_calls:
        msg["tool_calls"] = tool_calls
    return msg


# Models as Ollama Cloud names them (a local Ollama calls them gpt-oss:120b-cloud ...).
CLOUD_MODELS = ("gpt-oss:120b", "gpt-oss:20b", "qwen3-coder:480b", "deepseek-v3.1:671b")


class OllamaEmulator(OllamaModelStore):
    """Generation, embeddings and routing; see tests/emulators/README.md."""

    @classmethod
    def cloud(
        cls, api_key: str = "cloud-key", models: Sequence[str] = CLOUD_MODELS, **kw: Any
    ) -> OllamaEmulator:
        """Ollama Cloud (ollama.com): the same API, a bearer key on every /api and /v1 route
        (401 in the route's shape without it), cloud model names, gpt-oss thinking."""
        emu = cls(models, required_token=api_key, **kw)
        emu.thinking_models = {m for m in models if m.startswith("gpt-oss")}
        return emu

    def __init__(
        self,
        models: Sequence[str] = ("llama3:latest", "qwen2.5:7b", "nomic-embed-text:latest"),
        *,
        token_delay_s: float = 0.0,
        load_delay_s: float = 0.0,
        embed_delay_s: float = 0.0,
        reply: str = "The sky is blue because of Rayleigh scattering.",
        required_token: str | None = None,
        version: str = "0.15.2",
    ) -> None:
        super().__init__(models)
        self.token_delay_s = token_delay_s
        self.load_delay_s = load_delay_s
        self.embed_delay_s = embed_delay_s
        self.reply = reply
        self.required_token = required_token
        self.version = version
        # The model's scripted behaviour (tests/emulators/ollama_script.py):
        self.thinking = "Rayleigh scattering favours short wavelengths."
        self.thinking_models: set[str] = set()
        self.tool_calls: dict[str, dict[str, Any]] = {}
        self.structured_reply: object = None
        self.inner_requests: list[dict[str, Any]] = []
        self.embed_hold: trio.Event | None = None
        self.active_embeds = 0
        self.max_concurrent_embeds = 0
        self._loading: dict[str, trio.Event] = {}
        self.loads: dict[str, int] = {}  # model loads, reloads for other options included

    def is_generation_path(self, path: str) -> bool:
        return path in GENERATION_PATHS

    def is_embed_path(self, path: str) -> bool:
        return path in ("/api/embed", "/api/embeddings", "/v1/embeddings")

    def fault_error(self, path: str, status: int) -> tuple[bytes, str]:
        if is_compat_path(path):
            return compat_error(path, status, self.error_body(status))
        return super().fault_error(path, status)

    def error_body(self, status: int) -> bytes:
        messages = {
            499: "request canceled",
            503: "server busy, please try again.  maximum pending requests exceeded",
        }
        return dump({"error": messages.get(status, f"{status} error from emulated ollama")})

    # -------------------------------------------------------------- routing

    async def handle(self, exchange: Exchange) -> None:
        path, method = exchange.path, exchange.method
        token = self.required_token
        authorized = token is None or exchange.header("authorization") == f"Bearer {token}"
        if path.startswith("/api") and not authorized:
            await self._error(exchange, 401, "unauthorized")
            return
        if is_compat_path(path) and not authorized:  # Ollama Cloud: the route's own shape
            body, content_type = compat_error(path, 401, dump({"error": "unauthorized"}))
            await exchange.respond(401, body, content_type=content_type)
            return
        routes: dict[str, dict[str, Handler]] = {
            "/": {"GET": self._root, "HEAD": self._root},
            "/api/version": {"GET": self._version, "HEAD": self._version},
            "/api/tags": {"GET": self._tags, "HEAD": self._tags},
            "/api/ps": {"GET": self._ps},
            "/api/show": {"POST": self._show},
            "/api/chat": {"POST": self._chat},
            "/api/generate": {"POST": self._generate},
            "/api/embed": {"POST": self._embed},
            "/api/embeddings": {"POST": self._embeddings},
            "/api/pull": {"POST": self._pull},
            "/api/push": {"POST": self._push},
            "/api/create": {"POST": self._create},
            "/api/copy": {"POST": self._copy},
            "/api/delete": {"DELETE": self._delete},
        }
        if is_compat_path(path):
            routes.update(compat_routes(self, path))
        if path.startswith("/api/blobs/") and len(path) > len("/api/blobs/"):
            routes[path] = {"HEAD": self._head_blob, "POST": self._create_blob}
        methods = routes.get(path)
        if methods is None:
            await exchange.respond(404, b"404 page not found", content_type="text/plain")
        elif method not in methods:
            await exchange.respond(405, b"405 method not allowed", content_type="text/plain")
        else:
            await methods[method](exchange)

    # ---------------------------------------------------------- simple routes

    async def _root(self, exchange: Exchange) -> None:
        body = b"Ollama is running"
        await exchange.respond(200, body, content_type="text/plain; charset=utf-8")

    async def _version(self, exchange: Exchange) -> None:
        await self._json(exchange, 200, {"version": self.version})

    # ------------------------------------------------------------ generation

    async def _load(self, model: OllamaModel, keep_alive: object, options: dict[str, Any]) -> float:
        """Load (once, shared by concurrent requests) and mark used; returns seconds spent."""
        started = trio.current_time()
        num_ctx = options.get("num_ctx") if type(options.get("num_ctx")) is int else None
        if model.name in self.loaded and self._num_ctx.get(model.name) != num_ctx:
            # Ollama reloads a model asked for with other load options (needsReload).
            self.loaded.pop(model.name)
        while model.name not in self.loaded:
            loading = self._loading.get(model.name)
            if loading is not None:
                await loading.wait()
                continue
            loading = self._loading[model.name] = trio.Event()
            try:
                if self.load_delay_s > 0:
                    await trio.sleep(self.load_delay_s)
                self.loaded[model.name] = keep_alive
                self.loads[model.name] = self.loads.get(model.name, 0) + 1
            finally:
                del self._loading[model.name]
                loading.set()
        self.loaded[model.name] = keep_alive
        self._used_at[model.name] = datetime.now(UTC)
        if num_ctx is None:
            self._num_ctx.pop(model.name, None)
        else:
            self._num_ctx[model.name] = num_ctx
        self.changed()
        return trio.current_time() - started

    def _unload_if_zero(self, model: OllamaModel, keep_alive: float | None) -> None:
        if keep_alive == 0:
            self.loaded.pop(model.name, None)
            self.changed()

    async def _chat(self, exchange: Exchange) -> None:
        await self._complete(exchange, chat=True)

    async def _generate(self, exchange: Exchange) -> None:
        await self._complete(exchange, chat=False)

    async def _complete(self, exchange: Exchange, *, chat: bool) -> None:
        kind = "chat" if chat else "generate"
        req, err = decode_go_json(
            exchange.request.body, "ChatRequest" if chat else "GenerateRequest"
        )
        if err is not None:
            await self._error(exchange, 400, err)
            return
        name = req.get("model")
        if not isinstance(name, str) or not name:
            await self._error(exchange, 400, "model is required")
            return
        model = self.catalog.get(canonical(name))
        if model is None:
            await self._error(exchange, 404, f"model '{name}' not found")
            return
        if model.embedding:
            await self._error(exchange, 400, f"{json.dumps(name)} does not support {kind}")
            return
        thinking_model = model.name in {canonical(m) for m in self.thinking_models}
        relaxed = getattr(exchange, "relax_thinking", False)  # set by the /v1/messages layer
        if (
            self.thinking_models
            and not thinking_model
            and not relaxed
            and think_on(req.get("think"), thinking_model=False)
        ):
            await self._error(exchange, 400, f"{json.dumps(name)} does not support thinking")
            return
        try:
            keep_alive = parse_keep_alive(req.get("keep_alive"))
        except ValueError as exc:
            await self._error(exchange, 400, str(exc))
            return
        self.keep_alive_seen[model.name] = req.get("keep_alive")
        self.inner_requests.append(req)
        options = req.get("options") or {}
        if not isinstance(options, dict):
            await self._error(exchange, 400, "json: cannot unmarshal options")
            return
        messages = [m for m in req.get("messages") or [] if isinstance(m, dict)]
        prompt: str = req.get("prompt") or ""
        head: dict[str, Any] = {"model": name, "created_at": go_time()}
        if (chat and not messages) or (not chat and not prompt):
            # an empty request loads (or with keep_alive 0, unloads) the model
            if keep_alive == 0:
                self._unload_if_zero(model, keep_alive)
                reason = "unload"
            else:
                await self._load(model, req.get("keep_alive"), options)
                reason = "load"
            body = {"message": {"role": "assistant", "content": ""}} if chat else {"response": ""}
            await self._json(exchange, 200, {**head, **body, "done": True, "done_reason": reason})
            return

        texts = [str(m.get("content", "")) for m in messages] if chat else [prompt]
        users = [str(m.get("content", "")) for m in messages if m.get("role") == "user"]
        tag = exchange.header("x-test-tag") or (users[0] if chat and users else prompt or "")
        prompt_count = max(1, sum(len(t.split()) for t in texts))
        answer = plan_answer(
            req,
            chat=chat,
            reply=self.reply,
            thinking=self.thinking,
            thinking_model=thinking_model,
            tool_calls=self.tool_calls,
            structured=self.structured_reply,
        )
        done_reason = answer.done_reason

        parts: list[dict[str, Any]] = []
        if chat:
            parts += [{"message": message(thinking=t)} for t in answer.thinking]
            parts += [
                {"message": message(content=t), **token_logprobs(req, t)} for t in answer.content
            ]
            if answer.tool_calls:
                parts.append({"message": message(tool_calls=answer.tool_calls)})
        else:
            parts += [{"response": t} for t in answer.content]

        def piece(fields: dict[str, Any], *, done: bool = False) -> dict[str, Any]:
            fields = dict(fields)
            probs = fields.pop("logprobs", None)  # after done and done_reason, as Go orders it
            obj = {**head, "created_at": go_time(), **fields, "done": done}
            if done:
                obj["done_reason"] = done_reason
            if probs:
                obj["logprobs"] = probs
            return obj

        def final(fields: dict[str, Any], load_s: float, eval_started: float) -> dict[str, Any]:
            obj = piece(fields, done=True)
            if not chat:
                obj["context"] = [1000 + i for i in range(prompt_count + answer.eval_count)]
            now = trio.current_time()
            obj.update(
                total_duration=ns(now - started),
                load_duration=ns(load_s),
                prompt_eval_count=prompt_count,
                prompt_eval_duration=prompt_count * 100_000,
                eval_count=answer.eval_count,
                eval_duration=ns(now - eval_started),
            )
            return obj

        if chat:
            whole = {
                "message": message(
                    content="".join(answer.content),
                    thinking="".join(answer.thinking),
                    tool_calls=answer.tool_calls,
                ),
                "logprobs": [
                    p for t in answer.content for p in token_logprobs(req, t).get("logprobs", [])
                ],
            }
            last: dict[str, Any] = {"message": message()}
        else:
            whole = {"response": "".join(answer.content)}
            last = {"response": ""}
        started = trio.current_time()
        async with self.generation(tag) as outcome:

            def done() -> None:  # just before the last write: state settled for the client
                outcome.complete()
                self._unload_if_zero(model, keep_alive)

            try:
                load_s = await self._load(model, req.get("keep_alive"), options)
                eval_started = trio.current_time()
                if req.get("stream") is False:
                    await self.wait_hold(self.hold)
                    if self.token_delay_s > 0:
                        await trio.sleep(self.token_delay_s * len(parts))
                    done()
                    await self._json(exchange, 200, final(whole, load_s, eval_started))
                else:
                    await self._stream(
                        exchange,
                        parts,
                        last,
                        piece,
                        lambda: final(last, load_s, eval_started),
                        done,
                    )
            finally:
                self._unload_if_zero(model, keep_alive)

    async def _stream(
        self,
        exchange: Exchange,
        parts: list[dict[str, Any]],
        blank: dict[str, Any],
        piece: Callable[[dict[str, Any]], dict[str, Any]],
        final: Callable[[], dict[str, Any]],
        done: Callable[[], None],
    ) -> None:
        await exchange.start_stream(
            200, content_type=NDJSON, faulty=self.fault_applies(exchange.path)
        )
        lines = 0

        async def emit(obj: dict[str, Any] | None) -> None:
            nonlocal lines
            if lines and self.token_delay_s > 0:
                await trio.sleep(self.token_delay_s)
            if obj is None:  # the final line
                await exchange.apply_stream_faults()
                done()
                obj = final()
            await exchange.write_chunk(dump(obj) + b"\n")
            lines += 1

        overlong = self.overlong_bytes(exchange)
        if overlong is not None:
            line = piece(json.loads(json.dumps(blank)))
            filler = "x" * max(overlong - len(dump(line)), 0)
            if "message" in line:
                line["message"]["content"] = filler
            else:
                line["response"] = filler
            await emit(line)
        for index, part in enumerate(parts):
            await emit(piece(part))
            if index == 0:
                await self.wait_hold(self.hold)
        if not parts:
            await self.wait_hold(self.hold)
        await emit(None)
        await exchange.end_stream()

    # ------------------------------------------------------------ embeddings

    @asynccontextmanager
    async def _embedding(
        self, model: OllamaModel, keep_alive: float | None
    ) -> AsyncIterator[Callable[[], None]]:
        """Count an active embed; call the yielded ``done`` just before answering."""
        self.active_embeds += 1
        self.max_concurrent_embeds = max(self.max_concurrent_embeds, self.active_embeds)
        self.changed()
        finished = False

        def done() -> None:
            nonlocal finished
            if not finished:
                finished = True
                self.active_embeds -= 1
                self._unload_if_zero(model, keep_alive)
                self.changed()

        try:
            yield done
        finally:
            done()

    async def _embed_common(
        self, exchange: Exchange, type_name: str
    ) -> tuple[dict[str, Any], OllamaModel, float | None] | None:
        req, err = decode_go_json(exchange.request.body, type_name)
        if err is not None:
            await self._error(exchange, 400, err)
            return None
        name = req.get("model")
        if not isinstance(name, str) or not name:
            await self._error(exchange, 400, "model is required")
            return None
        model = self.catalog.get(canonical(name))
        if model is None:
            await self._error(
                exchange, 404, f"model {json.dumps(name)} not found, try pulling it first"
            )
            return None
        try:
            keep_alive = parse_keep_alive(req.get("keep_alive"))
        except ValueError as exc:
            await self._error(exchange, 400, str(exc))
            return None
        self.keep_alive_seen[model.name] = req.get("keep_alive")
        return req, model, keep_alive

    async def _embed(self, exchange: Exchange) -> None:
        common = await self._embed_common(exchange, "EmbedRequest")
        if common is None:
            return
        req, model, keep_alive = common
        raw = req.get("input")
        if isinstance(raw, str):
            inputs = [raw] if raw else []
        elif isinstance(raw, list) and all(isinstance(v, str) for v in raw):
            inputs = list(raw)
        elif raw is None:
            inputs = []
        else:
            await self._error(exchange, 400, "invalid input type")
            return
        started = trio.current_time()
        async with self._embedding(model, keep_alive) as done:
            load_s = await self._load(model, req.get("keep_alive"), {})
            if self.embed_delay_s > 0:
                await trio.sleep(self.embed_delay_s)
            await self.wait_hold(self.embed_hold)
            body: dict[str, Any] = {"model": req["model"], "embeddings": []}
            if inputs:
                body["embeddings"] = [embedding_vector(t, normalize=True) for t in inputs]
                body["total_duration"] = ns(trio.current_time() - started)
                body["load_duration"] = ns(load_s)
                body["prompt_eval_count"] = sum(max(1, len(t.split())) for t in inputs)
            done()
            await self._json(exchange, 200, body)

    async def _embeddings(self, exchange: Exchange) -> None:
        common = await self._embed_common(exchange, "EmbeddingRequest")
        if common is None:
            return
        req, model, keep_alive = common
        prompt: str = req.get("prompt") or ""
        async with self._embedding(model, keep_alive) as done:
            await self._load(model, req.get("keep_alive"), {})
            if self.embed_delay_s > 0:
                await trio.sleep(self.embed_delay_s)
            await self.wait_hold(self.embed_hold)
            vector = embedding_vector(prompt, normalize=False) if prompt else []
            done()
            await self._json(exchange, 200, {"embedding": vector})
