"""The SSE splitter: framing only, byte by byte."""

import pytest

from gateway.providers.sse import DONE, SseSplitter, sse_event

STREAM = (
    b'data: {"a":1}\n\n: keep-alive comment\n\ndata: {"b":\ndata: 2}\n\nevent: x\ndata: [DONE]\n\n'
)


@pytest.mark.parametrize("size", [1, 2, 5, 1000])
def test_events_across_any_chunking(size: int) -> None:
    splitter = SseSplitter()
    events: list[bytes] = []
    for start in range(0, len(STREAM), size):
        events += splitter.feed(STREAM[start : start + size])
    assert events == [b'{"a":1}', b'{"b":\n2}', b"[DONE]"]


def test_crlf_and_cr_line_ends() -> None:
    assert SseSplitter().feed(b"data: x\r\n\r\ndata: y\r\rdata: z\n\n") == [b"x", b"y", b"z"]


def test_a_line_over_the_bound_fails() -> None:
    with pytest.raises(ValueError, match="longer than"):
        SseSplitter(max_event_bytes=10).feed(b"data: " + b"x" * 20)


def test_event_helpers() -> None:
    assert sse_event(b"{}") == b"data: {}\n\n"
    assert DONE == b"data: [DONE]\n\n"


def test_crlf_split_across_chunks_keeps_a_multi_line_event_whole() -> None:
    stream = b"data: a\r\ndata: b\r\n\r\n"
    splitter = SseSplitter()
    events: list[bytes] = []
    for byte in stream:
        events += splitter.feed(bytes([byte]))
    assert events == [b"a\nb"]
