"""The HTTP/1.1 connection pool against scripted servers on real sockets (127.0.0.1:0).

Each test scripts the server byte by byte. A server waits with
`trio.testing.wait_all_tasks_blocked` after each write, so the client has read it before
the next one: splits stay splits. Timeouts run on the autojump clock.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing
import trustme

from gateway.errors import BadRequest, UpstreamProtocol, UpstreamTimeout, UpstreamUnavailable
from gateway.h1 import connection as connection_module
from gateway.h1.client import ConnectionPool

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Peer:
    """The server's side of one connection, with what it has read so far."""

    def __init__(self, stream: trio.abc.Stream, server: Server, index: int) -> None:
        self.stream = stream
        self.server = server
        self.index = index
        self.buffer = b""
        self.closed_by_client = trio.Event()

    async def request(self) -> bytes | None:
        """The next request, head and body, or None when the client closed first."""
        while b"\r\n\r\n" not in self.buffer:
            data = await self.stream.receive_some(65536)
            if not data:
                self.closed_by_client.set()
                return None
            self.buffer += data
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            rest += await self.stream.receive_some(65536)
        self.buffer = rest[length:]
        request = head + b"\r\n\r\n" + rest[:length]
        self.server.requests.append((self.index, request))
        return request

    async def send(self, *pieces: bytes) -> None:
        """Write each piece, and let the client read it before the next."""
        for piece in pieces:
            await self.stream.send_all(piece)
            await trio.testing.wait_all_tasks_blocked()

    async def wait_closed(self) -> None:
        """Until the client closes the connection."""
        while await self.stream.receive_some(65536):
            pass
        self.closed_by_client.set()

    async def close(self) -> None:
        await self.stream.aclose()


Script = Callable[[Peer], Awaitable[None]]


@dataclass
class Server:
    script: Script
    port: int = 0
    requests: list[tuple[int, bytes]] = field(default_factory=list)
    peers: list[Peer] = field(default_factory=list)
    release: trio.Event = field(default_factory=trio.Event)

    @property
    def connections(self) -> int:
        return len(self.peers)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, stream: trio.abc.Stream) -> None:
        peer = Peer(stream, self, len(self.peers))
        self.peers.append(peer)
        try:
            await self.script(peer)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()


def answer_each(*answers: bytes) -> Script:
    """Answer every request on every connection with the next of `answers` (the last
    one repeats)."""
    given = 0

    async def script(peer: Peer) -> None:
        nonlocal given
        while await peer.request() is not None:
            await peer.send(answers[min(given, len(answers) - 1)])
            given += 1

    return script


MakePool = Callable[..., Awaitable[ConnectionPool]]
StartServer = Callable[[Script], Awaitable[Server]]


@pytest.fixture
async def start_server(nursery: trio.Nursery) -> AsyncIterator[StartServer]:
    servers: list[Server] = []

    async def start(script: Script) -> Server:
        server = Server(script)
        listeners = await nursery.start(partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1"))
        server.port = listeners[0].socket.getsockname()[1]
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.release.set()


@pytest.fixture
async def make_pool(nursery: trio.Nursery) -> AsyncIterator[MakePool]:
    pools: list[ConnectionPool] = []

    async def make(url: str, **options: Any) -> ConnectionPool:
        settings: dict[str, Any] = {
            "name": "test upstream",
            "connect_timeout_s": 1.0,
            "idle_timeout_s": 5.0,
            "max_connections": 4,
            "default_headers": [(b"User-Agent", b"trio-llm-gateway")],
            **options,
        }
        pool = ConnectionPool(url, **settings)
        pools.append(pool)
        await nursery.start(pool.run)
        return pool

    yield make
    for pool in pools:
        await pool.aclose()


async def fetch(
    pool: ConnectionPool, method: str = "GET", path: str = "/", **kwargs: Any
) -> tuple[int, bytes]:
    with trio.fail_after(10):
        async with pool.request(method, path, **kwargs) as response:
            return response.status, await response.read()


async def read_into(
    pool: ConnectionPool, got: list[bytes], then: Callable[[], Awaitable[None]] | None = None
) -> None:
    """Append the body's chunks to `got`; after the first, await `then()`."""
    async with pool.request("GET", "/", first_byte_timeout_s=1.0) as response:
        async for chunk in response:
            got.append(chunk)
            if len(got) == 1 and then is not None:
                await then()


async def chunks_of(pool: ConnectionPool, path: str = "/") -> list[bytes]:
    with trio.fail_after(10):
        async with pool.request("GET", path) as response:
            return [chunk async for chunk in response]


# ------------------------------------------------------------------------------ framing


async def test_content_length_answer_and_the_request_as_written(
    start_server: StartServer, make_pool: MakePool
) -> None:
    server = await start_server(
        answer_each(
            b"HTTP/1.1 201 Created\r\nContent-Type: text/plain\r\nX-A: 1\r\n"
            b"Content-Length: 5\r\n\r\nhello"
        )
    )
    pool = await make_pool(server.url)
    with trio.fail_after(10):
        async with pool.request(
            "POST", "/api/chat?x=1", [(b"content-type", b"application/json")], b'{"a":1}'
        ) as response:
            assert response.status == 201
            assert response.headers == [
                (b"content-type", b"text/plain"),
                (b"x-a", b"1"),
                (b"content-length", b"5"),
            ]
            assert response.header(b"x-a") == b"1"
            assert response.header(b"x-missing") is None
            assert await response.read() == b"hello"
    assert await fetch(pool, "POST") == (201, b"hello")
    first, second = (request for _, request in server.requests)
    assert (
        first
        == (
            f"POST /api/chat?x=1 HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            "User-Agent: trio-llm-gateway\r\ncontent-type: application/json\r\n"
            'Content-Length: 7\r\n\r\n{"a":1}'
        ).encode()
    )
    assert second.endswith(b"\r\nContent-Length: 0\r\n\r\n")  # a POST without a body


@pytest.mark.parametrize(
    "pieces",
    [
        [b"5\r\nhello\r\n0\r\n\r\n"],
        [b"5", b"\r\nhel", b"lo\r", b"\n0\r\n", b"\r\n"],  # size line and CRLFs split
        [b"3;ext=1\r\nhel\r\n", b"2\r\nlo\r\n", b"0\r\nTrailer: x\r\n\r\n"],
        [bytes([byte]) for byte in b"5\r\nhello\r\n0\r\n\r\n"],  # one byte per write
    ],
    ids=["whole", "awkward", "extensions-trailers", "byte-by-byte"],
)
async def test_chunked_body_split_anywhere(
    start_server: StartServer, make_pool: MakePool, pieces: list[bytes]
) -> None:
    async def script(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", *pieces)

    server = await start_server(script)
    pool = await make_pool(server.url)
    chunks = await chunks_of(pool)
    assert b"".join(chunks) == b"hello"
    # Each chunk is what one read gave: never joined across reads, never re-split.
    expected = [piece for piece in _payloads(pieces) if piece]
    assert chunks == expected
    assert b"".join(await chunks_of(pool)) == b"hello"
    assert server.connections == 1  # read to its end: kept


def _payloads(pieces: list[bytes]) -> list[bytes]:
    """The body bytes in each piece of `b"5\\r\\nhello\\r\\n0..."`-like chunked writes."""
    stream = b"".join(pieces)
    data_at = {i for i in range(len(stream)) if _in_data(stream, i)}
    out, at = [], 0
    for piece in pieces:
        out.append(bytes(stream[i] for i in range(at, at + len(piece)) if i in data_at))
        at += len(piece)
    return out


def _in_data(stream: bytes, index: int) -> bool:
    at = 0
    while True:
        line_end = stream.index(b"\r\n", at)
        size = int(stream[at:line_end].split(b";")[0], 16)
        if size == 0:
            return False
        start = line_end + 2
        if start <= index < start + size:
            return True
        at = start + size + 2


async def test_a_body_until_close_is_read_and_the_connection_not_kept(
    start_server: StartServer, make_pool: MakePool
) -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\n\r\nno ", b"length")

    server = await start_server(script)
    pool = await make_pool(server.url)
    assert await fetch(pool) == (200, b"no length")
    assert await fetch(pool) == (200, b"no length")
    assert server.connections == 2


@pytest.mark.parametrize(
    ("method", "answer"),
    [
        ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"),
        ("GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 100\r\n\r\n"),
        ("GET", b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n"),
    ],
)
async def test_answers_without_a_body(
    start_server: StartServer, make_pool: MakePool, method: str, answer: bytes
) -> None:
    server = await start_server(answer_each(answer))
    pool = await make_pool(server.url)
    for _ in range(2):
        with trio.fail_after(10):
            async with pool.request(method, "/") as response:
                assert await response.read() == b""
                assert [chunk async for chunk in response] == []
    assert server.connections == 1


async def test_interim_answers_are_skipped(start_server: StartServer, make_pool: MakePool) -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(
            b"HTTP/1.1 100 Continue\r\n\r\n",
            b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\n",
            b"Content-Length: 2\r\n\r\nok",
        )

    server = await start_server(script)
    pool = await make_pool(server.url)
    with trio.fail_after(10):
        async with pool.request("GET", "/") as response:
            assert response.status == 200
            assert response.headers == [(b"content-length", b"2")]
            assert await response.read() == b"ok"


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        (b"HTTP/1.1 2000 OK\r\n\r\n", "Invalid response status"),
        (b"HTTP/2 200 OK\r\n\r\n", "Expected dot"),
        (b"ICY 200 OK\r\n\r\n", "status line starts with"),
        (
            b"HTTP/1.1 200 OK\r\nX: a\rInjected: 1\r\nContent-Length: 0\r\n\r\n",
            "Missing expected LF",
        ),
        (
            b"HTTP/1.1 200 OK\r\nX: a\r\n folded\r\nContent-Length: 0\r\n\r\n",
            "whitespace after header",
        ),
        (b"HTTP/1.1 200 OK\r\nNo Colon\r\n\r\n", "Invalid header token"),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
            "Duplicate Content-Length",
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\nok",
            "Transfer-Encoding can't be present with Content-Length",
        ),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "Transfer-Encoding"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "Invalid character in Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokk\r\n",
            "Expected LF after chunk data",
        ),
        (b"HTTP/1.1 200 OK\r\nX: " + b"x" * 70_000 + b"\r\n\r\n", "over 65536 bytes"),
        (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "switched protocols"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\nX: "
            + b"a" * 150_000,  # the bound is checked read by read, so give it two
            "chunk framing or trailers",
        ),
    ],
)
async def test_malformed_answers_are_protocol_errors(
    start_server: StartServer, make_pool: MakePool, answer: bytes, says: str
) -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(answer)
        await peer.wait_closed()

    server = await start_server(script)
    pool = await make_pool(server.url)
    with pytest.raises(UpstreamProtocol, match=says) as error:
        await fetch(pool)
    assert error.value.message.startswith("test upstream ")
    with trio.fail_after(10):
        await server.peers[0].closed_by_client.wait()  # never kept after a bad answer


async def test_a_short_body_is_a_dropped_connection(
    start_server: StartServer, make_pool: MakePool
) -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")

    server = await start_server(script)
    pool = await make_pool(server.url)
    with pytest.raises(UpstreamProtocol, match="dropped the connection"):
        await fetch(pool)


async def test_a_chunked_body_cut_short_is_a_dropped_connection(
    start_server: StartServer, make_pool: MakePool
) -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel")

    server = await start_server(script)
    pool = await make_pool(server.url)
    got: list[bytes] = []
    with pytest.raises(UpstreamProtocol, match="dropped the connection"), trio.fail_after(10):
        await read_into(pool, got)
    assert got == [b"hel"]


# --------------------------------------------------------------------------- keep-alive


async def test_keep_alive_one_connection_for_sequential_requests(
    start_server: StartServer, make_pool: MakePool
) -> None:
    server = await start_server(answer_each(OK))
    pool = await make_pool(server.url)
    for _ in range(3):
        assert await fetch(pool) == (200, b"ok")
    assert server.connections == 1
    assert len(server.requests) == 3


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA",  # more than the answer
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\nEXTRA",
        b"HTTP/1.1 204 No Content\r\n\r\nEXTRA",
    ],
    ids=["connection-close", "http-1.0", "extra-after-length", "extra-after-chunked", "extra"],
)
async def test_connections_that_cannot_carry_another_request_are_closed(
    start_server: StartServer, make_pool: MakePool, answer: bytes
) -> None:
    server = await start_server(answer_each(answer))
    pool = await make_pool(server.url)
    for _ in range(2):
        status, body = await fetch(pool)
        assert body == (b"" if status == 204 else b"ok")
    assert server.connections == 2
    with trio.fail_after(10):
        await server.peers[0].closed_by_client.wait()


async def test_an_unread_body_closes_the_connection(
    start_server: StartServer, make_pool: MakePool
) -> None:
    server = await start_server(answer_each(OK))
    pool = await make_pool(server.url)
    with trio.fail_after(10):
        async with pool.request("GET", "/") as response:
            assert response.status == 200
    assert await fetch(pool) == (200, b"ok")
    assert server.connections == 2


async def test_a_connection_the_server_closed_while_idle_is_not_used(
    start_server: StartServer, make_pool: MakePool
) -> None:
    closed = trio.Event()

    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(OK)
        if peer.index == 0:
            await peer.close()  # while the pool holds it idle
            closed.set()
            return
        while await peer.request() is not None:
            await peer.send(OK)

    server = await start_server(script)
    pool = await make_pool(server.url)
    assert await fetch(pool) == (200, b"ok")
    with trio.fail_after(10):
        await closed.wait()
    assert pool._idle[-1].closed_while_idle()
    assert await fetch(pool) == (200, b"ok")
    # Checked before use: the second request went straight to a new connection.
    assert [index for index, _ in server.requests] == [0, 1]


async def closes_after_reading_the_second_request(peer: Peer) -> None:
    await peer.request()
    if peer.index == 0:
        await peer.send(OK)
        await peer.request()  # the race: read, then closed without an answer
        return
    await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nretried")


async def test_a_reused_connection_closed_before_any_answer_retries_a_get_once(
    start_server: StartServer, make_pool: MakePool
) -> None:
    server = await start_server(closes_after_reading_the_second_request)
    pool = await make_pool(server.url)
    assert await fetch(pool) == (200, b"ok")
    assert await fetch(pool, "GET") == (200, b"retried")
    assert [index for index, _ in server.requests] == [0, 0, 1]
    assert server.requests[1][1] == server.requests[2][1]


async def test_a_post_the_server_read_is_never_sent_twice(
    start_server: StartServer, make_pool: MakePool
) -> None:
    """A POST may be a generation: once written to a server that then closed, it fails
    (502 upstream) rather than running twice, as net/http decides too."""
    server = await start_server(closes_after_reading_the_second_request)
    pool = await make_pool(server.url)
    assert await fetch(pool) == (200, b"ok")
    with pytest.raises(UpstreamProtocol, match="dropped the connection"):
        await fetch(pool, "POST", body=b"again")
    assert [index for index, _ in server.requests] == [0, 0]


async def test_a_fresh_connection_closed_before_any_answer_is_not_retried(
    start_server: StartServer, make_pool: MakePool
) -> None:
    async def script(peer: Peer) -> None:
        await peer.request()

    server = await start_server(script)
    pool = await make_pool(server.url)
    with pytest.raises(UpstreamProtocol, match="dropped the connection"):
        await fetch(pool)
    assert server.connections == 1


async def test_no_retry_once_a_byte_of_the_answer_came(
    start_server: StartServer, make_pool: MakePool
) -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(OK)
        await peer.request()
        await peer.send(b"HTTP/1.1 200")

    server = await start_server(script)
    pool = await make_pool(server.url)
    assert await fetch(pool) == (200, b"ok")
    with pytest.raises(UpstreamProtocol, match="dropped the connection"):
        await fetch(pool)
    assert server.connections == 1


async def test_idle_connections_expire(
    start_server: StartServer, make_pool: MakePool, autojump_clock: trio.abc.Clock
) -> None:
    server = await start_server(answer_each(OK))
    pool = await make_pool(server.url, keepalive_expiry_s=30.0)
    assert await fetch(pool) == (200, b"ok")
    await trio.sleep(29)
    assert await fetch(pool) == (200, b"ok")  # still fresh: reused
    assert server.connections == 1
    with trio.fail_after(31):
        await server.peers[0].closed_by_client.wait()  # the watchdog closed it
    assert trio.current_time() == pytest.approx(29 + 30, abs=0.01)
    assert await fetch(pool) == (200, b"ok")
    assert server.connections == 2


# ---------------------------------------------------------------- deadlines and errors


async def test_a_refused_connection_is_unavailable(make_pool: MakePool) -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    pool = await make_pool(f"http://127.0.0.1:{port}")
    with pytest.raises(UpstreamUnavailable, match=r"test upstream is unreachable: .*refused"):
        await fetch(pool)


async def test_a_connection_not_accepted_in_time_is_unavailable(
    make_pool: MakePool, autojump_clock: trio.abc.Clock
) -> None:
    with trio.socket.socket() as listener, trio.socket.socket() as filler:
        await listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        await filler.connect(listener.getsockname())  # the one place in the accept queue
        pool = await make_pool(
            f"http://127.0.0.1:{listener.getsockname()[1]}", connect_timeout_s=2.0
        )
        started = trio.current_time()
        with pytest.raises(UpstreamUnavailable, match="did not accept a connection in time"):
            await fetch(pool)
        assert trio.current_time() - started == pytest.approx(2.0, abs=0.01)


async def test_no_head_in_time_is_our_timeout(
    start_server: StartServer, make_pool: MakePool, autojump_clock: trio.abc.Clock
) -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.server.release.wait()

    server = await start_server(script)
    pool = await make_pool(server.url)
    started = trio.current_time()
    with pytest.raises(UpstreamTimeout, match=r"test upstream sent no answer within 2\.5 s"):
        await fetch(pool, first_byte_timeout_s=2.5)
    assert trio.current_time() - started == pytest.approx(2.5, abs=0.01)
    with trio.fail_after(1):
        await server.peers[0].wait_closed()


async def test_silence_mid_body_is_our_timeout_but_the_callers_own_time_is_not(
    start_server: StartServer, make_pool: MakePool, autojump_clock: trio.abc.Clock
) -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"1\r\na\r\n")
        await peer.server.release.wait()
        await peer.send(b"1\r\nb\r\n")
        await trio.sleep_forever()

    server = await start_server(script)
    pool = await make_pool(server.url, idle_timeout_s=5.0)
    got: list[bytes] = []
    resumed: list[float] = []

    async def slow_caller() -> None:
        await trio.sleep(60)  # the caller's own time: not the upstream's silence
        server.release.set()
        resumed.append(trio.current_time())

    with pytest.raises(UpstreamTimeout, match="test upstream sent nothing for too long"):
        await read_into(pool, got, slow_caller)
    assert got == [b"a", b"b"]
    assert trio.current_time() - resumed[0] == pytest.approx(5.0, abs=0.01)


async def test_the_callers_cancellation_is_never_swallowed(
    start_server: StartServer, make_pool: MakePool, autojump_clock: trio.abc.Clock
) -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.server.release.wait()

    server = await start_server(script)
    pool = await make_pool(server.url)
    with trio.move_on_after(3) as outer:
        await fetch(pool, first_byte_timeout_s=10)
    assert outer.cancelled_caught
    with trio.fail_after(1):
        await server.peers[0].wait_closed()


async def test_a_cancelled_caller_closes_the_connection_mid_body(
    start_server: StartServer, make_pool: MakePool
) -> None:
    async def script(peer: Peer) -> None:
        if await peer.request() is None:
            return
        if peer.index == 0:
            await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
            await peer.wait_closed()
        else:
            await peer.send(OK)

    server = await start_server(script)
    pool = await make_pool(server.url, max_connections=1)
    with trio.CancelScope() as scope, trio.fail_after(10):
        async with pool.request("GET", "/") as response:
            async for chunk in response:
                assert chunk == b"half"
                scope.cancel()
    assert scope.cancelled_caught
    with trio.fail_after(10):
        await server.peers[0].closed_by_client.wait()
    assert await fetch(pool) == (200, b"ok")  # its one slot is free again
    assert server.connections == 2


async def test_callers_wait_in_order_for_a_free_connection(
    start_server: StartServer, make_pool: MakePool
) -> None:
    server = await start_server(answer_each(OK))
    pool = await make_pool(server.url, max_connections=1)
    order: list[str] = []

    async def call(name: str) -> None:
        assert await fetch(pool) == (200, b"ok")
        order.append(name)

    with trio.fail_after(10):
        async with pool.request("GET", "/") as first, trio.open_nursery() as nursery:
            for name in "BCD":
                nursery.start_soon(call, name)
                await trio.testing.wait_all_tasks_blocked()
            assert order == []
            assert await first.read() == b"ok"
            await first.aclose()
    assert order == ["B", "C", "D"]
    assert server.connections == 1


async def test_no_free_connection_in_time(
    start_server: StartServer, make_pool: MakePool, autojump_clock: trio.abc.Clock
) -> None:
    server = await start_server(answer_each(OK))
    pool = await make_pool(server.url, max_connections=1, connect_timeout_s=2.0)
    async with pool.request("GET", "/"):
        started = trio.current_time()
        with pytest.raises(UpstreamUnavailable, match="no free connection to test upstream"):
            await fetch(pool)
        assert trio.current_time() - started == pytest.approx(2.0, abs=0.01)


# ------------------------------------------------------------------ what the pool sends


@pytest.mark.parametrize("value", [b"a\r\nInjected: 1", b"a\nb", b"a\rb", b"a\x00b", b"a\x7f"])
async def test_header_values_with_control_bytes_are_refused(
    start_server: StartServer, make_pool: MakePool, value: bytes
) -> None:
    server = await start_server(answer_each(OK))
    pool = await make_pool(server.url)
    with pytest.raises(BadRequest, match="cannot be sent"):
        await fetch(pool, headers=[(b"x-test", value)])
    with pytest.raises(BadRequest, match="cannot be sent"):
        await fetch(pool, headers=[(b"bad name", b"x")])
    with pytest.raises(ValueError, match="pool's to write"):
        await fetch(pool, headers=[(b"Content-Length", b"5")])
    assert server.connections == 0
    assert await fetch(pool, headers=[(b"x-test", b"tab\tand \xe9 are fine")]) == (200, b"ok")


async def test_a_base_path_is_kept_and_url_credentials_are_basic_auth(
    start_server: StartServer, make_pool: MakePool
) -> None:
    server = await start_server(answer_each(OK))
    pool = await make_pool(f"http://us%40r:p%3Ass@127.0.0.1:{server.port}/base/")
    await fetch(pool, path="/api/tags", headers=[(b"authorization", b"Bearer replaced")])
    head = server.requests[0][1]
    assert head.startswith(b"GET /base/api/tags HTTP/1.1\r\n")
    assert b"Authorization: Basic dXNAcjpwOnNz\r\n" in head  # "us@r:p:ss"
    assert b"Bearer" not in head


async def test_a_large_body_arrives_whole(start_server: StartServer, make_pool: MakePool) -> None:
    body = bytes(range(256)) * 4096  # 1 MiB, sent after the head
    server = await start_server(answer_each(OK))
    pool = await make_pool(server.url)
    assert await fetch(pool, "POST", body=body) == (200, b"ok")
    assert server.requests[0][1].endswith(b"\r\nContent-Length: 1048576\r\n\r\n" + body)


async def test_requests_need_the_watchdog() -> None:
    pool = ConnectionPool(
        "http://127.0.0.1:9", name="x", connect_timeout_s=1.0, idle_timeout_s=1.0, max_connections=1
    )
    with pytest.raises(RuntimeError, match="run"):
        pool.request("GET", "/")
    await pool.aclose()


async def start_https(nursery: trio.Nursery, script: Script) -> tuple[Server, ssl.SSLContext]:
    """A TLS server for `script`, and a client context that trusts it."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    server = Server(script)
    listeners = await nursery.start(
        partial(trio.serve_ssl_over_tcp, server.handle, 0, server_context, host="127.0.0.1")
    )
    server.port = listeners[0].transport_listener.socket.getsockname()[1]
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    return server, client_context


async def test_https_with_keep_alive(nursery: trio.Nursery, make_pool: MakePool) -> None:
    server, context = await start_https(nursery, answer_each(OK))
    url = f"https://127.0.0.1:{server.port}"
    pool = await make_pool(url, ssl_context=context)
    assert await fetch(pool) == (200, b"ok")
    assert await fetch(pool) == (200, b"ok")
    assert server.connections == 1
    untrusted = await make_pool(url)
    with pytest.raises(UpstreamUnavailable, match=r"unreachable: .*CERTIFICATE_VERIFY_FAILED"):
        await fetch(untrusted)


async def test_https_silence_mid_body_is_our_timeout(
    nursery: trio.Nursery, make_pool: MakePool, autojump_clock: trio.abc.Clock
) -> None:
    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", b"part")
        await peer.server.release.wait()

    server, context = await start_https(nursery, script)
    pool = await make_pool(f"https://127.0.0.1:{server.port}", ssl_context=context)
    got: list[bytes] = []
    with pytest.raises(UpstreamTimeout, match="sent nothing for too long"):
        await read_into(pool, got)
    assert got == [b"part"]
    server.release.set()


async def test_a_body_that_is_always_ready_still_lets_other_tasks_run(
    start_server: StartServer, make_pool: MakePool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reads that find data waiting skip trio's scheduler; a long run of them (a large
    download) must still yield now and then, or the rest of the gateway stalls. Here the
    whole body is in the socket buffers before the first read (small reads, so that a
    body that fits in the buffers takes many)."""
    monkeypatch.setattr(connection_module, "READ_BYTES", 512)
    body = b"x" * (64 * 512)
    sent = trio.Event()

    async def script(peer: Peer) -> None:
        await peer.request()
        await peer.stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
        await peer.stream.send_all(body)
        sent.set()
        await peer.wait_closed()

    server = await start_server(script)
    pool = await make_pool(server.url)
    ticks = 0
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def tick() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    await trio.lowlevel.checkpoint()

            async with pool.request("GET", "/") as response:
                await sent.wait()
                nursery.start_soon(tick)  # runs only when the reading task yields
                received = 0
                seen = ticks
                reads = 0
                async for chunk in response:
                    received += len(chunk)
                    reads += 1
                ran = ticks - seen
            nursery.cancel_scope.cancel()
    assert received == len(body)
    assert reads >= 64
    assert ran >= reads // 16 - 1, (ran, reads)
