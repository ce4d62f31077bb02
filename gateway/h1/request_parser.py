"""Requests as llhttp reads them: feed the bytes of one client connection, get events.

llhttp (Node.js's parser, through `httptools`) does the framing: request lines, field
lines, Content-Length and chunked bodies, trailers. It runs with none of its "dangerous
leniencies" (bare LF, obsolete folding, CL with TE, spaces in chunk sizes are all
errors). What it still lets through and a proxy must not, this module refuses (ADR 0016):
HTTP versions other than 1.0 and 1.1, Transfer-Encoding on HTTP/1.0 or other than exactly
`chunked`, a missing, repeated or malformed `Host`, fragments and anything but origin,
absolute (`http`/`https`) and `OPTIONS *` targets, `CONNECT`, a body on an upgrade
request, and heads or trailer sections over their bounds.

No I/O here, so it is tested alone and against h11 (`tests/test_h1_differential.py`).
The cost is linear in the bytes fed, however they are split.
"""

from __future__ import annotations

import functools
import re
from collections import deque
from typing import Final

import httptools

from gateway.h1.framing import MAX_HEAD_BYTES, TOKEN, Headers, has_token

# The end of a request's body; it follows the body's last bytes in `RequestParser.events`.
END: Final = None
MAX_TRAILER_FIELDS = 64
MAX_OVERHEAD_BYTES = MAX_HEAD_BYTES
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]*)(?::[0-9]*)?")
_SCHEMES = (b"http://", b"https://")
_HEAD, _BODY, _IDLE = range(3)


class Head:
    """A request head, checked: what the ASGI scope is made of."""

    __slots__ = (
        "chunked",
        "expect_continue",
        "has_body",
        "headers",
        "keep_alive",
        "method",
        "minor",
        "path",
        "query",
    )

    def __init__(
        self,
        method: bytes,
        path: bytes,
        query: bytes,
        minor: int,
        headers: Headers,
        *,
        keep_alive: bool,
        has_body: bool,
        chunked: bool,
        expect_continue: bool,
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.minor = minor
        self.headers = headers
        self.keep_alive = keep_alive
        self.has_body = has_body
        self.chunked = chunked
        self.expect_continue = expect_continue


class Refusal:
    """Where the stream stops being HTTP as this gateway accepts it: the status and the
    message to answer with (then close)."""

    __slots__ = ("message", "status")

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message


Event = Head | bytes | Refusal | None


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.refusal = Refusal(status, message)


class RequestParser:
    """Feed bytes with `feed`; take events from `events` in order: a `Head`, its body as
    `bytes` pieces, `END`; the next request's `Head`... A `Refusal` is the last event.

    `stopped` turns true after a refusal (then `refused` too) or after a request that
    closes the connection: bytes fed after that are ignored (they are not this
    connection's to interpret).
    `queued_body` counts body bytes in `events`, for the reader's backpressure.
    """

    __slots__ = (
        "_fields",
        "_head_bytes",
        "_head_size",
        "_keep_alive",
        "_method",
        "_overhead",
        "_parser",
        "_pieces",
        "_state",
        "_trailers",
        "_url",
        "events",
        "queued_body",
        "refused",
        "stopped",
    )

    def __init__(self) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self.events: deque[Event] = deque()
        self.queued_body = 0
        self.stopped = False
        self.refused = False
        self._state = _IDLE
        self._fields: Headers = []
        self._url = b""
        self._pieces: list[bytes] = []
        self._head_bytes = 0  # fed since the last head ended, while no body was being read
        self._head_size = 0  # of the head being read, as its parts were parsed
        self._trailers = 0
        self._keep_alive = True
        self._method: bytes | None = None  # a method llhttp does not know, see `feed`
        # Bytes fed while reading a body, less its payload: chunk lines, extensions,
        # trailers. llhttp does not bound them (and httptools gathers a trailer value
        # whole, at a quadratic cost), so they are bounded here.
        self._overhead = 0

    @property
    def in_request(self) -> bool:
        """Part of a request has been fed and its end has not."""
        return self._state != _IDLE

    def feed(self, data: bytes) -> None:
        """Parse `data`; its events are appended to `events`."""
        if self.stopped:
            return
        if self._state == _IDLE:
            data = self._unknown_method(data)
        elif self._state == _BODY:
            self._overhead += len(data)
        try:
            self._feed(data)
        except _Refused as exc:
            self._refuse(exc.refusal)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Refused):
                self._refuse(cause.refusal)
            else:  # pragma: no cover - our callbacks raise nothing else
                raise
        except httptools.HttpParserError as exc:
            if not self.stopped:  # after a closing request, the rest is not ours
                self._refuse(Refusal(400, f"malformed HTTP request: {_reason(exc)}"))
        self._flush()
        if self._state == _BODY and self._overhead > MAX_OVERHEAD_BYTES:
            self._refuse(
                Refusal(
                    400,
                    f"malformed HTTP request: over {MAX_OVERHEAD_BYTES} bytes of"
                    " chunk framing, extensions or trailers",
                )
            )
        if self._state != _BODY and not self.stopped:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse(Refusal(431, f"request head too large: over {MAX_HEAD_BYTES} bytes"))

    def _unknown_method(self, data: bytes) -> bytes:
        """llhttp knows only registered methods; any other token must still reach the
        app, which answers 405 in its route's own error shape. When a request starts a
        read (as it does unless pipelined), its method is read here, and llhttp is shown
        `GET` in its place: for a request, the method never changes the framing llhttp
        applies (CONNECT, the one that does, is known to it). A pipelined request with an
        unknown method is refused by llhttp (400)."""
        self._method = None
        start = len(data) - len(data.lstrip(b"\r\n"))
        space = data.find(b" ", start, start + 33)
        if space < 0:
            return data
        method = data[start:space]
        if _known(method) or TOKEN.fullmatch(method) is None:
            return data
        self._method = method
        return data[:start] + b"GET" + data[space:]

    def _feed(self, data: bytes) -> None:
        while True:
            try:
                self._parser.feed_data(data)
                return
            except httptools.HttpParserUpgrade as exc:
                # A request asking for an upgrade (the body-less ones get this far): the
                # upgrade is not served, the request is, and parsing goes on after it.
                offset = int(exc.args[0])
                if self.stopped:
                    return
                data = data[offset:]
                if not data:
                    return

    def _refuse(self, refusal: Refusal) -> None:
        self._flush()
        self.events.append(refusal)
        self.stopped = self.refused = True

    def _flush(self) -> None:
        pieces = self._pieces
        if pieces:
            body = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            pieces.clear()
            self.events.append(body)
            self.queued_body += len(body)

    # llhttp callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._state = _HEAD
        self._fields = []
        self._url = b""
        self._trailers = 0
        self._head_size = 0

    def on_url(self, piece: bytes) -> None:
        self._url += piece
        self._head_size += len(piece) + 16  # with the method and version

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._state == _HEAD:
            self._fields.append((name.lower(), value.rstrip(b" \t")))
            self._head_size += len(name) + len(value) + 4
            return
        self._trailers += 1  # trailer fields: llhttp checked their syntax; dropped
        if self._trailers > MAX_TRAILER_FIELDS:
            raise _Refused(431, f"more than {MAX_TRAILER_FIELDS} trailer fields")

    def on_headers_complete(self) -> None:
        if self._head_size > MAX_HEAD_BYTES:
            raise _Refused(431, f"request head too large: over {MAX_HEAD_BYTES} bytes")
        head = self._check()
        self._state = _BODY
        self._head_bytes = 0
        self._overhead = 0
        self._keep_alive = head.keep_alive
        self.events.append(head)

    def on_body(self, piece: bytes) -> None:
        self._pieces.append(piece)
        # Framing may be up to 8 bytes per payload byte ("1\r\nx\r\n" is 5).
        self._overhead -= 9 * len(piece)

    def on_message_complete(self) -> None:
        self._flush()
        self.events.append(END)
        self._state = _IDLE
        self._head_bytes = 0
        if not self._keep_alive:
            self.stopped = True

    # The checks llhttp leaves to us --------------------------------------------------

    def _check(self) -> Head:
        parser = self._parser
        version = parser.get_http_version()
        if version == "1.1":
            minor = 1
        elif version == "1.0":
            minor = 0
        else:
            raise _Refused(505, f"HTTP version {version} is not supported")
        method: bytes = self._method or parser.get_method()
        self._method = None
        if method == b"CONNECT":
            raise _Refused(501, "CONNECT is not served")
        fields = self._fields
        hosts = 0
        length: bytes | None = None
        coding: bytes | None = None
        for name, value in fields:
            if name == b"host":
                hosts += 1
                if _HOST.fullmatch(value) is None:
                    raise _Refused(400, "malformed HTTP request: the Host header is not valid")
            elif name == b"transfer-encoding":
                coding = value if coding is None else coding + b"," + value
            elif name == b"content-length":
                length = value
        if hosts > 1:
            raise _Refused(400, "malformed HTTP request: more than one Host header")
        if hosts == 0 and minor == 1:
            raise _Refused(400, "malformed HTTP request: HTTP/1.1 request without a Host header")
        chunked = False
        if coding is not None:
            if minor == 0:
                # RFC 9112 6.1: its framing is faulty; nothing after it can be trusted.
                raise _Refused(400, "malformed HTTP request: Transfer-Encoding in HTTP/1.0")
            if coding.lower() != b"chunked":
                raise _Refused(
                    400,
                    f"malformed HTTP request: unsupported Transfer-Encoding {coding[:40]!r}",
                )
            chunked = True
        has_body = chunked or (length is not None and length.strip(b"0") != b"")
        if has_body and has_token(fields, b"connection", b"upgrade"):
            raise _Refused(400, "malformed HTTP request: a body on an upgrade request")
        path, query = _split_target(self._url, method)
        if minor == 1:
            keep_alive = not has_token(fields, b"connection", b"close")
        else:
            keep_alive = has_token(fields, b"connection", b"keep-alive")
        return Head(
            method,
            path,
            query,
            minor,
            fields,
            keep_alive=keep_alive,
            has_body=has_body,
            chunked=chunked,
            expect_continue=(
                has_body and minor == 1 and has_token(fields, b"expect", b"100-continue")
            ),
        )


@functools.lru_cache(maxsize=64)
def _known(method: bytes) -> bool:
    """Whether llhttp reads `method` as a request method."""
    try:
        httptools.HttpRequestParser(None).feed_data(method + b" / HTTP/1.1\r\n")
    except httptools.HttpParserInvalidMethodError:
        return False
    except httptools.HttpParserError:
        return True
    return True


def _split_target(target: bytes, method: bytes) -> tuple[bytes, bytes]:
    """`(path, query)` of a request target (RFC 9112 3.2): origin form, absolute form
    with an http(s) scheme (its authority is not used for routing), or `OPTIONS *`."""
    if b"#" in target:
        raise _Refused(400, "malformed HTTP request: a fragment in the request target")
    if not target.startswith(b"/"):
        if target[:8].lower().startswith(_SCHEMES):
            rest = target.split(b"//", 1)[1]
            end = len(rest)
            for stop in (b"/", b"?"):
                at = rest.find(stop)
                if 0 <= at < end:
                    end = at
            if end == 0 or _HOST.fullmatch(rest[:end]) is None:
                raise _Refused(400, "malformed HTTP request: the target's authority is not valid")
            target = rest[end:]
            if not target.startswith(b"/"):
                target = b"/" + target
        elif target == b"*" and method == b"OPTIONS":
            return b"*", b""
        else:
            raise _Refused(400, f"malformed HTTP request: target {target[:80]!r} is not a path")
    path, _, query = target.partition(b"?")
    return path, query


def _reason(exc: Exception) -> str:
    return str(exc) or type(exc).__name__
