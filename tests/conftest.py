"""Shared fixtures: upstream emulators and the whole gateway, on 127.0.0.1 port 0."""

from __future__ import annotations

import io
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import httpx
import pytest
import trio

from gateway.app import Started, serve
from gateway.config import Config, from_mapping, provider_names
from gateway.logs import JsonFormatter
from gateway.services import Services
from tests.emulators import OllamaEmulator, OpenAIEmulator


def make_config(ollama_url: str, **sections: Any) -> Config:
    """A config for tests: port 0, fast polls, the given overrides merged in by section."""
    raw: dict[str, Any] = {
        "bind": "127.0.0.1:0",
        # The Host names the raw-socket tests send; the DNS-rebinding guard (on, since
        # the bind is loopback) refuses any other name but local ones and addresses.
        "allowed_hosts": ["gw", "a", "b", "t", "x", "host", "soak", "gateway"],
        "shutdown_grace_s": 2.0,
        "ollama": {
            "url": ollama_url,
            "poll_interval_s": 30.0,
            "degraded_poll_interval_s": 0.2,
            "connect_timeout_s": 1.0,
        },
        # Hermetic: no usage ledger in the user's state directory; tests that want one
        # give a path under their tmp_path.
        "usage": {"path": ""},
    }
    # Hermetic: no provider reads a key file from the machine running the tests.
    providers: dict[str, Any] = {name: {"env_file": ""} for name in provider_names()}
    for name, table in sections.pop("providers", {}).items():
        providers[name] = {**providers[name], **table}
    raw["providers"] = providers
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return from_mapping(raw, source="test config")


@dataclass
class RunningGateway:
    url: str
    services: Services
    config: Config
    stop: trio.Event
    stopped: trio.Event
    client: httpx.AsyncClient
    environ: dict[str, str] = field(default_factory=dict)


StartGateway = Callable[..., Awaitable[RunningGateway]]


@pytest.fixture
async def ollama(nursery: trio.Nursery) -> OllamaEmulator:
    emulator = OllamaEmulator()
    await nursery.start(emulator.run)
    return emulator


@pytest.fixture
async def openai_emu(nursery: trio.Nursery) -> OpenAIEmulator:
    emulator = OpenAIEmulator()
    await nursery.start(emulator.run)
    return emulator


@pytest.fixture
async def start_gateway(nursery: trio.Nursery) -> AsyncIterator[StartGateway]:
    """Start a whole gateway (`gateway.app.serve`) in the test's nursery."""
    clients: list[httpx.AsyncClient] = []

    async def start(
        config: Config, *, environ: dict[str, str] | None = None, **serve_options: Any
    ) -> RunningGateway:
        stop = trio.Event()
        stopped = trio.Event()
        env = environ or {}

        async def run(task_status: trio.TaskStatus[Started]) -> None:
            try:
                await serve(
                    config,
                    environ=env,
                    shutdown_trigger=stop.wait,
                    task_status=task_status,
                    **serve_options,
                )
            finally:
                stopped.set()

        started: Started = await nursery.start(run)
        client = httpx.AsyncClient(base_url=started.url, timeout=10.0, trust_env=False)
        clients.append(client)
        return RunningGateway(started.url, started.services, config, stop, stopped, client, env)

    yield start
    for client in clients:
        await client.aclose()


@pytest.fixture
async def gateway(start_gateway: StartGateway, ollama: OllamaEmulator) -> RunningGateway:
    """The gateway in front of the Ollama emulator, with default settings."""
    return await start_gateway(make_config(ollama.url))


@pytest.fixture
def all_logs() -> Iterator[io.StringIO]:
    """Everything any logger says during the test, at every level, as JSON lines."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


async def eventually(predicate: Callable[[], bool], *, timeout_s: float = 5.0) -> None:
    """Wait until `predicate()` holds, for state that changes across a socket (where no
    event can be awaited); bounded, and it fails the test with a timeout if never true."""
    with trio.fail_after(timeout_s):
        while not predicate():
            await trio.sleep(0.002)


async def stop_gateway(gw: RunningGateway, timeout_s: float = 10.0) -> None:
    gw.stop.set()
    with trio.fail_after(timeout_s):
        await gw.stopped.wait()


__all__ = ["RunningGateway", "StartGateway", "eventually", "make_config", "partial", "stop_gateway"]
