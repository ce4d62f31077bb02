"""HTTP/1.1 framing (`gateway.h1.framing`): pure parsing, no sockets."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.h1.framing import (
    CHUNKED,
    MAX_HEAD_BYTES,
    ChunkedDecoder,
    FramingError,
    body_length,
    has_token,
    head_end,
    parse_request_head,
    parse_response_head,
    valid_value,
)


def test_a_request_head_is_split_into_its_parts() -> None:
    method, target, minor, fields = parse_request_head(
        b"POST /api/chat?x=1 HTTP/1.1\r\nHost: gw\r\nContent-Length:  5 \r\nX-Empty:"
    )
    assert (method, target, minor) == (b"POST", b"/api/chat?x=1", 1)
    assert fields == [(b"host", b"gw"), (b"content-length", b"5"), (b"x-empty", b"")]


def test_a_response_head_is_split_into_its_parts() -> None:
    status, minor, fields = parse_response_head(
        b"HTTP/1.0 404 Not Found\r\nContent-Type: application/json"
    )
    assert (status, minor, fields) == (404, 0, [(b"content-type", b"application/json")])
    assert parse_response_head(b"HTTP/1.1 200")[0] == 200  # the reason may be absent


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\n folded: line",
        b"GET / HTTP/1.1\r\nname : space-before-colon",
        b"GET / HTTP/1.1\r\nno colon",
        b"GET / HTTP/1.1\r\nx: nul\x00inside",
        b"GET / HTTP/1.1\r\nx: bare\nnewline",
        b"GET /a b HTTP/1.1",
        b"GET / HTTP/2.0",
        b"G(T / HTTP/1.1",
        b"GET /\x7f HTTP/1.1",
    ],
)
def test_malformed_request_heads_are_refused(head: bytes) -> None:
    with pytest.raises(FramingError):
        parse_request_head(head)


def test_head_end_finds_the_blank_line_and_bounds_the_head() -> None:
    assert head_end(b"GET / HTTP/1.1\r\nhost: a\r\n\r\nbody") == 27
    assert head_end(b"GET / HTTP/1.1\r\nhost: a\r\n") == -1
    with pytest.raises(FramingError):
        head_end(b"x" * (MAX_HEAD_BYTES + 1))
    with pytest.raises(FramingError):
        head_end(b"x" * (MAX_HEAD_BYTES + 1) + b"\r\n\r\n")


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ([], None),
        ([(b"content-length", b"12")], 12),
        ([(b"content-length", b"5, 5")], 5),
        ([(b"content-length", b"5"), (b"content-length", b"5")], 5),
        ([(b"transfer-encoding", b"Chunked")], CHUNKED),
    ],
)
def test_body_length(fields: list[tuple[bytes, bytes]], expected: int | None) -> None:
    assert body_length(fields) == expected


@pytest.mark.parametrize(
    "fields",
    [
        [(b"content-length", b"5"), (b"transfer-encoding", b"chunked")],
        [(b"content-length", b"5, 6")],
        [(b"content-length", b"5"), (b"content-length", b"6")],
        [(b"content-length", b"-1")],
        [(b"content-length", b"0x10")],
        [(b"transfer-encoding", b"gzip, chunked")],
        [(b"transfer-encoding", b"identity")],
    ],
)
def test_ambiguous_or_unsupported_lengths_are_refused(fields: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(FramingError):
        body_length(fields)


def test_tokens_and_values() -> None:
    assert has_token([(b"connection", b"keep-alive, Close")], b"connection", b"close")
    assert not has_token([(b"connection", b"closed")], b"connection", b"close")
    assert valid_value(b"a\tb c")
    assert not valid_value(b"a\r\nb")


CHUNKED_BODY = b"5\r\nhello\r\n6;name=value\r\n world\r\n0\r\nTrailer: x\r\n\r\nNEXT"


@given(cuts=st.lists(st.integers(min_value=0, max_value=len(CHUNKED_BODY)), max_size=12))
def test_chunked_decoding_does_not_depend_on_how_the_bytes_are_split(cuts: list[int]) -> None:
    decoder = ChunkedDecoder()
    payload = b""
    edges = [0, *sorted(cuts), len(CHUNKED_BODY)]
    for start, end in itertools.pairwise(edges):
        payload += decoder.feed(CHUNKED_BODY[start:end])
    assert payload == b"hello world"
    assert decoder.done
    assert decoder.rest == b"NEXT"


@pytest.mark.parametrize(
    "data",
    [
        b"zz\r\n",  # not hex
        b"3\r\nabcd\r\n",  # longer than declared
        b"1" * 2000,  # a size line that never ends
    ],
)
def test_broken_chunked_framing_is_refused(data: bytes) -> None:
    with pytest.raises(FramingError):
        ChunkedDecoder().feed(data)
