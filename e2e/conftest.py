"""The real-model tier's fixtures: llama-server (SmolLM2-135M), ollama-proxy-plus in front
of it, and the gateway itself, all on 127.0.0.1 with ports picked at run time.

Processes are session-wide (sync fixtures; pytest-trio runs one `trio.run` per test), the
gateway is per test and in-process (`gateway.app.serve`), so its gate can be read.

    llama_chat   llama-server --api-key KEY        (OpenAI-compatible, checks its key)
    llama_embed  llama-server --embeddings --pooling mean
    proxy        ollama-proxy-plus: llama/<m> -> llama_chat, llamaemb/<m> -> llama_embed

Every child runs in its own process group with PR_SET_PDEATHSIG, is stopped at session
end (SIGTERM, then SIGKILL), and the teardown checks that the group is gone and its port
is closed, so a run leaves nothing behind even when tests fail or pytest is killed.
Run `e2e/prepare.py` first (`just e2e` does); without its manifest the tier fails.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import trio

from e2e.prepare import paths
from gateway.app import Started, serve
from gateway.config import Config, from_mapping, provider_names
from gateway.gate import ChatGate
from gateway.services import Services

T = TypeVar("T")

LLAMA_KEY = "e2e-llama-key-7f3a"  # llama_chat's --api-key; the gateway's OpenRouter key
ALIAS = "smollm2"
ROUTER_MODEL = f"openrouter/llama/{ALIAS}"  # -> OpenRouter provider -> llama_chat
OLLAMA_MODEL = f"llama/{ALIAS}"  # ollama-proxy-plus's name for llama_chat's model
EMBED_MODEL = f"llamaemb/{ALIAS}"  # ollama-proxy-plus's name for llama_embed's model
LLAMA_COMMON = ["--alias", ALIAS, "-c", "2048", "-np", "2", "-t", "2"]
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 10.0


# ---------------------------------------------------------------------------
# Child processes
# ---------------------------------------------------------------------------


def free_port() -> int:
    """A port free on 127.0.0.1 right now (the child binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when pytest dies, whatever the way."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Service:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])

    def get(self, path: str, timeout_s: float = 5.0) -> httpx.Response:
        with httpx.Client(trust_env=False, timeout=timeout_s) as client:
            return client.get(self.url + path, headers=self.headers)


_started: list[Service] = []


def stop(service: Service) -> None:
    """SIGTERM the child's process group, SIGKILL it after STOP_TIMEOUT_S."""
    proc = service.proc
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(STOP_TIMEOUT_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # anything left in its group
    proc.wait(STOP_TIMEOUT_S)


def _stop_all() -> None:
    while _started:
        stop(_started.pop())


atexit.register(_stop_all)


def start(
    name: str,
    argv: Callable[[int], list[str]],
    *,
    env: dict[str, str] | Callable[[int], dict[str, str]],
    ready: Callable[[Service], bool],
    logs: Path,
    cwd: Path | None = None,
    headers: dict[str, str] | None = None,
) -> Service:
    """Start `argv(port)` on a free port and wait until `ready`; a child that dies at once
    (a port taken in between) is retried on another port."""
    failure = ""
    for attempt in range(3):
        port = free_port()
        log = logs / f"{name}-{attempt}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                argv(port),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env(port) if callable(env) else env,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        service = Service(name, port, proc, log, headers or {})
        _started.append(service)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                if ready(service):
                    return service
            time.sleep(0.1)
        exited = proc.poll() is not None
        failure = (
            f"{name} exited with {proc.returncode}"
            if exited
            else f"{name} not ready within {START_TIMEOUT_S:g} s"
        )
        failure += f"; log {log}:\n{service.log_tail()}"
        _started.remove(service)
        stop(service)
        if not exited:
            break  # slow, not a lost port race: another try would not help
    pytest.fail(failure, pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Ctrl-C stops the run (and so the children) at once: under Trio a KeyboardInterrupt
    reaches pytest wrapped in an exception group, which pytest would take for a failed
    test and carry on."""
    try:
        return (yield)
    except BaseExceptionGroup as group:
        if group.subgroup(KeyboardInterrupt) is not None:
            raise KeyboardInterrupt from group
        raise


def clean_env(**extra: str) -> dict[str, str]:
    """A child's whole environment: nothing of ours (no keys, no LLAMA_ARG_*, no proxies)."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", **extra}


# ---------------------------------------------------------------------------
# Session fixtures: the artefacts and the processes
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def manifest() -> dict[str, Any]:
    where = paths()["manifest"]
    if not where.exists():
        pytest.fail(f"{where} is missing: run `.venv/bin/python e2e/prepare.py` first", False)
    data: dict[str, Any] = json.loads(where.read_text())
    for key in ("llama_server", "model", "proxy_python"):
        if not Path(data[key]).exists():
            pytest.fail(f"{data[key]} is missing: run e2e/prepare.py again", False)
    return data


@pytest.fixture(scope="session")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e-logs")


@pytest.fixture(scope="session", autouse=True)
def _everything_stopped() -> Iterator[None]:
    """At session end: stop every child, then prove it: group gone, port closed."""
    yield
    services = list(_started)
    _stop_all()
    leftovers = []
    for service in services:
        try:
            os.killpg(service.proc.pid, 0)
            leftovers.append(f"{service.name}: process group {service.proc.pid} still alive")
        except ProcessLookupError:
            pass
        if port_open(service.port):
            leftovers.append(f"{service.name}: 127.0.0.1:{service.port} still accepts")
    assert not leftovers, "; ".join(leftovers)


def _llama_ready(service: Service) -> bool:
    return service.get("/health").status_code == 200


@pytest.fixture(scope="session")
def llama_chat(manifest: dict[str, Any], logs: Path) -> Service:
    """llama-server that checks its key (an OpenAI-compatible provider)."""
    return start(
        "llama-chat",
        lambda port: [
            manifest["llama_server"],
            "-m",
            manifest["model"],
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *LLAMA_COMMON,
            "--api-key",
            LLAMA_KEY,
            "--slots",
            "--metrics",
            "--no-webui",
            "--offline",
        ],
        env=clean_env(HOME=str(logs)),
        ready=_llama_ready,
        logs=logs,
        headers={"Authorization": f"Bearer {LLAMA_KEY}"},
    )


@pytest.fixture(scope="session")
def llama_embed(manifest: dict[str, Any], logs: Path) -> Service:
    """llama-server for embeddings (mean pooling over SmolLM2's hidden states)."""
    return start(
        "llama-embed",
        lambda port: [
            manifest["llama_server"],
            "-m",
            manifest["model"],
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *LLAMA_COMMON,
            "--embeddings",
            "--pooling",
            "mean",
            "--no-webui",
            "--offline",
        ],
        env=clean_env(HOME=str(logs)),
        ready=_llama_ready,
        logs=logs,
    )


def start_proxy(
    name: str, manifest: dict[str, Any], logs: Path, home: Path, chat: Service, embed: Service
) -> Service:
    """ollama-proxy-plus, bound to 127.0.0.1 both ways (PROXY_HOST/PORT and --host/--port),
    in an empty directory with .env loading off, so nothing of the machine configures it."""

    def argv(port: int) -> list[str]:
        return [
            manifest["proxy_python"],
            "-m",
            "ollama_proxy",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]

    def ready(service: Service) -> bool:
        return service.get("/api/tags").status_code == 200

    def env(port: int) -> dict[str, str]:
        return clean_env(
            HOME=str(home),
            PROXY_HOST="127.0.0.1",
            PROXY_PORT=str(port),
            PYTHON_DOTENV_DISABLED="1",
            PROVIDERS_LLAMA_BASE_URL=f"{chat.url}/v1",
            PROVIDERS_LLAMA_API_KEY=LLAMA_KEY,
            PROVIDERS_LLAMAEMB_BASE_URL=f"{embed.url}/v1",
            PROVIDERS_LLAMAEMB_API_KEY="unused",
            EXTRA_MODELS=f"{OLLAMA_MODEL},{EMBED_MODEL}",
        )

    return start(name, argv, env=env, ready=ready, logs=logs, cwd=home)


@pytest.fixture(scope="session")
def proxy(
    manifest: dict[str, Any],
    logs: Path,
    llama_chat: Service,
    llama_embed: Service,
    tmp_path_factory: pytest.TempPathFactory,
) -> Service:
    """The Ollama stand-in every test's gateway targets."""
    home = tmp_path_factory.mktemp("proxy-home")
    return start_proxy("ollama-proxy-plus", manifest, logs, home, llama_chat, llama_embed)


@pytest.fixture(scope="session")
def proxy_b(
    manifest: dict[str, Any],
    logs: Path,
    llama_chat: Service,
    llama_embed: Service,
    tmp_path_factory: pytest.TempPathFactory,
) -> Service:
    """A second Ollama stand-in in front of the same llama-servers: a second GPU host."""
    home = tmp_path_factory.mktemp("proxy-b-home")
    return start_proxy("ollama-proxy-plus-b", manifest, logs, home, llama_chat, llama_embed)


# ---------------------------------------------------------------------------
# The gateway, in-process, per test
# ---------------------------------------------------------------------------


def gateway_config(
    ollama_url: str, openrouter_url: str, hosts: dict[str, str] | None = None
) -> Config:
    """The tier's gateway: one Ollama host at `ollama_url`, or `hosts` (name -> URL)."""
    ollama: dict[str, Any] = {
        "url": ollama_url,
        "poll_interval_s": 30.0,
        "degraded_poll_interval_s": 0.5,
        "connect_timeout_s": 2.0,
        "first_byte_timeout_s": 120.0,
        "idle_timeout_s": 120.0,
    }
    if hosts:
        ollama["hosts"] = {name: {"url": url} for name, url in hosts.items()}
    providers: dict[str, Any] = {name: {"env_file": ""} for name in provider_names()}
    providers["openrouter"] = {"env_file": "", "base_url": openrouter_url, "timeout_s": 120.0}
    return from_mapping(
        {
            "bind": "127.0.0.1:0",
            "shutdown_grace_s": 2.0,
            "ollama": ollama,
            "providers": providers,
            # No usage ledger: the tier must not write into the user's state directory.
            "usage": {"path": ""},
        },
        source="e2e config",
    )


@dataclass
class Gateway:
    url: str
    services: Services
    stop: trio.Event
    stopped: trio.Event


async def start_gateway(
    nursery: trio.Nursery,
    proxy: Service,
    llama_chat: Service,
    *,
    key: str = LLAMA_KEY,
    hosts: dict[str, Service] | None = None,
) -> Gateway:
    """The gateway: Ollama target = ollama-proxy-plus (or the GPU hosts `hosts`, by name),
    OpenRouter = llama_chat with `key`."""
    config = gateway_config(
        proxy.url,
        f"{llama_chat.url}/v1",
        {name: service.url for name, service in hosts.items()} if hosts else None,
    )
    stop_event, stopped = trio.Event(), trio.Event()

    async def run(task_status: trio.TaskStatus[Started]) -> None:
        try:
            await serve(
                config,
                environ={"OPENROUTER_API_KEY": key},
                shutdown_trigger=stop_event.wait,
                task_status=task_status,
            )
        finally:
            stopped.set()

    started: Started = await nursery.start(run)
    assert started.url.startswith("http://127.0.0.1:")
    return Gateway(started.url, started.services, stop_event, stopped)


@pytest.fixture
async def gateway(
    nursery: trio.Nursery, proxy: Service, llama_chat: Service
) -> Any:  # AsyncIterator[Gateway]; pytest-trio fixtures are async generators
    gw = await start_gateway(nursery, proxy, llama_chat)
    yield gw
    gw.stop.set()
    with trio.fail_after(15):
        await gw.stopped.wait()


# ---------------------------------------------------------------------------
# Helpers for tests
# ---------------------------------------------------------------------------


async def in_thread(call: Callable[[], T], timeout_s: float = 120.0) -> T:
    """Run a synchronous client call (official SDKs) in a worker thread, bounded."""
    with trio.fail_after(timeout_s):
        return await trio.to_thread.run_sync(call, abandon_on_cancel=True)


async def eventually(predicate: Callable[[], bool], *, timeout_s: float = 5.0) -> None:
    with trio.fail_after(timeout_s):
        while not predicate():  # noqa: ASYNC110 - state across a socket, no event to await
            await trio.sleep(0.005)


async def released(gate: ChatGate) -> None:
    """The gate is free within a moment: it is released just after the answer's last bytes
    are sent, and the test's client runs in the same event loop, so it may read them first."""
    await eventually(lambda: gate.figures().busy == 0, timeout_s=1.0)


def async_client(timeout_s: float = 120.0) -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=timeout_s, trust_env=False)


async def slots(llama: Service, client: httpx.AsyncClient) -> list[dict[str, Any]]:
    """llama-server's /slots: per slot `is_processing`, and for the current or last task
    `next_token[0].n_decoded` (tokens generated)."""
    answer = await client.get(llama.url + "/slots", headers=llama.headers)
    answer.raise_for_status()
    result: list[dict[str, Any]] = answer.json()
    return result


def busy_slots(state: list[dict[str, Any]]) -> int:
    return sum(1 for slot in state if slot.get("is_processing"))


async def metrics(llama: Service, client: httpx.AsyncClient) -> dict[str, float]:
    """llama-server's Prometheus counters (`--metrics`), e.g. `tokens_predicted_total`,
    which also counts the tokens of a task that was cancelled."""
    answer = await client.get(llama.url + "/metrics", headers=llama.headers)
    answer.raise_for_status()
    values = {}
    for line in answer.text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.partition(" ")
            values[name.removeprefix("llamacpp:")] = float(value)
    return values


__all__ = [
    "ALIAS",
    "EMBED_MODEL",
    "LLAMA_KEY",
    "OLLAMA_MODEL",
    "ROUTER_MODEL",
    "Gateway",
    "Service",
    "async_client",
    "busy_slots",
    "eventually",
    "in_thread",
    "metrics",
    "released",
    "slots",
    "start",
    "start_gateway",
    "start_proxy",
    "stop",
]
