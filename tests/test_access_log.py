"""One access-log record per request, request ids, timing headers, and what logs never say."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from functools import partial
from typing import Any

import httpx
import pytest
import trio

from gateway import logs
from gateway.logs import JsonFormatter, TextFormatter
from tests.conftest import RunningGateway, StartGateway, eventually, make_config
from tests.emulators import OllamaEmulator

GENERATED_ID = re.compile(r"[0-9a-f]{16}")
FIELDS = {
    "request_id",
    "method",
    "route",
    "model",
    "provider",
    "host",
    "status",
    "client",
    "client_name",
    "gate_wait_ms",
    "gpu_ms",
    "ttfb_ms",
    "total_ms",
    "tokens_in",
    "tokens_out",
    "bytes_out",
    "error",
}


def chat_body(content: str = "why is the sky blue?", **extra: Any) -> dict[str, Any]:
    return {"model": "llama3", "messages": [{"role": "user", "content": content}], **extra}


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def fields(self) -> list[dict[str, Any]]:
        return [r.fields for r in self.records]  # type: ignore[attr-defined]

    def of(self, request_id: str) -> list[dict[str, Any]]:
        return [f for f in self.fields() if f["request_id"] == request_id]

    def one(self, request_id: str) -> dict[str, Any]:
        found = self.of(request_id)
        assert len(found) == 1, found
        return found[0]


@pytest.fixture
def access() -> Iterator[Collect]:
    """Every `gateway.access` record, quiet routes (DEBUG) included."""
    logger = logging.getLogger("gateway.access")
    handler = Collect()
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def test_one_record_per_request_with_every_field(
    gateway: RunningGateway, ollama: OllamaEmulator, access: Collect
) -> None:
    with trio.fail_after(10):
        response = await gateway.client.post(
            "/api/chat",
            json=chat_body("one two three", stream=False),
            headers={"x-request-id": "req-abc.123:x_y"},
        )
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "req-abc.123:x_y"
    frame = json.loads(b"".join(c for _, c in ollama.requests_to("/api/chat")[-1].emitted))
    # Logged as the request's last act, just after its answer was sent.
    await eventually(lambda: len(access.of("req-abc.123:x_y")) == 1)
    [record] = [r for r in access.records if r.fields["request_id"] == "req-abc.123:x_y"]  # type: ignore[attr-defined]
    assert record.levelno == logging.INFO
    assert record.getMessage() == "POST /api/chat 200"
    fields = record.fields  # type: ignore[attr-defined]
    assert set(fields) == FIELDS
    assert fields["method"] == "POST"
    assert fields["route"] == "/api/chat"
    assert fields["model"] == "llama3"
    assert fields["provider"] == "ollama"
    assert fields["status"] == 200
    assert fields["tokens_in"] == frame["prompt_eval_count"] == 3
    assert fields["tokens_out"] == frame["eval_count"]
    assert fields["bytes_out"] == len(response.content)
    assert re.fullmatch(r"127\.0\.0\.1:\d+", fields["client"])
    assert fields["client_name"] is None
    assert fields["error"] is None
    assert 0 <= fields["gate_wait_ms"] <= fields["ttfb_ms"] <= fields["total_ms"]
    assert 0 < fields["gpu_ms"] <= fields["total_ms"]


async def test_every_request_gets_exactly_one_record(
    gateway: RunningGateway, access: Collect
) -> None:
    calls = [
        ("POST", "/api/chat", chat_body()),
        ("POST", "/api/embed", {"model": "nomic-embed-text", "input": "x"}),
        ("GET", "/api/tags", None),
        ("POST", "/v1/chat", chat_body()),
        ("POST", "/api/chat", {"model": "nope", "messages": []}),
        ("GET", "/no/such/route", None),
        ("GET", "/health", None),
        ("GET", "/metrics", None),
    ]
    statuses = []
    with trio.fail_after(10):
        for n, (method, path, body) in enumerate(calls):
            response = await gateway.client.request(
                method, path, json=body, headers={"x-request-id": f"call-{n}"}
            )
            statuses.append(response.status_code)
            assert response.headers["x-request-id"] == f"call-{n}"
    assert statuses == [200, 200, 200, 200, 404, 404, 200, 200]
    await eventually(lambda: len(access.records) == len(calls))
    for n, (method, path, _) in enumerate(calls):
        fields = access.one(f"call-{n}")
        assert fields["method"] == method
        assert fields["status"] == statuses[n]
        assert fields["route"] == (path if path != "/no/such/route" else "other")
    assert access.one("call-1")["tokens_in"] > 0  # embeddings count their input
    assert access.one("call-3")["provider"] == "ollama"
    assert access.one("call-4")["model"] == "nope"
    # Probes and scrapes are quiet: DEBUG, so they stay out of the log at INFO.
    levels = {r.fields["request_id"]: r.levelno for r in access.records}  # type: ignore[attr-defined]
    assert levels["call-6"] == levels["call-7"] == logging.DEBUG
    assert levels["call-0"] == logging.INFO


@pytest.mark.parametrize(
    "given",
    [None, "", "x" * 200, "has spaces", "semi;colon", "ünïcode"],
    ids=["absent", "empty", "too-long", "spaces", "semicolon", "non-ascii"],
)
async def test_request_id_is_generated_when_absent_or_invalid(
    gateway: RunningGateway, access: Collect, given: str | None
) -> None:
    headers = {} if given is None else {"x-request-id": given.encode()}
    with trio.fail_after(10):
        response = await gateway.client.get("/api/version", headers=headers)
    assert response.status_code == 200
    request_id = response.headers["x-request-id"]
    assert GENERATED_ID.fullmatch(request_id)
    await eventually(lambda: len(access.of(request_id)) == 1)
    assert access.one(request_id)["route"] == "/api/version"


async def test_request_id_is_echoed_on_errors_and_ids_differ(
    gateway: RunningGateway, access: Collect
) -> None:
    with trio.fail_after(10):
        refused = await gateway.client.post(
            "/api/chat", content=b"{", headers={"x-request-id": "A-1"}
        )
        first = await gateway.client.get("/api/version")
        second = await gateway.client.get("/api/version")
    assert refused.status_code == 400
    assert refused.headers["x-request-id"] == "A-1"
    await eventually(lambda: len(access.of("A-1")) == 1)
    assert access.one("A-1")["status"] == 400
    assert first.headers["x-request-id"] != second.headers["x-request-id"]


async def test_queue_and_overhead_headers(gateway: RunningGateway, ollama: OllamaEmulator) -> None:
    gate = gateway.services.gate
    ollama.hold = trio.Event()
    responses: dict[str, httpx.Response] = {}

    async def chat(tag: str) -> None:
        responses[tag] = await gateway.client.post("/api/chat", json=chat_body(tag))

    with trio.fail_after(10):
        async with trio.open_nursery() as clients:
            clients.start_soon(chat, "first")
            await eventually(lambda: gate.busy == 1)
            clients.start_soon(chat, "second")
            await eventually(lambda: gate.queued == 1)
            # Time passes on the clock while the second waits: a round trip to the gateway.
            assert (await gateway.client.get("/health")).status_code == 200
            ollama.hold.set()
        other = await gateway.client.get("/no/such/route")
    assert float(responses["second"].headers["x-gateway-queue-ms"]) > 0
    assert float(responses["second"].headers["x-gateway-queue-ms"]) > float(
        responses["first"].headers["x-gateway-queue-ms"]
    )
    for response in (*responses.values(), other):
        assert float(response.headers["x-gateway-overhead-ms"]) >= 0
        assert float(response.headers["x-gateway-queue-ms"]) >= 0
    assert other.headers["x-gateway-queue-ms"] == "0.0"


async def test_the_logged_gate_wait_is_the_headers_queue_time(
    gateway: RunningGateway, ollama: OllamaEmulator, access: Collect
) -> None:
    gate = gateway.services.gate
    ollama.hold = trio.Event()
    responses: list[httpx.Response] = []

    async def chat(tag: str) -> None:
        responses.append(
            await gateway.client.post(
                "/api/chat", json=chat_body(tag), headers={"x-request-id": tag}
            )
        )

    with trio.fail_after(10):
        async with trio.open_nursery() as clients:
            clients.start_soon(chat, "first")
            await eventually(lambda: gate.busy == 1)
            clients.start_soon(chat, "second")
            await eventually(lambda: gate.queued == 1)
            ollama.hold.set()
    await eventually(lambda: len(access.of("second")) == 1)
    second = next(r for r in responses if r.headers["x-request-id"] == "second")
    waited = access.one("second")["gate_wait_ms"]
    assert waited == pytest.approx(float(second.headers["x-gateway-queue-ms"]), abs=0.1)
    assert waited > 0


async def test_a_client_that_leaves_while_queued_is_logged_as_499(
    gateway: RunningGateway, ollama: OllamaEmulator, access: Collect
) -> None:
    gate = gateway.services.gate
    ollama.hold = trio.Event()
    with trio.fail_after(10):
        async with trio.open_nursery() as clients:
            clients.start_soon(partial(gateway.client.post, "/api/chat", json=chat_body("holder")))
            await eventually(lambda: gate.busy == 1)
            waiter = trio.CancelScope()

            async def leave() -> None:
                with waiter:
                    await gateway.client.post(
                        "/api/chat", json=chat_body("leaver"), headers={"x-request-id": "leaver"}
                    )

            clients.start_soon(leave)
            await eventually(lambda: gate.queued == 1)
            waiter.cancel()
            await eventually(lambda: len(access.of("leaver")) == 1)
            ollama.hold.set()
    fields = access.one("leaver")
    assert fields["status"] == 499
    assert fields["ttfb_ms"] is None
    assert fields["bytes_out"] == 0


async def test_a_client_that_leaves_mid_stream_is_logged_as_499(
    gateway: RunningGateway, ollama: OllamaEmulator, access: Collect
) -> None:
    ollama.hold = trio.Event()  # the stream pauses after its first line
    with trio.fail_after(10):
        async with gateway.client.stream(
            "POST", "/api/chat", json=chat_body(), headers={"x-request-id": "gone"}
        ) as response:
            assert response.status_code == 200
            async for _ in response.aiter_raw():
                break  # one line read, then the client hangs up
        await ollama.wait_until(lambda: ollama.cancelled_generations == 1)
        await eventually(lambda: len(access.of("gone")) == 1)
    fields = access.one("gone")
    assert fields["status"] == 499
    assert fields["bytes_out"] > 0
    assert fields["ttfb_ms"] is not None


async def test_no_message_body_text_in_any_log_output(
    start_gateway: StartGateway, nursery: trio.Nursery, all_logs: io.StringIO
) -> None:
    user_text = "zebra-user-text-marker"
    reply_text = "quokka-reply-text-marker"
    emulator = OllamaEmulator(reply=f"{reply_text} is the answer")
    await nursery.start(emulator.run)
    gw = await start_gateway(make_config(emulator.url))
    client = gw.client
    openai_body = {"model": "llama3", "messages": [{"role": "user", "content": user_text}]}
    with trio.fail_after(10):
        answers = [
            await client.post("/api/chat", json=chat_body(user_text)),
            await client.post("/api/chat", json=chat_body(user_text, stream=False)),
            await client.post("/api/generate", json={"model": "llama3", "prompt": user_text}),
            await client.post("/api/embed", json={"model": "nomic-embed-text", "input": user_text}),
            await client.post("/v1/chat", json=chat_body(user_text)),
            await client.post("/v1/chat/completions", json=openai_body),
            await client.post("/v1/chat/completions", json={**openai_body, "stream": True}),
            await client.post("/v1/embeddings", json={"model": "nomic-embed-text", "input": "x"}),
        ]
        bad = [
            await client.post("/api/chat", content=f'{{"model": "{user_text}'.encode()),
            await client.post(
                "/api/chat", json={"messages": [{"role": "user", "content": user_text}]}
            ),
            await client.post("/v1/chat", json={"model": "llama3", "messages": user_text}),
            await client.post("/v1/chat/completions", content=f"[{user_text}".encode()),
        ]
    assert [a.status_code for a in answers] == [200] * len(answers)
    assert [b.status_code for b in bad] == [400] * len(bad)
    assert reply_text in answers[1].text  # the marker did go through the gateway
    expected = len(answers) + len(bad)
    await eventually(lambda: all_logs.getvalue().count('"logger":"gateway.access"') == expected)
    output = all_logs.getvalue()
    assert user_text not in output
    assert reply_text not in output


async def test_startup_and_transitions_are_logged_once_each(
    start_gateway: StartGateway, ollama: OllamaEmulator, all_logs: io.StringIO
) -> None:
    gw = await start_gateway(make_config(ollama.url))
    inventory = gw.services.inventory
    await ollama.set_down(True)
    with trio.fail_after(10):
        for _ in range(3):
            assert (await gw.client.post("/api/chat", json=chat_body())).status_code == 503
        await eventually(lambda: inventory.poll_failures >= 2)  # polls keep failing
        await ollama.set_down(False)
        await eventually(lambda: not inventory.degraded)
        assert (await gw.client.post("/api/chat", json=chat_body())).status_code == 200
    entries = [json.loads(line) for line in all_logs.getvalue().splitlines()]
    ours = [e for e in entries if e["logger"] in ("gateway", "gateway.inventory")]
    messages = [e["msg"] for e in ours]
    assert sum("gateway listening on" in m for m in messages) == 1
    assert sum("serving degraded" in m for m in messages) == 1
    assert sum("degraded mode is over" in m for m in messages) == 1
    up = [m for m in messages if "is up with 3 models" in m]
    assert len(up) == 1


def test_json_formatter_writes_one_object_per_line() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("tests.access_log.json")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        logger.warning("two\nlines %s", "and\r\nmore")
        logger.info("GET / 200", extra={"fields": {"status": 200, "route": "/", "model": "a\nb"}})
        try:
            raise ValueError("boom\nboom")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    entries = [json.loads(line) for line in lines]
    assert all(isinstance(e, dict) for e in entries)
    assert entries[0]["msg"] == "two\nlines and\r\nmore"
    assert entries[0]["level"] == "warning"
    assert entries[0]["logger"] == "tests.access_log.json"
    assert entries[0]["ts"].endswith("+00:00")
    assert entries[1]["status"] == 200
    assert entries[1]["route"] == "/"
    assert entries[1]["model"] == "a\nb"
    assert "ValueError: boom" in entries[2]["exc"]


class TtyStream(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    hypercorn = logging.getLogger("hypercorn.error")
    saved = (root.handlers[:], root.level, hypercorn.level)
    try:
        yield
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        hypercorn.setLevel(saved[2])


@pytest.mark.usefixtures("restore_root")
@pytest.mark.parametrize(
    ("fmt", "stream", "formatter"),
    [
        ("auto", TtyStream(), TextFormatter),
        ("auto", io.StringIO(), JsonFormatter),
        ("json", TtyStream(), JsonFormatter),
        ("text", io.StringIO(), TextFormatter),
    ],
    ids=["auto-tty", "auto-pipe", "json", "text"],
)
def test_setup_picks_text_for_a_terminal_and_json_otherwise(
    fmt: Any, stream: io.StringIO, formatter: type[logging.Formatter]
) -> None:
    logs.setup(fmt, stream)
    [handler] = logging.getLogger().handlers
    assert type(handler.formatter) is formatter
    logging.getLogger("gateway.access").info(
        "GET /health 200", extra={"fields": {"status": 200, "model": None}}
    )
    line = stream.getvalue().strip()
    assert len(line.splitlines()) == 1
    if formatter is JsonFormatter:
        assert json.loads(line)["status"] == 200
    else:
        assert line.endswith("INFO gateway.access: GET /health 200 status=200")
