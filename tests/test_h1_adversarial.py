"""The server leg attacked with raw sockets, through the whole gateway (issue 13).

Every test sends bytes as an attacker would, reads what came back, and checks with the
Ollama emulator (which records every request it gets) exactly what reached the upstream.
Smuggling variants hide a second request carrying a marker: the marker must never reach
the upstream nor come back. The controls (`test_the_marker_is_seen_when_it_is_a_real_
request`) prove the checks would notice a request that got through.
"""

from __future__ import annotations

import io
import json
import random
import socket
import struct

import pytest
import trio
import trio.testing

from tests.conftest import RunningGateway, StartGateway, eventually, make_config
from tests.emulators import OllamaEmulator

MARKER = b"SMUGGLED-7f3a"
SHOW = b'{"model": "llama3"}'
HIDDEN_BODY = b'{"model": "' + MARKER + b'"}'
HIDDEN = (
    b"POST /api/show HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n" % len(HIDDEN_BODY) + HIDDEN_BODY
)
HIDDEN_CLOSING = HIDDEN.replace(b"Host: gw\r\n", b"Host: gw\r\nConnection: close\r\n", 1)


def address(gw: RunningGateway) -> tuple[str, int]:
    host, port = gw.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


async def exchange(
    gw: RunningGateway,
    pieces: list[bytes],
    *,
    half_close: bool = False,
    timeout_s: float = 5.0,
) -> bytes:
    """Send `pieces` (one write each, letting the gateway run between them), optionally
    half-close, then read until the gateway closes the connection."""
    with trio.fail_after(timeout_s):
        sock = trio.socket.socket()
        with sock:
            await sock.connect(address(gw))
            for piece in pieces:
                await sock.send(piece)
                await trio.lowlevel.checkpoint()
            if half_close:
                sock.shutdown(socket.SHUT_WR)
            answer = b""
            while True:
                try:
                    data = await sock.recv(65536)
                except ConnectionResetError:
                    break
                if not data:
                    break
                answer += data
            return answer


def answers(data: bytes) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """The answers in `data`, in order: (status, fields, body); framing as RFC 9112."""
    out = []
    while data:
        head, sep, data = data.partition(b"\r\n\r\n")
        assert sep, head
        status_line, *lines = head.split(b"\r\n")
        fields = {k.lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines)}
        status = int(status_line.split(b" ")[1])
        if b"content-length" in fields:
            n = int(fields[b"content-length"])
            body, data = data[:n], data[n:]
        elif fields.get(b"transfer-encoding") == b"chunked":
            body = b""
            while True:
                size_line, _, data = data.partition(b"\r\n")
                size = int(size_line, 16)
                body += data[:size]
                data = data[size + 2 :]
                if size == 0:
                    break
        else:
            body, data = data, b""
        out.append((status, fields, body))
    return out


def server_errors(logs: io.StringIO) -> list[str]:
    """Log lines at ERROR or above (a 500, a traceback, a connection that failed)."""
    return [
        line
        for line in logs.getvalue().splitlines()
        if json.loads(line).get("level") in ("error", "critical")
    ]


def show(extra: bytes = b"", *, version: bytes = b"1.1", body: bytes = SHOW) -> bytes:
    return (
        b"POST /api/show HTTP/"
        + version
        + b"\r\nHost: gw\r\nContent-Type: application/json\r\n"
        + extra
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )


@pytest.fixture
async def gw(start_gateway: StartGateway, ollama: OllamaEmulator) -> RunningGateway:
    gateway = await start_gateway(make_config(ollama.url, keep_alive_timeout_s=30.0))
    await eventually(lambda: not gateway.services.inventory.degraded)
    return gateway


def chunked(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload)


SMUGGLING = {
    # Issue 13's desync: TE on HTTP/1.0 with keep-alive was decoded and the connection kept.
    "te-on-http-1.0": b"POST /api/show HTTP/1.0\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n"
    b"Connection: keep-alive\r\n\r\n" + chunked(SHOW) + HIDDEN,
    "cl-te": b"POST /api/show HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
    % (len(chunked(SHOW)) + len(HIDDEN))
    + chunked(SHOW)
    + HIDDEN,
    "te-cl": b"POST /api/show HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Length: 4\r\n\r\n" + chunked(SHOW) + HIDDEN,
    "te-obfuscated-name": b"POST /api/show HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding : chunked\r\n"
    b"Content-Length: %d\r\n\r\n" % len(SHOW) + SHOW + HIDDEN,
    "te-xchunked": b"POST /api/show HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: xchunked\r\n"
    b"\r\n" + chunked(SHOW) + HIDDEN,
    "te-chunked-identity": b"POST /api/show HTTP/1.1\r\nHost: gw\r\n"
    b"Transfer-Encoding: chunked, identity\r\n\r\n" + chunked(SHOW) + HIDDEN,
    "te-twice": b"POST /api/show HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n"
    b"Transfer-Encoding: identity\r\n\r\n" + chunked(SHOW) + HIDDEN,
    "te-folded": b"POST /api/show HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding:\r\n chunked\r\n"
    b"Content-Length: %d\r\n\r\n" % len(SHOW) + SHOW + HIDDEN,
    "te-bare-lf": b"POST /api/show HTTP/1.1\r\nHost: gw\r\nX: a\nTransfer-Encoding: chunked\r\n"
    b"\r\n" + chunked(SHOW) + HIDDEN,
    "cl-twice": show(b"Content-Length: %d\r\n" % (len(SHOW) + len(HIDDEN))) + HIDDEN,
    "cl-list": b"POST /api/show HTTP/1.1\r\nHost: gw\r\nContent-Length: %d, %d\r\n\r\n"
    % (len(SHOW), len(SHOW) + len(HIDDEN))
    + SHOW
    + HIDDEN,
    "cl-plus": b"POST /api/show HTTP/1.1\r\nHost: gw\r\nContent-Length: +%d\r\n\r\n" % len(SHOW)
    + SHOW
    + HIDDEN,
    "cl-hex": b"POST /api/show HTTP/1.1\r\nHost: gw\r\nContent-Length: 0x%x\r\n\r\n" % len(SHOW)
    + SHOW
    + HIDDEN,
    "chunk-size-lf": b"POST /api/show HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"%x\n%s\r\n0\r\n\r\n" % (len(SHOW), SHOW) + HIDDEN,
    "chunk-size-overflow": b"POST /api/show HTTP/1.1\r\nHost: gw\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n1000000000000000%x\r\n%s\r\n0\r\n\r\n"
    % (len(SHOW), SHOW)
    + HIDDEN,
    "chunk-longer-than-said": b"POST /api/show HTTP/1.1\r\nHost: gw\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n2\r\n" + SHOW + b"\r\n0\r\n\r\n" + HIDDEN,
    "nul-in-header": show(b"X-A: a\x00b\r\n") + HIDDEN,
    "space-before-colon": b"POST /api/show HTTP/1.1\r\nHost: gw\r\nContent-Length : 0\r\n\r\n"
    + SHOW
    + HIDDEN,
    "upgrade-with-body": show(b"Connection: Upgrade\r\nUpgrade: h2c\r\n") + HIDDEN,
    "http-2-version": show(version=b"2.0") + HIDDEN,
}


@pytest.mark.parametrize("name", SMUGGLING)
async def test_no_smuggled_request_reaches_the_upstream(
    gw: RunningGateway, ollama: OllamaEmulator, name: str
) -> None:
    before = len(ollama.requests)
    answer = await exchange(gw, [SMUGGLING[name]])
    assert MARKER not in answer, answer
    got = answers(answer)
    assert len(got) == 1, got  # the refusal, and the connection closed after it
    status, fields, body = got[0]
    assert status in (400, 501, 505), (name, got)
    assert fields[b"connection"] == b"close"
    assert json.loads(body)["error"]
    await trio.testing.wait_all_tasks_blocked()
    for request in ollama.requests[before:]:
        assert MARKER not in request.body, (name, request)
        assert request.path != "/api/show", (name, request)  # the refusal came first


async def test_the_marker_is_seen_when_it_is_a_real_request(
    gw: RunningGateway, ollama: OllamaEmulator
) -> None:
    """The control: the same bytes without the trick are two requests, both forwarded."""
    before = len(ollama.requests)
    answer = await exchange(gw, [show() + HIDDEN_CLOSING])
    assert [status for status, _, _ in answers(answer)] == [200, 404]
    bodies = [r.body for r in ollama.requests[before:] if r.path == "/api/show"]
    assert bodies == [SHOW, HIDDEN_BODY]


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /api/ps HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET http://host#/api/ps HTTP/1.1\r\nHost: host\r\n\r\n", 400),
        (b"GET /api/ps#frag HTTP/1.1\r\nHost: host\r\n\r\n", 400),
        (b"GET /api/ps HTTP/1.1\nHost: host\n\n", 400),  # bare LF: at once, not at timeout
        (b"GET /api/ps HTTP/1.1\r\nHost: host\r\nX: \x7f\r\n\r\n", 400),
        (b"GET /api/ps HTTP/2.0\r\nHost: host\r\n\r\n", 505),
        (b"CONNECT host:443 HTTP/1.1\r\nHost: host:443\r\n\r\n", 501),
    ],
)
async def test_malformed_heads_are_refused_at_once(
    gw: RunningGateway, ollama: OllamaEmulator, request_bytes: bytes, status: int
) -> None:
    before = len(ollama.requests_to("/api/ps"))
    # keep_alive_timeout_s is 30 s here: an answer within 5 s is not a timeout's.
    answer = await exchange(gw, [request_bytes], timeout_s=5.0)
    [(got, fields, body)] = answers(answer)
    assert got == status, answer
    assert fields[b"connection"] == b"close"
    assert json.loads(body)["error"]
    assert len(ollama.requests_to("/api/ps")) == before


async def test_absolute_form_routes_by_its_own_path(
    gw: RunningGateway, ollama: OllamaEmulator
) -> None:
    # Issue 13: `http://host?/api/ps` was routed to /api/ps. Its path is `/`.
    before = len(ollama.requests_to("/api/ps"))
    answer = await exchange(
        gw, [b"GET http://host?/api/ps HTTP/1.1\r\nHost: host\r\nConnection: close\r\n\r\n"]
    )
    [(status, _, body)] = answers(answer)
    assert (status, body) == (200, b"Ollama is running")
    assert len(ollama.requests_to("/api/ps")) == before
    answer = await exchange(
        gw, [b"GET http://host:1/api/ps HTTP/1.1\r\nHost: host\r\nConnection: close\r\n\r\n"]
    )
    assert answers(answer)[0][0] == 200
    assert len(ollama.requests_to("/api/ps")) == before + 1


@pytest.mark.parametrize(("version", "interim"), [(b"1.0", False), (b"1.1", True)])
async def test_100_continue_only_to_http_1_1(
    gw: RunningGateway, ollama: OllamaEmulator, version: bytes, interim: bool
) -> None:
    head = show(b"Expect: 100-continue\r\nConnection: close\r\n", version=version)
    head, body = head[: -len(SHOW)], SHOW
    with trio.fail_after(5):
        sock = trio.socket.socket()
        with sock:
            await sock.connect(address(gw))
            await sock.send(head)
            if interim:
                assert await sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
            else:
                # Once everything is blocked, the app is waiting for the body.
                await trio.testing.wait_all_tasks_blocked()
            await sock.send(body)
            answer = b""
            while data := await sock.recv(65536):
                answer += data
    assert b"100 Continue" not in answer
    assert answers(answer)[0][0] == 200


@pytest.mark.parametrize("closes", [False, True])
async def test_eof_at_every_point_of_a_request_is_never_a_500(
    gw: RunningGateway, ollama: OllamaEmulator, all_logs: io.StringIO, closes: bool
) -> None:
    """Half-close after every prefix of a request (and a reset for some): the gateway
    closes quietly, answers 400 at most, never 500, and logs no error. After a complete
    request, keep-alive or not, the client has left (499 in the access log)."""
    request = show(b"Connection: close\r\n" if closes else b"")
    for cut in range(len(request) + 1):
        answer = await exchange(gw, [request[:cut]], half_close=True)
        statuses = [status for status, _, _ in answers(answer)]
        if cut < len(request):
            assert statuses in ([], [400]), (cut, answer)
    answer = await exchange(gw, [request], half_close=True)
    statuses = [status for status, _, _ in answers(answer)]
    assert statuses in ([], [200]), answer  # [200] only if the answer won the race
    for cut in (len(request) // 2, len(request)):  # a reset instead of a FIN
        with trio.socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await sock.connect(address(gw))
            await sock.send(request[:cut])
    await eventually(lambda: gw.services.drain.active == 0)
    await trio.testing.wait_all_tasks_blocked()
    assert server_errors(all_logs) == []
    access = [json.loads(line) for line in all_logs.getvalue().splitlines()]
    codes = {e.get("status") for e in access if e.get("logger") == "gateway.access"}
    assert 500 not in codes
    assert codes <= {200, 499}, codes
    assert 499 in codes


async def test_pipelining_under_load_with_split_writes(
    gw: RunningGateway, ollama: OllamaEmulator, all_logs: io.StringIO
) -> None:
    """Issue 13's race: the disconnect watcher and the connection task both waited on the
    socket, and a pipelined request got no answer a few times in a hundred under load.
    24 clients at once, 12 pipelined requests each, written in random pieces."""
    rng = random.Random(13)
    requests = []
    for index in range(12):
        if index % 3 == 0:
            requests.append(b"GET /api/version HTTP/1.1\r\nHost: gw\r\n\r\n")
        elif index % 3 == 1:
            requests.append(show())
        else:
            body = b'{"model": "nomic-embed-text", "input": "x%d"}' % index
            requests.append(
                b"POST /api/embed HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:7], body[7:]))
                + b"0\r\n\r\n"
            )
    requests[-1] = requests[-1].replace(b"Host: gw\r\n", b"Host: gw\r\nConnection: close\r\n")
    stream = b"".join(requests)
    outcomes: list[list[int]] = []

    async def client() -> None:
        cuts = sorted(rng.sample(range(1, len(stream)), 20))
        pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
        answer = await exchange(gw, pieces, timeout_s=20)
        outcomes.append([status for status, _, _ in answers(answer)])

    for _ in range(2):
        async with trio.open_nursery() as nursery:
            for _ in range(24):
                nursery.start_soon(client)
    assert outcomes == [[200] * 12] * 48
    assert server_errors(all_logs) == []


async def test_http_1_0_keep_alive_is_honoured_and_ends_when_not_asked(
    gw: RunningGateway,
) -> None:
    answer = await exchange(
        gw,
        [
            b"GET /api/version HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
            b"GET /api/version HTTP/1.0\r\n\r\n"
            b"GET /api/version HTTP/1.0\r\n\r\n"  # never read: the second closed
        ],
    )
    got = answers(answer)
    assert [status for status, _, _ in got] == [200, 200]
    assert got[0][1][b"connection"] == b"keep-alive"
    assert got[1][1][b"connection"] == b"close"


@pytest.mark.parametrize("closing", [b"Connection: close\r\n", b""])
async def test_a_queued_client_that_leaves_leaves_the_queue(
    gw: RunningGateway, ollama: OllamaEmulator, closing: bytes
) -> None:
    """Whether its request asked to close the connection or not: the reader watches
    the socket after a closing request too, so the gate's queue loses the client at once."""
    body = b'{"model": "llama3", "messages": [{"role": "user", "content": "hi"}], "stream": false}'
    chat = b"POST /api/chat HTTP/1.1\r\nHost: gw\r\n%sContent-Length: %d\r\n\r\n%s"
    ollama.hold = trio.Event()
    gate = gw.services.gate
    with trio.fail_after(10):
        holder = trio.socket.socket()
        await holder.connect(address(gw))
        await holder.send(chat % (b"", len(body), body))
        await eventually(lambda: gate.busy == 1)
        with trio.socket.socket() as waiter:
            await waiter.connect(address(gw))
            await waiter.send(chat % (closing, len(body), body))
            await eventually(lambda: gate.queued == 1)
        await eventually(lambda: gate.queued == 0)
        assert gate.busy == 1
        ollama.hold.set()
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += await holder.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200 ")
        holder.close()
        await eventually(lambda: gate.busy == 0)
