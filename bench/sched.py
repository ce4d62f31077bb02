"""The scheduling benchmark: `python -m bench.sched` (or `just bench --sched`).

Team workloads against the GPU host simulator (`bench.gpu_sim`: one chat model resident,
swaps cost `load_s`, generations one at a time in arrival order), each run three ways in
one go: straight to the simulator (Ollama's own order), through the gateway with
`gate.order = "arrival"`, and through the gateway's scheduler (`"fair"`). The whole
gateway runs in this process, on real loopback sockets, on a trio `MockClock`: minutes of
simulated GPU time take seconds, and the figures are the same on every machine.

It prints, side by side: model swaps, makespan, GPU busy fraction, and p50/p95/max
latency per client class, then the issue's targets with yes/no (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import httpx
import trio
import trio.testing

from bench.gpu_sim import GpuSim
from gateway.app import Started, serve
from gateway.config import from_mapping

MODES = ("direct", "arrival", "fair")
MODELS = ("m1:latest", "m2:latest", "m3:latest")
EMBED = "embed:latest"
# Real seconds the run loop waits for socket I/O before the mock clock jumps: far above
# what a loopback hop in one process takes, so time only jumps when everyone is idle.
AUTOJUMP_S = 0.003
# Priorities as `[clients.x]` tables; everybody else is "normal".
PRIORITIES = {"alice": "interactive", "agent": "interactive", "nightly": "batch"}


@dataclass(frozen=True)
class Req:
    client: str
    klass: str  # the row of the latency table
    model: str
    tokens: int = 100
    at: float = 0.0  # sent at this time, or this long after the answer to `follows`
    follows: int | None = None
    embed: bool = False


@dataclass
class Workload:
    name: str
    about: str
    requests: list[Req]
    load_s: float = 10.0
    tokens_per_s: float = 40.0


def own_models() -> Workload:
    """Three people, each with their own model, requests interleaved (an agent each,
    fanning out): arrival order swaps on every request."""
    reqs = [
        Req(f"p{i + 1}", "people", MODELS[i], 120, at=j * 3.0 + i)
        for j in range(8)
        for i in range(3)
    ]
    return Workload("own-models", "3 people x 8 requests, own model each, interleaved", reqs)


def beside_batch() -> Workload:
    """A nightly batch of 30 queued at once, and an agent (interactive) making 8
    sequential calls on the same model, 2 s of thought between them."""
    reqs = [Req("nightly", "batch", MODELS[0], 250) for _ in range(30)]
    first = len(reqs)
    for k in range(8):
        follows = None if k == 0 else first + k - 1
        reqs.append(
            Req("agent", "interactive", MODELS[0], 80, at=5.0 if k == 0 else 2.0, follows=follows)
        )
    return Workload("agent+batch", "batch of 30 queued, agent with 8 sequential calls", reqs)


def team(seed: int = 7) -> Workload:
    """Three people and a nightly script sharing two chat models and an embedder: alice
    (interactive) and carol on m1, bob on m2 with embeddings, the script's 20 on m2."""
    rng = random.Random(seed)
    reqs = [Req("nightly", "batch", MODELS[1], 200) for _ in range(20)]
    for who, model in (("alice", MODELS[0]), ("bob", MODELS[1]), ("carol", MODELS[0])):
        klass = "interactive" if who == "alice" else "people"
        t = rng.uniform(0, 10)
        while t < 240:
            reqs.append(Req(who, klass, model, rng.randint(80, 300), at=t))
            t += rng.expovariate(1 / 25)
    reqs += [Req("bob", "embed", EMBED, at=rng.uniform(0, 240), embed=True) for _ in range(30)]
    return Workload("team", "3 people + nightly script, 2 chat models + embedder", reqs)


def burst(seed: int = 11) -> Workload:
    """A burst of 30 requests for three models from five clients within 3 s."""
    rng = random.Random(seed)
    reqs = [
        Req(
            f"u{rng.randint(1, 5)}",
            "people",
            rng.choice(MODELS),
            rng.randint(50, 250),
            at=rng.uniform(0, 3),
        )
        for _ in range(30)
    ]
    return Workload("burst", "30 requests, 3 models, 5 clients, within 3 s", reqs)


WORKLOADS: dict[str, Callable[[], Workload]] = {
    "own-models": own_models,
    "agent+batch": beside_batch,
    "team": team,
    "burst": burst,
}


@dataclass
class Result:
    workload: str
    mode: str
    swaps: int
    makespan_s: float
    busy: float
    latency: dict[str, list[float]] = field(default_factory=dict)
    failures: int = 0

    def stats(self, klass: str) -> tuple[float, float, float]:
        values = sorted(self.latency.get(klass, []))
        if not values:
            return (math.nan, math.nan, math.nan)

        def pct(p: float) -> float:
            return values[max(1, math.ceil(p / 100 * len(values))) - 1]

        return pct(50), pct(95), values[-1]

    def worst(self) -> float:
        return max((max(v) for k, v in self.latency.items() if v and k != "embed"), default=0)


def gateway_config(sim: GpuSim, order: str) -> Any:
    return config_for({"url": sim.url}, order)


def config_for(hosts: dict[str, Any], order: str) -> Any:
    """The gateway's configuration for a run: `hosts` is where `[ollama]` finds the GPU
    (its `url`, or a `hosts` table of several, for `bench.hosts`)."""
    clients = {name: {"priority": p} for name, p in PRIORITIES.items()}
    return from_mapping(
        {
            "bind": "127.0.0.1:0",
            "shutdown_grace_s": 0.0,
            "ollama": {"poll_interval_s": 30.0, "first_byte_timeout_s": 600.0, **hosts},
            "gate": {"order": order, "max_queue": 1000},
            "providers": {
                n: {"env_file": ""} for n in ("ollama_cloud", "openrouter", "opencode", "kimi")
            },
            "clients": clients,
        },
        source="bench.sched",
    )


async def run_one(workload: Workload, mode: str) -> Result:
    sim = GpuSim(
        MODELS, embed_model=EMBED, load_s=workload.load_s, tokens_per_s=workload.tokens_per_s
    )
    names = sorted({r.client for r in workload.requests})
    environ = {"GATEWAY_TOKENS": ",".join(f"{n}:token-{n}" for n in names)}
    result = Result(workload.name, mode, 0, 0.0, 0.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(sim.run)
        url = sim.url
        stop = trio.Event()
        if mode != "direct":
            started: Started = await nursery.start(
                partial(
                    serve, gateway_config(sim, mode), environ=environ, shutdown_trigger=stop.wait
                )
            )
            url = started.url
        await drive(workload, url, result)
        result.swaps = sim.swaps
        result.busy = sim.busy_s / result.makespan_s
        stop.set()
        nursery.cancel_scope.cancel()
    return result


async def drive(workload: Workload, url: str, result: Result) -> None:
    """Send `workload`'s requests to `url` as its clients would (each with its own token,
    at its time or after the answer it follows) and record into `result` the latency of
    each by class, the failures and the makespan. Shared with `bench.hosts`."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as client:
        t0 = trio.current_time()
        done = [trio.Event() for _ in workload.requests]
        ends: list[float] = []

        async def send(index: int, req: Req) -> None:
            if req.follows is not None:
                await done[req.follows].wait()
                await trio.sleep(req.at)
            else:
                await trio.sleep_until(t0 + req.at)
            sent = trio.current_time()
            path = "/api/embed" if req.embed else "/api/chat"
            body: dict[str, Any] = {"model": req.model, "stream": False}
            if req.embed:
                body["input"] = "text"
            else:
                body["messages"] = [{"role": "user", "content": "hi"}]
                body["options"] = {"num_predict": req.tokens}
            headers = {"Authorization": f"Bearer token-{req.client}"}
            response = await client.post(path, json=body, headers=headers)
            if response.status_code != 200:
                result.failures += 1
            now = trio.current_time()
            result.latency.setdefault(req.klass, []).append(now - sent)
            ends.append(now)
            done[index].set()

        async with trio.open_nursery() as senders:
            for index, req in enumerate(workload.requests):
                senders.start_soon(send, index, req)
    result.makespan_s = max(ends) - t0


def run_all(names: list[str]) -> list[Result]:
    logging.getLogger("gateway").setLevel(logging.ERROR)
    results = []
    for name in names:
        workload = WORKLOADS[name]()
        for mode in MODES:
            clock = trio.testing.MockClock(autojump_threshold=AUTOJUMP_S)
            results.append(trio.run(run_one, workload, mode, clock=clock))
    return results


def table(results: list[Result]) -> str:
    classes = ("interactive", "people", "batch", "embed")
    head = "| workload | run | swaps | makespan s | GPU busy | " + " | ".join(
        f"{c} p50/p95/max s" for c in classes
    )
    lines = [head + " |", "|" + "---|" * (5 + len(classes))]
    for r in results:
        cells = []
        for c in classes:
            p50, p95, worst = r.stats(c)
            cells.append("-" if math.isnan(p50) else " / ".join(map(_secs, (p50, p95, worst))))
        mode = {"direct": "direct", "arrival": "gw arrival", "fair": "gw fair"}[r.mode]
        lines.append(
            f"| {r.workload} | {mode} | {r.swaps} | {r.makespan_s:.0f} | {r.busy:.0%} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def _secs(value: float) -> str:
    return f"{value:.2f}" if value < 1 else f"{value:.0f}"


def targets(results: list[Result]) -> list[tuple[str, float, float, bool]]:
    """(what, measured, target, met) for the issue's targets."""
    by = {(r.workload, r.mode): r for r in results}
    out = []
    if ("own-models", "fair") in by:
        fair, arrival = by["own-models", "fair"], by["own-models", "arrival"]
        swaps = fair.swaps / arrival.swaps
        span = fair.makespan_s / arrival.makespan_s
        worst = fair.worst() / arrival.worst()
        out += [
            ("own-models: swaps, fair / arrival", swaps, 0.5, swaps <= 0.5),
            ("own-models: makespan, fair / arrival", span, 0.6, span <= 0.6),
            ("own-models: worst latency, fair / arrival", worst, 1.0, worst <= 1.0),
        ]
    if ("agent+batch", "fair") in by:
        fair_i = by["agent+batch", "fair"].stats("interactive")[2]
        arrival_i = by["agent+batch", "arrival"].stats("interactive")[2]
        ratio = fair_i / arrival_i
        out.append(("agent+batch: interactive worst, fair / arrival", ratio, 0.6, ratio <= 0.6))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.sched", description=__doc__)
    parser.add_argument("--workload", action="append", choices=sorted(WORKLOADS))
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    results = run_all(args.workload or list(WORKLOADS))
    print(table(results))
    print()
    met = True
    for what, value, target, ok in targets(results):
        met &= ok
        print(f"- {what}: {value:.2f} (target <= {target:g}) {'yes' if ok else 'NO'}")
    failures = sum(r.failures for r in results)
    if failures:
        print(f"- {failures} requests failed")
    if args.out:
        with open(args.out, "w") as f:
            json.dump([r.__dict__ for r in results], f, indent=1)
    return 0 if met and not failures else 1


if __name__ == "__main__":
    sys.exit(main())
