"""What the status page shows, as msgspec Structs, and the functions that build it.

`host_views` is the one place that reads the GPU host(s) from the running gateway: today
one host (`Services.inventory`, `.gate`), a list so that the page already iterates
hosts. `provider_views` reads the registry and the tally. `usage_view` turns two ledger
reports into the page's tables and chart. `anonymize` hides other clients' names. All
but `host_views` and `provider_views` are pure and tested alone.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec

from gateway.config import redact_url
from gateway.gate import GateFigures
from gateway.providers.registry import LOCAL, ORDER
from gateway.status.tally import ProviderTally
from gateway.usage.report import DAY_S, day_start

if TYPE_CHECKING:
    from gateway.services import Services


class _View(msgspec.Struct, kw_only=True):
    """Base of the page's shapes: keyword-only, encoded as JSON objects for the page."""


class Generation(_View):
    client: str
    model: str
    priority: str
    elapsed_s: float
    tokens: int  # stream frames relayed so far: a token each on a generation stream
    tokens_per_s: float | None
    loads: bool  # the model was not resident when granted: Ollama loads it first


class Waiting(_View):
    client: str
    model: str
    priority: str
    waited_s: float
    starts_in_s: float  # estimated, from measured generation and load times


class HostView(_View):
    name: str
    url: str
    status: str  # "up" or "degraded"
    why: str | None = None
    since: str | None = None  # ISO time of the last change of status seen
    last_good_poll: str | None = None
    installed: list[str] = msgspec.field(default_factory=list)
    resident: list[str] = msgspec.field(default_factory=list)
    capacity: int = 1
    max_queue: int = 0
    generations: list[Generation] = msgspec.field(default_factory=list)
    queued: int = 0  # all waiters; `queue` lists the first `QUEUE_SHOWN` of them
    queue: list[Waiting] = msgspec.field(default_factory=list)


class ProviderView(_View):
    name: str
    registered: bool
    base_url: str | None = None
    missing: str | None = None  # why it is not registered: which variable is missing
    requests_1h: int = 0
    errors_1h: int = 0
    last_error: str | None = None
    last_error_ago_s: float | None = None


class UsageRow(_View):
    name: str  # the client, or the model
    requests: int = 0
    errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    gpu_s: float = 0.0
    cloud_tokens: dict[str, int] = msgspec.field(default_factory=dict)


class UsageView(_View):
    enabled: bool
    error: str | None = None
    clients_today: list[UsageRow] = msgspec.field(default_factory=list)
    clients_week: list[UsageRow] = msgspec.field(default_factory=list)
    models_today: list[UsageRow] = msgspec.field(default_factory=list)
    models_week: list[UsageRow] = msgspec.field(default_factory=list)
    days: list[str] = msgspec.field(default_factory=list)  # the 7 days, oldest first
    tokens_per_day: dict[str, list[int]] = msgspec.field(default_factory=dict)


class HostHistory(_View):
    name: str
    span_s: float  # the charts' width: the last hour
    # [seconds ago, longest queue, GPU busy fraction] per bucket, oldest first.
    points: list[tuple[float, int, float]] = msgspec.field(default_factory=list)


class Status(_View):
    generated_at: str
    viewer: str  # the token's name looking at the page ("" with auth off)
    names_hidden: bool
    draining: bool
    hosts: list[HostView]
    providers: list[ProviderView]
    usage: UsageView
    history: list[HostHistory]


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# ---------------------------------------------------------------------- hosts

QUEUE_SHOWN = 50  # a page polled twice a second stays small with 1,000 waiters


def gate_lists(figures: GateFigures, now: float) -> tuple[list[Generation], list[Waiting]]:
    """The gate's holders and waiters as the page shows them (`now` on the trio clock)."""
    generations = []
    for holder in figures.holders:
        elapsed = max(0.0, now - holder.since)
        record = holder.record
        tokens = record.frames_out if record is not None else 0
        rate = None
        if record is not None and record.response_started is not None:
            streaming_s = now - record.response_started
            if streaming_s > 0.2 and tokens:
                rate = round(tokens / streaming_s, 1)
        generations.append(
            Generation(
                client=holder.ask.client,
                model=holder.ask.model,
                priority=holder.ask.priority,
                elapsed_s=round(elapsed, 1),
                tokens=tokens,
                tokens_per_s=rate,
                loads=holder.loads,
            )
        )
    queue = [
        Waiting(
            client=w.ask.client,
            model=w.ask.model,
            priority=w.ask.priority,
            waited_s=round(max(0.0, now - w.arrived), 1),
            starts_in_s=round(w.start_in_s, 1),
        )
        for w in figures.waiters
    ]
    return generations, queue


def host_views(services: Services, now: float) -> list[HostView]:
    """Every GPU host as the page shows it, in configuration order; `since` is left to the
    sampler, which sees status changes. The one function that knows how hosts are held
    in `Services` (ADR 0020: `services.hosts`)."""
    views = []
    for host in services.hosts:
        inventory = host.inventory
        figures = host.gate.figures()
        generations, queue = gate_lists(figures, now)
        polled_at = inventory.snapshot.polled_at
        views.append(
            HostView(
                name=host.name,
                url=host.url,
                status="degraded" if inventory.degraded else "up",
                why=(inventory.last_error or None) if inventory.degraded else None,
                last_good_poll=iso(polled_at) if polled_at else None,
                installed=sorted(inventory.snapshot.installed),
                resident=sorted(set(inventory.snapshot.loaded) | set(figures.resident)),
                capacity=figures.capacity,
                max_queue=figures.max_queue,
                generations=generations,
                queued=len(queue),
                queue=queue[:QUEUE_SHOWN],
            )
        )
    return views


# ---------------------------------------------------------------------- providers


def provider_views(services: Services, tally: ProviderTally, now: float) -> list[ProviderView]:
    """Each cloud provider: registered (with its figures) or why not (no secret)."""
    registry = services.registry
    views = []
    for name in ORDER:
        if name == LOCAL:
            continue
        provider = registry.get(name)
        if provider is None:
            views.append(
                ProviderView(name=name, registered=False, missing=registry.missing_reason(name))
            )
            continue
        figures = tally.figures(name, now)
        last = figures.last_error
        views.append(
            ProviderView(
                name=name,
                registered=True,
                base_url=redact_url(provider.base_url),
                requests_1h=figures.requests,
                errors_1h=figures.errors,
                last_error=last.message if last else None,
                last_error_ago_s=round(now - last.at, 1) if last else None,
            )
        )
    return views


# ---------------------------------------------------------------------- usage

WEEK_DAYS = 7


def usage_range(now: float) -> tuple[float, list[str]]:
    """Where the week starts (UTC midnight six days before today's) and its days."""
    start = day_start(now) - (WEEK_DAYS - 1) * DAY_S
    return start, [iso(start + i * DAY_S)[:10] for i in range(WEEK_DAYS)]


def _add(row: UsageRow, item: Mapping[str, Any], provider: str | None) -> None:
    row.requests += int(item["requests"])
    row.errors += int(item["errors"])
    row.input_tokens += int(item["input_tokens"])
    row.output_tokens += int(item["output_tokens"])
    row.gpu_s = round(row.gpu_s + float(item["gpu_s"]), 3)
    if provider and provider != LOCAL:
        tokens = int(item["input_tokens"]) + int(item["output_tokens"])
        row.cloud_tokens[provider] = row.cloud_tokens.get(provider, 0) + tokens


def _table(rows: Mapping[str, UsageRow]) -> list[UsageRow]:
    return sorted(rows.values(), key=lambda r: (-(r.input_tokens + r.output_tokens), r.name))


def usage_view(
    by_client: Sequence[Mapping[str, Any]], by_model: Sequence[Mapping[str, Any]], now: float
) -> UsageView:
    """The page's usage from two reports over the week: rows grouped by
    (client, provider, day) and by (model, provider, day), as `Ledger.report` gives them."""
    _, days = usage_range(now)
    today = days[-1]
    view = UsageView(enabled=True, days=days)
    tables: dict[str, dict[str, UsageRow]] = {
        "clients_today": {},
        "clients_week": {},
        "models_today": {},
        "models_week": {},
    }
    for kind, rows in (("clients", by_client), ("models", by_model)):
        key = "client" if kind == "clients" else "model"
        for item in rows:
            name, provider, day = str(item[key]), str(item["provider"]), str(item["day"])
            periods = ("week", "today") if day == today else ("week",)
            for period in periods:
                table = tables[f"{kind}_{period}"]
                _add(table.setdefault(name, UsageRow(name=name)), item, provider)
            if kind == "clients" and day in days:
                series = view.tokens_per_day.setdefault(name, [0] * WEEK_DAYS)
                series[days.index(day)] += int(item["input_tokens"]) + int(item["output_tokens"])
    view.clients_today = _table(tables["clients_today"])
    view.clients_week = _table(tables["clients_week"])
    view.models_today = _table(tables["models_today"])
    view.models_week = _table(tables["models_week"])
    return view


# ---------------------------------------------------------------------- names


def anonymous_label(key: bytes, name: str) -> str:
    """A stable label for a client's name: the same name, the same label, for as long as
    `key` lives (the gateway's run); the name cannot be read back from it."""
    digest = hmac.new(key, name.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()
    return f"client-{digest[:6]}"


def anonymize(status: Status, key: bytes, keep: Iterable[str]) -> Status:
    """`status` with every client name but those in `keep` replaced by its label."""
    kept = frozenset(keep)

    def label(name: str) -> str:
        return name if name in kept or not name else anonymous_label(key, name)

    def rows(items: list[UsageRow]) -> list[UsageRow]:
        return [msgspec.structs.replace(r, name=label(r.name)) for r in items]

    hosts = [
        msgspec.structs.replace(
            host,
            generations=[
                msgspec.structs.replace(g, client=label(g.client)) for g in host.generations
            ],
            queue=[msgspec.structs.replace(w, client=label(w.client)) for w in host.queue],
        )
        for host in status.hosts
    ]
    usage = msgspec.structs.replace(
        status.usage,
        clients_today=rows(status.usage.clients_today),
        clients_week=rows(status.usage.clients_week),
        tokens_per_day={label(name): s for name, s in status.usage.tokens_per_day.items()},
    )
    return msgspec.structs.replace(status, hosts=hosts, usage=usage, names_hidden=True)
