"""Prometheus metrics, through prometheus-client (no hand-written exposition).

Each gateway has its own `CollectorRegistry`, so several can run in one process (tests).
Live figures (gate, inventory, warm-ups) are read at scrape time by a collector, never
copied on the hot path. Labels are bounded: routes are the known ones or "other";
models are those of the inventory or the first `MAX_MODELS` cloud names, then "other";
per-client usage counters name the configured `[clients.*]` and count the rest as "other".
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.gate import ChatGate
from gateway.record import RequestRecord
from gateway.target.inventory import Inventory
from gateway.target.warmup import EmbedWarmer
from gateway.target.wire import canonical_model
from gateway.usage.ledger import Ledger

MAX_MODELS = 64
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _Live(Collector):
    def __init__(self, gate: ChatGate, inventory: Inventory, warmer: EmbedWarmer | None) -> None:
        self._gate = gate
        self._inventory = inventory
        self._warmer = warmer

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        gate = self._gate
        yield GaugeMetricFamily(
            "gateway_gate_capacity", "Generations allowed at once.", gate.capacity
        )
        yield GaugeMetricFamily("gateway_gate_busy", "Generations running now.", gate.busy)
        yield GaugeMetricFamily(
            "gateway_gate_queue_depth", "Requests waiting for the gate.", gate.queued
        )
        by_priority = GaugeMetricFamily(
            "gateway_gate_queue_depth_by_priority",
            "Requests waiting for the gate, by their client's priority.",
            labels=["priority"],
        )
        for priority, count in gate.queued_by_priority().items():
            by_priority.add_metric([priority], count)
        yield by_priority
        yield CounterMetricFamily(
            "gateway_gate_model_switches",
            "Grants of a model that was not loaded (Ollama loads it, unloading another).",
            gate.switches,
        )
        yield CounterMetricFamily(
            "gateway_gate_overdue_grants",
            "Grants decided by the overtake bound (gate.max_overtake_s).",
            gate.overdue_grants,
        )
        inventory = self._inventory
        yield GaugeMetricFamily(
            "gateway_inventory_degraded",
            "1 while the Ollama target is unreachable.",
            int(inventory.degraded),
        )
        age = inventory.age_s()
        yield GaugeMetricFamily(
            "gateway_inventory_age_seconds",
            "Seconds since the last good inventory poll (-1: never).",
            -1 if age is None else age,
        )
        yield GaugeMetricFamily(
            "gateway_inventory_models",
            "Models installed on the target.",
            len(inventory.snapshot.installed),
        )
        yield CounterMetricFamily(
            "gateway_inventory_poll_failures",
            "Inventory polls that failed.",
            inventory.poll_failures,
        )
        yield CounterMetricFamily(
            "gateway_inventory_recoveries", "Recoveries from degraded mode.", inventory.recoveries
        )
        if self._warmer is not None:
            yield CounterMetricFamily(
                "gateway_embed_warmups", "Embedder loads with keep_alive -1.", self._warmer.warmups
            )


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
        gate: ChatGate,
        inventory: Inventory,
        warmer: EmbedWarmer | None,
        *,
        ledger: Ledger | None = None,
        clients: Iterable[str] = (),
    ) -> None:
        self.registry = CollectorRegistry()
        self._clients = frozenset(clients)
        self._inventory = inventory
        self._cloud_models: set[str] = set()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        r = self.registry
        self.requests = Counter(
            "gateway_requests",
            "Requests answered.",
            ["route", "status", "provider", "client"],
            registry=r,
        )
        self.gate_wait = Histogram(
            "gateway_gate_wait_seconds",
            "Time queued for the chat gate.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_first_byte = Histogram(
            "gateway_upstream_first_byte_seconds",
            "Upstream time to answer headers.",
            ["provider"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_total = Histogram(
            "gateway_upstream_seconds",
            "Upstream time to the end of the answer.",
            ["provider"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "gateway_tokens", "Tokens in and out.", ["provider", "model", "direction"], registry=r
        )
        self.model_load = Histogram(
            "gateway_model_load_seconds",
            "Ollama's load_duration per answer; seconds-long values are cold model loads.",
            ["model"],
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.eval_rate = Histogram(
            "gateway_tokens_per_second",
            "Generation speed from Ollama's final frames.",
            ["provider", "model"],
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
            ["client"],
            registry=r,
        )
        r.register(_Live(gate, inventory, warmer))
        if ledger is not None and ledger.enabled:
            r.register(_LedgerFigures(ledger))

    def client_label(self, who: str) -> str:
        return who if who in self._clients else OTHER_CLIENT

    def model_label(self, provider: str, model: str) -> str:
        if not model:
            return ""
        if provider == "ollama":
            return canonical_model(model) if self._inventory.has_model(model) else "other"
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
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe(self, record: RequestRecord) -> None:
        provider = record.provider
        child = self._child
        child(self.requests, record.route, str(record.status), provider, record.client_name).inc()
        if record.gate_wait_s is not None:
            self.gate_wait.observe(record.gate_wait_s)
        if record.upstream_headers_s is not None:
            child(self.upstream_first_byte, provider).observe(record.upstream_headers_s)
        if record.upstream_s is not None:
            child(self.upstream_total, provider).observe(record.upstream_s)
        model = self.model_label(provider, record.model)
        if record.tokens_in:
            self.tokens.labels(provider, model, "in").inc(record.tokens_in)
        if record.tokens_out:
            self.tokens.labels(provider, model, "out").inc(record.tokens_out)
        if record.load_s is not None:
            self.model_load.labels(model).observe(record.load_s)
        if record.eval_rate is not None:
            self.eval_rate.labels(provider, model).observe(record.eval_rate)
        if record.tokens_in or record.tokens_out or record.gpu_s:
            client = self.client_label(record.who)
            if record.tokens_in:
                child(self.client_tokens, client, provider, "in").inc(record.tokens_in)
            if record.tokens_out:
                child(self.client_tokens, client, provider, "out").inc(record.tokens_out)
            if record.gpu_s:
                child(self.client_gpu, client).inc(record.gpu_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
