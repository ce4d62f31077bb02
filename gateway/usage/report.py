"""A usage report: its parameters (`since`, `until`, `group_by`), parsed and checked the
same way for `GET /v1/usage` and `gateway usage`, and its two renderings (JSON, a table).

Pure: no I/O; times are Unix seconds and "now" is passed in.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from gateway.errors import BadRequest
from gateway.usage.store import FIGURES, GROUP_EXPRESSIONS

DAY_S = 86400
PARAMETERS = ("since", "until", "group_by")
_AGO = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": DAY_S, "w": 7 * DAY_S}
TIME_FORMS = (
    "an ISO 8601 date or time (2026-12-03, 2026-12-03T09:00Z; UTC unless an offset is given),"
    " a duration ago (90m, 24h, 7d), 'today' or 'now'"
)


def day_start(t: float) -> float:
    """The UTC midnight that starts the day holding `t`."""
    return math.floor(t / DAY_S) * DAY_S


def parse_time(name: str, text: str, now: float) -> float:
    text = text.strip()
    if text == "now":
        return now
    if text == "today":
        return day_start(now)
    ago = _AGO.fullmatch(text)
    if ago:
        return now - float(ago.group(1)) * _UNIT_S[ago.group(2)]
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise BadRequest(f"{name}: expected {TIME_FORMS}; got {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


@dataclass(frozen=True, slots=True)
class UsageQuery:
    since: float
    until: float
    group_by: tuple[str, ...]


def parse_query(args: Mapping[str, Sequence[str]], now: float) -> UsageQuery:
    """Check the parameters (each given at most once, no others) and resolve their times.

    Defaults: since the start of today (UTC), until now, grouped by client. `group_by`
    takes one key or several separated by commas (`client,day`).
    """
    unknown = sorted(set(args) - set(PARAMETERS))
    if unknown:
        raise BadRequest(
            f"unknown parameter {unknown[0]!r}; this route takes {', '.join(PARAMETERS)}"
        )
    values: dict[str, str] = {}
    for name, given in args.items():
        if len(given) != 1:
            raise BadRequest(f"{name} is given {len(given)} times; give it once")
        values[name] = given[0]
    since = parse_time("since", values["since"], now) if "since" in values else day_start(now)
    until = parse_time("until", values["until"], now) if "until" in values else now
    if since >= until:
        raise BadRequest(
            f"since ({iso(since)}) must be before until ({iso(until)}): the range is empty"
        )
    group_by = tuple(part.strip() for part in values.get("group_by", "client").split(","))
    for key in group_by:
        if key not in GROUP_EXPRESSIONS:
            raise BadRequest(
                f"group_by: {key!r} is not one of {', '.join(GROUP_EXPRESSIONS)}"
                " (several may be given, separated by commas)"
            )
    if len(set(group_by)) != len(group_by):
        raise BadRequest(f"group_by: a key is repeated in {values['group_by']!r}")
    return UsageQuery(since, until, group_by)


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def build(query: UsageQuery, rows: Sequence[Sequence[object]]) -> dict[str, Any]:
    """The JSON report: each group's keys and figures, and the totals over all groups."""
    n = len(query.group_by)
    groups: list[dict[str, Any]] = []
    totals: dict[str, Any] = dict.fromkeys(FIGURES, 0)
    for row in rows:
        item: dict[str, Any] = dict(zip(query.group_by, row[:n], strict=True))
        for figure, value in zip(FIGURES, row[n:], strict=True):
            item[figure] = round(value, 3) if isinstance(value, float) else value
            totals[figure] += value
        groups.append(item)
    for figure in ("gpu_s", "queue_s"):
        totals[figure] = round(float(totals[figure]), 3)
    return {
        "since": iso(query.since),
        "until": iso(query.until),
        "group_by": list(query.group_by),
        "rows": groups,
        "totals": totals,
    }


def render_table(report: Mapping[str, Any]) -> str:
    """The report as a plain-text table, for a terminal: a line per group, then totals."""
    keys: list[str] = list(report["group_by"])
    lines: list[list[str]] = [[*keys, *FIGURES]]
    for row in report["rows"]:
        lines.append([str(row[k]) or "-" for k in keys] + [_figure(row[f]) for f in FIGURES])
    totals = report["totals"]
    lines.append(["total"] + [""] * (len(keys) - 1) + [_figure(totals[f]) for f in FIGURES])
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    rule = "  ".join("-" * width for width in widths)
    text = [f"usage from {report['since']} to {report['until']}"]
    for index, line in enumerate(lines):
        if index == len(lines) - 1:
            text.append(rule)
        cells = [
            cell.ljust(width) if i < len(keys) else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        text.append("  ".join(cells).rstrip())
        if index == 0:
            text.append(rule)
    return "\n".join(text)


def _figure(value: object) -> str:
    return f"{value:.1f}" if isinstance(value, float) else str(value)
