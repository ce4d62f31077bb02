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
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from bench.client import BlockingConnection, build_request
from bench.procs import Gateway, Upstream, cpu

HOST = "127.0.0.1"
WARMUP = 200


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("trees", nargs="+", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=1500)
    args = parser.parse_args()
    args.trees = [tree.resolve() for tree in args.trees]
    usable = sorted(os.sched_getaffinity(0))
    pinned = len(usable) >= 2
    load, gateway_cpus = ({usable[0]}, {usable[1]}) if pinned else (None, None)
    upstream = Upstream(load, 768)
    if load:
        os.sched_setaffinity(0, load)
    logs = Path(tempfile.mkdtemp(prefix="gateway-ab-"))
    gateways: list[Gateway] = []
    for n, tree in enumerate(args.trees):
        gateway = Gateway(upstream.port, gateway_cpus, logs / f"gateway-{n}.log", {}, tree=tree)
        gateways.append(gateway)
        gateway.wait_ready()
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
            for tree, gateway in zip(args.trees, gateways, strict=True):
                port = gateway.port
                for kind, (path, payload) in kinds.items():
                    conn = BlockingConnection(HOST, port)
                    request = build_request("POST", path, HOST, port, json.dumps(payload).encode())
                    try:
                        for _ in range(WARMUP):
                            conn.request(request)
                        before = cpu(gateway.pid).precise_s
                        for _ in range(args.requests):
                            if conn.request(request).status != 200:
                                raise RuntimeError(f"{tree}: {path} failed")
                        spent = cpu(gateway.pid).precise_s - before
                    finally:
                        conn.close()
                    results.setdefault((tree, kind), []).append(spent / args.requests * 1000)
    finally:
        for gateway in gateways:
            gateway.stop()
        upstream.stop()
        shutil.rmtree(logs, ignore_errors=True)
    for (tree, kind), values in results.items():
        print(
            f"{tree}  {kind:5s}  CPU per request: min {min(values):.3f} ms,"
            f" median {statistics.median(values):.3f} ms  rounds {[round(v, 3) for v in values]}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
