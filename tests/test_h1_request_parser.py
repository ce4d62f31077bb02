"""Requests as llhttp reads them (`gateway.h1.request_parser`): pure, no sockets.

Each refusal here is one llhttp lets through, or one the audit of issue 13 found."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.h1.request_parser import END, Head, Refusal, RequestParser


def parse(data: bytes, cuts: list[int] | None = None) -> list[object]:
    parser = RequestParser()
    at = 0
    for cut in sorted(cuts or []):
        parser.feed(data[at:cut])
        at = cut
    parser.feed(data[at:])
    out: list[object] = []
    for event in parser.events:
        if isinstance(event, Head):
            out.append((event.method, event.path, event.query, event.minor, event.keep_alive))
        elif isinstance(event, Refusal):
            out.append((event.status, event.message))
        elif event is END:
            out.append("end")
        else:
            if out and isinstance(out[-1], bytes):
                out[-1] += event
            else:
                out.append(event)
    return out


PIPELINE = (
    b"POST /a?x=1 HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n\r\nhello"
    b"POST /b HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3;ext=1\r\nabc\r\n4\r\ndefg\r\n0\r\nX-Trailer: t\r\n\r\n"
    b"GET /c HTTP/1.0\r\n\r\n"
)
EXPECTED = [
    (b"POST", b"/a", b"x=1", 1, True),
    b"hello",
    "end",
    (b"POST", b"/b", b"", 1, True),
    b"abcdefg",
    "end",
    (b"GET", b"/c", b"", 0, False),
    "end",
]


@given(st.lists(st.integers(min_value=1, max_value=len(PIPELINE) - 1), max_size=12))
def test_events_do_not_depend_on_how_the_bytes_are_split(cuts: list[int]) -> None:
    assert parse(PIPELINE, cuts) == EXPECTED


def test_fields_are_lowercased_and_trimmed() -> None:
    parser = RequestParser()
    parser.feed(b"GET / HTTP/1.1\r\nHost: gw \t\r\nX-Empty:\r\nX-A:  b c  \r\n\r\n")
    head = parser.events[0]
    assert isinstance(head, Head)
    assert head.headers == [(b"host", b"gw"), (b"x-empty", b""), (b"x-a", b"b c")]


@pytest.mark.parametrize(
    ("data", "status", "says"),
    [
        # The desync of issue 13: TE on HTTP/1.0 with keep-alive hid a second request.
        (
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n"
            b"0\r\n\r\nGET /hidden HTTP/1.1\r\nHost: gw\r\n\r\n",
            400,
            "Transfer-Encoding in HTTP/1.0",
        ),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "more than one Host"),
        (b"GET / HTTP/1.1\r\n\r\n", 400, "without a Host"),
        (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400, "Host header is not valid"),
        (b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", 400, "Host header is not valid"),
        (b"GET http://host#/api/ps HTTP/1.1\r\nHost: a\r\n\r\n", 400, ""),
        (b"GET /api/ps#x HTTP/1.1\r\nHost: a\r\n\r\n", 400, "fragment"),
        (b"GET http:///api/ps HTTP/1.1\r\nHost: a\r\n\r\n", 400, ""),
        (b"GET ftp://h/api/ps HTTP/1.1\r\nHost: a\r\n\r\n", 400, ""),
        (b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400, "not a path"),
        (b"GET / HTTP/1.1\nHost: a\n\n", 400, "malformed HTTP request"),  # bare LF
        (b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n", 400, "malformed HTTP request"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n folded\r\n\r\n", 400, "whitespace"),
        (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400, "header token"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", 400, "header value char"),
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505, "HTTP version 2.0"),
        (b"GET / HTTP/0.9\r\nHost: a\r\n\r\n", 505, "HTTP version 0.9"),
        (b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", 400, "version"),
        (b"CONNECT gw:443 HTTP/1.1\r\nHost: gw\r\n\r\n", 501, "CONNECT"),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n", 400, ""),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\nabc", 400, "Content-Length"),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -3\r\n\r\n", 400, "Content-Length"),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            400,
            "Content-Length",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            400,
            "unsupported Transfer-Encoding",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            400,
            "",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: x\r\n"
            b"Content-Length: 2\r\n\r\nab",
            400,
            "upgrade",
        ),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, "malformed HTTP request"),
    ],
)
def test_what_a_proxy_must_not_accept_is_refused(data: bytes, status: int, says: str) -> None:
    events = parse(data)
    refusal = events[-1]
    assert isinstance(refusal, tuple)
    assert refusal[0] == status, events
    assert says in refusal[1]
    assert not any(isinstance(e, tuple) and len(e) == 5 for e in events), events


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"3 \r\nabc\r\n0\r\n\r\n", "chunk size"),
        (b"3\r\nabcd\r\n0\r\n\r\n", "chunk data"),
        (b"3\nabc\n0\n\n", "CR"),
        (b"fffffffffffffffff\r\n", "overflow"),
        (b"3\r\nabc\r\n0\r\nBad Trailer\r\n\r\n", "header token"),  # trailers are checked
        (b"0\r\n" + b"X-T: 1\r\n" * 65 + b"\r\n", "trailer fields"),
        # Found while writing this suite: a trailer value (or a chunk extension) that
        # never ends was gathered whole by httptools, at a quadratic cost.
        (b"1\r\na\r\n0\r\nX-T: " + b"a" * 70_000, "chunk framing"),
        (b"1;" + b"x" * 70_000, "chunk framing"),
    ],
)
def test_broken_chunked_bodies_are_refused(body: bytes, says: str) -> None:
    head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    events = parse(head + body, list(range(len(head), len(head) + len(body), 4096)))
    assert events[0] == (b"POST", b"/", b"", 1, True)
    refusal = events[-1]
    assert isinstance(refusal, tuple)
    assert says in refusal[1], events
    assert "end" not in events


@pytest.mark.parametrize(
    ("target", "path", "query"),
    [
        (b"http://host?/api/ps", b"/", b"/api/ps"),  # issue 13: routed to /api/ps
        (b"http://host:11434/api/ps?x=1", b"/api/ps", b"x=1"),
        (b"HTTPS://[::1]:8/api/tags", b"/api/tags", b""),
        (b"http://host", b"/", b""),
    ],
)
def test_absolute_form_targets_keep_only_their_path(
    target: bytes, path: bytes, query: bytes
) -> None:
    events = parse(b"GET " + target + b" HTTP/1.1\r\nHost: host\r\n\r\n")
    assert events == [(b"GET", path, query, 1, True), "end"]


def test_a_body_less_upgrade_request_is_served_as_a_plain_request() -> None:
    events = parse(
        b"GET /a HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n"
        b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    assert events == [(b"GET", b"/a", b"", 1, True), "end", (b"GET", b"/b", b"", 1, True), "end"]


def test_nothing_is_read_after_a_request_that_closes() -> None:
    events = parse(
        b"GET /a HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    assert events == [(b"GET", b"/a", b"", 1, False), "end"]
    events = parse(b"GET /a HTTP/1.0\r\n\r\nGARBAGE")
    assert events == [(b"GET", b"/a", b"", 0, False), "end"]


def test_heads_are_bounded_whether_they_end_or_not() -> None:
    big = b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 70_000
    assert parse(big)[-1] == (431, "request head too large: over 65536 bytes")
    assert parse(big + b"\r\n\r\n", [65_536])[-1][0] == 431  # type: ignore[index]
    many = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-A: b\r\n" * 9000 + b"\r\n"
    assert parse(many)[-1][0] == 431  # type: ignore[index]
    assert parse(b"\r\n" * 40_000)[-1][0] in (400, 431)  # type: ignore[index]


class _Counting:
    """Stands between `RequestParser` and llhttp, counting the bytes llhttp is given."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.fed = 0

    def feed_data(self, data: bytes) -> None:
        self.fed += len(data)
        self.inner.feed_data(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_head_parsing_is_linear_in_the_head_size() -> None:
    # Issue 13: a 60 KB head sent a byte at a time cost over a second of CPU, because the
    # buffered head was searched again from its start at every read. Every byte now goes
    # to llhttp once, and llhttp keeps its state between calls.
    head = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-Field: value\r\n" * 3700 + b"\r\n"
    parser = RequestParser()
    counting = _Counting(parser._parser)
    parser._parser = counting  # type: ignore[assignment]
    for at in range(len(head)):
        parser.feed(head[at : at + 1])
    assert isinstance(parser.events[0], Head)
    assert counting.fed == len(head)


def test_a_method_llhttp_does_not_know_still_reaches_the_app() -> None:
    # The app answers 405 in its route's own error shape (OpenAI's on /v1/...).
    assert parse(b"BREW /v1/x HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi") == [
        (b"BREW", b"/v1/x", b"", 1, True),
        b"hi",
        "end",
    ]
    # Pipelined behind another request in the same read, llhttp refuses it.
    events = parse(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nBREW / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert events[:2] == [(b"GET", b"/a", b"", 1, True), "end"]
    assert events[2][0] == 400  # type: ignore[index]


def test_one_byte_chunks_are_not_mistaken_for_a_framing_flood() -> None:
    body = b"".join(b"1\r\n%c\r\n" % (97 + i % 26) for i in range(20_000)) + b"0\r\n\r\n"
    head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    events = parse(head + body, list(range(len(head), len(head) + len(body), 65536)))
    assert events[-1] == "end"
    assert len(events[1]) == 20_000  # type: ignore[arg-type]
