"""A/B: gateway CPU per request of two (or more) source trees, in alternating rounds.

    python -m bench.ab /path/to/tree-a /path/to/tree-b [--rounds 5] [--requests 1500]

Each tree (a checkout, e.g. `git worktree add /tmp/old <commit>`) runs its own gateway,
all pinned on the same CPU, against one `bench.upstream`; the client sends sequential
non-streaming `/api/chat` and `/api/embed` requests on one keep-alive connection, a round
per tree in turn, so that machine noise (a shared VM's steal time drifts over minutes)
hits every tree alike. Prints min and median CPU per request over the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.client import BlockingConnection, build_request
from bench.procs import Upstream, cpu, free_port

HOST = "127.0.0.1"
WARMUP = 200


def start_gateway(
    tree: Path, upstream_port: int, cpus: set[int] | None
) -> tuple[int, subprocess.Popen[bytes]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(
        GATEWAY_BIND=f"{HOST}:{port}",
        GATEWAY_OLLAMA_URL=f"http://{HOST}:{upstream_port}",
        GATEWAY_LOG_FORMAT="json",
        PYTHONPATH=str(tree),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve"],
        cwd=tree,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        conn = BlockingConnection(HOST, port, timeout_s=2.0)
        try:
            if conn.request(build_request("GET", "/ready", HOST, port)).status == 200:
                return port, proc
        except OSError:
            time.sleep(0.1)
        finally:
            conn.close()
    proc.kill()
    raise RuntimeError(f"the gateway from {tree} did not get ready")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("trees", nargs="+", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=1500)
    args = parser.parse_args()
    usable = sorted(os.sched_getaffinity(0))
    pinned = len(usable) >= 2
    load, gateway_cpus = ({usable[0]}, {usable[1]}) if pinned else (None, None)
    upstream = Upstream(load, 768)
    if load:
        os.sched_setaffinity(0, load)
    gateways = [(tree, *start_gateway(tree, upstream.port, gateway_cpus)) for tree in args.trees]
    kinds = {
        "chat": (
            "/api/chat",
            {
                "model": "bench-chat",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": False,
            },
        ),
        "embed": ("/api/embed", {"model": "bench-embed", "input": "hi"}),
    }
    results: dict[tuple[Path, str], list[float]] = {}
    try:
        for _ in range(args.rounds):
            for tree, port, proc in gateways:
                for kind, (path, payload) in kinds.items():
                    conn = BlockingConnection(HOST, port)
                    request = build_request("POST", path, HOST, port, json.dumps(payload).encode())
                    try:
                        for _ in range(WARMUP):
                            conn.request(request)
                        before = cpu(proc.pid).precise_s
                        for _ in range(args.requests):
                            if conn.request(request).status != 200:
                                raise RuntimeError(f"{tree}: {path} failed")
                        spent = cpu(proc.pid).precise_s - before
                    finally:
                        conn.close()
                    results.setdefault((tree, kind), []).append(spent / args.requests * 1000)
    finally:
        for _, _, proc in gateways:
            proc.send_signal(signal.SIGTERM)
            proc.wait()
        upstream.stop()
    for (tree, kind), values in results.items():
        print(
            f"{tree}  {kind:5s}  CPU per request: min {min(values):.3f} ms,"
            f" median {statistics.median(values):.3f} ms  rounds {[round(v, 3) for v in values]}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
