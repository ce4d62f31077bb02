"""Request bodies sent with a `Content-Encoding`, decoded on the way in (ADR 0022).

Codex and other agents send large `/v1/responses` bodies as `Content-Encoding: zstd`
(gzip is also seen). The gateway must read `model` to route, and Ollama does not decode
request content codings itself, so the body is decoded here, once, before routing; the
upstream gets the plain bytes (our clients never forward the client's `Content-Encoding`,
and they write `Content-Length` from the body they send).

Decoding is bounded WHILE it runs: no coding ever produces more than `limit` bytes (the
gateway's `max_body_bytes`), so a small bomb is refused with 413 after at most `limit`
bytes of output, never after allocating what it expands to. A request without the header
pays one scan of its header list.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable

import trio
import zstandard

from gateway.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from gateway.web.asgi import Receive, Scope, read_body

# What the 415 names, and its `Accept-Encoding` (RFC 9110 15.5.16).
SUPPORTED = "zstd, gzip, deflate"
_IDENTITY = "identity"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# RFC 9659: a `zstd` content coding never needs a window over 8 MiB; a frame asking for
# more is refused before the decoder allocates it.
_ZSTD_MAX_WINDOW = 8 * 1024 * 1024
_ZSTD_READ = 256 * 1024


class CorruptBody(Exception):
    """The coded bytes are not valid data of their coding (raised by the decoders)."""


class OverLimit(Exception):
    """The decoded output passed the limit (raised by the decoders, mid-decoding)."""


def _inflate(data: bytes, wbits: int, limit: int) -> bytes:
    """One zlib-family stream, output bounded by `limit`; a gzip body may hold several
    members (RFC 1952), decoded one after the other under the same bound."""
    out: list[bytes] = []
    size = 0
    while True:
        inflater = zlib.decompressobj(wbits)
        try:
            piece = inflater.decompress(data, limit + 1 - size)
        except zlib.error as exc:
            raise CorruptBody(str(exc)) from None
        size += len(piece)
        if size > limit:
            raise OverLimit
        out.append(piece)
        if not inflater.eof:
            # Below the bound, so all input was consumed and the stream is cut short.
            raise CorruptBody("the data ends before the end of the stream")
        data = inflater.unused_data
        if not data:
            return b"".join(out)
        if wbits != 31:
            raise CorruptBody("data after the end of the stream")


def _gzip(data: bytes, limit: int) -> bytes:
    return _inflate(data, 31, limit)


def _deflate(data: bytes, limit: int) -> bytes:
    """`deflate` is zlib-wrapped (RFC 9110 8.4.1.2); some clients send raw deflate, so
    that is tried when the zlib wrapper is not there."""
    try:
        return _inflate(data, zlib.MAX_WBITS, limit)
    except CorruptBody:
        if len(data) >= 2 and (data[0] & 0x0F) == 8 and (data[0] << 8 | data[1]) % 31 == 0:
            raise  # a zlib header: the stream itself is bad
    return _inflate(data, -zlib.MAX_WBITS, limit)


def _zstd_frames_complete(data: bytes) -> None:
    """Walk the frames' block headers (no decoding): the zstd stream reader stops quietly
    at a cut frame, and a cut body must be a 400, not a short one."""
    view = memoryview(data)
    at = 0
    while at < len(data):
        magic = bytes(view[at : at + 4])
        if len(magic) == 4 and 0x184D2A50 <= int.from_bytes(magic, "little") <= 0x184D2A5F:
            if at + 8 > len(data):
                raise CorruptBody("a skippable frame is cut short")
            at += 8 + int.from_bytes(view[at + 4 : at + 8], "little")
            continue
        if magic != _ZSTD_MAGIC:
            raise CorruptBody("not a zstd frame")
        try:
            params = zstandard.get_frame_parameters(view[at:])
            at += zstandard.frame_header_size(view[at:])
        except zstandard.ZstdError as exc:
            raise CorruptBody(str(exc)) from None
        last = False
        while not last:
            if at + 3 > len(data):
                raise CorruptBody("the data ends inside a frame")
            head = int.from_bytes(view[at : at + 3], "little")
            last, kind, length = bool(head & 1), (head >> 1) & 3, head >> 3
            if kind == 3:
                raise CorruptBody("reserved block type")
            at += 3 + (1 if kind == 1 else length)
        at += 4 if params.has_checksum else 0
    if at > len(data):
        raise CorruptBody("the data ends inside a frame")


def _zstd(data: bytes, limit: int) -> bytes:
    _zstd_frames_complete(data)
    decompressor = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW)
    out = bytearray()
    try:
        with decompressor.stream_reader(data, read_across_frames=True) as reader:
            while piece := reader.read(_ZSTD_READ):
                out += piece
                if len(out) > limit:
                    raise OverLimit
    except zstandard.ZstdError as exc:
        raise CorruptBody(str(exc)) from None
    return bytes(out)


_DECODERS: dict[str, Callable[[bytes, int], bytes]] = {
    "zstd": _zstd,
    "gzip": _gzip,
    "x-gzip": _gzip,
    "deflate": _deflate,
}


def codings_of(value: str) -> list[str]:
    """The codings of a `Content-Encoding` value, in the order they were applied;
    `identity` and empty members say nothing (RFC 9110 8.4)."""
    codings = [part.strip().lower() for part in value.split(",")]
    return [coding for coding in codings if coding and coding != _IDENTITY]


def decode_content(encoding: str, body: bytes, limit: int) -> bytes:
    """The plain body under `Content-Encoding: encoding`, stacked codings decoded in
    reverse order; no step ever holds more than `limit` decoded bytes.

    Raises UnsupportedMediaType (415) for a coding the gateway does not decode,
    BadRequest (400) naming the coding for data that is not valid in it, and
    PayloadTooLarge (413) as soon as the output passes `limit`."""
    if not body:
        return body  # nothing was coded (a GET, a HEAD)
    codings = codings_of(encoding)
    unknown = [coding for coding in codings if coding not in _DECODERS]
    if unknown:
        raise UnsupportedMediaType(
            f"Content-Encoding {', '.join(unknown)} is not supported;"
            f" request bodies may be sent in {SUPPORTED} (or identity)",
            accept_encoding=SUPPORTED,
        )
    for coding in reversed(codings):
        try:
            body = _DECODERS[coding](body, limit)
        except CorruptBody as exc:
            raise BadRequest(f"request body is not valid {coding} data: {exc}") from None
        except OverLimit:
            raise PayloadTooLarge(
                f"request body decodes ({coding}) to more than the limit of {limit} bytes"
            ) from None
    return body


def encoding_of(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """Every `Content-Encoding` line of an ASGI header list, joined as RFC 9110 combines
    repeated fields; None (the common case) when there is none."""
    found: list[bytes] | None = None
    for name, value in headers:
        if name == b"content-encoding":
            found = [value] if found is None else [*found, value]
    if found is None:
        return None
    return b",".join(found).decode("latin-1")


async def decoded(encoding: str, body: bytes, limit: int) -> bytes:
    """`decode_content` in a worker thread: decoding up to `limit` (64 MiB by default)
    takes tens of milliseconds that other requests' streams must not wait for (zlib and
    libzstd release the GIL). The work is bounded, so it is not abandoned on cancel."""
    return await trio.to_thread.run_sync(decode_content, encoding, body, limit)


async def read_plain_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The request body as `read_body` reads it, decoded when it came with a
    `Content-Encoding`: what the raw routes parse and forward."""
    body = await read_body(scope, receive, limit)
    encoding = encoding_of(scope["headers"])
    if encoding is None:
        return body
    return await decoded(encoding, body, limit)
