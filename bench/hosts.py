"""The multi-host benchmark: `python -m bench.hosts` (or `just bench --hosts`).

The scheduling benchmark's team workloads (`bench.sched`, whose workloads and client
driver this reuses) against simulated GPU hosts (`bench.gpu_sim`), each case run twice in
one go: the gateway in front of one host that has every model the case uses, and in front
of two hosts (`[ollama.hosts.a]`, `[ollama.hosts.b]`) with the case's model sets, which
may overlap. The gateway runs in this process on real loopback sockets on a trio
`MockClock`, its scheduler in its default (`fair`) order, so the figures are simulated
seconds and the same on every machine.

It prints, side by side: makespan and the throughput against one host, swaps and GPU
busy per host, p95 latency per client class, then the generations and loads of each model
on each host (a model that ping-pongs between hosts shows as loads on both, again and
again), then the issue's targets with yes/no (docs/benchmarks.md, "Several hosts").
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial

import trio
import trio.testing

from bench.gpu_sim import GpuSim
from bench.sched import (
    AUTOJUMP_S,
    EMBED,
    MODELS,
    Result,
    Workload,
    burst,
    config_for,
    drive,
    own_models,
    team,
)
from gateway.app import Started, serve

M1, M2, M3 = MODELS
CLASSES = ("interactive", "people", "batch", "embed")
# The throughput two hosts must reach on a case whose models both have (issue 15).
SPEEDUP_TARGET = 1.8


@dataclass(frozen=True)
class Case:
    """A workload and the chat models of each of the two hosts it runs on; the one-host
    run has their union."""

    name: str
    about: str
    workload: Callable[[], Workload]
    hosts: dict[str, tuple[str, ...]]
    # Both hosts have every model and the requests come at once, so that the run
    # measures the hosts' throughput, not the clients' arrivals: the speed-up target.
    saturating: bool

    def one_host(self) -> dict[str, tuple[str, ...]]:
        union = sorted({m for models in self.hosts.values() for m in models})
        return {"a": tuple(union)}


def busy_burst() -> Workload:
    """The scheduling bench's burst twice over: 60 requests for 3 models from 5 clients
    within 6 s, more than one host does in five minutes."""
    later = [replace(r, at=r.at + 3.0) for r in burst(seed=12).requests]
    requests = [*burst(seed=11).requests, *later]
    return Workload("busy-burst", "60 requests, 3 models, 5 clients, within 6 s", requests)


BOTH = {"a": MODELS, "b": MODELS}
CASES: dict[str, Case] = {
    case.name: case
    for case in (
        Case("busy-burst", "every model on both hosts", busy_burst, BOTH, saturating=True),
        Case("burst", "every model on both hosts", burst, BOTH, saturating=True),
        Case(
            "own-models",
            f"{M1} on both, {M2} only on a, {M3} only on b",
            own_models,
            {"a": (M1, M2), "b": (M1, M3)},
            saturating=False,
        ),
        Case("team", "every model on both hosts", team, BOTH, saturating=False),
        Case(
            "team-overlap",
            f"{M1} on both, {M2} only on a, {M3} only on b",
            team,
            {"a": (M1, M2), "b": (M1, M3)},
            saturating=False,
        ),
    )
}


@dataclass
class HostFigures:
    name: str
    swaps: int
    busy: float  # of the makespan
    served: dict[str, int]
    loads: list[tuple[float, str]]  # (when, model), in order

    def loaded(self, model: str) -> int:
        return sum(1 for _, m in self.loads if m == model)


@dataclass
class Run:
    case: str
    hosts: int
    result: Result
    figures: list[HostFigures] = field(default_factory=list)


async def run_one(case: Case, layout: dict[str, tuple[str, ...]]) -> Run:
    workload = case.workload()
    sims = {
        name: GpuSim(
            models, embed_model=EMBED, load_s=workload.load_s, tokens_per_s=workload.tokens_per_s
        )
        for name, models in layout.items()
    }
    names = sorted({r.client for r in workload.requests})
    environ = {"GATEWAY_TOKENS": ",".join(f"{n}:token-{n}" for n in names)}
    result = Result(case.name, "fair", 0, 0.0, 0.0)
    async with trio.open_nursery() as nursery:
        for sim in sims.values():
            await nursery.start(sim.run)
        if len(sims) == 1:
            ollama: dict[str, object] = {"url": next(iter(sims.values())).url}
        else:
            ollama = {"hosts": {name: {"url": sim.url} for name, sim in sims.items()}}
        stop = trio.Event()
        started: Started = await nursery.start(
            partial(serve, config_for(ollama, "fair"), environ=environ, shutdown_trigger=stop.wait)
        )
        await drive(workload, started.url, result)
        stop.set()
        nursery.cancel_scope.cancel()
    run = Run(case.name, len(sims), result)
    for name, sim in sims.items():
        run.figures.append(
            HostFigures(name, sim.swaps, sim.busy_s / result.makespan_s, sim.served, sim.loads)
        )
    result.swaps = sum(f.swaps for f in run.figures)
    result.busy = sum(sim.busy_s for sim in sims.values()) / (len(sims) * result.makespan_s)
    return run


def run_all(names: list[str], *, one_only: bool = False) -> list[Run]:
    logging.getLogger("gateway").setLevel(logging.ERROR)
    runs = []
    for name in names:
        case = CASES[name]
        layouts = [case.one_host()] if one_only else [case.one_host(), case.hosts]
        for layout in layouts:
            clock = trio.testing.MockClock(autojump_threshold=AUTOJUMP_S)
            runs.append(trio.run(run_one, case, layout, clock=clock))
    return runs


def _secs(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}" if value < 1 else f"{value:.0f}"


def _speedup(runs: list[Run], run: Run) -> float:
    one = next(r for r in runs if r.case == run.case and r.hosts == 1)
    return one.result.makespan_s / run.result.makespan_s


def table(runs: list[Run]) -> str:
    """One row per run. `same model`: loads of a model while the other host had it loaded;
    `back`: loads of a model back on a host it had left for the other (ping-pong)."""
    head = (
        "| case | hosts | last sent s | makespan s | throughput x | swaps | same model | back"
        " | GPU busy | " + " | ".join(f"{c} p95 s" for c in CLASSES) + " |"
    )
    lines = [head, "|" + "---|" * (9 + len(CLASSES))]
    for run in runs:
        r = run.result
        last = max(
            q.at for q in CASES[run.case].workload().requests if q.follows is None and not q.embed
        )
        per_host = " / ".join(f"{f.name} {f.swaps}" for f in run.figures)
        busy = " / ".join(f"{f.name} {f.busy:.0%}" for f in run.figures)
        p95 = [_secs(r.stats(c)[1]) for c in CLASSES]
        lines.append(
            f"| {run.case} | {run.hosts} | {last:.0f} | {r.makespan_s:.0f} |"
            f" {_speedup(runs, run):.2f} | {per_host} | {doubled(run.figures)} |"
            f" {sum(returns(run.figures).values())} | {busy} | " + " | ".join(p95) + " |"
        )
    return "\n".join(lines)


def placement(runs: list[Run]) -> str:
    """Generations (and loads) of each model on each host."""
    lines = ["| case | hosts | host | " + " | ".join(MODELS) + " |", "|" + "---|" * 6]
    for run in runs:
        for f in run.figures:
            cells = [
                f"{f.served.get(m, 0)} ({f.loaded(m)})" if f.served.get(m) or f.loaded(m) else "-"
                for m in MODELS
            ]
            lines.append(f"| {run.case} | {run.hosts} | {f.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def doubled(figures: list[HostFigures]) -> int:
    """Loads of a model on a host while the other host had it loaded (or loading)."""
    count = 0
    for f in figures:
        for when, model in f.loads:
            for other in figures:
                before = [m for t, m in other.loads if t <= when]
                if other is not f and before and before[-1] == model:
                    count += 1
                    break
    return count


def returns(figures: list[HostFigures]) -> dict[str, int]:
    """Ping-pong, per model: loads of it on a host after it was loaded on another host
    since its previous load there (there, then elsewhere, then back)."""
    events = sorted((when, model, f.name) for f in figures for when, model in f.loads)
    last: dict[str, str] = {}  # model -> host of its latest load
    left: set[tuple[str, str]] = set()  # (model, host): loaded elsewhere since
    back: dict[str, int] = {}
    for _, model, host in events:
        if (model, host) in left:
            back[model] = back.get(model, 0) + 1
            left.discard((model, host))
        previous = last.get(model)
        if previous is not None and previous != host:
            left.add((model, previous))
        last[model] = host
    return back


def _counts(values: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(values.items()))


def targets(runs: list[Run]) -> list[tuple[str, str, bool]]:
    """(what, measured, met) for the issue's targets, per two-host run."""
    out = []
    for run in runs:
        if run.hosts < 2:
            continue
        case = CASES[run.case]
        if run.result.failures:
            out.append((f"{run.case}: two hosts", f"{run.result.failures} requests failed", False))
            continue
        if case.saturating:
            x = _speedup(runs, run)
            out.append(
                (
                    f"{run.case}: throughput, two hosts / one",
                    f"{x:.2f} (target >= {SPEEDUP_TARGET:g})",
                    x >= SPEEDUP_TARGET,
                )
            )
        back = returns(run.figures)
        out.append(
            (
                f"{run.case}: loads of a model back on a host it had left for the other",
                f"{sum(back.values())}" + (f" ({_counts(back)})" if back else ""),
                not back,
            )
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.hosts", description=__doc__)
    parser.add_argument("--case", action="append", choices=sorted(CASES))
    parser.add_argument(
        "--one-host", action="store_true", help="only the one-host runs (no multi-host gateway)"
    )
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    runs = run_all(args.case or list(CASES), one_only=args.one_host)
    print(table(runs))
    print()
    print("Generations (loads) of each model on each host:")
    print()
    print(placement(runs))
    print()
    met = True
    for what, value, ok in targets(runs):
        met &= ok
        print(f"- {what}: {value} {'yes' if ok else 'NO'}")
    failures = sum(r.result.failures for r in runs)
    if failures:
        print(f"- {failures} requests failed")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                [
                    {
                        "case": r.case,
                        "hosts": r.hosts,
                        **r.result.__dict__,
                        "per_host": [h.__dict__ for h in r.figures],
                    }
                    for r in runs
                ],
                f,
                indent=1,
            )
    return 0 if met and not failures else 1


if __name__ == "__main__":
    sys.exit(main())
