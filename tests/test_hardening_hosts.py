"""Attacks on the several-hosts surfaces (ADR 0020) through the whole gateway on real
sockets, two or three Ollama emulators on port 0: credentials in host URLs, the `?host=`
parameter of the management routes, hosts that answer garbage, lie or reset, and
clients that leave while queued on several gates."""

from __future__ import annotations

import json
import logging

import pytest
import trio

from gateway.cli import render_config
from tests.conftest import RunningGateway, StartGateway, eventually, make_config
from tests.emulators import OllamaEmulator
from tests.emulators.http import Faults
from tests.test_faults import gateway_tasks, settle_tasks
from tests.test_hosts import LLAMA, QWEN, chats, emulator, post_chat, start_hosts
from tests.test_secrets import Evidence, marker

URL_USER = marker("urluser")  # a credential as the whole userinfo: http://<token>@host
URL_PASSWORD = marker("urlpass")
HOST_TOKEN = marker("hosttoken")


async def _free_port() -> int:
    with trio.socket.socket() as probe:
        await probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_no_host_credential_shows_in_health_status_metrics_errors_or_logs(
    start_gateway: StartGateway, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """A host URL may carry a credential as user and password, or as the user alone (a
    token, as in https://<token>@host); a host reads a bearer from `token_env`. With one
    host up and two down (the errors that name hosts most), none of them shows."""
    caplog.set_level(logging.DEBUG)
    evidence = Evidence()
    up = await emulator(nursery, [LLAMA])
    gone, also_gone = await _free_port(), await _free_port()
    hosts = {
        "up": {"url": up.url.replace("http://", f"http://user:{URL_PASSWORD}@")},
        "tok": {"url": f"http://{URL_USER}@127.0.0.1:{gone}", "token_env": "TOK_TOKEN"},
        "pw": {"url": f"http://u:{URL_PASSWORD}@127.0.0.1:{also_gone}"},
    }
    gw = await start_gateway(
        make_config(up.url, ollama={"hosts": hosts}),
        environ={"TOK_TOKEN": HOST_TOKEN},
    )
    down = [h for h in gw.services.hosts if h.name != "up"]
    await eventually(lambda: not any(h.healthy for h in down))
    for method, path, body in (
        ("POST", "/api/chat", {"model": "qwen9", "messages": []}),  # 404 after a re-poll
        ("POST", "/api/chat", {"model": "llama3", "messages": [], "stream": False}),
        ("GET", "/api/tags", None),
        ("GET", "/health", None),
        ("GET", "/ready", None),
        ("GET", "/metrics", None),
        ("GET", "/status.json", None),
        ("GET", "/status", None),
    ):
        response = await gw.client.request(method, path, json=body)
        evidence.response(f"{method} {path}", response)
    health = (await gw.client.get("/health")).json()
    assert health["hosts"]["tok"]["degraded"] is True
    assert health["hosts"]["tok"]["target"] == f"http://***@127.0.0.1:{gone}"
    assert health["hosts"]["pw"]["target"] == f"http://u:***@127.0.0.1:{also_gone}"
    status = (await gw.client.get("/status.json")).json()
    assert {h["url"] for h in status["hosts"]} >= {f"http://***@127.0.0.1:{gone}"}
    evidence.logs(caplog.records)
    _assert_clean(evidence)


def _assert_clean(evidence: Evidence) -> None:
    tails = {
        name: value.rsplit("-", 1)[1]
        for name, value in (
            ("url user", URL_USER),
            ("url password", URL_PASSWORD),
            ("host token", HOST_TOKEN),
        )
    }
    leaks = sorted(
        {
            f"{name} in {where}"
            for where, text in evidence.texts
            for name, tail in tails.items()
            if tail in text
        }
    )
    assert evidence.texts
    assert not leaks, leaks


async def test_no_credential_in_a_provider_base_url_shows(
    start_gateway: StartGateway, ollama: OllamaEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    """A provider's base URL may carry a credential too (a proxy's user and password):
    /v1/chat/providers, the status page, its errors and check-config show it redacted."""
    caplog.set_level(logging.DEBUG)
    evidence = Evidence()
    port = await _free_port()
    base_url = f"http://proxy:{URL_PASSWORD}@127.0.0.1:{port}/api/v1"
    config = make_config(ollama.url, providers={"openrouter": {"base_url": base_url}})
    gw = await start_gateway(config, environ={"OPENROUTER_API_KEY": HOST_TOKEN})
    for method, path, body in (
        ("GET", "/v1/chat/providers", None),
        (
            "POST",
            "/v1/chat",
            {"model": "openrouter/x/y", "messages": [{"role": "user", "content": "hi"}]},
        ),
        ("POST", "/v1/chat/completions", {"model": "openrouter/x/y", "messages": []}),
        ("GET", "/status.json", None),
        ("GET", "/health", None),
    ):
        response = await gw.client.request(method, path, json=body)
        evidence.response(f"{method} {path}", response)
    listed = (await gw.client.get("/v1/chat/providers")).json()
    assert f"http://proxy:***@127.0.0.1:{port}/api/v1" in str(listed)
    evidence.add("check-config", render_config(config, {"OPENROUTER_API_KEY": HOST_TOKEN}))
    evidence.logs(caplog.records)
    _assert_clean(evidence)


async def test_the_host_parameter_names_one_host_or_is_refused(
    start_gateway: StartGateway, nursery: trio.Nursery
) -> None:
    """`?host=` on a management route picks the one host it changes: a request whose
    parameter is empty, unknown, repeated with different hosts (in any spelling of the
    key), or smuggles a second parameter in its value reaches no host at all."""
    a = await emulator(nursery, [LLAMA])
    b = await emulator(nursery, [LLAMA])
    gw = await start_hosts(start_gateway, {"a": a, "b": b}, ollama={"allow_management": True})
    refused = [
        "host=",
        "host",
        "host=c",
        "host=A",
        "host=%E2%80%8Ba",  # a zero-width space before the name
        "host=a%00",
        "host=a&host=b",
        "host=b&host=a",
        "host=a&host=",
        "ho%73t=a&host=b",
        "host=a%26host%3Db",
        "host=a;host=b",
        "host=" + "x" * 4000,
    ]
    for query in refused:
        response = await gw.client.request(
            "DELETE", f"/api/delete?{query}", json={"model": "llama3"}
        )
        assert response.status_code == 400, query
        assert response.headers["content-type"].startswith("application/json")
        error = response.json()["error"]
        assert "host" in error, query
        assert len(error) < 400, query  # a long name is not echoed whole
    assert a.requests_to("/api/delete") == []
    assert b.requests_to("/api/delete") == []
    # The same host twice is one host; a percent-encoded name is that name. The gateway's
    # parameter never goes upstream; the others do. (The first delete removes the model,
    # so the host's own 404 answers the next: what counts is which host was asked.)
    for query, host, other in (("host=b&host=b", b, a), ("host=%61", a, b), ("x=1&host=b", b, a)):
        before, others = len(host.requests_to("/api/delete")), len(other.requests_to("/api/delete"))
        response = await gw.client.request(
            "DELETE", f"/api/delete?{query}", json={"model": "llama3"}
        )
        assert response.status_code in (200, 404), query
        assert len(host.requests_to("/api/delete")) == before + 1, query
        assert len(other.requests_to("/api/delete")) == others, query
        assert "host" not in str(host.requests_to("/api/delete")[-1].query), query
    assert b.requests_to("/api/delete")[-1].query in ("x=1", b"x=1")


NOT_UTF8 = b'{"models":[{"name":"llama3:latest","model":"\xff\xfe"}]}'
DEEP = b'{"models":[],"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"


async def test_a_host_whose_inventory_does_not_decode_is_degraded_alone(
    start_gateway: StartGateway, nursery: trio.Nursery
) -> None:
    """msgspec raises UnicodeDecodeError (invalid UTF-8 in a string) and RecursionError
    (deep nesting, even in a field it skips), not only DecodeError: a host that sends
    either in /api/tags or /api/ps, at start or later, is degraded with a clear reason;
    it does not take the poller, and with it the gateway, down."""
    a = await emulator(nursery, [LLAMA])
    b = await emulator(nursery, [LLAMA])
    c = await emulator(nursery, [LLAMA])
    b.faults = Faults(status=200, status_body=NOT_UTF8, fault_paths=frozenset({"/api/tags"}))
    gw = await start_hosts(start_gateway, {"a": a, "b": b, "c": c})
    hosts = {h.name: h for h in gw.services.hosts}
    assert not hosts["b"].healthy
    assert "not valid" in hosts["b"].inventory.last_error
    c.faults = Faults(status=200, status_body=DEEP, fault_paths=frozenset({"/api/ps"}))
    tags = await gw.client.get("/api/tags")  # polls the healthy hosts afresh: c too
    assert tags.status_code == 200
    assert [m["name"] for m in tags.json()["models"]] == [LLAMA]
    assert not hosts["c"].healthy
    assert "recursion" in hosts["c"].inventory.last_error
    assert (await post_chat(gw, "still serving")).status_code == 200
    assert chats(a) == ["still serving"]
    health = await gw.client.get("/health")
    assert health.json()["degraded_hosts"] == ["b", "c"]


async def test_an_answer_that_does_not_decode_is_relayed_or_502_never_500(
    start_gateway: StartGateway, ollama: OllamaEmulator
) -> None:
    """The same bytes in a generation's answer: passthrough relays them as sent (only the
    gateway's telemetry reads them), a route that must decode them answers 502, and an
    upstream error whose text does not decode is still that upstream's error."""
    gw = await start_gateway(make_config(ollama.url))
    paths = frozenset({"/api/chat", "/v1/chat/completions"})
    final = b'{"model":"llama3","done":true,"done_reason":"\xff","eval_count":3}'
    deep = b'{"model":"llama3","done":true,"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    messages = [{"role": "user", "content": "hi"}]
    for body in (final, deep):
        ollama.faults = Faults(status=200, status_body=body, fault_paths=paths)
        relayed = await gw.client.post(
            "/api/chat", json={"model": "llama3", "messages": messages, "stream": False}
        )
        assert relayed.status_code == 200
        assert relayed.content == body
        routed = await gw.client.post("/v1/chat", json={"model": "llama3", "messages": messages})
        assert routed.status_code == 502
        assert "not valid" in routed.json()["error"]
    ollama.faults = Faults(status=500, status_body=b'{"error":"\xff"}', fault_paths=paths)
    routed = await gw.client.post("/v1/chat", json={"model": "llama3", "messages": messages})
    assert routed.status_code == 502
    assert routed.json()["error"].startswith("Ollama target")


class Busy:
    """Three hosts with llama3 resident; `hold_all` puts one held chat on each."""

    def __init__(self, gw: RunningGateway, emus: dict[str, OllamaEmulator]) -> None:
        self.gw, self.emus = gw, emus
        self.gates = {h.name: h.gate for h in gw.services.hosts}
        self.statuses: dict[str, int] = {}
        self.errors: dict[str, str] = {}
        self.baseline = gateway_tasks()  # the gateway idle: what it runs again at the end

    async def send(self, tag: str) -> None:
        response = await post_chat(self.gw, tag)
        self.statuses[tag] = response.status_code
        self.errors[tag] = response.text if response.status_code != 200 else ""

    async def hold_all(self, nursery: trio.Nursery) -> None:
        for count, (name, emu) in enumerate(self.emus.items(), start=1):
            emu.hold = trio.Event()
            nursery.start_soon(self.send, f"hold-{name}")
            await eventually(lambda count=count: self.busy() == count)  # type: ignore[misc]

    def busy(self) -> int:
        return sum(g.busy for g in self.gates.values())

    def queued(self) -> list[int]:
        return [g.queued for g in self.gates.values()]

    def ran(self) -> list[str]:
        return sorted(tag for emu in self.emus.values() for tag in chats(emu))


async def three_hosts(start_gateway: StartGateway, nursery: trio.Nursery) -> Busy:
    emus = {name: await emulator(nursery, [LLAMA], loaded=[LLAMA]) for name in "abc"}
    return Busy(await start_hosts(start_gateway, emus), emus)


async def test_a_client_that_leaves_while_queued_on_three_gates_leaves_them_all_at_once(
    start_gateway: StartGateway, nursery: trio.Nursery
) -> None:
    busy = await three_hosts(start_gateway, nursery)
    await busy.hold_all(nursery)
    with trio.CancelScope() as leaver:

        async def leave_when_queued() -> None:
            await eventually(lambda: busy.queued() == [1, 1, 1])
            leaver.cancel()

        nursery.start_soon(leave_when_queued)
        await post_chat(busy.gw, "leaver")
    assert leaver.cancelled_caught
    await eventually(lambda: busy.gates["a"].queued == 0)
    # No checkpoint since: the other gates emptied in the same step, not one by one.
    assert busy.queued() == [0, 0, 0]
    stayer = trio.Event()

    async def stay() -> None:
        await busy.send("stayer")
        stayer.set()

    nursery.start_soon(stay)
    await eventually(lambda: busy.queued() == [1, 1, 1])
    for emu in busy.emus.values():
        assert emu.hold is not None
        emu.hold.set()
    with trio.fail_after(10):
        await stayer.wait()
    await eventually(lambda: len(busy.statuses) == 4)
    assert set(busy.statuses.values()) == {200}
    assert busy.ran() == ["hold-a", "hold-b", "hold-c", "stayer"]  # the leaver never ran
    await eventually(lambda: busy.busy() == 0)
    assert busy.queued() == [0, 0, 0]
    await busy.gw.client.aclose()  # its idle keep-alive connections
    await settle_tasks(busy.baseline)


async def test_hosts_flapping_under_a_queue_run_each_request_once(
    start_gateway: StartGateway, nursery: trio.Nursery
) -> None:
    """Four requests queued on three busy hosts while two of them go down, come back and
    go down again: each queued request runs exactly once, none is lost, a held chat on a
    host that died gets a 502 (it may have run: never retried), and everything settles."""
    busy = await three_hosts(start_gateway, nursery)
    hosts = {h.name: h for h in busy.gw.services.hosts}
    await busy.hold_all(nursery)
    queued = [f"q{i}" for i in range(4)]
    for tag in queued:
        nursery.start_soon(busy.send, tag)
    await eventually(lambda: busy.queued() == [4, 4, 4])
    a, b, c = busy.emus["a"], busy.emus["b"], busy.emus["c"]

    await b.set_down(True)  # its held chat dies; its queue moves to a and c
    await eventually(lambda: not hosts["b"].healthy and busy.gates["b"].queued == 0)
    await c.set_down(True)
    await eventually(lambda: not hosts["c"].healthy and busy.gates["c"].queued == 0)
    # A request a dead host's gate granted before its poll noticed meets a refused
    # connection and moves on: then all four wait on a, the one host up.
    await eventually(lambda: busy.queued() == [4, 0, 0] and busy.busy() == 1)
    b.hold = None
    await b.set_down(False)  # back, free: the queue flows to it
    await eventually(lambda: len(chats(b)) >= 2)
    await b.set_down(True)  # and down again, maybe mid-answer
    c.hold = None
    await c.set_down(False)
    assert a.hold is not None
    a.hold.set()
    await eventually(lambda: len(busy.statuses) == 7, timeout_s=10)
    assert busy.statuses["hold-a"] == 200
    assert busy.statuses["hold-b"] == 502
    assert busy.statuses["hold-c"] == 502
    # Each queued request is answered: 200 (it ran once), or 502 naming b if b went down
    # while it was in flight there (it may have run: never sent anywhere else after).
    ran = [tag for tag in busy.ran() if tag.startswith("q")]
    assert len(ran) == len(set(ran)), ran  # nothing ran twice
    for tag in queued:
        if busy.statuses[tag] == 200:
            assert tag in ran, tag
        else:
            assert busy.statuses[tag] == 502, busy.errors[tag]
            assert f"127.0.0.1:{b.port}" in busy.errors[tag], busy.errors[tag]
            assert tag not in chats(a) + chats(c), tag
    await eventually(lambda: busy.busy() == 0)
    assert busy.queued() == [0, 0, 0]
    assert busy.gw.services.hosts._claims == set()
    await busy.gw.client.aclose()
    await settle_tasks(busy.baseline)


@pytest.mark.parametrize("fault", ["reset_before_headers", "close_before_headers"])
async def test_a_host_that_accepts_then_drops_is_never_retried_elsewhere(
    start_gateway: StartGateway, nursery: trio.Nursery, fault: str
) -> None:
    """The request reached the host (it may be generating): a 502 naming that host, on
    every generation route, never a second run on the other host; the host is asked
    again at its next poll, not degraded for good."""
    a = await emulator(nursery, [LLAMA], loaded=[LLAMA])
    b = await emulator(nursery, [LLAMA], loaded=[LLAMA])
    gw = await start_hosts(start_gateway, {"a": a, "b": b})
    a.hold = trio.Event()
    busy = Busy(gw, {"a": a, "b": b})
    nursery.start_soon(busy.send, "held")
    await eventually(lambda: busy.busy() == 1)  # a is busy: the next goes to b
    setattr(b.faults, fault, True)
    messages = [{"role": "user", "content": "dropped"}]
    for path, body in (
        ("/api/chat", {"model": "llama3", "messages": messages, "stream": False}),
        ("/api/chat", {"model": "llama3", "messages": messages}),
        ("/v1/chat", {"model": "llama3", "messages": messages}),
        ("/v1/chat/completions", {"model": "llama3", "messages": messages}),
    ):
        with trio.fail_after(5):
            response = await gw.client.post(path, json=body)
        assert response.status_code == 502, (path, response.text)
        assert f"127.0.0.1:{b.port}" in response.text, path
        assert busy.queued() == [0, 0], path
    setattr(b.faults, fault, False)
    a.hold.set()
    await eventually(lambda: busy.statuses.get("held") == 200)
    assert chats(a) == ["held"]  # nothing dropped by b ran on a
    assert (await post_chat(gw, "after")).status_code == 200


async def test_a_hosts_huge_error_text_is_cut_in_health_status_errors_and_logs(
    start_gateway: StartGateway, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """A host that answers its polls and generations with a megabyte of error text: the
    gateway says what happened in a bounded message (in /health and /status.json, both
    polled all day, in its 502s and in its log), not by repeating the megabyte."""
    caplog.set_level(logging.DEBUG)
    a = await emulator(nursery, [LLAMA])
    b = await emulator(nursery, [LLAMA])
    huge = json.dumps({"error": "overloaded " + "x" * 1_000_000}).encode()
    b.faults = Faults(
        status=500, status_body=huge, fault_paths=frozenset({"/api/tags", "/api/chat"})
    )
    gw = await start_hosts(start_gateway, {"a": a, "b": b})
    b_host = gw.services.hosts.get("b")
    assert b_host is not None
    assert not b_host.healthy
    health = (await gw.client.get("/health")).json()["hosts"]["b"]
    assert health["last_error"].startswith(f"Ollama target {b.url}: overloaded xxx")
    assert len(health["last_error"]) < 2000
    status = (await gw.client.get("/status.json")).json()
    [why] = [h["why"] for h in status["hosts"] if h["name"] == "b"]
    assert len(why) < 2000
    b.faults = Faults(status=500, status_body=huge, fault_paths=frozenset({"/api/chat"}))
    await eventually(lambda: b_host.healthy, timeout_s=10)
    a.hold = trio.Event()  # a busy: the next chat goes to b
    nursery.start_soon(post_chat, gw, "held")
    await eventually(lambda: a.active_generations == 1)
    routed = await gw.client.post(
        "/v1/chat", json={"model": "llama3", "messages": [{"role": "user", "content": "x"}]}
    )
    assert routed.status_code == 502
    assert "overloaded xxx" in routed.json()["error"]
    assert len(routed.text) < 2000
    a.hold.set()
    assert max(len(r.getMessage()) for r in caplog.records) < 5000


async def test_a_host_whose_ps_lies_gets_no_model_it_has_not_installed(
    start_gateway: StartGateway, nursery: trio.Nursery
) -> None:
    """b's /api/ps claims qwen resident, which b's /api/tags does not list: placement
    trusts the installed list, so qwen's generations and embeddings go to a, never to b;
    the lie shows in b's own /api/ps entry of the union, nothing more."""
    a = await emulator(nursery, [LLAMA, QWEN])
    b = await emulator(nursery, [LLAMA])
    lie = json.dumps({"models": [{"name": QWEN, "model": QWEN, "size_vram": 1}]}).encode()
    b.faults = Faults(status=200, status_body=lie, fault_paths=frozenset({"/api/ps"}))
    gw = await start_hosts(start_gateway, {"a": a, "b": b})
    for n in range(3):
        assert (await post_chat(gw, f"q{n}", QWEN)).status_code == 200
    embedded = await gw.client.post("/api/embed", json={"model": QWEN, "input": "x"})
    assert embedded.status_code == 200
    assert chats(a) == ["q0", "q1", "q2"]
    assert chats(b) == []
    assert b.requests_to("/api/embed") == []
    assert (await gw.client.get("/health")).json()["hosts"]["b"]["degraded"] is False
