"""The usage ledger's cost: 10,000 requests through a gateway with the ledger on and
10,000 through one with it off, in alternating rounds.

    .venv/bin/python -m bench.ledger [--rounds 10] [--requests 1000] [--out FILE]

Two gateways (`[usage] path` a fresh file vs `""`) pinned on the same CPU, one
`bench.upstream` and this client on another; each round sends `--requests` sequential
non-streaming `/api/chat` requests on one keep-alive connection to each gateway in
turn, so machine noise hits both alike. Prints latency (p50, p99, mean) and gateway CPU
per request for each, the difference, and checks that the ledger holds one row per
request sent to it. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.client import BlockingConnection, build_request
from bench.procs import Gateway, Upstream, cpu

HOST = "127.0.0.1"
WARMUP = 300
CHAT = {"model": "bench-chat", "messages": [{"role": "user", "content": "hi"}], "stream": False}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--flush-interval", type=float, help="usage.flush_interval_s (default: the gateway's)"
    )
    args = parser.parse_args()
    usable = sorted(os.sched_getaffinity(0))
    pinned = len(usable) >= 2
    load, gateway_cpus = ({usable[0]}, {usable[1]}) if pinned else (None, None)
    upstream = Upstream(load, 768)
    if load:
        os.sched_setaffinity(0, load)
    work = Path(tempfile.mkdtemp(prefix="gateway-ledger-bench-"))
    db = work / "usage.db"
    settings = {"on": str(db), "off": ""}
    gateways = {
        name: Gateway(
            upstream.port, gateway_cpus, work / f"gateway-{name}.log", {"GATEWAY_USAGE_PATH": path}
        )
        for name, path in settings.items()
    }
    latencies: dict[str, list[float]] = {name: [] for name in gateways}
    cpu_ms: dict[str, list[float]] = {name: [] for name in gateways}
    round_p50: dict[str, list[float]] = {name: [] for name in gateways}
    started = time.monotonic()
    try:
        for gateway in gateways.values():
            gateway.wait_ready()
        connections = {name: BlockingConnection(HOST, g.port) for name, g in gateways.items()}
        requests = {
            name: build_request("POST", "/api/chat", HOST, g.port, json.dumps(CHAT).encode())
            for name, g in gateways.items()
        }
        for name, conn in connections.items():
            for _ in range(WARMUP):
                conn.request(requests[name])
        for _ in range(args.rounds):
            for name, gateway in gateways.items():
                conn, raw, times = connections[name], requests[name], []
                before = cpu(gateway.pid).precise_s
                for _ in range(args.requests):
                    t0 = time.perf_counter()
                    if conn.request(raw).status != 200:
                        raise RuntimeError(f"ledger {name}: /api/chat failed")
                    times.append((time.perf_counter() - t0) * 1000)
                spent = cpu(gateway.pid).precise_s - before
                cpu_ms[name].append(spent / args.requests * 1000)
                round_p50[name].append(statistics.median(times))
                latencies[name].extend(times)
        for conn in connections.values():
            conn.close()
    finally:
        for gateway in gateways.values():
            gateway.stop()
        upstream.stop()
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT COUNT(*) FROM requests WHERE route = '/api/chat'").fetchone()[0]
    conn.close()
    shutil.rmtree(work, ignore_errors=True)
    sent = WARMUP + args.rounds * args.requests
    report: dict[str, object] = {
        "requests_per_gateway": args.rounds * args.requests,
        "rounds": args.rounds,
        "pinned": pinned,
        "seconds": round(time.monotonic() - started, 1),
        "ledger_rows": rows,
        "ledger_rows_expected": sent,
    }
    print(f"{args.rounds} rounds x {args.requests} sequential /api/chat per gateway")
    print(f"{'':14s} {'p50 ms':>8s} {'p99 ms':>8s} {'mean ms':>8s} {'CPU ms/req':>11s}")
    for name in gateways:
        figures = {
            "p50_ms": round(statistics.median(latencies[name]), 3),
            "p99_ms": round(percentile(latencies[name], 0.99), 3),
            "mean_ms": round(statistics.fmean(latencies[name]), 3),
            "cpu_ms_per_request": round(statistics.median(cpu_ms[name]), 3),
        }
        report[f"ledger_{name}"] = figures
        print(
            f"ledger {name:7s} {figures['p50_ms']:8.3f} {figures['p99_ms']:8.3f}"
            f" {figures['mean_ms']:8.3f} {figures['cpu_ms_per_request']:11.3f}"
        )
    paired = [on - off for on, off in zip(round_p50["on"], round_p50["off"], strict=True)]
    report["paired_p50_difference_ms"] = {
        "median": round(statistics.median(paired), 3),
        "min": round(min(paired), 3),
        "max": round(max(paired), 3),
    }
    print(
        f"per-round p50, on - off: median {statistics.median(paired):+.3f} ms"
        f" (rounds from {min(paired):+.3f} to {max(paired):+.3f})"
    )
    print(f"ledger rows: {rows} of {sent} requests sent to the gateway with the ledger on")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if rows == sent else 1


if __name__ == "__main__":
    sys.exit(main())
