"""The NDJSON splitter and the passthrough frame watcher: pure, so tested byte by byte."""

import json

import pytest

from gateway.target.ndjson import FrameWatch, LineTooLong, NdjsonSplitter

LINES = [
    {"message": {"content": "a\u2028b"}, "done": False},
    {"message": {"content": "c\u0085d\re"}, "done": False},
    {"done": True, "done_reason": "stop", "eval_count": 2},
]
STREAM = b"".join(json.dumps(line, ensure_ascii=False).encode() + b"\n" for line in LINES)


def test_u2028_u0085_and_cr_inside_strings_stay_one_line() -> None:
    lines = NdjsonSplitter().feed(STREAM)
    assert [json.loads(line) for line in lines] == LINES


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64])
def test_chunk_boundaries_anywhere(size: int) -> None:
    splitter = NdjsonSplitter()
    lines: list[bytes] = []
    for start in range(0, len(STREAM), size):
        lines += splitter.feed(STREAM[start : start + size])
    assert splitter.close() is None
    assert [json.loads(line) for line in lines] == LINES


def test_crlf_line_ends_decode() -> None:
    lines = NdjsonSplitter().feed(b'{"a":1}\r\n{"a":2}\r\n')
    assert [json.loads(line) for line in lines] == [{"a": 1}, {"a": 2}]


def test_blank_lines_skipped_and_unterminated_tail_returned_on_close() -> None:
    splitter = NdjsonSplitter()
    assert splitter.feed(b'\n\n{"a":1}\n{"a"') == [b'{"a":1}']
    assert splitter.feed(b":2}") == []
    assert splitter.close() == b'{"a":2}'
    assert splitter.close() is None


def test_line_at_the_bound_passes_and_one_byte_more_fails() -> None:
    limit = 1024
    assert NdjsonSplitter(limit).feed(b"x" * limit + b"\n") == [b"x" * limit]
    with pytest.raises(LineTooLong):
        NdjsonSplitter(limit).feed(b"x" * (limit + 1) + b"\n")


def test_over_long_partial_line_fails_without_waiting_for_newline() -> None:
    splitter = NdjsonSplitter(1024)
    splitter.feed(b"x" * 1000)
    with pytest.raises(LineTooLong):
        splitter.feed(b"x" * 25)


def test_default_bound_is_4_mib() -> None:
    splitter = NdjsonSplitter()
    with pytest.raises(LineTooLong):
        splitter.feed(b"x" * (4 * 1024 * 1024 + 1))


@pytest.mark.parametrize("size", [1, 5, 16, 1000])
def test_frame_watch_keeps_last_line_and_mid_line_state(size: int) -> None:
    watch = FrameWatch()
    for start in range(0, len(STREAM), size):
        watch.feed(STREAM[start : start + size])
    assert json.loads(watch.last_line) == LINES[-1]
    assert watch.lines == 3
    assert not watch.mid_line
    watch.feed(b'{"partial":')
    assert watch.mid_line


def test_frame_watch_bounds_a_line_spanning_chunks() -> None:
    watch = FrameWatch(max_line_bytes=100)
    watch.feed(b"x" * 60)
    with pytest.raises(LineTooLong):
        watch.feed(b"x" * 41)
    watch = FrameWatch(max_line_bytes=100)
    watch.feed(b"x" * 60)
    with pytest.raises(LineTooLong):
        watch.feed(b"y" * 41 + b"\n")


def test_frame_watch_bounds_a_spanning_line_followed_by_more_lines_in_one_chunk() -> None:
    # The end of an over-long line can arrive in the same read as the lines after it.
    watch = FrameWatch(max_line_bytes=100)
    watch.feed(b"x" * 90)
    with pytest.raises(LineTooLong):
        watch.feed(b"x" * 20 + b'\n{"a":1}\n{"a":2}\n')


def test_frame_watch_last_line_when_one_chunk_holds_several_lines_after_a_partial() -> None:
    watch = FrameWatch()
    watch.feed(b'{"a":')
    watch.feed(b'1}\n{"b":2}\n{"c":')
    assert watch.last_line == b'{"b":2}'
    assert watch.mid_line
    watch.feed(b"3}\n")
    assert watch.last_line == b'{"c":3}'
    assert watch.lines == 3
