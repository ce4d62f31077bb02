"""The running gateway's parts, built once in `gateway.app.serve` and passed explicitly."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.auth import Auth
from gateway.config import Config
from gateway.drain import Drain
from gateway.gate import ChatGate
from gateway.hosts import Hosts
from gateway.metrics import Metrics
from gateway.providers.registry import Registry
from gateway.status.board import StatusBoard
from gateway.target.client import TargetClient
from gateway.target.inventory import Inventory
from gateway.target.warmup import EmbedWarmer
from gateway.usage import Budgets, Ledger


@dataclass(frozen=True, slots=True)
class Services:
    config: Config
    hosts: Hosts
    drain: Drain
    registry: Registry
    auth: Auth
    metrics: Metrics
    ledger: Ledger
    budgets: Budgets
    status: StatusBoard

    # The first GPU host's parts: the one host of a configuration without
    # `[ollama.hosts]` (tests and tools written for one host). Routes use `hosts`.

    @property
    def target(self) -> TargetClient:
        return self.hosts.first.target

    @property
    def inventory(self) -> Inventory:
        return self.hosts.first.inventory

    @property
    def gate(self) -> ChatGate:
        return self.hosts.first.gate

    @property
    def warmer(self) -> EmbedWarmer | None:
        return self.hosts.first.warmer
