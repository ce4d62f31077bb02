"""The gateway's HTTP/1.1 server (`gateway.h1.serve` through `gateway.server.serve_http`),
with small ASGI apps, spoken to byte by byte over real sockets on 127.0.0.1."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio
import trio.lowlevel
import trio.testing

from gateway.drain import Drain
from gateway.server import hypercorn_config, serve_http

Message = dict[str, Any]
App = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


@dataclass
class Seen:
    """What the app saw of each request."""

    scopes: list[dict[str, Any]] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    disconnected: trio.Event = field(default_factory=trio.Event)


async def lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        await send({"type": message["type"] + ".complete"})
        if message["type"] == "lifespan.shutdown":
            return


class Left(Exception):
    """The client left before its body arrived."""


async def read_all(receive: Any) -> bytes:
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Left
        assert message["type"] == "http.request", message
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


def echo_app(seen: Seen) -> App:
    """Answers `<method> <path> <body length>` with a Content-Length, or in two chunks
    when the path is `/chunked`."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        seen.scopes.append(scope)
        try:
            body = await read_all(receive)
        except Left:
            return
        seen.bodies.append(body)
        answer = f"{scope['method']} {scope['path']} {len(body)}".encode()
        if scope["path"] == "/chunked":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": answer, "more_body": True})
            await send({"type": "http.response.body", "body": b"!", "more_body": False})
            return
        headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(answer))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer})

    return app


@asynccontextmanager
async def serving(
    app: App,
    *,
    keep_alive_timeout_s: float = 5.0,
    write_timeout_s: float = 5.0,
    request_body_timeout_s: float = 60.0,
) -> AsyncIterator[tuple[str, int, trio.Event]]:
    """Run the server on port 0; yields host, port and the event that shuts it down."""
    stop = trio.Event()
    config = hypercorn_config(
        "127.0.0.1:0", keep_alive_timeout_s=keep_alive_timeout_s, max_body_bytes=1 << 20, grace_s=1
    )
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            lambda task_status: serve_http(
                app,
                config,
                drain=Drain(),
                grace_s=1.0,
                write_timeout_s=write_timeout_s,
                request_body_timeout_s=request_body_timeout_s,
                shutdown_trigger=stop.wait,
                task_status=task_status,
            )
        )
        host, port = binds[0].removeprefix("http://").rsplit(":", 1)
        yield host, int(port), stop
        stop.set()


async def exchange(host: str, port: int, data: bytes, *, timeout_s: float = 5.0) -> bytes:
    """Send `data`, then read until the server closes the connection."""
    with trio.fail_after(timeout_s):
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            await stream.send_all(data)
            answer = b""
            while chunk := await stream.receive_some(65536):
                answer += chunk
            return answer


def split_answers(data: bytes) -> list[tuple[bytes, dict[bytes, bytes], bytes]]:
    """Answers with a Content-Length or chunked body, in order: (status line, fields, body)."""
    answers = []
    while data:
        head, _, data = data.partition(b"\r\n\r\n")
        status, *lines = head.split(b"\r\n")
        fields = {k.lower(): v for k, _, v in (line.partition(b": ") for line in lines)}
        if b"content-length" in fields:
            n = int(fields[b"content-length"])
            body, data = data[:n], data[n:]
        elif fields.get(b"transfer-encoding") == b"chunked":
            body = b""
            while True:
                size_line, _, data = data.partition(b"\r\n")
                size = int(size_line, 16)
                body, data = body + data[:size], data[size + 2 :]
                if size == 0:
                    break
        else:
            body, data = data, b""
        answers.append((status, fields, body))
    return answers


CLOSE = b"GET /last HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n"


async def test_keep_alive_and_pipelined_requests_are_answered_in_order() -> None:
    seen = Seen()
    async with serving(echo_app(seen)) as (host, port, _):
        answer = await exchange(
            host,
            port,
            b"POST /a?x=1 HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\n\r\nhello"
            b"GET /chunked HTTP/1.1\r\nhost: t\r\n\r\n" + CLOSE,
        )
    answers = split_answers(answer)
    assert [body for _, _, body in answers] == [b"POST /a 5", b"GET /chunked 0!", b"GET /last 0"]
    assert all(status == b"HTTP/1.1 200 OK" for status, _, _ in answers)
    first, second, last = (fields for _, fields, _ in answers)
    assert first[b"content-type"] == b"text/plain"
    assert b"date" in first
    assert second[b"transfer-encoding"] == b"chunked"
    assert last[b"connection"] == b"close"
    assert seen.scopes[0]["query_string"] == b"x=1"
    assert seen.scopes[0]["headers"][:2] == [(b"host", b"t"), (b"content-length", b"5")]
    assert seen.scopes[0]["http_version"] == "1.1"
    assert seen.scopes[0]["client"][0] == "127.0.0.1"


async def test_a_chunked_request_body_reaches_the_app_decoded() -> None:
    seen = Seen()
    async with serving(echo_app(seen)) as (host, port, _):
        answer = await exchange(
            host,
            port,
            b"POST /up HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n4;ext=x\r\ndefg\r\n0\r\ntrailer: y\r\n\r\n" + CLOSE,
        )
    assert seen.bodies[0] == b"abcdefg"
    assert [body for _, _, body in split_answers(answer)] == [b"POST /up 7", b"GET /last 0"]


async def test_expect_100_continue_is_answered_before_the_body_is_sent() -> None:
    seen = Seen()
    async with serving(echo_app(seen)) as (host, port, _):
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(
                    b"POST /e HTTP/1.1\r\nhost: t\r\nexpect: 100-continue\r\n"
                    b"content-length: 3\r\nconnection: close\r\n\r\n"
                )
                interim = await stream.receive_some(65536)
                assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
                await stream.send_all(b"abc")
                rest = b""
                while chunk := await stream.receive_some(65536):
                    rest += chunk
    assert split_answers(rest)[0][2] == b"POST /e 3"


async def test_http_1_0_gets_a_close_delimited_answer() -> None:
    async with serving(echo_app(Seen())) as (host, port, _):
        answer = await exchange(host, port, b"GET /chunked HTTP/1.0\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"transfer-encoding" not in head.lower()
    assert b"connection: close" in head.lower()
    assert body == b"GET /chunked 0!"


async def test_head_keeps_the_length_and_sends_no_body() -> None:
    async with serving(echo_app(Seen())) as (host, port, _):
        answer = await exchange(host, port, b"HEAD /h HTTP/1.1\r\nhost: t\r\n\r\n" + CLOSE)
    first, _, rest = answer.partition(b"\r\n\r\n")
    assert first.lower().count(b"content-length") == 1
    assert b"content-length: 9" in first.lower()  # len(b"HEAD /h 0"), as a GET would say
    assert rest.startswith(b"HTTP/1.1 200 OK")


async def test_malformed_requests_get_a_json_400_and_a_close() -> None:
    seen = Seen()
    async with serving(echo_app(seen)) as (host, port, _):
        for request in [
            b"GET /\xff HTTP/1.1\r\nhost: t\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",  # no Host
            b"GET / HTTP/1.1\r\nhost: t\r\n folded: header\r\n\r\n",
            b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 3\r\n"
            b"transfer-encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 3, 4\r\n\r\nabcd",
            b"POST / HTTP/1.1\r\nhost: t\r\ntransfer-encoding: gzip\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        ]:
            answer = await exchange(host, port, request)
            [(status, fields, body)] = split_answers(answer)
            assert status == b"HTTP/1.1 400 Bad Request", (request, answer)
            assert fields[b"connection"] == b"close"
            assert json.loads(body)["error"].startswith("malformed HTTP request"), body
    assert seen.scopes == []  # the app never ran


async def test_a_head_over_64_kib_gets_431() -> None:
    async with serving(echo_app(Seen())) as (host, port, _):
        answer = await exchange(
            host, port, b"GET / HTTP/1.1\r\nhost: t\r\nx-big: " + b"a" * 70_000 + b"\r\n\r\n"
        )
    assert answer.startswith(b"HTTP/1.1 431 ")


async def test_an_idle_keep_alive_connection_is_closed_after_its_timeout() -> None:
    async with serving(echo_app(Seen()), keep_alive_timeout_s=0.2) as (host, port, _):
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(b"GET /a HTTP/1.1\r\nhost: t\r\n\r\n")
                started = trio.current_time()
                answer = b""
                while chunk := await stream.receive_some(65536):
                    answer += chunk
                waited = trio.current_time() - started
    assert split_answers(answer)[0][2] == b"GET /a 0"
    assert 0.15 < waited < 2.0


async def test_the_app_sees_the_client_leave_while_it_works() -> None:
    seen = Seen()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        await read_all(receive)
        assert (await receive())["type"] == "http.disconnect"
        seen.disconnected.set()

    async with serving(app) as (host, port, _):
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream(host, port)
            await stream.send_all(b"POST /w HTTP/1.1\r\nhost: t\r\ncontent-length: 1\r\n\r\nx")
            await stream.aclose()
            await seen.disconnected.wait()


async def test_a_client_that_stops_reading_is_dropped_after_the_write_timeout() -> None:
    outcome: dict[str, Any] = {}
    done = trio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        await read_all(receive)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        sent = 0
        started = trio.current_time()
        # The client reads nothing: socket buffers fill, then a write waits, then the
        # connection is dropped and the app's `receive` says the client is gone.
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                outcome["message"] = (await receive())["type"]
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            while True:
                await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})
                sent += 65536
                await trio.lowlevel.checkpoint()
        outcome["sent"] = sent
        outcome["after_s"] = trio.current_time() - started
        done.set()

    async with serving(app, write_timeout_s=0.3) as (host, port, _):
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(b"GET /flood HTTP/1.1\r\nhost: t\r\n\r\n")
                await done.wait()
    assert outcome["message"] == "http.disconnect"
    assert outcome["sent"] > 65536
    assert 0.25 < outcome["after_s"] < 5


async def test_an_app_failure_is_a_500_and_the_server_keeps_serving() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["path"] == "/boom":
            raise ValueError("boom")
        if scope["path"] == "/bad-header":
            headers = [(b"x-bad", b"a\r\nb")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b"never"})
        await echo_app(Seen())(scope, receive, send)

    async with serving(app) as (host, port, _):
        for path in [b"/boom", b"/bad-header"]:
            answer = await exchange(host, port, b"GET " + path + b" HTTP/1.1\r\nhost: t\r\n\r\n")
            [(status, fields, body)] = split_answers(answer)
            assert status == b"HTTP/1.1 500 Internal Server Error", answer
            assert b"x-bad" not in fields
            assert b"never" not in answer
            assert json.loads(body)["error"] == "internal error"
        answer = await exchange(host, port, CLOSE)
    assert split_answers(answer)[0][2] == b"GET /last 0"


async def test_an_early_answer_reaches_a_client_still_uploading() -> None:
    """A 413 sent before the body is read: the server closes, but first reads and drops
    the rest of the upload, so the client gets the answer rather than a reset."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        body = b'{"error":"too large"}'
        headers = [(b"content-length", b"%d" % len(body)), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async with serving(app) as (host, port, _):
        upload = b"y" * (4 << 20)
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(
                    b"POST /big HTTP/1.1\r\nhost: t\r\ncontent-length: %d\r\n\r\n" % len(upload)
                )
                await stream.send_all(upload)
                answer = b""
                while chunk := await stream.receive_some(65536):
                    answer += chunk
    [(status, fields, body)] = split_answers(answer)
    assert status == b"HTTP/1.1 413 Content Too Large"
    assert fields[b"connection"] == b"close"
    assert body == b'{"error":"too large"}'


async def test_shutdown_closes_idle_connections_at_once() -> None:
    async with serving(echo_app(Seen()), keep_alive_timeout_s=60) as (host, port, stop):
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(b"GET /a HTTP/1.1\r\nhost: t\r\n\r\n")
                answer = await stream.receive_some(65536)
                assert split_answers(answer)[0][2] == b"GET /a 0"
                stop.set()
                assert await stream.receive_some(65536) == b""


async def test_cancel_on_disconnect_cancels_the_work_of_a_client_that_left() -> None:
    """The `gateway.cancel_on_disconnect` extension: the app hands the server a cancel
    scope instead of running its own watcher task; the server cancels it when the client
    leaves mid-request, and not when the answer completes (the connection serves on)."""
    outcome: dict[str, bool] = {}
    registered = trio.Event()
    done = trio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        await read_all(receive)
        with trio.CancelScope() as work:
            scope["extensions"]["gateway.cancel_on_disconnect"](work)
            if scope["path"] == "/hang":
                registered.set()
                await trio.sleep_forever()
            body = b"quick"
            headers = [(b"content-length", b"5")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            await trio.testing.wait_all_tasks_blocked()  # after the answer: no cancel
        outcome[scope["path"]] = work.cancelled_caught
        if scope["path"] == "/hang":
            done.set()

    async with serving(app) as (host, port, _):
        answer = await exchange(
            host,
            port,
            b"GET /quick HTTP/1.1\r\nhost: t\r\n\r\n" + CLOSE.replace(b"last", b"quick2"),
        )
        assert [body for _, _, body in split_answers(answer)] == [b"quick", b"quick"]
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream(host, port)
            await stream.send_all(b"GET /hang HTTP/1.1\r\nhost: t\r\n\r\n")
            await registered.wait()
            await stream.aclose()
            await done.wait()
    assert outcome == {"/quick": False, "/quick2": False, "/hang": True}


async def test_a_body_that_stops_arriving_gets_408_and_a_broken_one_400() -> None:
    """A client that sends a head and part of its body, then nothing: after
    `keep_alive_timeout_s` without a byte the app is told the client left and the server
    answers 408 itself. A chunked body whose framing breaks gets 400. Both close."""
    seen = Seen()
    async with serving(echo_app(seen), keep_alive_timeout_s=0.3) as (host, port, _):
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(
                    b"POST /slow HTTP/1.1\r\nhost: t\r\ncontent-length: 100\r\n\r\n" + b"x" * 10
                )
                answer = b""
                while chunk := await stream.receive_some(65536):
                    answer += chunk
        [(status, fields, body)] = split_answers(answer)
        assert status == b"HTTP/1.1 408 Request Timeout"
        assert fields[b"connection"] == b"close"
        assert "stopped arriving" in json.loads(body)["error"]
        answer = await exchange(
            host,
            port,
            b"POST /chunks HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n"
            b"5\r\nabc\r\nzz\r\n",
        )
        [(status, fields, body)] = split_answers(answer)
        assert status == b"HTTP/1.1 400 Bad Request"
        assert "malformed chunked request body" in json.loads(body)["error"]
    assert seen.bodies == []  # the app never got either body whole


async def test_a_body_trickled_in_gets_408_at_the_overall_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Issue 13: a body that never stalls for `keep_alive_timeout_s` (a byte every 4 s
    here, 5 s allowed) could take forever. `request_body_timeout_s` bounds the whole."""
    seen = Seen()
    async with serving(echo_app(seen), keep_alive_timeout_s=5.0, request_body_timeout_s=20.0) as (
        host,
        port,
        _,
    ):
        with trio.fail_after(60):
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                started = trio.current_time()
                await stream.send_all(
                    b"POST /slow HTTP/1.1\r\nhost: t\r\ncontent-length: 100\r\n\r\n"
                )
                answer = b""
                while True:
                    with trio.move_on_after(4):
                        answer = await stream.receive_some(65536)
                        break
                    await stream.send_all(b"x")
                while chunk := await stream.receive_some(65536):
                    answer += chunk
                took = trio.current_time() - started
    [(status, fields, body)] = split_answers(answer)
    assert status == b"HTTP/1.1 408 Request Timeout"
    assert fields[b"connection"] == b"close"
    assert "took too long" in json.loads(body)["error"]
    assert 20.0 <= took < 21.0
    assert seen.bodies == []


async def test_a_client_that_leaves_after_its_request_is_not_a_500(
    all_logs: io.StringIO,
) -> None:
    """Issue 13: a client that half-closed after a complete request got `500 internal
    error: no answer` and an error log line. It has left: its work is cancelled, nothing
    is written, nothing logged as an error, whether it asked to close or not."""
    cancelled = trio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        await read_all(receive)
        with trio.CancelScope() as work:
            scope["extensions"]["gateway.cancel_on_disconnect"](work)
            if scope["path"] == "/slow":
                await trio.sleep_forever()
        if work.cancelled_caught:
            cancelled.set()
            return
        headers = [(b"content-length", b"2")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    async with serving(app) as (host, port, _):
        with trio.fail_after(5):
            for request, expected in [
                (b"GET /slow HTTP/1.1\r\nhost: t\r\n\r\n", b""),
                (b"GET /slow HTTP/1.0\r\n\r\n", b""),
                (b"GET /slow HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n", b""),
            ]:
                stream = await trio.open_tcp_stream(host, port)
                async with stream:
                    await stream.send_all(request)
                    await stream.send_eof()
                    answer = b""
                    while chunk := await stream.receive_some(65536):
                        answer += chunk
                assert answer == expected, answer
                await cancelled.wait()
                cancelled = trio.Event()
    errors = [line for line in all_logs.getvalue().splitlines() if '"level":"error"' in line]
    assert errors == []
