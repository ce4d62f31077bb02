"""Processes of the benchmark: start the upstream and the gateway, read their counters.

CPU time comes from the process's own counters in /proc: the precise per-thread
`schedstat` run time (ns) summed over the process's threads, with `stat`'s utime+stime
(clock ticks, all threads including finished ones) kept beside it as a cross-check.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.client import BlockingConnection, build_request

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
NOFILE = 8192


def raise_nofile(limit: int = NOFILE) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _preexec(cpus: set[int] | None) -> Callable[[], None]:
    def run() -> None:
        raise_nofile()
        if cpus:
            os.sched_setaffinity(0, cpus)

    return run


@dataclass(frozen=True, slots=True)
class CpuSample:
    precise_s: float  # schedstat run time summed over live threads
    ticks_s: float  # stat utime+stime, all threads

    def __sub__(self, other: CpuSample) -> CpuSample:
        return CpuSample(self.precise_s - other.precise_s, self.ticks_s - other.ticks_s)


def cpu(pid: int) -> CpuSample:
    precise = 0.0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/schedstat") as f:
                precise += int(f.read().split()[0]) / 1e9
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = (int(fields[11]) + int(fields[12])) / CLK_TCK
    except OSError:
        return CpuSample(0.0, 0.0)
    return CpuSample(precise or ticks, ticks)


def self_cpu() -> float:
    return time.process_time()


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) in KiB."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    name, value = line.split(":", 1)
                    out[name] = int(value.split()[0])
    except OSError:
        pass
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def machine_info() -> dict[str, object]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    load = os.getloadavg()
    return {
        "nproc": os.cpu_count(),
        "usable_cpus": sorted(os.sched_getaffinity(0)),
        "cpu_model": model,
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "load_average_at_start": [round(x, 2) for x in load],
    }


def package_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for name in ("trio", "hypercorn", "quart", "quart-trio", "httpx", "httpcore", "h11", "msgspec"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def _spawn_announcing_port(
    args: list[str], cpus: set[int] | None, what: str
) -> tuple[subprocess.Popen[bytes], int]:
    """Start `python -m <args>`, which prints `PORT <n>` once it listens; wait for it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        preexec_fn=_preexec(cpus),
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 10.0)
    line = proc.stdout.readline().decode() if ready else ""
    if not line.startswith("PORT "):
        _terminate(proc)
        raise RuntimeError(f"the {what} did not start (said {line!r})")
    return proc, int(line.split()[1])


def _terminate(proc: subprocess.Popen[bytes]) -> bytes:
    """SIGTERM, up to 5 s, then SIGKILL; what it still had on stdout."""
    if proc.poll() is not None:
        return b""
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=5)
        return out or b""
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return b""


class Upstream:
    """`python -m bench.upstream` as a subprocess."""

    def __init__(self, cpus: set[int] | None, embed_dims: int) -> None:
        args = ["bench.upstream", "--port", "0", "--embed-dims", str(embed_dims)]
        self.proc, self.port = _spawn_announcing_port(args, cpus, "upstream")
        self.pid = self.proc.pid
        self.stats = ""

    def stop(self) -> None:
        self.stats = _terminate(self.proc).decode(errors="replace").strip()


class Relay:
    """`python -m bench.relay` as a subprocess: the trio floor (bytes piped, no HTTP)."""

    def __init__(self, upstream_port: int, cpus: set[int] | None, *, blocking: bool) -> None:
        args = ["bench.relay", "--upstream-port", str(upstream_port)]
        args += ["--blocking"] if blocking else []
        self.proc, self.port = _spawn_announcing_port(args, cpus, "relay")
        self.pid = self.proc.pid

    def stop(self) -> None:
        _terminate(self.proc)


class Gateway:
    """`python -m gateway serve` as a subprocess."""

    def __init__(
        self,
        upstream_port: int,
        cpus: set[int] | None,
        log_path: Path,
        extra_env: dict[str, str],
        *,
        tree: Path = ROOT,
    ) -> None:
        """`tree` is the source tree whose `gateway` runs (`bench.ab` runs other builds)."""
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env.update(
            GATEWAY_BIND=f"127.0.0.1:{self.port}",
            GATEWAY_OLLAMA_URL=f"http://127.0.0.1:{upstream_port}",
            GATEWAY_LOG_FORMAT="json",
            GATEWAY_SHUTDOWN_GRACE_S="2",
            # The usage ledger (on, as by default) beside the log, not in ~/.local/state.
            GATEWAY_USAGE_PATH=str(log_path.with_suffix(".usage.db")),
        )
        env.update(extra_env)
        self.env = {k: v for k, v in env.items() if k.startswith("GATEWAY_")}
        if tree != ROOT:
            env["PYTHONPATH"] = str(tree)
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        command = [sys.executable, "-m", "gateway", "serve"]
        self.proc = subprocess.Popen(
            command,
            cwd=tree,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            preexec_fn=_preexec(cpus),
        )
        self.pid = self.proc.pid

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        request = build_request("GET", "/ready", "127.0.0.1", self.port)
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the gateway exited ({self.proc.returncode}): {self.log_tail()}"
                )
            conn = BlockingConnection("127.0.0.1", self.port, timeout_s=2.0)
            try:
                response = conn.request(request)
                if response.status == 200:
                    return
                last = f"/ready answered {response.status}"
            except OSError as exc:
                last = str(exc)
            finally:
                conn.close()
            time.sleep(0.05)
        raise RuntimeError(f"the gateway was not ready within {timeout_s:g} s ({last})")

    def log_tail(self, lines: int = 5) -> str:
        with contextlib.suppress(OSError):
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
            return " | ".join(text.strip().splitlines()[-lines:])
        return ""

    def stop(self, timeout_s: float = 15.0) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        finally:
            self._log.close()


def tcp_counters(
    names: tuple[str, ...] = ("ListenOverflows", "ListenDrops", "TCPSynRetrans"),
) -> dict[str, int]:
    """System-wide TCP counters (from /proc/net/netstat), to see listen-queue overflows."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError), open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
    for head, values in zip(lines[::2], lines[1::2], strict=False):
        if head.startswith("TcpExt:"):
            table = dict(zip(head.split()[1:], values.split()[1:], strict=False))
            out = {name: int(table.get(name, 0)) for name in names}
    return out


def machine_busy_s() -> float:
    """CPU time used by everything on the machine (all CPUs), from /proc/stat."""
    with contextlib.suppress(OSError), open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        steal = fields[7] if len(fields) > 7 else 0
        return (sum(fields[:8]) - idle - steal) / CLK_TCK
    return 0.0


def git_state() -> dict[str, object]:
    """The commit measured, and whether gateway/ had uncommitted changes."""

    def git(*args: str) -> str:
        try:
            out = subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=5, check=False
            )
        except (OSError, subprocess.SubprocessError):
            return ""
        return out.stdout.strip()

    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "gateway_changed_files": len(git("status", "--porcelain", "--", "gateway").splitlines()),
    }
