"""Usage: the ledger of finished requests (SQLite), its reports, and the daily budgets."""

from gateway.usage import report, store
from gateway.usage.budgets import Budgets
from gateway.usage.ledger import Ledger
from gateway.usage.report import UsageQuery, parse_query
from gateway.usage.store import resolve_path

__all__ = ["Budgets", "Ledger", "UsageQuery", "parse_query", "report", "resolve_path", "store"]
