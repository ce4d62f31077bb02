"""A/B: gateway CPU per request of two (or more) source trees, in alternating rounds.

    python -m bench.ab /path/to/tree-a /path/to/tree-b [--rounds 5] [--requests 1500]
                       [--delay-ms 5]

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
from bench.procs import Gateway, Relay, Upstream, cpu

HOST = "127.0.0.1"
WARMUP = 200


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("trees", nargs="+", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also measure the trio and blocking relays (no HTTP) on the same requests",
    )
    parser.add_argument(
        "--delay-ms",
        type=float,
        default=0.0,
        help="also measure chat with an upstream that answers after this delay",
    )
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
    targets: list[tuple[str, int, int]] = []  # what is measured: label, pid, port
    relays: list[Relay] = []
    for n, tree in enumerate(args.trees):
        gateway = Gateway(upstream.port, gateway_cpus, logs / f"gateway-{n}.log", {}, tree=tree)
        gateways.append(gateway)
        gateway.wait_ready()
        targets.append((str(tree), gateway.pid, gateway.port))
    if args.floor:
        for blocking in (False, True):
            relay = Relay(upstream.port, gateway_cpus, blocking=blocking)
            relays.append(relay)
            targets.append(
                ("relay, blocking" if blocking else "relay, trio", relay.pid, relay.port)
            )
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
    if args.delay_ms > 0:
        # The upstream answers after a delay, as a model does: the gateway sleeps in
        # epoll and wakes per request, which the instant rows never make it do.
        kinds["chat-delayed"] = (
            "/api/chat",
            {
                "model": "bench-chat",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": False,
                "options": {"bench_delay_us": int(args.delay_ms * 1000)},
            },
        )
    results: dict[tuple[str, str], list[float]] = {}
    try:
        for _ in range(args.rounds):
            for label, pid, port in targets:
                for kind, (path, payload) in kinds.items():
                    conn = BlockingConnection(HOST, port)
                    request = build_request("POST", path, HOST, port, json.dumps(payload).encode())
                    try:
                        for _ in range(WARMUP if kind != "chat-delayed" else WARMUP // 4):
                            conn.request(request)
                        count = args.requests if kind != "chat-delayed" else args.requests // 3
                        before = cpu(pid).precise_s
                        for _ in range(count):
                            if conn.request(request).status != 200:
                                raise RuntimeError(f"{label}: {path} failed")
                        spent = cpu(pid).precise_s - before
                    finally:
                        conn.close()
                    results.setdefault((label, kind), []).append(spent / count * 1000)
    finally:
        for gateway in gateways:
            gateway.stop()
        for relay in relays:
            relay.stop()
        upstream.stop()
        shutil.rmtree(logs, ignore_errors=True)
    for (label, kind), values in results.items():
        print(
            f"{label}  {kind:5s}  CPU per request: min {min(values):.3f} ms,"
            f" median {statistics.median(values):.3f} ms  rounds {[round(v, 3) for v in values]}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
