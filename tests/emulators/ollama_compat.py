"""Which compatibility routes an emulated Ollama serves (``server/routes.go``), from which
version on, and how their errors look before any handler runs (auth, faults)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING

from . import ollama_anthropic as anth
from . import ollama_openai as oa
from . import ollama_openai_extra as oax
from . import ollama_responses as resp
from .http import Exchange

if TYPE_CHECKING:
    from .ollama import OllamaEmulator

Handler = Callable[[Exchange], Awaitable[None]]

# The Ollama release that added a route; an older server answers gin's 404 for it.
ADDED_IN = {"/v1/responses": (0, 13, 3), "/v1/messages": (0, 14, 0)}


def version_tuple(version: str) -> tuple[int, ...]:
    core = version.lstrip("v").split("-", 1)[0]
    return tuple(int(p) for p in core.split(".") if p.isdigit())


def is_compat_path(path: str) -> bool:
    return path.startswith("/v1/")


def compat_routes(emu: OllamaEmulator, path: str) -> dict[str, dict[str, Handler]]:
    """The /v1 routes this emulator's version serves (``path`` for /v1/models/{model})."""
    routes: dict[str, dict[str, Handler]] = {
        "/v1/chat/completions": {"POST": partial(oa.chat_completions, emu)},
        "/v1/completions": {"POST": partial(oax.completions, emu)},
        "/v1/embeddings": {"POST": partial(oax.embeddings, emu)},
        "/v1/models": {"GET": partial(oax.list_models, emu)},
        "/v1/messages": {"POST": partial(anth.messages, emu)},
        "/v1/responses": {"POST": partial(resp.responses, emu)},
    }
    model = path.removeprefix("/v1/models/")
    if path.startswith("/v1/models/") and model and "/" not in model:
        routes[path] = {"GET": partial(oax.retrieve_model, emu, model=model)}
    have = version_tuple(emu.version)
    return {p: m for p, m in routes.items() if have >= ADDED_IN.get(p, (0,))}


def compat_error(path: str, status: int, native: bytes) -> tuple[bytes, str]:
    """A native ``{"error": ...}`` as the route at ``path`` writes it."""
    if path == "/v1/messages":
        return anth.from_native_error(status, native), "application/json"
    return oa.from_native_error(status, native), "application/json"
