"""The running gateway's parts, built once in `gateway.app.serve` and passed explicitly."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.auth import Auth
from gateway.config import Config
from gateway.drain import Drain
from gateway.gate import ChatGate
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
    target: TargetClient
    inventory: Inventory
    gate: ChatGate
    drain: Drain
    warmer: EmbedWarmer | None
    registry: Registry
    auth: Auth
    metrics: Metrics
    ledger: Ledger
    budgets: Budgets
    status: StatusBoard
