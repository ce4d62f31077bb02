"""Prometheus metrics, through prometheus-client (no hand-written exposition).

Each gateway has its own `CollectorRegistry`, so several can run in one process (tests).
Live figures (gate, inventory, warm-ups) are read at scrape time by a collector, never
copied on the hot path. Labels are bounded: routes are the known ones or "other";
models are those of the inventory or the first `MAX_MODELS` cloud names, then "other";
per-client usage counters name the configured `[clients.*]` and count the rest as "other".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.hosts import Host, Hosts
from gateway.record import RequestRecord
from gateway.target.wire import canonical_model
from gateway.usage.ledger import Ledger

F = TypeVar("F", GaugeMetricFamily, CounterMetricFamily)
MAX_MODELS = 64
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _Live(Collector):
    """The hosts' gates, inventories and warm-ups, read at scrape time. With several hosts
    each family has a `host` label; with one, none (the names and samples of before)."""

    def __init__(self, hosts: Hosts) -> None:
        self._hosts = hosts

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        hosts = self._hosts.all
        labels = [] if len(hosts) == 1 else ["host"]

        def family(kind: type[F], name: str, doc: str, value: Callable[[Host], float]) -> F:
            metric = kind(name, doc, labels=labels)
            for host in hosts:
                metric.add_metric([host.name] if labels else [], value(host))
            return metric

        gauge, counter = GaugeMetricFamily, CounterMetricFamily
        yield family(gauge, "gateway_gate_capacity", "Generations allowed at once.", _capacity)
        yield family(gauge, "gateway_gate_busy", "Generations running now.", _busy)
        yield family(gauge, "gateway_gate_queue_depth", "Requests waiting for the gate.", _queued)
        by_priority = GaugeMetricFamily(
            "gateway_gate_queue_depth_by_priority",
            "Requests waiting for the gate, by their client's priority.",
            labels=["priority", *labels],
        )
        for host in hosts:
            for priority, count in host.gate.queued_by_priority().items():
                by_priority.add_metric([priority, host.name][: 1 + len(labels)], count)
        yield by_priority
        yield family(
            counter,
            "gateway_gate_grants",
            "Generations granted the gate (with several hosts: how many each host ran).",
            lambda h: h.gate.granted_total,
        )
        yield family(
            counter,
            "gateway_gate_model_switches",
            "Grants of a model that was not loaded (Ollama loads it, unloading another).",
            lambda h: h.gate.switches,
        )
        yield family(
            counter,
            "gateway_gate_overdue_grants",
            "Grants decided by the overtake bound (gate.max_overtake_s).",
            lambda h: h.gate.overdue_grants,
        )
        yield family(
            gauge,
            "gateway_inventory_degraded",
            "1 while the Ollama target is unreachable.",
            lambda h: int(h.inventory.degraded),
        )
        yield family(
            gauge,
            "gateway_inventory_age_seconds",
            "Seconds since the last good inventory poll (-1: never).",
            _age,
        )
        yield family(
            gauge,
            "gateway_inventory_models",
            "Models installed on the target.",
            lambda h: len(h.inventory.snapshot.installed),
        )
        yield family(
            counter,
            "gateway_inventory_poll_failures",
            "Inventory polls that failed.",
            lambda h: h.inventory.poll_failures,
        )
        yield family(
            counter,
            "gateway_inventory_recoveries",
            "Recoveries from degraded mode.",
            lambda h: h.inventory.recoveries,
        )
        warmed = [h for h in hosts if h.warmer is not None]
        if warmed:
            warmups = CounterMetricFamily(
                "gateway_embed_warmups", "Embedder loads with keep_alive -1.", labels=labels
            )
            for host in warmed:
                assert host.warmer is not None
                warmups.add_metric([host.name] if labels else [], host.warmer.warmups)
            yield warmups


def _capacity(host: Host) -> float:
    return host.gate.capacity


def _busy(host: Host) -> float:
    return host.gate.busy


def _queued(host: Host) -> float:
    return host.gate.queued


def _age(host: Host) -> float:
    age = host.inventory.age_s()
    return -1 if age is None else age


class _LedgerFigures(Collector):
    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        ledger = self._ledger
        yield CounterMetricFamily(
            "gateway_usage_records_written", "Usage records written to the ledger.", ledger.written
        )
        yield CounterMetricFamily(
            "gateway_usage_records_dropped",
            "Usage records dropped: the ledger's buffer was full.",
            ledger.dropped,
        )
        yield CounterMetricFamily(
            "gateway_usage_write_failures",
            "Ledger writes that failed (read-only, full or locked file).",
            ledger.write_failures,
        )
        yield GaugeMetricFamily(
            "gateway_usage_records_pending", "Usage records waiting to be written.", ledger.pending
        )
        yield GaugeMetricFamily(
            "gateway_usage_failing", "1 while the ledger cannot write.", int(ledger.failing)
        )


OTHER_CLIENT = "other"


class Metrics:
    def __init__(
        self,
        hosts: Hosts,
        *,
        ledger: Ledger | None = None,
        clients: Iterable[str] = (),
    ) -> None:
        self.registry = CollectorRegistry()
        self._clients = frozenset(clients)
        self._hosts = hosts
        # With several hosts, the per-request figures carry the host's name too ("" for
        # a request that reached no GPU host: cloud, refused before placement).
        self._by_host = not hosts.single
        host_label = ["host"] if self._by_host else []
        self._cloud_models: set[str] = set()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        r = self.registry
        self.requests = Counter(
            "gateway_requests",
            "Requests answered.",
            ["route", "status", "provider", "client", *host_label],
            registry=r,
        )
        self.gate_wait = Histogram(
            "gateway_gate_wait_seconds",
            "Time queued for the chat gate.",
            host_label,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_first_byte = Histogram(
            "gateway_upstream_first_byte_seconds",
            "Upstream time to answer headers.",
            ["provider", *host_label],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_total = Histogram(
            "gateway_upstream_seconds",
            "Upstream time to the end of the answer.",
            ["provider", *host_label],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "gateway_tokens", "Tokens in and out.", ["provider", "model", "direction"], registry=r
        )
        self.model_load = Histogram(
            "gateway_model_load_seconds",
            "Ollama's load_duration per answer; seconds-long values are cold model loads.",
            ["model", *host_label],
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.eval_rate = Histogram(
            "gateway_tokens_per_second",
            "Generation speed from Ollama's final frames.",
            ["provider", "model", *host_label],
            buckets=(1, 5, 10, 20, 40, 80, 160, 320),
            registry=r,
        )
        self.client_tokens = Counter(
            "gateway_client_tokens",
            "Tokens per client (configured [clients.*] names, else other), provider, direction.",
            ["client", "provider", "direction"],
            registry=r,
        )
        self.client_gpu = Counter(
            "gateway_client_gpu_seconds",
            "Seconds each client held the GPU host's gate (configured names, else other).",
            ["client", *host_label],
            registry=r,
        )
        r.register(_Live(hosts))
        if ledger is not None and ledger.enabled:
            r.register(_LedgerFigures(ledger))

    def client_label(self, who: str) -> str:
        return who if who in self._clients else OTHER_CLIENT

    def model_label(self, provider: str, model: str) -> str:
        if not model:
            return ""
        if provider == "ollama":
            return canonical_model(model) if self._hosts.has_model(model) else "other"
        if model in self._cloud_models:
            return model
        if len(self._cloud_models) < MAX_MODELS:
            self._cloud_models.add(model)
            return model
        return "other"

    def _child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, looked up once per label set: prometheus-client
        validates and locks on every `labels()` call, and this runs once per request.
        Bounded because every label is (routes, statuses, providers, token names)."""
        if not labels:
            return metric
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe(self, record: RequestRecord) -> None:
        provider = record.provider
        child = self._child
        at = (record.host,) if self._by_host else ()  # where it ran ("" for no GPU host)
        child(
            self.requests, record.route, str(record.status), provider, record.client_name, *at
        ).inc()
        host = (record.host or self._hosts.first.name,) if self._by_host else ()
        if record.gate_wait_s is not None:
            child(self.gate_wait, *host).observe(record.gate_wait_s)
        if record.upstream_headers_s is not None:
            child(self.upstream_first_byte, provider, *at).observe(record.upstream_headers_s)
        if record.upstream_s is not None:
            child(self.upstream_total, provider, *at).observe(record.upstream_s)
        model = self.model_label(provider, record.model)
        if record.tokens_in:
            self.tokens.labels(provider, model, "in").inc(record.tokens_in)
        if record.tokens_out:
            self.tokens.labels(provider, model, "out").inc(record.tokens_out)
        if record.load_s is not None:
            child(self.model_load, model, *at).observe(record.load_s)
        if record.eval_rate is not None:
            child(self.eval_rate, provider, model, *at).observe(record.eval_rate)
        if record.tokens_in or record.tokens_out or record.gpu_s:
            client = self.client_label(record.who)
            if record.tokens_in:
                child(self.client_tokens, client, provider, "in").inc(record.tokens_in)
            if record.tokens_out:
                child(self.client_tokens, client, provider, "out").inc(record.tokens_out)
            if record.gpu_s:
                child(self.client_gpu, client, *host).inc(record.gpu_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
