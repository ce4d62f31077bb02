"""The small helpers left in `gateway.h1.framing` (the framing itself is llhttp's)."""

from __future__ import annotations

from gateway.h1.framing import TOKEN, has_token, valid_value


def test_tokens_and_values() -> None:
    assert has_token([(b"connection", b"keep-alive, Close")], b"connection", b"close")
    assert not has_token([(b"connection", b"closed")], b"connection", b"close")
    assert valid_value(b"a\tb c")
    assert not valid_value(b"a\r\nb")
    assert not valid_value(b"a\x00b")
    assert TOKEN.fullmatch(b"X-Request-Id")
    assert not TOKEN.fullmatch(b"X Request")
