"""`gateway.web.content_coding` alone: every coding round-trips, stacked codings decode in
reverse order, the decoded size is bounded while decoding (a bomb stops at the limit, it
never allocates what it expands to), and bad or unknown codings are the right 4xx."""

from __future__ import annotations

import time
import tracemalloc
import zlib
from functools import cache

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from gateway.web.content_coding import (
    SUPPORTED,
    codings_of,
    decode_content,
    encoding_of,
)

LIMIT = 1 << 20
GIB = 1 << 30


def gzip(data: bytes) -> bytes:
    packer = zlib.compressobj(6, zlib.DEFLATED, 31)
    return packer.compress(data) + packer.flush()


def deflate(data: bytes) -> bytes:
    return zlib.compress(data)


def raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(6, zlib.DEFLATED, -15)
    return packer.compress(data) + packer.flush()


def zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(data)  # Codex's level


ENCODERS = {"zstd": zstd, "gzip": gzip, "x-gzip": gzip, "deflate": deflate}


def encode(body: bytes, codings: list[str]) -> bytes:
    """Apply `codings` in the order a `Content-Encoding` header lists them."""
    for coding in codings:
        body = ENCODERS[coding](body)
    return body


@cache
def zstd_bomb() -> bytes:
    """About 32 KB of zstd (level 3, a real encoder) that expands to 1 GiB of zeros."""
    packer = zstandard.ZstdCompressor(level=3).compressobj()
    zeros = bytes(1 << 20)
    return b"".join([packer.compress(zeros) for _ in range(GIB >> 20)] + [packer.flush()])


@cache
def gzip_bomb() -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(1 << 20)
    return b"".join([packer.compress(zeros) for _ in range(64)] + [packer.flush()])


# ------------------------------------------------------------------- round trips


@settings(max_examples=60, deadline=None)
@given(
    body=st.binary(max_size=4096),
    codings=st.lists(st.sampled_from(sorted(ENCODERS)), min_size=1, max_size=3),
)
def test_every_stack_of_codings_round_trips(body: bytes, codings: list[str]) -> None:
    header = ", ".join(codings)
    assert decode_content(header, encode(body, codings), LIMIT) == body


@settings(max_examples=30, deadline=None)
@given(body=st.binary(min_size=1, max_size=4096))
def test_raw_deflate_is_accepted_as_deflate(body: bytes) -> None:
    assert decode_content("deflate", raw_deflate(body), LIMIT) == body


def test_stacked_codings_are_decoded_in_reverse_order() -> None:
    body = b'{"model": "llama3"}'
    coded = gzip(zstd(body))  # zstd applied first, then gzip
    assert decode_content("zstd, gzip", coded, LIMIT) == body
    with pytest.raises(BadRequest, match="zstd"):
        decode_content("gzip, zstd", coded, LIMIT)  # the wrong order is not valid zstd


def test_identity_and_spelling() -> None:
    body = b'{"model": "x"}'
    assert decode_content("identity", body, LIMIT) is body
    assert decode_content(" ZSTD ,identity", zstd(body), LIMIT) == body
    assert decode_content("x-gzip", gzip(body), LIMIT) == body
    assert codings_of("gzip, , Identity,zstd") == ["gzip", "zstd"]


def test_several_frames_and_members_are_one_body() -> None:
    assert decode_content("zstd", zstd(b"ab") + zstd(b"cd"), LIMIT) == b"abcd"
    assert decode_content("gzip", gzip(b"ab") + gzip(b"cd"), LIMIT) == b"abcd"


def test_repeated_header_lines_combine_in_order() -> None:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-encoding", b"zstd"),
        (b"content-encoding", b"gzip"),
    ]
    assert encoding_of(headers) == "zstd,gzip"
    assert encoding_of([(b"content-type", b"application/json")]) is None


# ------------------------------------------------------------------------- limits


@pytest.mark.parametrize("coding", sorted(ENCODERS))
def test_the_limit_is_the_decoded_size(coding: str) -> None:
    exact = bytes(LIMIT)
    assert decode_content(coding, ENCODERS[coding](exact), LIMIT) == exact
    with pytest.raises(PayloadTooLarge, match=f"{coding}.*{LIMIT}"):
        decode_content(coding, ENCODERS[coding](exact + b"x"), LIMIT)


@pytest.mark.parametrize(
    ("header", "bomb"),
    [
        ("zstd", zstd_bomb),
        ("gzip", gzip_bomb),
        # 44 bytes -> 32 KB -> 1 GiB: the inner layer is bounded too.
        ("zstd, zstd", lambda: zstd(zstd_bomb())),
    ],
)
def test_a_bomb_stops_at_the_limit(header: str, bomb: object) -> None:
    assert callable(bomb)
    coded: bytes = bomb()
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(PayloadTooLarge):
            decode_content(header, coded, LIMIT)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Decoding stopped near the limit: a few times 1 MiB at most, never the 1 GiB (or
    # 64 MiB) the body expands to; and it took a fraction of the time a full decode does.
    assert peak < 4 * LIMIT
    assert time.perf_counter() - started < 0.5


def test_a_zstd_window_over_8_mib_is_refused_before_allocation() -> None:
    """RFC 9659: 8 MiB is the most a `zstd` content coding may ask for."""
    params = zstandard.ZstdCompressionParameters.from_level(1, window_log=27)
    packer = zstandard.ZstdCompressor(compression_params=params).compressobj()  # size unknown
    big_window = packer.compress(bytes(1000)) + packer.flush()
    assert zstandard.get_frame_parameters(big_window).window_size == 1 << 27
    with pytest.raises(BadRequest, match="zstd"):
        decode_content("zstd", big_window, GIB)


# ----------------------------------------------------------------- bad input


@pytest.mark.parametrize("coding", sorted(ENCODERS))
def test_corrupt_data_is_a_400_naming_the_coding(coding: str) -> None:
    body = b'{"model": "llama3", "input": "' + bytes(range(256)) * 40 + b'"}'
    coded = ENCODERS[coding](body)
    for bad in (b"not coded at all", coded[: len(coded) // 2], coded + b"trailing junk"):
        with pytest.raises(BadRequest, match=f"not valid {coding} data") as caught:
            decode_content(coding, bad, LIMIT)
        assert caught.value.status == 400


def test_a_zstd_frame_cut_anywhere_is_a_400() -> None:
    coded = zstd(bytes(range(256)) * 400)
    for cut in range(1, len(coded), max(1, len(coded) // 60)):
        with pytest.raises(BadRequest, match="not valid zstd data"):
            decode_content("zstd", coded[:cut], LIMIT)


@pytest.mark.parametrize("header", ["br", "compress", "gzip, br", "zstd,  Foo"])
def test_an_unknown_coding_is_a_415_naming_it_and_what_is_supported(header: str) -> None:
    with pytest.raises(UnsupportedMediaType) as caught:
        decode_content(header, b"whatever", LIMIT)
    error = caught.value
    assert error.status == 415
    unknown = header.split(",")[-1].strip().lower()
    assert unknown in error.message
    assert "gzip" not in error.message.split("is not supported")[0]
    assert SUPPORTED in error.message
    assert error.headers() == {"Accept-Encoding": SUPPORTED}


def test_an_empty_body_has_nothing_to_decode() -> None:
    assert decode_content("gzip", b"", LIMIT) == b""
    assert decode_content("br", b"", LIMIT) == b""  # a GET with the header: no content
