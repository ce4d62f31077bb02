"""The client leg attacked by a misbehaving upstream, through the whole gateway (issue 13).

A raw upstream (`RawUpstream`) answers each request with bytes a test scripts: bad
lengths on HEAD and 204, statuses below 100, hop-by-hop headers, answers that die before
their first body byte. What the client gets is checked byte by byte, and the logs for
errors and tracebacks.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing

from gateway.errors import UpstreamProtocol
from gateway.h1.client import ConnectionPool
from tests.conftest import RunningGateway, StartGateway, eventually, make_config
from tests.test_h1_adversarial import answers, exchange, server_errors

TAGS = b'{"models": [{"name": "llama3:latest", "model": "llama3:latest"}]}'
Script = Callable[[bytes, bytes], bytes | None]


@dataclass
class RawUpstream:
    """An HTTP/1.1 upstream on raw sockets: polls are answered properly, every other
    request with `script(method, path)`'s bytes (then the connection is closed), or
    nothing at all (the connection is closed) when it returns None."""

    script: Script
    seen: list[tuple[bytes, bytes]] = field(default_factory=list)
    url: str = ""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            buffer = b""
            try:
                while True:
                    while b"\r\n\r\n" not in buffer:
                        data = await stream.receive_some(65536)
                        if not data:
                            return
                        buffer += data
                    head, _, buffer = buffer.partition(b"\r\n\r\n")
                    method, path, _ = head.split(b"\r\n")[0].split(b" ")
                    length = 0
                    for line in head.split(b"\r\n")[1:]:
                        name, _, value = line.partition(b":")
                        if name.lower() == b"content-length":
                            length = int(value)
                    while len(buffer) < length:
                        buffer += await stream.receive_some(65536)
                    buffer = buffer[length:]
                    self.seen.append((method, path))
                    if path in (b"/api/tags", b"/api/ps"):
                        await stream.send_all(
                            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                            b"Content-Length: %d\r\n\r\n%s" % (len(TAGS), TAGS)
                        )
                        continue
                    answer = self.script(method, path)
                    if answer:
                        await stream.send_all(answer)
                    return
            except trio.BrokenResourceError:
                return


async def start(
    start_gateway: StartGateway, nursery: trio.Nursery, script: Script, **config: Any
) -> tuple[RunningGateway, RawUpstream]:
    upstream = RawUpstream(script)
    await nursery.start(upstream.run)
    gw = await start_gateway(make_config(upstream.url, **config))
    await eventually(lambda: not gw.services.inventory.degraded)
    return gw, upstream


def fixed(answer: bytes) -> Script:
    return lambda method, path: answer


@pytest.mark.parametrize(
    ("method", "answer"),
    [
        (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n"),
        (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 13, 13\r\n\r\n"),
        (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n"),
        (b"GET", b"HTTP/1.1 204 No Content\r\nContent-Length: abc\r\n\r\n"),
        (b"GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 13, 13\r\n\r\n"),
        (b"GET", b"HTTP/1.1 099 Odd\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
        (b"GET", b"HTTP/1.1 000 Odd\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
        (b"GET", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n"),
        (b"GET", b"RTSP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"),
        (b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nok"),
        (b"GET", b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"),
        (b"GET", b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok"),
    ],
)
async def test_a_malformed_answer_is_a_clean_502(
    start_gateway: StartGateway,
    nursery: trio.Nursery,
    all_logs: io.StringIO,
    method: bytes,
    answer: bytes,
) -> None:
    """Issue 13: these gave a 500 with a traceback, or were handed to the client."""
    gw, upstream = await start(start_gateway, nursery, fixed(answer))
    got = await exchange(
        gw, [method + b" /api/version HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"]
    )
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 "), got
    assert b"\r\ncontent-length: -5" not in head.lower()
    if method == b"GET":
        assert "malformed answer" in json.loads(body)["error"], body
    assert (method, b"/api/version") in upstream.seen
    await trio.testing.wait_all_tasks_blocked()
    assert server_errors(all_logs) == []
    assert "Traceback" not in all_logs.getvalue()


async def test_a_204_loses_its_content_length_and_304_keeps_it(
    start_gateway: StartGateway, nursery: trio.Nursery
) -> None:
    answers_by_path = {
        b"/api/version": b"HTTP/1.1 204 No Content\r\nContent-Length: 13\r\nX-A: 1\r\n\r\n",
        b"/": b"HTTP/1.1 304 Not Modified\r\nContent-Length: 13\r\nX-A: 1\r\n\r\n",
    }
    gw, _ = await start(start_gateway, nursery, lambda method, path: answers_by_path[path])
    got = await exchange(
        gw, [b"GET /api/version HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"]
    )
    head = got.lower()
    assert head.startswith(b"http/1.1 204 "), got
    assert b"content-length" not in head
    assert b"x-a: 1" in head
    got = await exchange(gw, [b"GET / HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"])
    head, _, rest = got.lower().partition(b"\r\n\r\n")
    assert head.startswith(b"http/1.1 304 "), got
    assert b"content-length: 13" in head
    assert rest == b""


async def test_hop_by_hop_headers_never_reach_the_client(
    start_gateway: StartGateway, nursery: trio.Nursery
) -> None:
    answer = (
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Secret-Hop\r\nX-Secret-Hop: s3cr3t\r\n"
        b"Proxy-Connection: keep-alive\r\nKeep-Alive: timeout=5\r\nUpgrade: h2c\r\n"
        b"X-Kept: yes\r\nContent-Length: 2\r\n\r\nok"
    )
    gw, _ = await start(start_gateway, nursery, fixed(answer))
    got = await exchange(
        gw, [b"GET /api/version HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"]
    )
    [(status, fields, body)] = answers(got)
    assert (status, body) == (200, b"ok")
    assert fields[b"x-kept"] == b"yes"
    for name in (b"x-secret-hop", b"proxy-connection", b"keep-alive", b"upgrade"):
        assert name not in fields, fields
    assert b"s3cr3t" not in got


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n",
        b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"a',
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nzz",
    ],
)
async def test_an_upstream_failure_before_the_first_byte_out_is_a_status(
    start_gateway: StartGateway, nursery: trio.Nursery, answer: bytes
) -> None:
    """Issue 13: a 200 and an in-band error line were sent when no byte of the answer
    had gone out yet; a clean 502 was still possible."""
    gw, _ = await start(start_gateway, nursery, fixed(answer))
    body = b'{"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}'
    got = await exchange(
        gw,
        [
            b"POST /api/chat HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        ],
    )
    [(status, _, error)] = answers(got)
    assert status == 502, got
    assert json.loads(error)["error"]


async def test_a_non_streamed_answer_over_the_bound_is_refused_unbuffered(
    nursery: trio.Nursery,
) -> None:
    """Issue 13: a non-streamed answer was read whole whatever length it declared. Here
    it declares a gigabyte and sends a few bytes, then waits: `read` refuses at once."""
    answer = b'HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n{"a": 1'
    released = trio.Event()

    async def handle(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(answer)
        await released.wait()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    nursery.start_soon(trio.serve_listeners, handle, listeners)
    pool = ConnectionPool(
        f"http://127.0.0.1:{port}",
        name="test upstream",
        connect_timeout_s=1,
        idle_timeout_s=30,
        max_connections=2,
        max_read_bytes=1024,
    )
    await nursery.start(pool.run)
    with trio.fail_after(5):
        async with pool.request("GET", "/") as response:
            assert response.length == 1_000_000_000
            with pytest.raises(UpstreamProtocol, match="over 1024 bytes"):
                await response.read()
    released.set()
    await pool.aclose()


async def test_an_answer_over_max_body_bytes_is_a_502_through_the_gateway(
    start_gateway: StartGateway, nursery: trio.Nursery
) -> None:
    big = b"x" * 5000
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(big), big)
    gw, _ = await start(start_gateway, nursery, fixed(answer), max_body_bytes=2048)
    got = await exchange(
        gw, [b"GET /api/version HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"]
    )
    [(status, _, body)] = answers(got)
    assert status == 502, got
    assert "over 2048 bytes" in json.loads(body)["error"]
