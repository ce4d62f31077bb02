"""Issue 5.2 and 5.3: upstream faults and client faults, as matrices over the routes.

Upstream faults: every fault the emulators inject, on every route that reaches an
upstream (the Ollama target, an OpenAI-compatible provider, Ollama Cloud). Each cell
states the answer the client must get (derived from SPEC and ADRs 0003, 0010, 0011), and
after each cell: the gate and the drain are idle, no generation runs upstream, the
inventory is degraded only when the target refused connections, the gateway's own tasks
are back to their count at start, and no upstream connection outlives the gateway.

Client faults: a client that leaves while queued, while holding the gate before the first
byte, and mid-stream, on the gated and the ungated routes; a client that stops reading an
SSE stream; 200 clients that connect and vanish at random; and a target that flaps.
(Single cells already covered elsewhere are marked in `tests/test_ollama_api.py`.)
"""

from __future__ import annotations

import json
import random
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import trio

from tests.conftest import RunningGateway, StartGateway, eventually, make_config, stop_gateway
from tests.emulators import Faults, OllamaEmulator, OpenAIEmulator

DEADLINE_S = 1.5  # first byte, idle, and provider timeouts in these tests
OPENROUTER_KEY = "sk-faults-openrouter"
CLOUD_KEY = "faults-cloud-key"
OPENROUTER_MODEL = "openrouter/openai/gpt-4o-mini"
CLOUD_MODEL = "kimi-k2:cloud"
MESSAGES = [{"role": "user", "content": "why is the sky blue?"}]

# ------------------------------------------------------------------------ the gateway's tasks


def _walk(task: trio.lowlevel.Task) -> Iterator[trio.lowlevel.Task]:
    yield task
    for nursery in task.child_nurseries:
        for child in nursery.child_tasks:
            yield from _walk(child)


def gateway_task_names() -> list[str]:
    """The tasks the one gateway started by `start_gateway` runs now (itself, its server,
    connections, handlers, poller and everything under them)."""
    roots = [
        task
        for task in _walk(trio.lowlevel.current_root_task())
        if task.name.endswith("start_gateway.<locals>.start.<locals>.run")
    ]
    assert len(roots) == 1, [task.name for task in roots]
    return sorted(task.name for task in _walk(roots[0]))


def gateway_tasks() -> int:
    return len(gateway_task_names())


async def settle_tasks(baseline: int, timeout_s: float = 5.0) -> None:
    """Wait until the gateway runs exactly `baseline` tasks again (fails the test if not)."""
    seen: list[list[str]] = []

    def settled() -> bool:
        names = gateway_task_names()
        if not seen or seen[-1] != names:
            seen.append(names)
        return len(names) == baseline

    try:
        await eventually(settled, timeout_s=timeout_s)
    except trio.TooSlowError:
        pytest.fail(f"the gateway runs {gateway_tasks()} tasks, {baseline} at start: {seen}")


def client_for(gw: RunningGateway) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=gw.url, timeout=10.0, trust_env=False)


# ------------------------------------------------------------------------------ the routes


@dataclass(frozen=True)
class Route:
    name: str
    path: str
    body: dict[str, Any]
    upstream: str  # "ollama" (the local target), "openrouter" or "cloud"
    stream: bool = False  # answers as a stream (NDJSON, or SSE on the front door)
    openai: bool = False  # OpenAI's error shape and SSE
    keeps_status: bool = False  # Ollama passthrough: upstream status and bytes as sent
    forwards_stream: bool = False  # front door to an OpenAI provider: SSE bytes as sent
    first_piece: bool = False  # the front door awaits the first piece before the status
    generation: bool = True  # a generation path (not an embed) upstream


def _route(name: str, path: str, body: dict[str, Any], upstream: str, **flags: bool) -> Route:
    return Route(name, path, body, upstream, **flags)


CHAT = {"model": "llama3", "messages": MESSAGES}
ROUTES = [
    _route("api_chat_stream", "/api/chat", CHAT, "ollama", stream=True, keeps_status=True),
    _route("api_chat", "/api/chat", {**CHAT, "stream": False}, "ollama", keeps_status=True),
    _route(
        "api_generate_stream",
        "/api/generate",
        {"model": "llama3", "prompt": "why?"},
        "ollama",
        stream=True,
        keeps_status=True,
    ),
    _route(
        "api_embed",
        "/api/embed",
        {"model": "nomic-embed-text", "input": "x"},
        "ollama",
        keeps_status=True,
        generation=False,
    ),
    _route(
        "api_embeddings",
        "/api/embeddings",
        {"model": "nomic-embed-text", "prompt": "x"},
        "ollama",
        keeps_status=True,
        generation=False,
    ),
    _route("v1_chat_local", "/v1/chat", CHAT, "ollama"),
    # The client-API routes pass through (issue 12): statuses and bytes as the upstream sent them.
    _route(
        "v1_embeddings",
        "/v1/embeddings",
        {"model": "nomic-embed-text", "input": "x"},
        "ollama",
        generation=False,
        openai=True,
        keeps_status=True,
    ),
    _route(
        "oai_local_stream",
        "/v1/chat/completions",
        {**CHAT, "stream": True},
        "ollama",
        stream=True,
        openai=True,
        keeps_status=True,
        forwards_stream=True,
    ),
    _route("oai_local", "/v1/chat/completions", CHAT, "ollama", openai=True, keeps_status=True),
    _route(
        "v1_chat_openrouter",
        "/v1/chat",
        {"model": OPENROUTER_MODEL, "messages": MESSAGES},
        "openrouter",
    ),
    _route(
        "oai_openrouter_stream",
        "/v1/chat/completions",
        {"model": OPENROUTER_MODEL, "messages": MESSAGES, "stream": True},
        "openrouter",
        stream=True,
        openai=True,
        keeps_status=True,
        forwards_stream=True,
    ),
    _route(
        "oai_openrouter",
        "/v1/chat/completions",
        {"model": OPENROUTER_MODEL, "messages": MESSAGES},
        "openrouter",
        openai=True,
        keeps_status=True,
    ),
    _route("v1_chat_cloud", "/v1/chat", {"model": CLOUD_MODEL, "messages": MESSAGES}, "cloud"),
    _route(
        "oai_cloud_stream",
        "/v1/chat/completions",
        {"model": CLOUD_MODEL, "messages": MESSAGES, "stream": True},
        "cloud",
        stream=True,
        openai=True,
        keeps_status=True,
        forwards_stream=True,
    ),
]
ROUTE = {route.name: route for route in ROUTES}
UPSTREAM_NAME = {"ollama": "Ollama target", "openrouter": "openrouter", "cloud": "ollama_cloud"}


@dataclass
class Upstreams:
    ollama: OllamaEmulator
    openrouter: OpenAIEmulator
    cloud: OllamaEmulator

    def of(self, route: Route) -> OllamaEmulator | OpenAIEmulator:
        emulator: OllamaEmulator | OpenAIEmulator = getattr(self, route.upstream)
        return emulator

    def all(self) -> list[OllamaEmulator | OpenAIEmulator]:
        return [self.ollama, self.openrouter, self.cloud]


@pytest.fixture
async def upstreams(ollama: OllamaEmulator, nursery: trio.Nursery) -> Upstreams:
    openrouter = OpenAIEmulator(api_key=OPENROUTER_KEY)
    await nursery.start(openrouter.run)
    # `/v1/chat` sends the cloud-tagged name (chatd); the client-API routes its base name.
    cloud = OllamaEmulator(models=(CLOUD_MODEL, "kimi-k2"), required_token=CLOUD_KEY)
    await nursery.start(cloud.run)
    return Upstreams(ollama, openrouter, cloud)


async def start_routed(
    start_gateway: StartGateway, up: Upstreams, **sections: Any
) -> RunningGateway:
    ollama_section = {
        "first_byte_timeout_s": DEADLINE_S,
        "idle_timeout_s": DEADLINE_S,
        **sections.pop("ollama", {}),
    }
    config = make_config(
        up.ollama.url,
        ollama=ollama_section,
        providers={
            "openrouter": {"base_url": f"{up.openrouter.url}/api/v1", "timeout_s": DEADLINE_S},
            "ollama_cloud": {"base_url": up.cloud.url, "timeout_s": DEADLINE_S},
        },
        **sections,
    )
    environ = {"OPENROUTER_API_KEY": OPENROUTER_KEY, "OLLAMA_CLOUD_KEY": CLOUD_KEY}
    return await start_gateway(config, environ=environ)


# ---------------------------------------------------------------------- what a client gets


@dataclass(frozen=True)
class Expect:
    status: int
    kind: str  # "error": an error in the route's shape; "verbatim": the upstream's bytes;
    # "tail": 200, then an in-band error ending the stream; "ok": a normal answer
    says: tuple[str, ...] = ()  # fragments the error message must hold
    retry_after: str | None = None


FAULTS: dict[str, Faults] = {
    "reset_before_headers": Faults(reset_before_headers=True),
    "close_before_headers": Faults(close_before_headers=True),
    "hang_before_headers": Faults(hang_before_headers=True),
    "hang_mid_stream": Faults(hang_mid_stream_after=1),
    "die_mid_stream": Faults(die_mid_stream_after=1),
    "garbage_body": Faults(garbage_body=True),
    "overlong_line": Faults(overlong_line_bytes=4 * 1024 * 1024 + 1),
    "status_500_json": Faults(status=500),
    "status_500_text": Faults(status=500, status_body=b"upstream exploded"),
    "status_500_empty": Faults(status=500, status_body=b""),
    "status_429_retry_after": Faults(status=429, retry_after="7"),
}


def expected(route: Route, fault: str) -> Expect:
    """What SPEC and the ADRs promise for `fault` on `route`."""
    name = UPSTREAM_NAME[route.upstream]
    if fault == "refused":
        if route.upstream == "ollama":  # degraded: fast 503 naming the target
            return Expect(503, "error", ("Ollama target", "127.0.0.1"), retry_after="any")
        return Expect(502, "error", (name,))
    if fault in ("reset_before_headers", "close_before_headers"):
        return Expect(502, "error", (name, "dropped the connection"))
    if fault == "hang_before_headers":
        return Expect(504, "error", (name, f"{DEADLINE_S:g} s"))
    if fault.startswith("status_"):
        status = 429 if "429" in fault else 500
        retry = "7" if status == 429 else None
        if route.keeps_status:
            return Expect(status, "verbatim", retry_after=retry)
        says = {"json": "error", "text": "upstream exploded", "empty": "empty body"}
        detail = says.get(fault.rsplit("_", 1)[-1], "")
        return Expect(
            429 if status == 429 else 502,
            "error",
            (name, f"(upstream status {status})", detail),
            retry_after=retry,
        )
    if fault == "garbage_body":
        if not route.generation:
            return Expect(200, "ok")  # the emulator garbles generation answers only
        if route.keeps_status or route.forwards_stream:
            return Expect(200, "verbatim")  # byte-faithful: handed on as sent
        return Expect(502, "error", (name,))
    # Mid-stream faults: only streams have a middle.
    if not route.stream:
        return Expect(200, "ok")
    if fault == "overlong_line":
        if route.forwards_stream:
            return Expect(200, "verbatim")  # SSE forwarded as sent, no line bound
        if route.first_piece:  # the over-long line is the first piece: still a status
            return Expect(502, "error", ("longer than 4194304 bytes",))
        return Expect(200, "tail", ("longer than 4194304 bytes",))
    if fault == "hang_mid_stream":
        return Expect(200, "tail", (name, "sent nothing for too long"))
    return Expect(200, "tail", (name,))  # die_mid_stream


def error_text(route: Route, response: httpx.Response) -> str:
    body = response.json()
    error = body["error"]
    if route.openai:
        assert isinstance(error, dict), body
        assert error["type"], body
        error = error["message"]
    assert isinstance(error, str), body
    assert error.strip(), body
    return error


def check_answer(
    route: Route,
    fault: str,
    response: httpx.Response,
    upstream: OllamaEmulator | OpenAIEmulator,
    elapsed: float,
) -> None:
    want = expected(route, fault)
    cell = f"{fault} on {route.name}: {response.status_code} {response.content[-300:]!r}"
    assert response.status_code == want.status, cell
    if want.retry_after == "any":
        assert (response.headers.get("retry-after") or "").isdigit(), cell
    elif want.retry_after is not None:
        assert response.headers.get("retry-after") == want.retry_after, cell
    if want.kind == "error":
        message = error_text(route, response)
        for fragment in want.says:
            assert fragment in message, (cell, fragment)
    elif want.kind == "verbatim":
        sent = b"".join(chunk for _, chunk in upstream.requests[-1].emitted)
        assert response.content == sent, cell
    elif want.kind == "tail":
        if route.openai:
            assert response.content.endswith(b"data: [DONE]\n\n"), cell
            events = [e for e in response.content.split(b"\n\n") if e.startswith(b"data: {")]
            last = json.loads(events[-1].removeprefix(b"data: "))
            message = last["error"]["message"]
        else:
            last = json.loads(response.content.splitlines()[-1])
            assert set(last) == {"error"}, cell
            message = last["error"]
        for fragment in want.says:
            assert fragment in message, (cell, fragment)
    else:
        assert b'"error"' not in response.content, cell
    if fault == "hang_before_headers":
        assert DEADLINE_S * 0.9 <= elapsed < DEADLINE_S + 2, (cell, elapsed)
    if fault == "refused" and route.upstream == "ollama":
        assert elapsed < 1.0, (cell, elapsed)  # fails fast, as SPEC says


async def assert_idle(gw: RunningGateway, up: Upstreams, baseline: int) -> None:
    """The gate, its queue and the drain are idle; nothing generates upstream; the
    gateway's tasks are back to `baseline`; at most a pooled connection per upstream."""
    gate, drain = gw.services.gate, gw.services.drain
    await eventually(lambda: (gate.busy, gate.queued, drain.active) == (0, 0, 0))
    for emulator in up.all():
        await eventually(lambda e=emulator: e.active_generations == 0)
    await settle_tasks(baseline)
    for emulator in up.all():
        # The pool may keep an answer's connection and a poll's; nothing more builds up.
        await eventually(lambda e=emulator: e.open_connections <= 2)


# ------------------------------------------------------------------- upstream fault matrix


@pytest.mark.parametrize("fault", list(FAULTS))
async def test_upstream_fault_matrix(
    start_gateway: StartGateway, upstreams: Upstreams, fault: str
) -> None:
    """Each route under one upstream fault: the defined answer, then everything idle."""
    gw = await start_routed(start_gateway, upstreams)
    baseline = gateway_tasks()
    for route in ROUTES:
        upstream = upstreams.of(route)
        upstream.faults = FAULTS[fault]
        async with client_for(gw) as client:
            started = trio.current_time()
            with trio.fail_after(10):
                response = await client.post(route.path, json=route.body)
            elapsed = trio.current_time() - started
        upstream.faults = Faults()
        check_answer(route, fault, response, upstream, elapsed)
        await assert_idle(gw, upstreams, baseline)
        assert not gw.services.inventory.degraded, f"{fault} on {route.name}: degraded"
    await stop_gateway(gw)
    for emulator in upstreams.all():
        await eventually(lambda e=emulator: e.open_connections == 0)


async def test_connection_refused_matrix(start_gateway: StartGateway, upstreams: Upstreams) -> None:
    """Every upstream refusing connections: local routes fail fast with 503 naming the
    target (degraded), cloud routes with 502, and the target's return ends degraded mode."""
    gw = await start_routed(start_gateway, upstreams)
    baseline = gateway_tasks()
    for emulator in upstreams.all():
        await emulator.set_down(True)
    for route in ROUTES:
        async with client_for(gw) as client:
            started = trio.current_time()
            with trio.fail_after(10):
                response = await client.post(route.path, json=route.body)
            elapsed = trio.current_time() - started
        check_answer(route, "refused", response, upstreams.of(route), elapsed)
        await assert_idle(gw, upstreams, baseline)
        if route.upstream == "ollama":
            assert gw.services.inventory.degraded, route.name
    for emulator in upstreams.all():
        await emulator.set_down(False)
    await eventually(lambda: not gw.services.inventory.degraded)
    async with client_for(gw) as client:
        for route in ROUTES:
            response = await client.post(route.path, json=route.body)
            assert response.status_code == 200, (route.name, response.content)
    await assert_idle(gw, upstreams, baseline)
    await stop_gateway(gw)
    for emulator in upstreams.all():
        await eventually(lambda e=emulator: e.open_connections == 0)


async def test_a_flapping_target_gets_defined_answers_and_recovers(
    start_gateway: StartGateway, nursery: trio.Nursery
) -> None:
    """The target goes down and up every half second, four times, while clients keep
    chatting (streams and not), embedding and routing: every answer is a 200 (a stream cut
    by the flap ends with an error line), a 503 naming the target, or a 502; none hangs,
    none is a 500; the gateway recovers each time by itself."""
    emulator = OllamaEmulator(token_delay_s=0.01)
    await nursery.start(emulator.run)
    gw = await start_gateway(make_config(emulator.url))
    baseline = gateway_tasks()
    outcomes: dict[str, int] = {}
    flapping = True

    async def client_loop(kind: str) -> None:
        async with client_for(gw) as client:
            while flapping:
                with trio.fail_after(5):
                    if kind == "stream":
                        response = await client.post("/api/chat", json=CHAT)
                    elif kind == "chat":
                        response = await client.post("/api/chat", json={**CHAT, "stream": False})
                    elif kind == "embed":
                        response = await client.post(
                            "/api/embed", json={"model": "nomic-embed-text", "input": "x"}
                        )
                    else:
                        response = await client.post("/v1/chat", json=CHAT)
                status = response.status_code
                key = f"{kind}:{status}"
                if status == 200 and kind == "stream":
                    last = json.loads(response.content.splitlines()[-1])
                    key += ":done" if last.get("done") else ":error-line"
                    assert last.get("done") or set(last) == {"error"}, response.content
                elif status == 503:
                    assert response.headers["retry-after"].isdigit()
                    assert emulator.url.removeprefix("http://") in response.json()["error"]
                else:
                    assert status in (200, 502), (kind, status, response.content)
                outcomes[key] = outcomes.get(key, 0) + 1
                await trio.sleep(0.01)

    with trio.fail_after(30):
        async with trio.open_nursery() as clients:
            for kind in ("stream", "chat", "embed", "router"):
                clients.start_soon(client_loop, kind)
            for _ in range(4):
                await trio.sleep(0.5)
                await emulator.set_down(True)
                await trio.sleep(0.5)
                await emulator.set_down(False)
            await eventually(lambda: not gw.services.inventory.degraded)
            await trio.sleep(0.3)
            flapping = False
    assert gw.services.inventory.recoveries >= 2, outcomes
    assert any(key.endswith(":503") for key in outcomes), outcomes
    assert sum(v for k, v in outcomes.items() if ":200" in k) > 20, outcomes
    await eventually(lambda: (gw.services.gate.busy, gw.services.gate.queued) == (0, 0))
    await eventually(lambda: gw.services.drain.active == 0)
    await settle_tasks(baseline)
    async with client_for(gw) as client:
        response = await client.post("/api/chat", json={**CHAT, "stream": False})
    assert response.status_code == 200
    assert (await gw.client.get("/health")).json()["status"] == "ok"


# ---------------------------------------------------------------------- client fault matrix

CLIENT_ROUTES = [
    "api_chat_stream",
    "api_chat",
    "v1_chat_local",
    "oai_local_stream",
    "oai_openrouter_stream",
    "oai_cloud_stream",
]


def _gated(route: Route) -> bool:
    return route.upstream == "ollama" and route.generation


CLIENT_CELLS = [
    (name, phase)
    for name in CLIENT_ROUTES
    for phase in ("queued", "before_first_byte", "mid_stream")
    if (phase != "queued" or _gated(ROUTE[name])) and (phase != "mid_stream" or ROUTE[name].stream)
]


def tagged(route: Route, tag: str) -> dict[str, Any]:
    """The route's body with `tag` as the user's message: the emulators' generation tag."""
    if "messages" in route.body:
        return {**route.body, "messages": [{"role": "user", "content": tag}]}
    return {**route.body, "prompt": tag}


async def _victim(
    client: httpx.AsyncClient, route: Route, scope: trio.CancelScope, first_byte: trio.Event
) -> None:
    """Send the route's request and read its answer until the scope is cancelled."""
    with scope:
        async with client.stream("POST", route.path, json=tagged(route, "victim")) as response:
            async for _ in response.aiter_raw():
                first_byte.set()


@pytest.mark.parametrize(("route_name", "phase"), CLIENT_CELLS)
async def test_client_leaving_frees_everything(
    start_gateway: StartGateway, upstreams: Upstreams, route_name: str, phase: str
) -> None:
    """A client leaves while queued, while it holds the gate before the first byte, or
    mid-stream: the queue and the gate are free at once, the upstream call is cancelled
    (its connection closed), no task of the gateway is left, and the next client is served."""
    route = ROUTE[route_name]
    upstream = upstreams.of(route)
    gw = await start_routed(
        start_gateway, upstreams, ollama={"first_byte_timeout_s": 30, "idle_timeout_s": 30}
    )
    gate = gw.services.gate
    baseline = gateway_tasks()
    scope, first_byte = trio.CancelScope(), trio.Event()
    held = trio.Event()
    with trio.fail_after(10):
        async with client_for(gw) as client, trio.open_nursery() as clients:
            if phase == "queued":
                upstreams.ollama.hold = held

                async def holder() -> None:
                    body = {**tagged(ROUTE["api_chat"], "holder"), "stream": False}
                    response = await client.post("/api/chat", json=body)
                    assert response.status_code == 200

                clients.start_soon(holder)
                await eventually(lambda: gate.busy == 1)
                clients.start_soon(_victim, client, route, scope, first_byte)
                await eventually(lambda: gate.queued == 1)
                scope.cancel()
                await eventually(lambda: gate.queued == 0)
                held.set()
            elif phase == "before_first_byte":
                upstream.faults = Faults(hang_before_headers=True)
                clients.start_soon(_victim, client, route, scope, first_byte)
                await upstream.wait_until(
                    lambda: len(upstream.requests_to(_upstream_path(route))) == 1
                )
                if _gated(route):
                    assert gate.busy == 1
                hanging = upstream.open_connections
                assert not first_byte.is_set()
                scope.cancel()
                await upstream.wait_until(lambda: upstream.open_connections == hanging - 1)
            else:
                upstream.hold = held
                clients.start_soon(_victim, client, route, scope, first_byte)
                await first_byte.wait()
                await upstream.wait_until(lambda: upstream.active_generations == 1)
                scope.cancel()
                await upstream.wait_until(lambda: upstream.cancelled_generations == 1)
        upstream.faults = Faults()
        upstream.hold = upstreams.ollama.hold = None
        if phase == "queued":
            assert upstreams.ollama.generation_order == ["holder"]
        await assert_idle(gw, upstreams, baseline)
        # The next client is served at once.
        async with client_for(gw) as client:
            response = await client.post(route.path, json=route.body)
        assert response.status_code == 200, response.content
        await assert_idle(gw, upstreams, baseline)


def _upstream_path(route: Route) -> str:
    if route.upstream == "openrouter":
        return "/api/v1/chat/completions"
    if route.upstream == "cloud":
        return "/api/generate" if route.path == "/v1/chat" else route.path
    return "/api/chat" if route.path == "/v1/chat" else route.path


@pytest.mark.parametrize("route_name", ["oai_local_stream", "oai_openrouter_stream"])
async def test_sse_client_that_stops_reading_is_dropped(
    start_gateway: StartGateway, nursery: trio.Nursery, route_name: str
) -> None:
    """A front-door SSE client that reads nothing is dropped at the write deadline: the
    upstream call is cancelled, the gate (for a local model) is free, the next is served."""
    route = ROUTE[route_name]
    reply = ("x" * 4000 + " ") * 4000  # about 16 MB: more than any socket buffer holds
    ollama = OllamaEmulator(reply=reply)
    await nursery.start(ollama.run)
    openrouter = OpenAIEmulator(api_key=OPENROUTER_KEY, reply=reply)
    await nursery.start(openrouter.run)
    # `/v1/chat` sends the cloud-tagged name (chatd); the client-API routes its base name.
    cloud = OllamaEmulator(models=(CLOUD_MODEL, "kimi-k2"), required_token=CLOUD_KEY)
    await nursery.start(cloud.run)
    up = Upstreams(ollama, openrouter, cloud)
    gw = await start_routed(
        start_gateway,
        up,
        write_timeout_s=0.5,
        # The emulator converts a 16 MB answer on its compatibility route: give it time.
        ollama={"first_byte_timeout_s": 5.0, "idle_timeout_s": 5.0},
    )
    baseline = gateway_tasks()
    upstream = up.of(route)
    host, port = gw.url.removeprefix("http://").rsplit(":", 1)
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect((host, int(port)))
    body = json.dumps(route.body).encode()
    await sock.send(
        f"POST {route.path} HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n".encode()
        + body
    )
    with trio.fail_after(15):
        await upstream.wait_until(lambda: upstream.active_generations == 1)
        await upstream.wait_until(lambda: upstream.cancelled_generations == 1)
        await eventually(lambda: gw.services.gate.busy == 0)
        async with client_for(gw) as client:
            response = await client.post(route.path, json={**route.body, "stream": False})
        assert response.status_code == 200
    sock.close()
    await assert_idle(gw, up, baseline)


async def test_200_clients_connecting_and_vanishing_at_random(
    start_gateway: StartGateway, nursery: trio.Nursery
) -> None:
    """200 raw clients, each doing one random unkind thing (close at once, half a request
    line, headers only, half a body, a full chat then gone while queued, holding or
    streaming, gone with a reset): afterwards the gate and the queue are idle, nothing
    generates, the gateway's tasks are back to their count at start, no upstream
    connection outlives the gateway, and a normal chat is served."""
    emulator = OllamaEmulator(token_delay_s=0.004, reply=" ".join(["word"] * 30))
    await nursery.start(emulator.run)
    gw = await start_gateway(make_config(emulator.url, gate={"max_queue": 256}))
    baseline = gateway_tasks()
    host, port = gw.url.removeprefix("http://").rsplit(":", 1)
    rng = random.Random(20251121)
    chat = json.dumps({**CHAT, "stream": True}).encode()
    request = (
        b"POST /api/chat HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(len(chat)).encode() + b"\r\n\r\n" + chat
    )
    kinds = ["close", "half_line", "headers_only", "half_body", "full_gone", "full_rst", "read"]
    done: dict[str, int] = {}

    async def vandal(n: int) -> None:
        kind = rng.choice(kinds)
        delay, linger = rng.uniform(0, 1.0), rng.uniform(0, 0.15)
        await trio.sleep(delay)
        stream = await trio.open_tcp_stream(host, int(port))
        try:
            if kind == "half_line":
                await stream.send_all(b"POST /api/ch")
            elif kind == "headers_only":
                await stream.send_all(request[: request.index(b"\r\n\r\n") + 4])
            elif kind == "half_body":
                await stream.send_all(request[: len(request) - len(chat) // 2])
            elif kind in ("full_gone", "full_rst", "read"):
                await stream.send_all(request)
            if kind == "read":
                with trio.move_on_after(linger):
                    await stream.receive_some(4096)
            else:
                await trio.sleep(linger)
            if kind == "full_rst":
                stream.socket.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
        finally:
            await stream.aclose()
        done[kind] = done.get(kind, 0) + 1

    with trio.fail_after(30):
        async with trio.open_nursery() as vandals:
            for n in range(200):
                vandals.start_soon(vandal, n)
        gate, drain = gw.services.gate, gw.services.drain
        await eventually(lambda: (gate.busy, gate.queued, drain.active) == (0, 0, 0))
        await emulator.wait_until(lambda: emulator.active_generations == 0)
        await settle_tasks(baseline)
        assert sum(done.values()) == 200
        assert len(done) == len(kinds), done
        # Every generation that started either finished or was cancelled: none runs on.
        started = len(emulator.generation_order)
        assert emulator.completed_generations + emulator.cancelled_generations == started
        assert emulator.cancelled_generations > 0, "no client left mid-generation"
        assert emulator.max_concurrent_generations == 1
        async with client_for(gw) as client:
            response = await client.post("/api/chat", json={**CHAT, "stream": False})
        assert response.status_code == 200
        await settle_tasks(baseline)
    await stop_gateway(gw)
    await eventually(lambda: emulator.open_connections == 0)


@pytest.mark.parametrize("stream", [True, False], ids=["after-a-stream", "after-a-whole-answer"])
async def test_a_connection_its_client_closed_is_released_at_once(
    start_gateway: StartGateway, ollama: OllamaEmulator, stream: bool
) -> None:
    """A keep-alive client that closes its idle connection: the gateway's connection task
    and socket go at once, not when the keep-alive timer fires. (hypercorn 0.18's trio
    `TCPServer.run` ends its read loop on EOF, then waits in its task group for the armed
    `_idle_timeout`: a socket in CLOSE_WAIT and two tasks per closed connection for
    `keep_alive_timeout_s`. Found by this file, fixed in `gateway/server.py` (c6445c3);
    the server's own connections (`gateway/h1/serve.py`) must keep it so.)"""
    gw = await start_gateway(make_config(ollama.url, keep_alive_timeout_s=30.0))
    baseline = gateway_tasks()
    async with client_for(gw) as client:
        response = await client.post("/api/chat", json={**CHAT, "stream": stream})
        assert response.status_code == 200
        # Wait until the answer is over on the server's side too (the connection idles).
        await eventually(lambda: gw.services.drain.active == 0)
        await trio.sleep(0.1)
    await settle_tasks(baseline, timeout_s=2.0)


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /health HTTP/1.1\r\nhost: gw\r\n\r\n",
        b"GET /api/version HTTP/1.1\r\nhost: gw\r\n\r\n",
        b"POST /api/embed HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
        b'content-length: 41\r\n\r\n{"model":"nomic-embed-text","input":"x"}',
    ],
    ids=["health", "version", "embed"],
)
async def test_clients_hanging_up_right_after_their_request_leave_nothing(
    start_gateway: StartGateway, ollama: OllamaEmulator, request_bytes: bytes
) -> None:
    """100 clients each send a whole request and close within a few milliseconds, before
    or while the answer is written. Every connection must end: its socket closed, its tasks
    gone. (A connection whose client left before its first byte was written got its
    write watchdog spawned after the read loop had ended, so nothing cancelled it: the
    connection's task group, its tasks and its socket stayed forever.)"""
    gw = await start_gateway(make_config(ollama.url))
    baseline = gateway_tasks()
    host, port = gw.url.removeprefix("http://").rsplit(":", 1)
    with trio.fail_after(20):
        for n in range(100):
            stream = await trio.open_tcp_stream(host, int(port))
            async with stream:
                await stream.send_all(request_bytes)
                await trio.sleep(0.001 * (n % 5))
        # Well past the keep-alive timeout: nothing may be waiting for it.
        await settle_tasks(baseline, timeout_s=gw.config.keep_alive_timeout_s + 2)


async def test_a_request_body_that_stalls_gets_408_and_frees_everything(
    start_gateway: StartGateway, ollama: OllamaEmulator
) -> None:
    """A chat whose body stops arriving half way: after `keep_alive_timeout_s` without a
    byte the gateway answers 408 in Ollama's shape and closes; nothing reached the
    upstream, the gate was never taken, and the gateway serves the next request."""
    gw = await start_gateway(make_config(ollama.url, keep_alive_timeout_s=0.5))
    host, port = gw.url.removeprefix("http://").rsplit(":", 1)
    body = json.dumps({"model": "llama3", "messages": [{"role": "user", "content": "hi"}]})
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            await stream.send_all(
                b"POST /api/chat HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(body), body[:20].encode())
            )
            answer = b""
            while chunk := await stream.receive_some(65536):
                answer += chunk
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), answer
    assert b"connection: close" in head.lower()
    assert "stopped arriving" in json.loads(payload)["error"]
    assert ollama.requests_to("/api/chat") == []
    assert gw.services.gate.figures().granted_total == 0
    async with httpx.AsyncClient(base_url=gw.url) as client:
        response = await client.post("/api/chat", content=body)
    assert response.status_code == 200
