"""Usage report parameters and renderings, alone (no file, no server)."""

from __future__ import annotations

import pytest

from gateway.errors import BadRequest
from gateway.usage.report import UsageQuery, build, parse_query, parse_time, render_table

NOW = 1_796_300_000.0  # 2026-12-03T12:13:20Z
MIDNIGHT = 1_796_256_000.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("now", NOW),
        ("today", MIDNIGHT),
        ("90m", NOW - 5400),
        ("24h", NOW - 86400),
        ("7d", NOW - 7 * 86400),
        ("1w", NOW - 7 * 86400),
        ("1.5h", NOW - 5400),
        ("2026-12-03", MIDNIGHT),
        ("2026-12-03T09:00", MIDNIGHT + 9 * 3600),
        ("2026-12-03T09:00Z", MIDNIGHT + 9 * 3600),
        ("2026-12-03T10:00+01:00", MIDNIGHT + 9 * 3600),
    ],
)
def test_time_forms(text: str, expected: float) -> None:
    assert parse_time("since", text, NOW) == expected


def test_defaults_are_today_so_far_per_client() -> None:
    assert parse_query({}, NOW) == UsageQuery(MIDNIGHT, NOW, ("client",))


def test_group_by_takes_several_keys() -> None:
    query = parse_query({"group_by": ["client, day"], "since": ["7d"]}, NOW)
    assert query.group_by == ("client", "day")
    assert query.since == NOW - 7 * 86400


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"since": ["last week"]}, "since: expected an ISO 8601 date or time"),
        ({"until": ["12/03/2026"]}, "until: expected"),
        ({"since": ["now"]}, "must be before until"),
        ({"group_by": ["host"]}, "group_by: 'host' is not one of client, model, provider, day"),
        ({"group_by": [""]}, "group_by: '' is not one of"),
        ({"group_by": ["model,model"]}, "repeated"),
        ({"group_by": ["day", "model"]}, "group_by is given 2 times"),
        ({"format": ["csv"]}, "unknown parameter 'format'; this route takes since, until"),
    ],
)
def test_bad_parameters_say_what_is_expected(args: dict[str, list[str]], message: str) -> None:
    with pytest.raises(BadRequest) as error:
        parse_query(args, NOW)
    assert message in error.value.message
    assert error.value.status == 400


def test_build_and_render() -> None:
    query = UsageQuery(MIDNIGHT, NOW, ("client", "provider"))
    report = build(
        query,
        [
            ("alice", "ollama", 3, 1, 30, 60, 4.25, 0.5),
            ("bob", "openrouter", 1, 0, 10, 5, 0.0, 0.0),
        ],
    )
    assert report["since"] == "2026-12-03T00:00:00Z"
    assert report["until"] == "2026-12-03T12:13:20Z"
    assert report["rows"][0] == {
        "client": "alice",
        "provider": "ollama",
        "requests": 3,
        "errors": 1,
        "input_tokens": 30,
        "output_tokens": 60,
        "gpu_s": 4.25,
        "queue_s": 0.5,
    }
    assert report["totals"] == {
        "requests": 4,
        "errors": 1,
        "input_tokens": 40,
        "output_tokens": 65,
        "gpu_s": 4.25,
        "queue_s": 0.5,
    }
    assert render_table(report).splitlines() == [
        "usage from 2026-12-03T00:00:00Z to 2026-12-03T12:13:20Z",
        "client  provider    requests  errors  input_tokens  output_tokens  gpu_s  queue_s",
        "------  ----------  --------  ------  ------------  -------------  -----  -------",
        "alice   ollama             3       1            30             60    4.2      0.5",
        "bob     openrouter         1       0            10              5    0.0      0.0",
        "------  ----------  --------  ------  ------------  -------------  -----  -------",
        "total                      4       1            40             65    4.2      0.5",
    ]
