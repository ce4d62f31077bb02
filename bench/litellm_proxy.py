"""LiteLLM's proxy as a comparison column (`bench.run --litellm`), behind a flag because it
is a heavy install.

`ensure_installed` makes a virtual environment of its own (never the project's) with
`litellm[proxy]==1.106.2`, once, in `~/.cache/gateway-bench/` (or takes the executable
named by `BENCH_LITELLM_BIN`). `LiteLLM` runs its proxy
with one model, `bench-chat`, routed to the bench upstream as `ollama_chat/bench-chat`,
no database, the model cost map read locally (`LITELLM_LOCAL_MODEL_COST_MAP=True`, as the
machine has no internet), and a master key the bench sends as a bearer token.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.client import BlockingConnection, build_request
from bench.procs import free_port

VERSION = "1.106.2"
MASTER_KEY = "sk-bench-only"
CACHE = Path.home() / ".cache" / "gateway-bench" / f"litellm-{VERSION}"


def ensure_installed(log: Path) -> Path:
    """The `litellm` executable: `$BENCH_LITELLM_BIN` if set (an existing install of the
    same version), else one installed into a venv of its own on first use (minutes)."""
    given = os.environ.get("BENCH_LITELLM_BIN")
    if given:
        return Path(given)
    executable = CACHE / "bin" / "litellm"
    if executable.exists():
        return executable
    print(f"bench: installing litellm[proxy]=={VERSION} into {CACHE} (once) ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(CACHE)], check=True)
    with open(log, "wb") as out:
        subprocess.run(
            [str(CACHE / "bin" / "pip"), "install", "-q", f"litellm[proxy]=={VERSION}"],
            stdout=out,
            stderr=subprocess.STDOUT,
            check=True,
        )
    return executable


class LiteLLM:
    """LiteLLM's proxy as a subprocess, in front of the bench upstream."""

    def __init__(
        self, executable: Path, upstream_port: int, cpus: set[int] | None, workdir: Path
    ) -> None:
        self.port = free_port()
        config = workdir / "litellm.yaml"
        config.write_text(
            "model_list:\n"
            "  - model_name: bench-chat\n"
            "    litellm_params:\n"
            "      model: ollama_chat/bench-chat\n"
            f"      api_base: http://127.0.0.1:{upstream_port}\n"
            "litellm_settings:\n"
            "  telemetry: false\n"
            "  turn_off_message_logging: true\n",
            encoding="utf-8",
        )
        env = {
            **os.environ,
            "LITELLM_MASTER_KEY": MASTER_KEY,
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "LITELLM_LOG": "ERROR",
        }
        env.pop("DATABASE_URL", None)
        self.log_path = workdir / "litellm.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                str(executable),
                "--config",
                str(config),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--num_workers",
                "1",
            ],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
        self.pid = self.proc.pid

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        request = build_request("GET", "/health/liveliness", "127.0.0.1", self.port)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"litellm exited ({self.proc.returncode}); see {self.log_path}")
            conn = BlockingConnection("127.0.0.1", self.port, timeout_s=2.0)
            try:
                if conn.request(request).status == 200:
                    return
            except OSError:
                pass
            finally:
                conn.close()
            time.sleep(0.25)
        raise RuntimeError(f"litellm was not ready within {timeout_s:g} s; see {self.log_path}")

    def stop(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        finally:
            with contextlib.suppress(OSError):
                self._log.close()
