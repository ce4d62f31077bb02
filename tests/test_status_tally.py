"""The cloud providers' tally: requests and errors of the last hour per minute bucket,
and the last error, scrubbed by the provider's own scrubber."""

from __future__ import annotations

from gateway.record import RequestRecord
from gateway.status.tally import ProviderTally

KEY = "sk-secret-key"


def finished(provider: str, status: int, error: str = "") -> RequestRecord:
    record = RequestRecord("id", "POST", "/v1/chat", "10.0.0.1:5", 0.0, "alice")
    record.provider, record.status, record.error = provider, status, error
    return record


def test_requests_and_errors_of_the_last_hour() -> None:
    tally = ProviderTally(frozenset({"kimi", "openrouter"}))
    for minute in range(90):  # one request a minute for an hour and a half
        tally.note(
            finished("kimi", 200 if minute % 10 else 502, "kimi: bad gateway"), minute * 60.0
        )
    figures = tally.figures("kimi", 89 * 60.0)
    assert figures.requests == 60  # minutes 30..89
    assert figures.errors == 6  # minutes 30, 40, ..., 80
    assert tally.figures("openrouter", 89 * 60.0).requests == 0
    # Two hours of silence: nothing left in the last hour, the last error is remembered.
    quiet = tally.figures("kimi", 209 * 60.0)
    assert (quiet.requests, quiet.errors) == (0, 0)
    assert quiet.last_error is not None
    assert quiet.last_error.at == 80 * 60.0


def test_local_and_unknown_providers_are_not_counted() -> None:
    tally = ProviderTally(frozenset({"kimi"}))
    tally.note(finished("ollama", 500), 1.0)
    tally.note(finished("", 404), 1.0)
    assert tally.figures("ollama", 1.0).requests == 0
    assert tally.figures("kimi", 1.0).requests == 0


def test_a_client_that_left_is_not_the_providers_error() -> None:
    tally = ProviderTally(frozenset({"kimi"}))
    tally.note(finished("kimi", 499), 1.0)
    tally.note(finished("kimi", 429, "kimi: rate limited"), 2.0)
    figures = tally.figures("kimi", 2.0)
    assert (figures.requests, figures.errors) == (2, 1)
    assert figures.last_error is not None
    assert (figures.last_error.status, figures.last_error.message) == (429, "kimi: rate limited")


def test_last_error_is_scrubbed_and_bounded() -> None:
    tally = ProviderTally(frozenset({"kimi"}), {"kimi": lambda text: text.replace(KEY, "***")})
    tally.note(finished("kimi", 401, f"kimi: invalid key {KEY} " + "x" * 1000), 5.0)
    last = tally.figures("kimi", 5.0).last_error
    assert last is not None
    assert KEY not in last.message
    assert last.message.startswith("kimi: invalid key ***")
    assert len(last.message) == 500
    tally.note(finished("kimi", 500), 6.0)  # no message: the status says what happened
    last = tally.figures("kimi", 6.0).last_error
    assert last is not None
    assert last.message == "HTTP 500"
