"""The `gateway` command as a real subprocess: degraded start, signals, the systemd unit."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.emulators import OllamaEmulator

ROOT = Path(__file__).resolve().parent.parent
GATEWAY = [sys.executable, "-m", "gateway"]
START_TIMEOUT_S = 20.0
GRACE_S = 5.0


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def clean_environ(**extra: str) -> dict[str, str]:
    """The test's environment without any GATEWAY_* setting (and with the usage ledger
    off unless `extra` gives it a path), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["GATEWAY_USAGE_PATH"] = ""
    env.update(extra)
    return env


@dataclass
class Gateway:
    process: trio.Process
    url: str
    stderr_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8")


@asynccontextmanager
async def running(
    args: list[str], env: dict[str, str], url: str, tmp: Path
) -> AsyncIterator[Gateway]:
    """Start `args` with stderr to a file; always killed (and reaped) on the way out."""
    stderr_path = tmp / "stderr.log"
    with stderr_path.open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            args, env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr
        )
    try:
        yield Gateway(process, url, stderr_path)
    finally:
        if process.returncode is None:
            process.kill()
        with trio.move_on_after(5):
            await process.wait()


async def wait_for_health(gw: Gateway) -> dict[str, Any]:
    """Poll `/health` until the subprocess answers (it is another process: no event to await)."""
    async with httpx.AsyncClient(base_url=gw.url, timeout=2.0, trust_env=False) as client:
        with trio.fail_after(START_TIMEOUT_S):
            while True:
                assert gw.process.returncode is None, f"exited early:\n{gw.stderr()}"
                try:
                    response = await client.get("/health")
                except httpx.TransportError:
                    await trio.sleep(0.05)
                    continue
                assert response.status_code == 200, response.content
                body: dict[str, Any] = response.json()
                return body


async def stop(gw: Gateway, signum: signal.Signals, within_s: float) -> int:
    gw.process.send_signal(signum)
    with trio.fail_after(within_s):
        return await gw.process.wait()


# --------------------------------------------------------------------- degraded start


async def _degraded_run(
    tmp_path: Path, signum: signal.Signals, *, polls: int
) -> tuple[int, str, dict[str, Any], int]:
    """Run `gateway serve` against a closed target port until the poller has failed
    `polls` times, then signal it; returns (exit code, stderr, health, dead port)."""
    port, dead = free_port(), free_port()
    env = clean_environ(
        GATEWAY_BIND=f"127.0.0.1:{port}",
        GATEWAY_OLLAMA_URL=f"http://127.0.0.1:{dead}",
        GATEWAY_OLLAMA_DEGRADED_POLL_INTERVAL_S="0.05",
        GATEWAY_SHUTDOWN_GRACE_S=str(GRACE_S),
    )
    url = f"http://127.0.0.1:{port}"
    async with running([*GATEWAY, "serve"], env, url, tmp_path) as gw:
        health = await wait_for_health(gw)
        async with httpx.AsyncClient(base_url=url, timeout=2.0, trust_env=False) as client:
            with trio.fail_after(10):
                while health["poll_failures"] < polls:
                    await trio.sleep(0.05)  # another process: poll its /health
                    health = (await client.get("/health")).json()
        returncode = await stop(gw, signum, within_s=GRACE_S)
        return returncode, gw.stderr(), health, dead


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_serve_starts_degraded_and_exits_0_on_signal(
    tmp_path: Path, signum: signal.Signals
) -> None:
    """With the target's port closed, `gateway serve` starts, answers /health (200,
    degraded, naming the target), and exits 0 within the grace on SIGTERM/SIGINT."""
    returncode, stderr, health, dead = await _degraded_run(tmp_path, signum, polls=1)
    assert returncode == 0, stderr
    assert health["status"] == "degraded"
    assert health["degraded"] is True
    assert health["target"] == f"http://127.0.0.1:{dead}"
    assert f"{signum.name} received" in stderr
    assert "Traceback" not in stderr, stderr


async def test_degraded_start_is_said_once_in_plain_words(tmp_path: Path) -> None:
    """SPEC: the gateway starts when Ollama is down, "degraded, said once in plain words":
    exactly one stderr line says the target is unreachable and it serves degraded, even
    after several failed polls."""
    returncode, stderr, _, dead = await _degraded_run(tmp_path, signal.SIGTERM, polls=4)
    assert returncode == 0, stderr
    notices = [line for line in stderr.splitlines() if "unreachable" in line.lower()]
    assert len(notices) == 1, stderr
    assert "degraded" in notices[0], stderr
    assert f"127.0.0.1:{dead}" in notices[0], stderr


# ----------------------------------------------------------------------- systemd unit


def unit_directives(path: Path) -> dict[str, list[str]]:
    directives: dict[str, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            directives.setdefault(key.strip(), []).append(value.strip())
    return directives


async def test_the_systemd_units_command_serves_and_stops_on_sigterm(
    tmp_path: Path, ollama: OllamaEmulator
) -> None:
    """`ExecStart=` of deploy/gateway.service, run as written (binary and config path
    relocated), with the unit's own environment: it serves /health, exits 0 on SIGTERM."""
    unit = unit_directives(ROOT / "deploy" / "gateway.service")
    assert unit["KillSignal"] == ["SIGTERM"]
    [exec_start] = unit["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[0] == "/opt/gateway/bin/gateway"
    config_copy = tmp_path / "gateway.toml"
    config_copy.write_bytes((ROOT / "deploy" / "gateway.toml").read_bytes())
    args = [*GATEWAY, *argv[1:]]
    args = [str(config_copy) if arg == "/etc/gateway/gateway.toml" else arg for arg in args]
    assert str(config_copy) in args  # the unit names the config file it installs

    port = free_port()
    env = clean_environ(GATEWAY_BIND=f"127.0.0.1:{port}", GATEWAY_OLLAMA_URL=ollama.url)
    for assignment in unit.get("Environment", []):
        key, _, value = assignment.partition("=")
        env[key] = str(config_copy) if value == "/etc/gateway/gateway.toml" else value

    async with running(args, env, f"http://127.0.0.1:{port}", tmp_path) as gw:
        health = await wait_for_health(gw)
        assert health["status"] == "ok", gw.stderr()
        assert health["models"] == len(ollama.models)
        assert health["target"] == ollama.url
        returncode = await stop(gw, signal.SIGTERM, within_s=10)
        stderr = gw.stderr()
    assert returncode == 0, stderr
    assert "SIGTERM received" in stderr
    assert "Traceback" not in stderr, stderr
    # systemd must wait longer than the drain before it kills.
    [timeout_stop] = unit["TimeoutStopSec"]
    assert float(timeout_stop) > _grace_in(config_copy)


def _grace_in(config: Path) -> float:
    value = tomllib.loads(config.read_text(encoding="utf-8"))["shutdown_grace_s"]
    assert isinstance(value, int | float)
    return float(value)


# ------------------------------------------------------------------ help, check-config


async def _run(*args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(START_TIMEOUT_S):
        return await trio.run_process(
            [*GATEWAY, *args],
            env=clean_environ(),
            cwd=ROOT,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ((), b"check-config"),
        (("serve",), b"--config"),
        (("check-config",), b"--config"),
    ],
)
async def test_help_exits_0_everywhere(args: tuple[str, ...], fragment: bytes) -> None:
    """`--help` works for the command and each subcommand."""
    done = await _run(*args, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(b"usage: gateway")
    assert fragment in done.stdout


async def test_check_config_names_an_unknown_key_and_exits_1(tmp_path: Path) -> None:
    """A typo in the file is an error naming the key path, with exit status 1."""
    config = tmp_path / "typo.toml"
    config.write_text('bind = "127.0.0.1:11435"\n[gate]\nmax_queeu = 3\n', encoding="utf-8")
    done = await _run("check-config", "--config", str(config))
    assert done.returncode == 1
    assert b"gate.max_queeu" in done.stderr, done.stderr
    assert b"Traceback" not in done.stderr
    assert done.stdout == b""


async def test_check_config_prints_a_config_that_loads(tmp_path: Path) -> None:
    """`check-config` on the deploy example exits 0 and prints TOML naming its values."""
    done = await _run("check-config", "--config", str(ROOT / "deploy" / "gateway.toml"))
    assert done.returncode == 0, done.stderr
    resolved = tomllib.loads(done.stdout.decode())
    assert resolved["bind"] == "127.0.0.1:11435"
    assert resolved["gate"]["max_queue"] == 64


async def test_check_config_refuses_a_client_no_token_is_named(tmp_path: Path) -> None:
    """With auth on, `[clients.x]` is keyed by token name: a name no token has is a typo."""
    tokens = tmp_path / "tokens"
    tokens.write_text("alice:tok-a-9f3\nnightly:tok-n-7c1\n", encoding="utf-8")
    config = tmp_path / "gateway.toml"
    base = f'[auth]\ntokens_file = "{tokens}"\n[clients.alice]\npriority = "interactive"\n'
    config.write_text(base + "[clients.alcie]\nweight = 2.0\n", encoding="utf-8")
    done = await _run("check-config", "--config", str(config))
    assert done.returncode == 1
    assert b"clients.alcie: no inbound token is named 'alcie'" in done.stderr, done.stderr
    assert b"tok-" not in done.stderr
    config.write_text(base + '[models."qwen2.5:7b"]\nnum_ctx = 8192\n', encoding="utf-8")
    done = await _run("check-config", "--config", str(config))
    assert done.returncode == 0, done.stderr
    resolved = tomllib.loads(done.stdout.decode())
    assert resolved["clients"]["alice"]["priority"] == "interactive"
    assert resolved["models"]["qwen2.5:7b"] == {"num_ctx": 8192}
    assert b"tok-" not in done.stdout
