"""The DNS-rebinding guard (ADR 0013): on a loopback bind only local names and addresses
pass as `Host`; the rule alone, then through the whole gateway on real sockets."""

from __future__ import annotations

import json

import pytest
import trio

from gateway.web.host_guard import HostGuard, guards, host_name
from tests.conftest import StartGateway, make_config
from tests.emulators import OllamaEmulator


@pytest.mark.parametrize(
    ("bind", "on"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("192.168.1.5", False),
        ("::", False),
        ("gateway.lan", False),
    ],
)
def test_the_guard_is_on_for_a_loopback_bind_only(bind: str, on: bool) -> None:
    assert guards(bind) is on


@pytest.mark.parametrize(
    ("value", "name"),
    [
        (b"localhost:11435", "localhost"),
        (b"LocalHost", "localhost"),
        (b"[::1]:8080", "::1"),
        (b"[::1]", "::1"),
        (b"127.0.0.1", "127.0.0.1"),
        (b"evil.example:80", "evil.example"),
        (b"evil.example:x", "evil.example:x"),
        (None, ""),
    ],
)
def test_host_name_drops_the_port_and_brackets(value: bytes | None, name: str) -> None:
    assert host_name(value) == name


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (None, True),  # HTTP/1.0 without Host: nothing to rebind
        (b"localhost:11435", True),
        (b"box:11435", True),  # this machine's hostname
        (b"gpu.local", True),
        (b"app.localhost", True),
        (b"svc.internal", True),
        (b"127.0.0.1:11435", True),
        (b"[::1]:11435", True),
        (b"10.1.2.3", True),
        (b"192.168.0.9:11435", True),
        (b"0.0.0.0", True),
        (b"proxy.example.com", True),  # configured
        (b"evil.example", False),
        (b"evil.example:11435", False),
        (b"localhost.evil.example", False),
        (b"8.8.8.8", False),
        (b"local", False),
        (b"evil.localhost.example", False),
    ],
)
def test_only_local_names_addresses_and_configured_names_pass(
    value: bytes | None, ok: bool
) -> None:
    guard = HostGuard("127.0.0.1", ["Proxy.Example.com"], hostname="BOX")
    assert guard.allowed(value) is ok


def test_a_lan_bind_or_a_star_turns_the_check_off() -> None:
    assert HostGuard("0.0.0.0", [], hostname="box").allowed(b"evil.example")
    assert HostGuard("127.0.0.1", ["*"], hostname="box").allowed(b"evil.example")
    assert not HostGuard("127.0.0.1", [], hostname="box").allowed(b"evil.example")


async def raw(url: str, request: bytes) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(request)
        data = b""
        with trio.fail_after(5):
            while True:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def request(path: str, host: str, body: bytes = b"") -> bytes:
    method = "POST" if body else "GET"
    return (
        f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def test_a_rebound_name_is_refused_in_each_routes_shape_and_reaches_nothing(
    start_gateway: StartGateway, ollama: OllamaEmulator
) -> None:
    gw = await start_gateway(make_config(ollama.url, allowed_hosts=[]))
    chat = json.dumps({"model": "llama3", "messages": [{"role": "user", "content": "x"}]})
    status, body = await raw(gw.url, request("/api/chat", "evil.example:11435", chat.encode()))
    assert status == 403
    assert "DNS rebinding" in json.loads(body)["error"]
    status, body = await raw(gw.url, request("/v1/chat/completions", "evil.example", chat.encode()))
    assert status == 403
    assert json.loads(body)["error"]["type"]  # OpenAI's shape
    status, _ = await raw(gw.url, request("/status.json", "evil.example"))
    assert status == 403
    assert ollama.requests_to("/api/chat") == []
    # /health too (as Ollama refuses every route): local probes use a local name or the
    # address, which pass.
    status, _ = await raw(gw.url, request("/health", "evil.example"))
    assert status == 403
    status, _ = await raw(gw.url, request("/health", "localhost"))
    assert status == 200
    port = gw.url.rsplit(":", 1)[1]
    status, body = await raw(gw.url, request("/api/chat", f"127.0.0.1:{port}", chat.encode()))
    assert status == 200
    assert len(ollama.requests_to("/api/chat")) == 1


async def test_a_lan_bind_is_not_guarded(
    start_gateway: StartGateway, ollama: OllamaEmulator
) -> None:
    gw = await start_gateway(make_config(ollama.url, bind="0.0.0.0:0", allowed_hosts=[]))
    port = gw.url.rsplit(":", 1)[1]
    status, _ = await raw(f"http://127.0.0.1:{port}", request("/health", "gateway.lan"))
    assert status == 200


def test_decisions_are_remembered_for_a_bounded_number_of_host_values() -> None:
    guard = HostGuard("127.0.0.1", [], hostname="box")
    for n in range(1000):  # a client sending a new Host each time
        assert guard.allowed(f"evil{n}.example".encode()) is False
    assert guard.allowed(b"127.0.0.1:1") is True  # still decided, past the bound
    assert len(guard._seen) == 256
