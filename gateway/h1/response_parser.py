"""Answers as llhttp reads them: feed the bytes of one upstream answer, get its head and
its body pieces.

llhttp (through `httptools`) frames the answer: status line, field lines, Content-Length
(digits only, one value), chunked bodies and trailers, the answers that have no body
(1xx, 204, 304). What it lets through and a proxy must not, this module refuses or
drops (ADR 0016): statuses outside 100-599, `101` (nothing asked to switch), versions
other than 1.0 and 1.1, Transfer-Encoding other than `chunked` or on HTTP/1.0, and the
hop-by-hop fields (`Connection`, those it names, `Proxy-Connection`, `Keep-Alive`,
`TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`), which never reach a client; a 204's
Content-Length is dropped too. Interim (1xx) answers are skipped. No I/O here.
"""

from __future__ import annotations

import httptools

from gateway.h1.framing import MAX_HEAD_BYTES, Headers

_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
MAX_TRAILER_FIELDS = 64


class FramingError(Exception):
    """The upstream's bytes are not an HTTP/1.1 answer this gateway accepts."""


class _Stop(Exception):
    """Raised in a callback to stop llhttp where the answer ends for us."""


class ResponseParser:
    """One answer: `feed` bytes until `head_done`, then body pieces appear in `pieces`
    until `done`. `head_only` is for answers to HEAD, whose head ends them.

    `length` is the declared Content-Length (None when chunked or read until close);
    `until_close` says the body ends with the connection; `extra` that bytes came after
    the end of the answer (the connection is out of step and must not be reused).
    """

    __slots__ = (
        "_fed",
        "_fields",
        "_head_bytes",
        "_head_only",
        "_head_size",
        "_heads",
        "_interim",
        "_overhead",
        "_parser",
        "_start",
        "_trailers",
        "chunked",
        "done",
        "extra",
        "head_done",
        "headers",
        "keep_alive",
        "length",
        "pieces",
        "status",
        "until_close",
    )

    def __init__(self, *, head_only: bool = False) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._head_only = head_only
        self._fields: Headers = []
        self._head_bytes = 0
        self._head_size = 0
        self._heads = 0
        # An answer to HEAD keeps its bytes, to find where its head ends (see below).
        self._fed: bytearray | None = bytearray() if head_only else None
        self._interim = False
        self._overhead = 0  # body bytes fed less payload: bounded, as on the server leg
        self._start: bytes | None = b""  # the answer's first bytes, until checked
        self._trailers = 0
        self.status = 0
        self.headers: Headers = []
        self.head_done = False
        self.done = False
        self.extra = False
        self.keep_alive = False
        self.chunked = False
        self.length: int | None = None
        self.until_close = False
        self.pieces: list[bytes] = []

    def feed(self, data: bytes) -> None:
        """Parse `data`; raises `FramingError` on anything malformed."""
        if self.done:
            self.extra = True
            return
        if self.head_done:
            self._overhead += len(data)
        if self._fed is not None:
            self._fed += data
        if self._start is not None:
            # llhttp also reads RTSP/ and ICE/ status lines; an HTTP answer starts so.
            start = self._start = self._start + data[:5]
            if len(start) >= 5:
                if not start.startswith(b"HTTP/"):
                    raise FramingError(f"its status line starts with {start[:5]!r}")
                self._start = None
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, FramingError):
                raise cause from None
            if not isinstance(cause, _Stop):  # pragma: no cover - nothing else is raised
                raise
        except httptools.HttpParserUpgrade:
            # A 101 with Upgrade is refused in `on_headers_complete`; this is reached
            # only if llhttp pauses for an upgrade without calling it.
            raise FramingError("it switched protocols unasked") from None
        except httptools.HttpParserError as exc:
            raise FramingError(str(exc) or type(exc).__name__) from None
        if self._overhead > MAX_HEAD_BYTES and not self.done:
            raise FramingError(f"over {MAX_HEAD_BYTES} bytes of chunk framing or trailers")
        if not self.head_done:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                raise FramingError(f"its head is over {MAX_HEAD_BYTES} bytes")

    def take(self) -> bytes:
        """The body bytes parsed so far and not yet taken."""
        pieces = self.pieces
        if not pieces:
            return b""
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        pieces.clear()
        return data

    # llhttp callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.done:
            self.extra = True
            raise _Stop
        self._fields = []
        self._head_size = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.head_done:
            self._fields.append((name.lower(), value.rstrip(b" \t")))
            self._head_size += len(name) + len(value) + 4
            return
        self._trailers += 1  # llhttp checked their syntax; trailers are dropped
        if self._trailers > MAX_TRAILER_FIELDS:
            raise FramingError(f"more than {MAX_TRAILER_FIELDS} trailer fields")

    def on_headers_complete(self) -> None:
        self._heads += 1
        if self._head_size > MAX_HEAD_BYTES:
            raise FramingError(f"its head is over {MAX_HEAD_BYTES} bytes")
        parser = self._parser
        status: int = parser.get_status_code()
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise FramingError(f"HTTP version {version} in its status line")
        if status < 100 or status > 599:
            raise FramingError(f"status {status:03d} is not a valid status")
        if status == 101:
            raise FramingError("it switched protocols unasked")
        if status < 200:
            self._interim = True  # 100, 102, 103: another head follows
            return
        minor = 1 if version == "1.1" else 0
        fields = self._fields
        close = minor == 0
        named: set[bytes] = set()
        coding: bytes | None = None
        for name, value in fields:
            if name == b"connection":
                for token in value.lower().split(b","):
                    token = token.strip()
                    if token == b"close":
                        close = True
                    elif token == b"keep-alive" and minor == 0:
                        close = False
                    named.add(token)
            elif name == b"transfer-encoding":
                coding = value if coding is None else coding + b"," + value
            elif name == b"content-length":
                self.length = int(value)  # llhttp has checked it is digits, once
        if coding is not None:
            if minor == 0:
                raise FramingError("Transfer-Encoding in an HTTP/1.0 answer")
            if coding.lower() != b"chunked":
                raise FramingError(f"unsupported Transfer-Encoding {coding[:40]!r}")
            self.chunked = True
        drop = _HOP_BY_HOP | named if named else _HOP_BY_HOP
        if status == 204:
            drop = drop | {b"content-length"}
        self.headers = [(name, value) for name, value in fields if name not in drop]
        self.status = status
        self.keep_alive = not close and minor == 1
        self.head_done = True
        no_body = self._head_only or status == 204 or status == 304
        if no_body:
            self.length = 0
        elif not self.chunked and self.length is None:
            self.until_close = True
            self.keep_alive = False
        if self._fed is not None:
            # llhttp would wait for the body a GET would have: the answer ends with its
            # head, which (CRLF line ends being enforced) ends at the blank line that
            # ends this answer's last head. Anything after it puts the connection out
            # of step.
            end = -4
            for _ in range(self._heads):
                end = self._fed.find(b"\r\n\r\n", end + 4)
            self.extra = end < 0 or end + 4 != len(self._fed)
            self.done = True
            raise _Stop

    def on_body(self, piece: bytes) -> None:
        self.pieces.append(piece)
        self._overhead -= 9 * len(piece)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            self._head_bytes = 0
            return
        self.done = True
