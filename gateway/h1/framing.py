"""HTTP/1.1 framing shared by the server and the target client: heads and chunked bodies.

Pure functions and one incremental decoder, no I/O (the sockets are in `serve.py` and
`client.py`). They accept what RFC 9112 allows and refuse the rest with `FramingError`,
the way h11 does, with the checks that matter for a proxy: no obsolete line folding, no
control characters in values, one unambiguous body length.
"""

from __future__ import annotations

import re

MAX_HEAD_BYTES = 64 * 1024
MAX_CHUNK_LINE_BYTES = 1024

Headers = list[tuple[bytes, bytes]]

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
# A field line: a token, a colon, optional whitespace, a value without control characters
# (horizontal tab allowed), optional whitespace. Folded lines start with whitespace and
# therefore never match.
_FIELD = re.compile(
    rb"(" + _TOKEN + rb"):[ \t]*((?:[^\x00-\x08\x0a-\x1f\x7f]*[^\x00-\x20\x7f])?)[ \t]*"
)
_VALUE = re.compile(rb"[^\x00-\x08\x0a-\x1f\x7f]*")
# A method or a field name.
TOKEN = re.compile(_TOKEN)
# Answers that never have a body, whatever their head says (besides 1xx).
NO_BODY_STATUSES = frozenset({204, 304})
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([^\x00-\x20\x7f]+) HTTP/1\.([01])")
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: [^\x00-\x08\x0a-\x1f\x7f]*)?")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,15})[ \t]*(?:;[^\r\n]*)?")


class FramingError(Exception):
    """Bytes that are not HTTP/1.1 as this gateway accepts it; the message says why."""


def head_end(buffer: bytes | bytearray) -> int:
    """Where the head in `buffer` ends (just past its blank line), or -1 if incomplete."""
    at = buffer.find(b"\r\n\r\n")
    if at < 0:
        if len(buffer) > MAX_HEAD_BYTES:
            raise FramingError(f"the head is longer than {MAX_HEAD_BYTES} bytes")
        return -1
    if at > MAX_HEAD_BYTES:
        raise FramingError(f"the head is longer than {MAX_HEAD_BYTES} bytes")
    return at + 4


def parse_fields(lines: list[bytes]) -> Headers:
    """Field lines as `(lowercased name, value)` pairs, in order."""
    fields: Headers = []
    match = _FIELD.fullmatch
    for line in lines:
        found = match(line)
        if found is None:
            raise FramingError(f"malformed header line {bytes(line[:80])!r}")
        fields.append((found[1].lower(), found[2]))
    return fields


def parse_request_head(head: bytes) -> tuple[bytes, bytes, int, Headers]:
    """`(method, target, minor version, fields)` of a request head (without its blank line)."""
    lines = head.split(b"\r\n")
    found = _REQUEST_LINE.fullmatch(lines[0])
    if found is None:
        raise FramingError(f"malformed request line {bytes(lines[0][:80])!r}")
    return found[1], found[2], int(found[3]), parse_fields(lines[1:])


def parse_response_head(head: bytes) -> tuple[int, int, Headers]:
    """`(status, minor version, fields)` of a response head (without its blank line)."""
    lines = head.split(b"\r\n")
    found = _STATUS_LINE.fullmatch(lines[0])
    if found is None:
        raise FramingError(f"malformed status line {bytes(lines[0][:80])!r}")
    return int(found[2]), int(found[1]), parse_fields(lines[1:])


def valid_value(value: bytes) -> bool:
    """Whether `value` can be written in a header (no CR, LF or other control bytes)."""
    return _VALUE.fullmatch(value) is not None


def body_length(fields: Headers) -> int | None:
    """The declared body length: a number, `CHUNKED` (-1), or None when neither is given.

    Both headers at once, several different lengths, or a coding other than chunked are
    refused: a proxy that guessed here would let two parties disagree on where a body ends.
    """
    length: bytes | None = None
    coding: bytes | None = None
    for name, value in fields:
        if name == b"content-length":
            for part in value.split(b","):
                part = part.strip()
                if not part.isdigit() or len(part) > 18:
                    raise FramingError(f"Content-Length {bytes(value[:40])!r} is not a number")
                if length is not None and part != length:
                    raise FramingError("conflicting Content-Length headers")
                length = part
        elif name == b"transfer-encoding":
            coding = value if coding is None else coding + b"," + value
    if coding is not None:
        if length is not None:
            raise FramingError("both Content-Length and Transfer-Encoding are set")
        if coding.strip().lower() != b"chunked":
            raise FramingError(f"unsupported Transfer-Encoding {bytes(coding[:40])!r}")
        return CHUNKED
    return None if length is None else int(length)


CHUNKED = -1


def has_token(fields: Headers, name: bytes, token: bytes) -> bool:
    """Whether a comma-separated header (`connection`, `expect`) lists `token`."""
    for key, value in fields:
        if key == name and token in [t.strip().lower() for t in value.split(b",")]:
            return True
    return False


class ChunkedDecoder:
    """Incremental decoder of a chunked body: feed bytes, get payload bytes.

    `done` turns true after the last chunk and its trailer section; the bytes that came
    after it are in `rest`. Chunk extensions and trailer fields are read and dropped.
    """

    __slots__ = ("_buffer", "_left", "_state", "done", "rest")

    _SIZE, _DATA, _DATA_END, _TRAILER = range(4)

    def __init__(self) -> None:
        self._buffer = b""
        self._left = 0
        self._state = self._SIZE
        self.done = False
        self.rest = b""

    def feed(self, data: bytes) -> bytes:
        """The payload bytes found in `data` (possibly empty), in order."""
        if self.done:
            self.rest += data
            return b""
        buffer = self._buffer + data if self._buffer else data
        self._buffer = b""
        out: list[bytes] = []
        at = 0
        end = len(buffer)
        while at < end:
            state = self._state
            if state == self._DATA:
                take = min(self._left, end - at)
                out.append(buffer[at : at + take])
                at += take
                self._left -= take
                if self._left == 0:
                    self._state = self._DATA_END
            elif state == self._SIZE:
                line_end = buffer.find(b"\r\n", at)
                if line_end < 0:
                    self._keep(buffer, at)
                    break
                found = _CHUNK_SIZE.fullmatch(buffer, at, line_end)
                if found is None:
                    raise FramingError(f"malformed chunk size line {bytes(buffer[at : at + 40])!r}")
                self._left = int(found[1], 16)
                at = line_end + 2
                self._state = self._DATA if self._left else self._TRAILER
            elif state == self._DATA_END:
                if end - at < 2:
                    self._keep(buffer, at)
                    break
                if buffer[at : at + 2] != b"\r\n":
                    raise FramingError("a chunk is longer than its declared size")
                at += 2
                self._state = self._SIZE
            else:  # trailer section: field lines up to an empty line
                line_end = buffer.find(b"\r\n", at)
                if line_end < 0:
                    self._keep(buffer, at)
                    break
                empty = line_end == at
                at = line_end + 2
                if empty:
                    self.done = True
                    self.rest = bytes(buffer[at:])
                    break
        return b"".join(out) if len(out) != 1 else out[0]

    def _keep(self, buffer: bytes, at: int) -> None:
        kept = bytes(buffer[at:])
        if len(kept) > MAX_CHUNK_LINE_BYTES:
            raise FramingError(f"a chunk size or trailer line is over {MAX_CHUNK_LINE_BYTES} bytes")
        self._buffer = kept
