"""Per-client daily caps on cloud use, per provider (`[clients.<name>]`
`cloud_tokens_per_day`, `cloud_requests_per_day`; 0 is no cap).

A day is a UTC day: counts reset at 00:00 UTC. Requests are counted when admitted (so a
burst of concurrent requests cannot overshoot a request cap), tokens when the answer is
finished (they are known only then, so a token cap stops the requests after the one that
crossed it). At start-up the counts of today come from the ledger, so a restart does not
reset the day. Only clients with a cap are tracked: the state is bounded by the
configured clients times the providers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from gateway.config import ClientConfig, Config
from gateway.errors import BudgetExceeded
from gateway.record import RequestRecord
from gateway.usage.report import DAY_S, iso

LOCAL = "ollama"  # the local GPU host's provider name: never capped here


@dataclass(slots=True)
class Used:
    requests: int = 0
    tokens: int = 0


@dataclass(frozen=True, slots=True)
class CapReached:
    kind: str  # "tokens" or "requests"
    limit: int
    used: int


def reached(client: ClientConfig, used: Used) -> CapReached | None:
    """The cap that `used` has reached, if any (the policy, pure)."""
    if client.cloud_requests_per_day and used.requests >= client.cloud_requests_per_day:
        return CapReached("requests", client.cloud_requests_per_day, used.requests)
    if client.cloud_tokens_per_day and used.tokens >= client.cloud_tokens_per_day:
        return CapReached("tokens", client.cloud_tokens_per_day, used.tokens)
    return None


def refusal(who: str, provider: str, cap: CapReached, now: float) -> BudgetExceeded:
    reset = (math.floor(now / DAY_S) + 1) * DAY_S
    wait_s = max(1, math.ceil(reset - now))
    hours, minutes = divmod(math.ceil(wait_s / 60), 60)
    return BudgetExceeded(
        f"daily cap reached: client {who!r} has used {cap.used} of its {cap.limit} cloud"
        f" {cap.kind} per day on provider {provider!r}; the cap resets at 00:00 UTC"
        f" ({iso(reset)}, in {hours}h{minutes:02d}m)",
        retry_after_s=wait_s,
    )


class Budgets:
    """Checks and counts cloud use per (client, provider) for the current UTC day.

    `clock` gives Unix seconds (injectable: tests run days on the autojump clock).
    """

    def __init__(self, config: Config, *, clock: Callable[[], float] = time.time) -> None:
        self._config = config
        self._capped = {
            name
            for name, client in config.clients.items()
            if client.cloud_tokens_per_day or client.cloud_requests_per_day
        }
        self._clock = clock
        self._day = math.floor(clock() / DAY_S)
        self._used: dict[tuple[str, str], Used] = {}

    def day_start(self) -> float:
        return math.floor(self._clock() / DAY_S) * DAY_S

    def load(self, totals: Mapping[tuple[str, str], tuple[int, int]], since: float) -> None:
        """Start today's counts from the ledger's (requests, tokens) since `since`."""
        if math.floor(since / DAY_S) != self._today():
            return  # the day turned while the ledger was read: nothing of it counts
        for (who, provider), (requests, tokens) in totals.items():
            if who in self._capped and provider != LOCAL:
                used = self._used.setdefault((who, provider), Used())
                used.requests += requests
                used.tokens += tokens

    def admit(self, who: str, provider: str) -> None:
        """Raise `BudgetExceeded` (429) when `who` has reached a daily cap on `provider`;
        else count the request. Call it where a request is bound to its provider."""
        if who not in self._capped or provider == LOCAL:
            return
        self._today()
        used = self._used.setdefault((who, provider), Used())
        cap = reached(self._config.client(who), used)
        if cap is not None:
            raise refusal(who, provider, cap, self._clock())
        used.requests += 1

    def note(self, record: RequestRecord) -> None:
        """Count a finished request's tokens against its client's cap."""
        who = record.who
        if who not in self._capped or not record.provider or record.provider == LOCAL:
            return
        self._today()
        used = self._used.setdefault((who, record.provider), Used())
        used.tokens += record.tokens_in + record.tokens_out

    def used(self, who: str, provider: str) -> Used:
        self._today()
        return self._used.get((who, provider)) or Used()

    def _today(self) -> int:
        day = math.floor(self._clock() / DAY_S)
        if day != self._day:
            self._day = day
            self._used.clear()
        return day
