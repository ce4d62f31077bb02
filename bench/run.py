"""The gateway benchmark: `.venv/bin/python -m bench.run [--quick] [--out FILE]`.

Three processes on loopback: the fast upstream (`bench.upstream`), the gateway
(`python -m gateway serve`), and this one, which generates the load (`bench.client`).
With two or more CPUs the gateway is pinned alone on one CPU and the upstream and this
process share another, so the load never competes with the gateway for CPU. The same
requests go directly to the upstream and through the gateway, interleaved (alternating
request by request, or block by block for throughput), so machine noise hits both alike.

`--sched` runs the GPU scheduling benchmark instead (`bench.sched`), `--hosts` the
multi-host one (`bench.hosts`).

It prints a table (metric | direct | gateway | ratio/added | target | ok?) and writes a
JSON report (`bench-report.json`, or `--out`). `--profile` runs a different, shorter
job: the gateway under py-spy with the non-streaming chat load, and a summary of where
its CPU goes. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import litellm_proxy
from bench.client import (
    AsyncConnection,
    BlockingConnection,
    ProtocolError,
    Response,
    build_request,
)
from bench.procs import (
    ROOT,
    Gateway,
    Relay,
    Upstream,
    cpu,
    git_state,
    machine_busy_s,
    machine_info,
    memory_kb,
    package_versions,
    raise_nofile,
    self_cpu,
    tcp_counters,
)

HOST = "127.0.0.1"
BUDGET_S = 290  # the whole run, hard limit (the issue allows 5 minutes)
LITELLM_BUDGET_S = 180  # more with --litellm: its start and the slow side of its phase
CHAT_MODEL = "bench-chat"
EMBED_MODEL = "bench-embed"
PROMPT = [{"role": "user", "content": "Why is the sky blue? Answer in one sentence."}]


@dataclass(frozen=True)
class Params:
    warmup: int = 300
    chat_pairs: int = 3000
    stream_lines: int = 200
    stream_pairs: int = 100
    paced_pairs: int = 25
    pace_us: int = 1000
    embed_levels: tuple[int, ...] = (1, 8, 32)
    embed_block_s: float = 1.5
    embed_rounds: int = 2
    openai_pairs: int = 300
    openai_lines: int = 20
    clients: int = 1000
    client_lines: int = 5
    clients_timeout_s: float = 90.0


FULL = Params()
QUICK = Params(
    warmup=100,
    chat_pairs=400,
    stream_pairs=20,
    paced_pairs=4,
    embed_block_s=0.5,
    embed_rounds=1,
    openai_pairs=50,
)

TARGETS = {
    "chat_added_p50_ms": 1.0,
    "cpu_per_request_ms": 1.0,
    "cpu_per_line_us": 20.0,
    "embed_rps": 1000.0,
    "clients_rss_mb": 150.0,
}


# --------------------------------------------------------------------------- helpers


def _same(payload: bytes) -> Callable[[Target], bytes]:
    """One body for both targets."""
    return lambda _target: payload


def pct(values: list[float], p: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def summary_ms(values_s: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values_s]
    if not ms:
        return {"n": 0}
    return {
        "n": len(ms),
        "p50": round(pct(ms, 50), 4),
        "p90": round(pct(ms, 90), 4),
        "p99": round(pct(ms, 99), 4),
        "mean": round(statistics.fmean(ms), 4),
        "min": round(min(ms), 4),
        "max": round(max(ms), 4),
    }


def body(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


@dataclass
class Target:
    name: str  # "direct" or "gateway"
    port: int

    def request(self, method: str, path: str, payload: bytes = b"") -> bytes:
        return build_request(method, path, HOST, self.port, payload)


@dataclass
class CpuMeter:
    """CPU used by the gateway, the upstream and this process over a phase."""

    gateway_pid: int
    upstream_pid: int
    started: float = 0.0
    marks: dict[str, Any] = field(default_factory=dict)

    def __enter__(self) -> CpuMeter:
        self.started = time.monotonic()
        self._g = cpu(self.gateway_pid)
        self._u = cpu(self.upstream_pid)
        self._c = self_cpu()
        self._m = machine_busy_s()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_s = time.monotonic() - self.started
        g = cpu(self.gateway_pid) - self._g
        self.gateway_s = g.precise_s
        self.gateway_ticks_s = g.ticks_s
        self.upstream_s = (cpu(self.upstream_pid) - self._u).precise_s
        self.client_s = self_cpu() - self._c
        # Everything else that ran meanwhile (other processes, kernel work not charged to
        # ours): noise. /proc/stat has clock-tick resolution.
        self.others_s = max(
            0.0,
            machine_busy_s() - self._m - self.gateway_ticks_s - self.upstream_s - self.client_s,
        )

    def as_dict(self) -> dict[str, float]:
        return {
            "wall_s": round(self.wall_s, 3),
            "gateway_cpu_s": round(self.gateway_s, 4),
            "gateway_cpu_ticks_s": round(self.gateway_ticks_s, 2),
            "upstream_cpu_s": round(self.upstream_s, 4),
            "client_cpu_s": round(self.client_s, 4),
            "other_processes_cpu_s": round(self.others_s, 2),
        }


class Bench:
    def __init__(self, params: Params, direct: Target, gateway: Target, gw_pid: int, up_pid: int):
        self.p = params
        self.direct = direct
        self.gateway = gateway
        self.relays: list[tuple[Target, int, str]] = []
        self.litellm_proxy: litellm_proxy.LiteLLM | None = None
        self.gw_pid = gw_pid
        self.up_pid = up_pid
        self.results: dict[str, Any] = {}

    def meter(self) -> CpuMeter:
        return CpuMeter(self.gw_pid, self.up_pid)

    def log(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ phases

    def interleaved(
        self,
        payload_for: Callable[[Target], bytes],
        pairs: int,
        path: str = "/api/chat",
        *,
        versus: Target | None = None,
        meter_pid: int | None = None,
    ) -> tuple[dict[str, list[Response]], CpuMeter, int]:
        """Send `pairs` requests to the upstream and to `versus` (the gateway unless
        given), alternating, on one keep-alive connection each; the order within a pair
        flips every pair. The meter's "gateway" is `meter_pid` when given."""
        other = versus or self.gateway
        targets = (self.direct, other)
        conns = {t.name: BlockingConnection(HOST, t.port) for t in targets}
        raws = {t.name: t.request("POST", path, payload_for(t)) for t in targets}
        out: dict[str, list[Response]] = {"direct": [], other.name: []}
        errors = 0
        order = [("direct", other.name), (other.name, "direct")]
        meter = self.meter() if meter_pid is None else CpuMeter(meter_pid, self.up_pid)
        try:
            with meter:
                for i in range(pairs):
                    for name in order[i & 1]:
                        try:
                            response = conns[name].request(raws[name])
                        except (OSError, ProtocolError):
                            errors += 1
                            continue
                        if response.status != 200:
                            errors += 1
                        out[name].append(response)
        finally:
            for conn in conns.values():
                conn.close()
        return out, meter, errors

    def warmup(self) -> None:
        chat = body({"model": CHAT_MODEL, "messages": PROMPT, "stream": False})
        stream = body({"model": CHAT_MODEL, "messages": PROMPT, "options": {"num_predict": 20}})
        embed = body({"model": EMBED_MODEL, "input": "warm up"})
        self.interleaved(lambda t: chat, self.p.warmup)
        self.interleaved(lambda t: stream, max(10, self.p.warmup // 10))
        self.interleaved(lambda t: embed, max(10, self.p.warmup // 3), "/api/embed")
        openai = body({"model": CHAT_MODEL, "messages": PROMPT, "stream": True, "max_tokens": 5})
        conn = BlockingConnection(HOST, self.gateway.port)
        try:
            for _ in range(max(10, self.p.warmup // 10)):
                conn.request(self.gateway.request("POST", "/v1/chat/completions", openai))
        finally:
            conn.close()

    def chat_c1(self) -> None:
        payload = body({"model": CHAT_MODEL, "messages": PROMPT, "stream": False})
        out, meter, errors = self.interleaved(lambda t: payload, self.p.chat_pairs)
        d = [r.elapsed for r in out["direct"]]
        g = [r.elapsed for r in out["gateway"]]
        paired = [b - a for a, b in zip(d, g, strict=False)]
        n_gw = len(out["gateway"])
        self.results["chat_c1"] = {
            "requests_each": self.p.chat_pairs,
            "direct_ms": summary_ms(d),
            "gateway_ms": summary_ms(g),
            "added_p50_ms": round((pct(g, 50) - pct(d, 50)) * 1000, 4),
            "added_p99_ms": round((pct(g, 99) - pct(d, 99)) * 1000, 4),
            "added_paired_median_ms": round(pct(paired, 50) * 1000, 4),
            "gateway_cpu_per_request_ms": round(meter.gateway_s / max(1, n_gw) * 1000, 4),
            "errors": errors,
            "cpu": meter.as_dict(),
        }

    def _stream_payload(self, lines: int, pace_us: int = 0) -> bytes:
        options: dict[str, int] = {"num_predict": lines}
        if pace_us:
            options["bench_pace_us"] = pace_us
        return body({"model": CHAT_MODEL, "messages": PROMPT, "options": options})

    @staticmethod
    def _stream_ok(response: Response, lines: int) -> bool:
        if response.status != 200:
            return False
        got = response.lines()
        return len(got) == lines and b'"done":true' in got[-1] and b'"error"' not in got[-1]

    def streams(self) -> None:
        p = self.p
        n = p.stream_lines
        # Back to back: the upstream writes the lines with no delay (one write each).
        out, meter, errors = self.interleaved(lambda t: self._stream_payload(n), p.stream_pairs)
        # One line: the per-request cost of the streaming path, to net out of per-line CPU.
        out1, meter1, errors1 = self.interleaved(lambda t: self._stream_payload(1), p.stream_pairs)
        # Paced: one line every `pace_us`, so each line reaches the gateway on its own, as
        # tokens do from a real model; each line carries its send time (`bench_t`).
        outp, meterp, errorsp = self.interleaved(
            lambda t: self._stream_payload(n, p.pace_us), p.paced_pairs
        )
        bad = sum(
            not self._stream_ok(r, lines)
            for group, lines in ((out, n), (out1, 1), (outp, n))
            for rs in group.values()
            for r in rs
        )

        def ttfl(rs: list[Response]) -> list[float]:
            return [(r.first_line_at() or r.ended) - r.started for r in rs]

        def body_time(rs: list[Response]) -> list[float]:
            return [r.ended - (r.first_line_at() or r.ended) for r in rs]

        def per_line_latency(rs: list[Response]) -> list[float]:
            lat: list[float] = []
            for r in rs:
                arrivals = r.line_arrivals()
                for line, at in zip(r.lines(), arrivals, strict=False):
                    mark = line.rfind(b'"bench_t":"')
                    if mark >= 0:
                        sent_ns = int(line[mark + 11 : mark + 30])
                        lat.append(at - sent_ns / 1e9)
            return lat

        n_gw = len(out["gateway"])
        cpu_stream = meter.gateway_s / max(1, n_gw)
        cpu_one = meter1.gateway_s / max(1, len(out1["gateway"]))
        cpu_paced = meterp.gateway_s / max(1, len(outp["gateway"]))
        d_body = body_time(out["direct"])
        g_body = body_time(out["gateway"])
        d_lat = per_line_latency(outp["direct"])
        g_lat = per_line_latency(outp["gateway"])
        reads = {
            name: round(statistics.fmean(r.reads for r in rs), 1) if rs else 0
            for name, rs in outp.items()
        }
        self.results["stream"] = {
            "lines": n,
            "streams_each": p.stream_pairs,
            "ttfl_direct_ms": summary_ms(ttfl(out["direct"])),
            "ttfl_gateway_ms": summary_ms(ttfl(out["gateway"])),
            "total_direct_ms": summary_ms([r.elapsed for r in out["direct"]]),
            "total_gateway_ms": summary_ms([r.elapsed for r in out["gateway"]]),
            "added_per_line_us": round(
                (pct(g_body, 50) - pct(d_body, 50)) / max(1, n - 1) * 1e6, 2
            ),
            "gateway_cpu_per_stream_ms": round(cpu_stream * 1000, 4),
            "gateway_cpu_per_one_line_stream_ms": round(cpu_one * 1000, 4),
            "gateway_cpu_per_line_gross_us": round(cpu_stream / n * 1e6, 2),
            "gateway_cpu_per_line_net_us": round((cpu_stream - cpu_one) / max(1, n - 1) * 1e6, 2),
            "paced": {
                "pace_us": p.pace_us,
                "streams_each": p.paced_pairs,
                "line_latency_direct_ms": summary_ms(d_lat),
                "line_latency_gateway_ms": summary_ms(g_lat),
                "added_line_latency_p50_us": round((pct(g_lat, 50) - pct(d_lat, 50)) * 1e6, 1),
                "client_reads_per_stream": reads,
                "gateway_cpu_per_stream_ms": round(cpu_paced * 1000, 4),
                "gateway_cpu_per_line_gross_us": round(cpu_paced / n * 1e6, 2),
                "gateway_cpu_per_line_net_us": round(
                    (cpu_paced - cpu_one) / max(1, n - 1) * 1e6, 2
                ),
                "cpu": meterp.as_dict(),
            },
            "errors": errors + errors1 + errorsp + bad,
            "cpu": meter.as_dict(),
            "cpu_one_line": meter1.as_dict(),
        }

    def floor(self) -> None:
        """The same paced streams and non-streaming chats through `bench.relay` (bytes
        piped, no HTTP), pinned where the gateway runs: once on trio, once with blocking
        sockets and threads. What a program pays per wake-up on this machine, before HTTP."""
        p = self.p
        n = p.stream_lines
        chat = body({"model": CHAT_MODEL, "messages": PROMPT, "stream": False})
        self.results["floor"] = floors = {}
        for target, pid, kind in self.relays:
            # The blocking relay runs a thread per direction and connection; threads that
            # end during a phase take their per-thread counters with them, so its CPU is
            # read from the process's own counters (clock ticks, which keep dead threads'
            # time), after a pause that lets the previous phase's threads end.
            time.sleep(0.3)
            outc, meterc, errorsc = self.interleaved(
                lambda t: chat, max(50, p.chat_pairs // 3), versus=target, meter_pid=pid
            )
            outp, meterp, errorsp = self.interleaved(
                lambda t: self._stream_payload(n, p.pace_us),
                p.paced_pairs,
                versus=target,
                meter_pid=pid,
            )
            bad = sum(not self._stream_ok(r, n) for r in outp["relay"])
            streams = max(1, len(outp["relay"]))
            chat_cpu_s = meterc.gateway_ticks_s if kind == "blocking" else meterc.gateway_s
            paced_cpu_s = meterp.gateway_ticks_s if kind == "blocking" else meterp.gateway_s
            relayed = [r.elapsed for r in outc["relay"]]
            direct = [r.elapsed for r in outc["direct"]]
            floors[kind] = {
                "what": f"bench.relay ({kind}): bytes piped both ways, no HTTP",
                "chat_requests": len(outc["relay"]),
                "cpu_per_chat_request_ms": round(chat_cpu_s / max(1, len(relayed)) * 1000, 4),
                "chat_added_p50_ms": round((pct(relayed, 50) - pct(direct, 50)) * 1000, 4),
                "paced_streams": len(outp["relay"]),
                "cpu_per_paced_line_us": round(paced_cpu_s / streams / n * 1e6, 2),
                "errors": errorsc + errorsp + bad,
                "cpu_chat": meterc.as_dict(),
                "cpu_paced": meterp.as_dict(),
            }

    def litellm_phase(self) -> None:
        """Non-streaming chat at c=1 on the OpenAI route: the upstream's `/api/chat`
        directly, the gateway's `/v1/chat/completions`, and LiteLLM's, in rotation."""
        if self.litellm_proxy is None:
            return
        proxy = self.litellm_proxy
        p = self.p
        rounds = max(60, p.openai_pairs)
        messages = PROMPT
        openai = body({"model": CHAT_MODEL, "messages": messages, "stream": False})
        native = body({"model": CHAT_MODEL, "messages": messages, "stream": False})
        bearer = ((b"Authorization", b"Bearer " + litellm_proxy.MASTER_KEY.encode()),)
        sides = {
            "direct": (
                self.direct.port,
                build_request("POST", "/api/chat", HOST, self.direct.port, native),
            ),
            "gateway": (
                self.gateway.port,
                build_request("POST", "/v1/chat/completions", HOST, self.gateway.port, openai),
            ),
            "litellm": (
                proxy.port,
                build_request(
                    "POST", "/v1/chat/completions", HOST, proxy.port, openai, headers=bearer
                ),
            ),
        }
        conns = {name: BlockingConnection(HOST, port) for name, (port, _) in sides.items()}
        times: dict[str, list[float]] = {name: [] for name in sides}
        errors = 0
        names = list(sides)
        try:
            for name in names:  # warm-up
                for _ in range(20):
                    conns[name].request(sides[name][1])
            g0, l0 = cpu(self.gw_pid), cpu(proxy.pid)
            for i in range(rounds):
                order = names[i % 3 :] + names[: i % 3]
                for name in order:
                    try:
                        response = conns[name].request(sides[name][1])
                    except (OSError, ProtocolError):
                        errors += 1
                        continue
                    if response.status != 200:
                        errors += 1
                    times[name].append(response.elapsed)
            g1, l1 = cpu(self.gw_pid), cpu(proxy.pid)
        finally:
            for conn in conns.values():
                conn.close()
        self.results["litellm"] = {
            "version": litellm_proxy.VERSION,
            "requests_each": rounds,
            "p50_ms": {name: round(pct(v, 50) * 1000, 3) for name, v in times.items()},
            "p99_ms": {name: round(pct(v, 99) * 1000, 3) for name, v in times.items()},
            "gateway_cpu_per_request_ms": round((g1 - g0).precise_s / rounds * 1000, 4),
            # LiteLLM runs threads; the process counters keep those that ended.
            "litellm_cpu_per_request_ms": round((l1 - l0).ticks_s / rounds * 1000, 4),
            "errors": errors,
        }

    async def _embed_block(
        self, target: Target, concurrency: int, seconds: float
    ) -> dict[str, Any]:
        raw = target.request(
            "POST", "/api/embed", body({"model": EMBED_MODEL, "input": "The quick brown fox"})
        )
        conns = [await AsyncConnection.open(HOST, target.port) for _ in range(concurrency)]
        latencies: list[float] = []
        errors = 0
        stop_at = 0.0

        async def worker(conn: AsyncConnection) -> None:
            nonlocal errors
            while time.monotonic() < stop_at:
                try:
                    r = await conn.request(raw)
                except (OSError, ProtocolError):
                    errors += 1
                    return
                if r.status == 200:
                    latencies.append(r.elapsed)
                else:
                    errors += 1

        try:
            with self.meter() as meter:
                stop_at = time.monotonic() + seconds
                await asyncio.wait_for(
                    asyncio.gather(*(worker(c) for c in conns)), timeout=seconds + 30
                )
        finally:
            for c in conns:
                c.close()
        return {"ok": len(latencies), "errors": errors, "latencies": latencies, "meter": meter}

    def embed(self) -> None:
        p = self.p
        levels: dict[str, Any] = {}

        async def run_level(c: int) -> dict[str, Any]:
            acc: dict[str, dict[str, Any]] = {
                name: {"ok": 0, "errors": 0, "wall": 0.0, "lat": [], "gw_cpu": 0.0}
                for name in ("direct", "gateway")
            }
            for round_ in range(p.embed_rounds):
                pair = (
                    (self.direct, self.gateway) if round_ % 2 == 0 else (self.gateway, self.direct)
                )
                for target in pair:
                    res = await self._embed_block(target, c, p.embed_block_s)
                    a = acc[target.name]
                    a["ok"] += res["ok"]
                    a["errors"] += res["errors"]
                    a["wall"] += res["meter"].wall_s
                    a["lat"] += res["latencies"]
                    a["gw_cpu"] += res["meter"].gateway_s
                    a.setdefault("cpu", []).append(res["meter"].as_dict())
            out: dict[str, Any] = {}
            for name, a in acc.items():
                out[name] = {
                    "requests": a["ok"],
                    "errors": a["errors"],
                    "rps": round(a["ok"] / a["wall"], 1) if a["wall"] else 0.0,
                    "latency_ms": summary_ms(a["lat"]),
                    "cpu": a["cpu"],
                }
            gw = acc["gateway"]
            out["gateway_cpu_per_request_ms"] = round(gw["gw_cpu"] / max(1, gw["ok"]) * 1000, 4)
            # Near 1.0 at saturation; well below with spare client capacity means the
            # gateway was waiting, or was starved by other processes on its CPU.
            out["gateway_cpu_utilization"] = round(gw["gw_cpu"] / max(1e-9, gw["wall"]), 3)
            out["ratio"] = (
                round(out["gateway"]["rps"] / out["direct"]["rps"], 4)
                if out["direct"]["rps"]
                else 0.0
            )
            return out

        for c in p.embed_levels:
            levels[str(c)] = asyncio.run(run_level(c))
        self.results["embed"] = {"block_s": p.embed_block_s, "rounds": p.embed_rounds, **levels}

    def client_apis(self) -> None:
        """Issue 12's routes, non-streaming at c=1: the same body to the upstream's
        `/v1/chat/completions` and `/v1/messages` and through the gateway (passthrough)."""
        for name, path, extra in (
            ("chat_completions_c1", "/v1/chat/completions", {}),
            ("messages_c1", "/v1/messages", {"max_tokens": 64}),
        ):
            payload = body({"model": CHAT_MODEL, "messages": PROMPT, **extra})
            out, meter, errors = self.interleaved(_same(payload), self.p.openai_pairs, path)
            d = [r.elapsed for r in out["direct"]]
            g = [r.elapsed for r in out["gateway"]]
            self.results[name] = {
                "path": path,
                "requests_each": self.p.openai_pairs,
                "direct_ms": summary_ms(d),
                "gateway_ms": summary_ms(g),
                "added_p50_ms": round((pct(g, 50) - pct(d, 50)) * 1000, 4),
                "gateway_cpu_per_request_ms": round(
                    meter.gateway_s / max(1, len(out["gateway"])) * 1000, 4
                ),
                "errors": errors,
                "cpu": meter.as_dict(),
            }

    def openai(self) -> None:
        p = self.p
        lines = p.openai_lines
        front = body({"model": CHAT_MODEL, "messages": PROMPT, "stream": True, "max_tokens": lines})
        conns = {t.name: BlockingConnection(HOST, t.port) for t in (self.direct, self.gateway)}
        raws = {
            "direct": self.direct.request("POST", "/v1/chat/completions", front),
            "gateway": self.gateway.request("POST", "/v1/chat/completions", front),
        }
        first: dict[str, list[float]] = {"direct": [], "gateway": []}
        total: dict[str, list[float]] = {"direct": [], "gateway": []}
        errors = 0
        try:
            with self.meter() as meter:
                for i in range(p.openai_pairs):
                    for name in ("direct", "gateway") if i % 2 == 0 else ("gateway", "direct"):
                        try:
                            r = conns[name].request(raws[name])
                        except (OSError, ProtocolError):
                            errors += 1
                            continue
                        at = r.first_event_at()
                        ok = r.status == 200 and at is not None
                        ok = ok and r.body.rstrip().endswith(b"data: [DONE]")
                        if not ok:
                            errors += 1
                            continue
                        assert at is not None
                        first[name].append(at - r.started)
                        total[name].append(r.elapsed)
        finally:
            for c in conns.values():
                c.close()
        self.results["openai_stream"] = {
            "streams_each": p.openai_pairs,
            "lines": lines,
            "direct_is": "the same stream straight from the upstream's /v1/chat/completions",
            "first_event_direct_ms": summary_ms(first["direct"]),
            "first_event_gateway_ms": summary_ms(first["gateway"]),
            "added_p50_ms": round((pct(first["gateway"], 50) - pct(first["direct"], 50)) * 1000, 4),
            "total_direct_ms": summary_ms(total["direct"]),
            "total_gateway_ms": summary_ms(total["gateway"]),
            "gateway_cpu_per_stream_ms": round(
                meter.gateway_s / max(1, len(first["gateway"])) * 1000, 4
            ),
            "errors": errors,
            "cpu": meter.as_dict(),
        }

    def clients(self) -> None:
        self.results["clients"] = asyncio.run(self._clients())

    async def _clients(self) -> dict[str, Any]:
        p = self.p
        n = p.clients
        raw = self.gateway.request("POST", "/api/chat", self._stream_payload(p.client_lines))
        health = self.gateway.request("GET", "/health")
        before = memory_kb(self.gw_pid)
        tcp_before = tcp_counters()
        max_rss = before.get("VmRSS", 0)
        max_queued = 0
        errors: dict[str, int] = {}
        opened: list[AsyncConnection] = []
        connect_gate = asyncio.Semaphore(64)
        in_flight = max_in_flight = 0
        all_sent = asyncio.get_running_loop().create_future()
        sent = 0

        def error(kind: str) -> None:
            errors[kind] = errors.get(kind, 0) + 1

        async def client() -> float | None:
            """Connect, and send the request at once (an idle new connection would meet
            the server's keep-alive timeout, which no real client waits out)."""
            nonlocal in_flight, max_in_flight, sent
            async with connect_gate:
                try:
                    conn = await asyncio.wait_for(AsyncConnection.open(HOST, self.gateway.port), 30)
                except (TimeoutError, OSError) as exc:
                    error(f"connect: {type(exc).__name__}")
                    return None
            opened.append(conn)
            in_flight += 1
            max_in_flight = max(max_in_flight, in_flight)
            try:
                pending = conn.request(raw)
                sent += 1
                if sent == n and not all_sent.done():
                    all_sent.set_result(time.monotonic())
                r = await pending
            except (OSError, ProtocolError) as exc:
                error(str(exc) if isinstance(exc, ProtocolError) else type(exc).__name__)
                return None
            finally:
                in_flight -= 1
            if r.status != 200:
                error(f"status {r.status}")
                return None
            if not self._stream_ok(r, p.client_lines):
                error("bad stream")
                return None
            return r.elapsed

        hold_raw = self.gateway.request(
            "POST", "/api/chat", self._stream_payload(1_000_000, pace_us=20_000)
        )

        async def holder_started(conn: AsyncConnection) -> None:
            while not (conn.parser and conn.parser.r.body):  # noqa: ASYNC110 - a poll is simplest
                await asyncio.sleep(0.005)

        async def wait_queued(count: int, deadline_s: float) -> None:
            nonlocal max_queued
            probe = await AsyncConnection.open(HOST, self.gateway.port)
            try:
                end = time.monotonic() + deadline_s
                while time.monotonic() < end:
                    h = await asyncio.wait_for(probe.request(health), 5)
                    queued = int(json.loads(h.body)["gate"]["queued"])
                    max_queued = max(max_queued, queued)
                    if queued >= count:
                        return
                    await asyncio.sleep(0.02)
                error("clients not all queued in time")
            finally:
                probe.close()

        stop = asyncio.Event()

        async def sample() -> None:
            nonlocal max_rss, max_queued
            probe = await AsyncConnection.open(HOST, self.gateway.port)
            last_health = 0.0
            try:
                while not stop.is_set():
                    max_rss = max(max_rss, memory_kb(self.gw_pid).get("VmRSS", 0))
                    now = time.monotonic()
                    if now - last_health > 0.25:
                        last_health = now
                        with contextlib.suppress(OSError, ProtocolError, ValueError):
                            h = await asyncio.wait_for(probe.request(health), 5)
                            max_queued = max(max_queued, json.loads(h.body)["gate"]["queued"])
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(stop.wait(), 0.02)
            finally:
                probe.close()

        sampler = asyncio.create_task(sample())
        latencies: list[float] = []
        try:
            with self.meter() as meter:
                # A holder takes the chat gate first with a slow stream, so all the clients
                # queue behind it, however long connecting takes; it then leaves (a client
                # disconnect, which frees the gate at once) and the queue is served.
                holder = await AsyncConnection.open(HOST, self.gateway.port)
                opened.append(holder)
                holding = asyncio.ensure_future(holder.request(hold_raw))
                await asyncio.wait_for(holder_started(holder), 10)
                t_start = time.monotonic()
                gathered = asyncio.gather(*(client() for _ in range(n)))
                try:
                    await asyncio.wait_for(asyncio.shield(all_sent), p.clients_timeout_s / 2)
                    await wait_queued(n, deadline_s=10.0)
                except TimeoutError:
                    error("clients not all queued in time")
                connect_s = time.monotonic() - t_start
                holder.close()
                with contextlib.suppress(ProtocolError, OSError):
                    await holding
                released = time.monotonic()
                try:
                    results = await asyncio.wait_for(gathered, p.clients_timeout_s)
                    latencies = [r for r in results if r is not None]
                except TimeoutError:
                    error("phase timeout")
                served_s = time.monotonic() - released
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                await sampler
            for c in opened:
                c.close()
        after = memory_kb(self.gw_pid)
        tcp_after = tcp_counters()
        return {
            "tcp_counters_delta": {k: v - tcp_before.get(k, 0) for k, v in tcp_after.items()},
            "clients": n,
            "lines_each": p.client_lines,
            "completed": len(latencies),
            "errors": sum(errors.values()),
            "error_kinds": errors,
            "max_in_flight": max_in_flight,
            "max_queued_seen": max_queued,
            "rss_before_mb": round(before.get("VmRSS", 0) / 1024, 1),
            "rss_max_sampled_mb": round(max_rss / 1024, 1),
            "peak_rss_mb": round(after.get("VmHWM", 0) / 1024, 1),
            "connect_and_queue_s": round(connect_s, 3),
            "served_s": round(served_s, 3),
            "streams_per_s": round(len(latencies) / served_s, 1) if served_s else 0.0,
            "latency_ms": summary_ms(latencies),
            "gateway_cpu_per_stream_ms": round(meter.gateway_s / max(1, len(latencies)) * 1000, 4),
            "cpu": meter.as_dict(),
        }


# ---------------------------------------------------------------------- table


def table_rows(r: dict[str, Any]) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []

    def row(
        metric: str,
        direct: str = "",
        gateway: str = "",
        ratio: str = "",
        target: str = "",
        ok: bool | None = None,
    ) -> None:
        rows.append(
            {
                "metric": metric,
                "direct": direct,
                "gateway": gateway,
                "ratio/added": ratio,
                "target": target,
                "ok?": "" if ok is None else ("yes" if ok else "NO"),
            }
        )

    def x(a: float, b: float) -> str:
        return f"x{b / a:.1f}" if a else ""

    if "chat_c1" in r:
        c = r["chat_c1"]
        d, g = c["direct_ms"], c["gateway_ms"]
        row(
            "chat, non-stream, c=1: p50 latency (ms)",
            f"{d['p50']:.3f}",
            f"{g['p50']:.3f}",
            f"+{c['added_p50_ms']:.3f} ms ({x(d['p50'], g['p50'])})",
            "added <= 1 ms",
            c["added_p50_ms"] <= TARGETS["chat_added_p50_ms"],
        )
        row(
            "chat, non-stream, c=1: p99 latency (ms)",
            f"{d['p99']:.3f}",
            f"{g['p99']:.3f}",
            f"+{c['added_p99_ms']:.3f} ms ({x(d['p99'], g['p99'])})",
        )
        row(
            "gateway CPU per proxied chat request (ms)",
            "",
            f"{c['gateway_cpu_per_request_ms']:.3f}",
            "",
            "<= 1 ms",
            c["gateway_cpu_per_request_ms"] <= TARGETS["cpu_per_request_ms"],
        )
    if "stream" in r:
        s = r["stream"]
        n = s["lines"]
        td, tg = s["ttfl_direct_ms"]["p50"], s["ttfl_gateway_ms"]["p50"]
        row(
            f"stream {n} lines: time to first line p50 (ms)",
            f"{td:.3f}",
            f"{tg:.3f}",
            f"+{tg - td:.3f} ms ({x(td, tg)})",
        )
        ad, ag = s["total_direct_ms"]["p50"], s["total_gateway_ms"]["p50"]
        row(
            f"stream {n} lines, back to back: whole stream p50 (ms)",
            f"{ad:.3f}",
            f"{ag:.3f}",
            f"+{s['added_per_line_us']:.1f} us/line ({x(ad, ag)})",
        )
        pc = s["paced"]
        ld, lg = pc["line_latency_direct_ms"]["p50"], pc["line_latency_gateway_ms"]["p50"]
        row(
            f"stream {n} lines, 1 per {pc['pace_us']} us: line latency p50 (us)",
            f"{ld * 1000:.0f}",
            f"{lg * 1000:.0f}",
            f"+{pc['added_line_latency_p50_us']:.0f} us/line",
        )
        row(
            "gateway CPU per streamed line, paced (us, net of per-request)",
            "",
            f"{pc['gateway_cpu_per_line_net_us']:.1f}",
            f"gross {pc['gateway_cpu_per_line_gross_us']:.1f}",
            "<= 20 us",
            pc["gateway_cpu_per_line_net_us"] <= TARGETS["cpu_per_line_us"],
        )
        row(
            "gateway CPU per streamed line, back to back (us, net)",
            "",
            f"{s['gateway_cpu_per_line_net_us']:.1f}",
            f"gross {s['gateway_cpu_per_line_gross_us']:.1f}",
        )
    for kind, f in r.get("floor", {}).items():
        row(
            f"floor, {kind} TCP relay (no HTTP): CPU per chat request (ms)",
            "",
            f"{f['cpu_per_chat_request_ms']:.3f}",
            f"+{f['chat_added_p50_ms']:.3f} ms p50",
        )
        row(
            f"floor, {kind} TCP relay (no HTTP): CPU per paced line (us)",
            "",
            f"{f['cpu_per_paced_line_us']:.1f}",
        )
    if "litellm" in r:
        ll = r["litellm"]
        d, g, lt = (ll["p50_ms"][k] for k in ("direct", "gateway", "litellm"))
        row(
            "OpenAI route, non-stream chat c=1, through the gateway: p50 (ms)",
            f"{d:.3f}",
            f"{g:.3f}",
            f"+{g - d:.3f} ms ({x(d, g)})",
        )
        row(
            f"same, through LiteLLM {ll['version']} proxy: p50 (ms)",
            f"{d:.3f}",
            f"{lt:.3f}",
            f"+{lt - d:.3f} ms ({x(d, lt)})",
        )
        row(
            "same: CPU per request, gateway / LiteLLM (ms)",
            "",
            f"{ll['gateway_cpu_per_request_ms']:.3f}",
            f"LiteLLM {ll['litellm_cpu_per_request_ms']:.3f}",
        )
    if "embed" in r:
        e = r["embed"]
        levels = [k for k in e if k.isdigit()]
        best = max((e[k]["gateway"]["rps"] for k in levels), default=0.0)
        for k in levels:
            lv = e[k]
            is_best = lv["gateway"]["rps"] == best
            row(
                f"/api/embed c={k}: requests/s",
                f"{lv['direct']['rps']:.0f}",
                f"{lv['gateway']['rps']:.0f}",
                f"x{lv['ratio']:.3f}",
                ">= 1000 (best c)" if is_best else "",
                (lv["gateway"]["rps"] >= TARGETS["embed_rps"]) if is_best else None,
            )
        top = e[levels[-1]]
        row(
            f"gateway CPU per proxied embed request, c={levels[-1]} (ms)",
            "",
            f"{top['gateway_cpu_per_request_ms']:.3f}",
            "",
            "<= 1 ms",
            top["gateway_cpu_per_request_ms"] <= TARGETS["cpu_per_request_ms"],
        )
    if "clients" in r:
        c = r["clients"]
        row(
            f"{c['clients']} concurrent streaming clients: peak RSS (MB)",
            "",
            f"{c['peak_rss_mb']:.1f}",
            f"from {c['rss_before_mb']:.1f}; {c['max_in_flight']} at once",
            "< 150 MB",
            c["peak_rss_mb"] < TARGETS["clients_rss_mb"],
        )
        row(
            f"{c['clients']} concurrent streaming clients: errors",
            "",
            f"{c['errors']}",
            f"{c['completed']} done in {c['served_s']:.1f} s",
            "0",
            c["errors"] == 0,
        )
    for key in ("chat_completions_c1", "messages_c1"):
        if key in r:
            c = r[key]
            d, g = c["direct_ms"], c["gateway_ms"]
            row(
                f"{c['path']}, non-stream, c=1: p50 latency (ms)",
                f"{d['p50']:.3f}",
                f"{g['p50']:.3f}",
                f"+{c['added_p50_ms']:.3f} ms ({x(d['p50'], g['p50'])})",
            )
            row(
                f"gateway CPU per {c['path']} request (ms)",
                "",
                f"{c['gateway_cpu_per_request_ms']:.3f}",
                "",
                "<= 1 ms",
                c["gateway_cpu_per_request_ms"] <= TARGETS["cpu_per_request_ms"],
            )
    if "openai_stream" in r:
        o = r["openai_stream"]
        fd, fg = o["first_event_direct_ms"]["p50"], o["first_event_gateway_ms"]["p50"]
        row(
            "/v1/chat/completions stream: first SSE event p50 (ms)",
            f"{fd:.3f}",
            f"{fg:.3f}",
            f"+{fg - fd:.3f} ms ({x(fd, fg)})",
        )
    total_errors = total_errors_of(r)
    if r:
        row(
            "errors in all other phases (non-200, cut or bad streams)",
            "",
            str(total_errors),
            "",
            "0",
            total_errors == 0,
        )
    return rows


def total_errors_of(r: dict[str, Any]) -> int:
    total = 0
    for name, phase in r.items():
        if name == "clients" or not isinstance(phase, dict):
            continue
        if name == "floor":
            total += sum(int(f.get("errors", 0)) for f in phase.values())
            continue
        total += int(phase.get("errors", 0) or 0)
        if name == "embed":
            for level in phase.values():
                if isinstance(level, dict):
                    total += sum(int(level[t]["errors"]) for t in ("direct", "gateway"))
    return total


def render_table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "(no results)"
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    aligns = {c: c == "metric" for c in cols}

    def line(values: dict[str, str]) -> str:
        cells = [
            values[c].ljust(widths[c]) if aligns[c] else values[c].rjust(widths[c]) for c in cols
        ]
        return "| " + " | ".join(cells) + " |"

    sep = "|" + "|".join("-" * (widths[c] + 1) + ("-" if aligns[c] else ":") for c in cols) + "|"
    return "\n".join([line({c: c for c in cols}), sep, *(line(r) for r in rows)])


# ---------------------------------------------------------------------- profile


def summarize_profile(raw_path: Path, top: int = 15) -> dict[str, Any]:
    """py-spy's raw output (`frame;frame;... count`, root first), summarized four ways:
    self time by function, inclusive time by function, self time by file, and "what the
    gateway called": each sample charged to the innermost gateway function on its stack
    and the library it was in at that point (or to hypercorn/trio when no gateway code
    is on the stack: connection handling and scheduling)."""
    self_counts: dict[str, int] = {}
    total_counts: dict[str, int] = {}
    file_self: dict[str, int] = {}
    by_library: dict[str, int] = {}
    by_call: dict[str, int] = {}
    by_concern: dict[str, int] = {}
    samples = 0

    def add(counts: dict[str, int], key: str, n: int) -> None:
        counts[key] = counts.get(key, 0) + n

    with open(raw_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            stack, _, count_text = line.rstrip("\n").rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            frames = [fr for fr in (_frame_name(fr) for fr in stack.split(";")) if fr]
            if not frames:
                continue
            count = int(count_text)
            samples += count
            leaf = frames[-1]
            add(self_counts, leaf, count)
            add(file_self, _frame_file(leaf), count)
            for fr in set(frames):
                add(total_counts, fr, count)
            library, call = _charge(frames)
            add(by_library, library, count)
            add(by_call, call, count)
            add(by_concern, _concern(frames), count)

    def ranked(counts: dict[str, int], limit: int = top) -> list[dict[str, Any]]:
        best = sorted(counts.items(), key=lambda kv: -kv[1])[:limit]
        return [
            {"frame": k, "samples": v, "percent": round(100 * v / max(1, samples), 1)}
            for k, v in best
        ]

    return {
        "samples": samples,
        "by_concern": ranked(by_concern, 12),
        "by_library": ranked(by_library, 30),
        "by_gateway_call": ranked(by_call, 25),
        "top_self": ranked(self_counts),
        "top_total": ranked(total_counts, 30),
        "top_files_self": ranked(file_self),
    }


_ENTRY_FILES = ("gateway/__main__.py", "gateway/cli.py")

# Checked in order: a sample goes to the first concern with a frame on its stack.
_CONCERNS = (
    ("logging (access log)", ("logging/", "gateway/logs.py")),
    ("metrics (prometheus_client)", ("prometheus_client/", "gateway/metrics.py")),
    ("upstream HTTP client (httpx, httpcore, its h11)", ("httpx/", "httpcore/")),
)
_SERVER = "server side HTTP (hypercorn, its h11)"
_TRIO = "trio (scheduler, cancel scopes, sockets, channels)"


def _concern(frames: list[str]) -> str:
    """One concern per sample: logging, metrics and the upstream client when on the stack
    at all; otherwise whatever the innermost gateway function was in (hypercorn when no
    gateway code is on the stack)."""
    files = [_frame_file(fr) for fr in frames]
    for name, prefixes in _CONCERNS:
        if any(path.startswith(prefixes) for path in files):
            return name
    library, _ = _charge(frames)
    lib = library.rsplit(": ", 1)[-1]
    if lib in ("hypercorn", "h11"):
        return _SERVER
    if lib == "trio" or library.startswith("trio") or "outcome" in lib:
        return _TRIO
    if library == "gateway's own code":
        return library
    return f"other: {lib}"


def _frame_file(frame: str) -> str:
    return frame.rsplit(" (", 1)[1].rstrip(")") if " (" in frame else frame


def _library(path: str) -> str:
    """`httpx/_client.py` -> `httpx`; `trio/_core/_run.py` -> `trio`; stdlib file -> name."""
    head = path.split("/", 1)[0]
    return head.removesuffix(".py") if head else path


def _charge(frames: list[str]) -> tuple[str, str]:
    files = [_frame_file(fr) for fr in frames]
    inner = -1
    for i, path in enumerate(files):
        if path.startswith("gateway/") and path not in _ENTRY_FILES:
            inner = i
    if inner < 0:
        # No gateway code on the stack: the server's connection handling, or the scheduler.
        for path in files:
            lib = _library(path)
            if lib not in ("<frozen runpy>", "gateway", "trio", "outcome"):
                return f"outside the app: {lib}", f"outside the app: {lib}"
        return "trio scheduler / IO wait", "trio scheduler / IO wait"
    caller = frames[inner].split(" (", 1)[0]
    if inner == len(frames) - 1:
        return "gateway's own code", f"{caller} (own code)"
    lib = _library(files[inner + 1])
    return f"called from gateway: {lib}", f"{caller} -> {lib}"


def _frame_name(frame: str) -> str:
    # py-spy: "function (path/file.py:123)"; drop line numbers so lines of one function add up.
    frame = frame.strip()
    if frame.startswith(("process ", "thread ")):
        return ""
    if frame.endswith(")") and ":" in frame:
        head, _, _ = frame[:-1].rpartition(":")
        return head + ")"
    return frame


# ---------------------------------------------------------------------- main


class Overtime(Exception):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise Overtime(f"the benchmark ran past its {BUDGET_S} s budget")


@contextlib.contextmanager
def processes(
    pin: bool, log_path: Path, embed_dims: int
) -> Iterator[tuple[Upstream, Gateway, tuple[Relay, Relay], dict[str, Any]]]:
    cpus = sorted(os.sched_getaffinity(0))
    pinned = pin and len(cpus) >= 2
    load_cpus = {cpus[0]} if pinned else None
    gateway_cpus = {cpus[1]} if pinned else None
    if load_cpus:
        os.sched_setaffinity(0, load_cpus)
    sharing = (
        f"gateway pinned alone on CPU {cpus[1]}; upstream and load client (this process)"
        f" share CPU {cpus[0]}"
        if pinned
        else f"not pinned: all three processes share CPUs {cpus}"
    )
    upstream = gateway = relay = blocking_relay = None
    try:
        upstream = Upstream(load_cpus, embed_dims)
        relay = Relay(upstream.port, gateway_cpus, blocking=False)
        blocking_relay = Relay(upstream.port, gateway_cpus, blocking=True)
        gateway = Gateway(
            upstream.port,
            gateway_cpus,
            log_path,
            {"GATEWAY_GATE_MAX_QUEUE": "2000"},
        )
        gateway.wait_ready()
        info = {
            "cpu_sharing": sharing,
            "pinned": pinned,
            "gateway_cpus": sorted(gateway_cpus) if gateway_cpus else None,
        }
        yield upstream, gateway, (relay, blocking_relay), info
    finally:
        for one in (relay, blocking_relay):
            if one is not None:
                one.stop()
        if gateway is not None:
            gateway.stop()
        if upstream is not None:
            upstream.stop()
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, set(cpus))


def run_bench(args: argparse.Namespace) -> int:
    params = QUICK if args.quick else FULL
    started = time.monotonic()
    report: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "machine": machine_info(),
        "versions": package_versions(),
        "git": git_state(),
        "params": {k: getattr(params, k) for k in params.__dataclass_fields__},
        "targets": TARGETS,
    }
    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    log_path = Path(args.gateway_log) if args.gateway_log else workdir / "gateway.log"
    results: dict[str, Any] = {}
    failure = ""
    try:
        procs = processes(not args.no_pin, log_path, args.embed_dims)
        with procs as (upstream, gateway, relay, info), contextlib.ExitStack() as stack:
            report.update(info)
            report["gateway_env"] = gateway.env
            report["gateway_log"] = (
                f"gateway stdout+stderr (JSON access log, one line per request) go to {log_path},"
                " a file, not a terminal"
            )
            bench = Bench(
                params,
                Target("direct", upstream.port),
                Target("gateway", gateway.port),
                gateway.pid,
                upstream.pid,
            )
            bench.relays = [
                (Target("relay", relay[0].port), relay[0].pid, "trio"),
                (Target("relay", relay[1].port), relay[1].pid, "blocking"),
            ]
            bench.results = results
            phases: list[tuple[str, Callable[[], None]]] = [
                ("warm-up", bench.warmup),
                ("chat, non-stream, c=1", bench.chat_c1),
                ("streams", bench.streams),
                ("trio relay floor", bench.floor),
                ("embed c=1/8/32", bench.embed),
                ("/v1/chat/completions and /v1/messages, c=1", bench.client_apis),
                ("/v1/chat/completions streams", bench.openai),
                (f"{params.clients} concurrent clients", bench.clients),
            ]
            if args.litellm_bin is not None:
                phases.append(("LiteLLM comparison", bench.litellm_phase))
                bench.log("bench: starting LiteLLM's proxy ...")
                cpus = set(info["gateway_cpus"]) if info["gateway_cpus"] else None
                proxy = litellm_proxy.LiteLLM(args.litellm_bin, upstream.port, cpus, workdir)
                stack.callback(proxy.stop)
                proxy.wait_ready()
                bench.litellm_proxy = proxy
            litellm_before = cpu(bench.litellm_proxy.pid).ticks_s if bench.litellm_proxy else 0.0
            with bench.meter() as whole:
                for name, phase in phases:
                    t0 = time.monotonic()
                    bench.log(f"bench: {name} ...")
                    phase()
                    bench.log(f"bench: {name} done in {time.monotonic() - t0:.1f} s")
            report["cpu_whole_run"] = whole.as_dict()
            if bench.litellm_proxy is not None:
                # LiteLLM's own CPU is not "other processes": say it apart.
                spent = cpu(bench.litellm_proxy.pid).ticks_s - litellm_before
                whole_run = report["cpu_whole_run"]
                whole_run["litellm_cpu_s"] = round(spent, 2)
                whole_run["other_processes_cpu_s"] = round(
                    max(0.0, whole_run["other_processes_cpu_s"] - spent), 2
                )
            report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
            report["gateway_rss_end_mb"] = round(memory_kb(gateway.pid).get("VmRSS", 0) / 1024, 1)
            report["gateway_log_warnings"] = _count_warnings(log_path)
    except Overtime as exc:
        failure = str(exc)
    except Exception as exc:
        failure = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        report["results"] = results
        report["duration_s"] = round(time.monotonic() - started, 1)
        rows = table_rows(results)
        report["table"] = rows
        report["table_text"] = render_table(rows)
        if failure:
            report["failure"] = failure
        out = Path(args.out)
        out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(report["table_text"])
        print()
        print(f"{report.get('cpu_sharing', '')}; {report['duration_s']} s; report: {out}")
        whole_cpu = report.get("cpu_whole_run")
        if whole_cpu:
            others = whole_cpu["other_processes_cpu_s"]
            share = others / max(1e-9, whole_cpu["wall_s"])
            print(
                f"CPU over the run: gateway {whole_cpu['gateway_cpu_s']:.1f} s,"
                f" upstream {whole_cpu['upstream_cpu_s']:.1f} s,"
                f" client {whole_cpu['client_cpu_s']:.1f} s,"
                f" other processes {others:.1f} s, over {whole_cpu['wall_s']:.1f} s"
            )
            if share > 0.1:
                print(
                    f"WARNING: other processes used {share:.0%} of a CPU during the run:"
                    " the figures are noisy; rerun on a quiet machine"
                )
        if not args.gateway_log:
            shutil.rmtree(workdir, ignore_errors=True)
    if failure:
        print(f"bench: FAILED: {failure}", file=sys.stderr)
        return 1
    failed = [r["metric"] for r in report["table"] if r["ok?"] == "NO"]
    if failed:
        print(f"bench: {len(failed)} target(s) missed", file=sys.stderr)
        if args.check:
            return 3
    return 0


def _count_warnings(log_path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    with contextlib.suppress(OSError), open(log_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if '"level":"warning"' in line or '"level":"error"' in line:
                level = "error" if '"level":"error"' in line else "warning"
                counts[level] = counts.get(level, 0) + 1
    return counts


def run_profile(args: argparse.Namespace) -> int:
    """Attach py-spy to the gateway while it proxies one kind of load, after a warm-up."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        print("bench: --profile needs py-spy (.venv/bin/pip install py-spy)", file=sys.stderr)
        return 2
    raw_path = Path(args.profile_out)
    raw_path.unlink(missing_ok=True)
    params = QUICK
    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    log_path = workdir / "gateway.log"
    count = 0
    try:
        with processes(not args.no_pin, log_path, args.embed_dims) as (up, gw, _relay, info):
            bench = Bench(
                params, Target("direct", up.port), Target("gateway", gw.port), gw.pid, up.pid
            )
            bench.warmup()
            if args.profile == "chat":
                payload = body({"model": CHAT_MODEL, "messages": PROMPT, "stream": False})
                path = "/api/chat"
            elif args.profile == "stream":
                payload = bench._stream_payload(200, params.pace_us)
                path = "/api/chat"
            else:
                payload = body({"model": EMBED_MODEL, "input": "The quick brown fox"})
                path = "/api/embed"
            raw = build_request("POST", path, HOST, gw.port, payload)
            conn = BlockingConnection(HOST, gw.port)
            # py-spy pauses the gateway for each sample (accurate stacks); it runs on the
            # load's CPU, so the gateway's CPU stays its own.
            spy = subprocess.Popen(
                [
                    py_spy,
                    "record",
                    "--pid",
                    str(gw.pid),
                    "--duration",
                    str(math.ceil(args.profile_seconds)),
                    "--rate",
                    str(args.profile_rate),
                    "--format",
                    "raw",
                    # Only samples holding the GIL: the loop waiting in epoll is not CPU.
                    "--gil",
                    "--output",
                    str(raw_path),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            try:
                time.sleep(0.5)  # let it attach
                with bench.meter() as meter:
                    while spy.poll() is None:
                        conn.request(raw)
                        count += 1
                _, err = spy.communicate(timeout=30)
            finally:
                if spy.poll() is None:
                    spy.kill()
                    spy.wait()
                conn.close()
            if not raw_path.exists():
                print(
                    f"bench: py-spy wrote no profile: {err.decode(errors='replace')}",
                    file=sys.stderr,
                )
                return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary = summarize_profile(raw_path)
    summary.update(
        load=args.profile,
        requests=count,
        seconds=round(meter.wall_s, 1),
        gateway_cpu_s=round(meter.gateway_s, 3),
        gateway_cpu_per_request_ms=round(meter.gateway_s / max(1, count) * 1000, 4),
        cpu_sharing=info["cpu_sharing"],
        raw=str(raw_path),
    )
    out = Path(args.out)
    out.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(
        f"{args.profile} load: {count} requests in {summary['seconds']} s under py-spy;"
        f" {summary['samples']} samples; gateway CPU {summary['gateway_cpu_s']} s"
        f" ({summary['gateway_cpu_per_request_ms']} ms/request, inflated by sampling)"
    )
    for title, key, limit in (
        ("concern (inclusive; each sample counted once)", "by_concern", 12),
        ("library, as called from the gateway's code", "by_library", 15),
        ("gateway function -> library it called", "by_gateway_call", 15),
        ("self time", "top_self", 15),
        ("inclusive time", "top_total", 25),
    ):
        print(f"\ntop by {title}:")
        for entry in summary[key][:limit]:
            print(f"  {entry['percent']:5.1f}%  {entry['frame']}")
    print(f"\nraw profile: {raw_path}; summary: {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="Benchmark the gateway against a fast local Ollama-compatible upstream.",
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke-length run (~20 s)")
    parser.add_argument("--out", default=None, help="JSON report (default bench-report.json)")
    parser.add_argument(
        "--check", action="store_true", help="exit 3 when a target is missed (default: 0)"
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--embed-dims", type=int, default=768, help="embedding size (768)")
    parser.add_argument("--gateway-log", help="keep the gateway's log at this path")
    parser.add_argument(
        "--profile",
        choices=("chat", "stream", "embed"),
        help="instead of the benchmark: run the gateway under py-spy with this load",
    )
    parser.add_argument("--profile-seconds", type=float, default=20.0)
    parser.add_argument("--profile-rate", type=int, default=200, help="py-spy samples/s")
    parser.add_argument("--profile-out", default="bench-profile.txt", help="py-spy raw output")
    parser.add_argument(
        "--litellm",
        action="store_true",
        help=f"add a LiteLLM {litellm_proxy.VERSION} column (installed once, in its own venv)",
    )
    parser.add_argument(
        "--sched",
        action="store_true",
        help="instead: the GPU scheduling benchmark (bench.sched, simulated GPU host)",
    )
    parser.add_argument(
        "--hosts",
        action="store_true",
        help="instead: the multi-host benchmark (bench.hosts, two simulated GPU hosts)",
    )
    args = parser.parse_args(argv)
    if args.sched:
        from bench import sched

        return sched.main(["--out", args.out] if args.out else [])
    if args.hosts:
        from bench import hosts

        return hosts.main(["--out", args.out] if args.out else [])
    args.litellm_bin = None
    if args.litellm:
        if args.profile:
            parser.error("--litellm does not combine with --profile")
        args.litellm_bin = litellm_proxy.ensure_installed(
            Path(tempfile.gettempdir()) / "litellm-pip.log"
        )
    if args.out is None:
        args.out = "bench-profile.json" if args.profile else "bench-report.json"
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    raise_nofile()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(BUDGET_S + (LITELLM_BUDGET_S if args.litellm else 0))
    try:
        return run_profile(args) if args.profile else run_bench(args)
    finally:
        signal.alarm(0)


if __name__ == "__main__":
    sys.exit(main())
