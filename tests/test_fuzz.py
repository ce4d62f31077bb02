"""Issue 5.1: bad input, fuzzed with hypothesis against the running gateway, route by route.

Each hypothesis example starts its own stack (the Ollama emulator, an OpenAI-compatible
emulator registered as OpenRouter, and the whole gateway on port 0) and sends a batch of
generated requests through a real HTTP client. For every answer:

- never a 5xx made by the gateway; an error is a 4xx with a JSON body in the route's shape
  (Ollama's `{"error": "..."}`, OpenAI's `{"error": {"message": ...}}` on
  `/v1/chat/completions`) whose message is specific, not a framework's boilerplate;
- the gate, its queue and the drain are idle again afterwards;
- the upstream saw only the route's own path (a model name never changes the upstream URL
  nor reaches another provider), and a passthrough body went upstream byte for byte;
- after the batch, a normal chat still gets its answer.

The one 5xx tolerated is ADR 0010's: a router call for a bare model name goes to local
Ollama without an inventory check, and Ollama's 404 comes back as 502 naming that status.
Defects found while writing this file have their own deterministic tests at the end.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import trio
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from gateway.app import Started, serve
from gateway.services import Services
from tests.conftest import eventually, make_config
from tests.emulators import Exchange, OllamaEmulator, OpenAIEmulator

MAX_BODY = 64 * 1024
OPENROUTER_KEY = "sk-fuzz-openrouter"
OPENROUTER_PATH = "/api/v1/chat/completions"
CASES_PER_EXAMPLE = 20
# No shrinking: each attempt restarts a whole stack, and a failure already prints the
# request that broke it (the deterministic tests at the end pin each defect down).
FUZZ = settings(
    max_examples=6,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

MESSAGES = [{"role": "user", "content": "why is the sky blue?"}]
# A valid body per POST route; the strategies below break them in every way they can.
VALID: dict[str, dict[str, Any]] = {
    "/api/chat": {"model": "llama3", "messages": MESSAGES, "stream": False},
    "/api/generate": {"model": "llama3", "prompt": "why?", "stream": False},
    "/api/embed": {"model": "nomic-embed-text", "input": "text"},
    "/api/embeddings": {"model": "nomic-embed-text", "prompt": "text"},
    "/api/show": {"model": "llama3"},
    "/v1/chat": {"model": "llama3", "messages": MESSAGES},
    "/v1/chat/completions": {"model": "llama3", "messages": MESSAGES},
    "/v1/embeddings": {"model": "nomic-embed-text", "input": "text"},
}
POST_ROUTES = tuple(VALID)
PASSTHROUGH = frozenset(
    {"/api/chat", "/api/generate", "/api/embed", "/api/embeddings", "/api/show"}
)
ROUTER = frozenset({"/v1/chat", "/v1/chat/completions"})
GET_ROUTES = (
    "/",
    "/api/version",
    "/api/tags",
    "/api/ps",
    "/health",
    "/ready",
    "/metrics",
    "/v1/models",
    "/v1/chat/providers",
)
# Which upstream paths a request to each route may cause at the Ollama target. Polls
# (`/api/tags`, `/api/ps`) may follow any request: a model miss re-polls once.
UPSTREAM_PATHS: dict[str, frozenset[str]] = {
    **{route: frozenset({route}) for route in PASSTHROUGH},
    "/v1/chat": frozenset({"/api/chat"}),
    # The client-API routes pass through to the same path (issue 12).
    "/v1/chat/completions": frozenset({"/v1/chat/completions"}),
    "/v1/embeddings": frozenset({"/v1/embeddings"}),
    "/": frozenset({"/"}),
    "/api/version": frozenset({"/api/version"}),
    "/api/tags": frozenset({"/api/tags"}),
    "/api/ps": frozenset({"/api/ps"}),
}
POLLS = frozenset({"/api/tags", "/api/ps"})
# Boilerplate that says nothing about what was wrong with the request.
GENERIC = (
    "The browser (or proxy) sent a request that this server could not understand.",
    "The server encountered an internal error",
)


class TolerantOllama(OllamaEmulator):
    """The Ollama emulator, answering a body its handlers cannot digest (for example
    `"messages": 5`, `"prompt": 5`) with a 400 as Ollama's Go decoder does, instead of
    dropping the connection: the fuzz is aimed at the gateway, not at the emulator."""

    def __init__(self) -> None:
        super().__init__()
        self.indigestible = 0

    async def handle(self, exchange: Exchange) -> None:
        try:
            await super().handle(exchange)
        except (TypeError, AttributeError, ValueError, RecursionError) as exc:
            self.indigestible += 1
            message = f"json: cannot unmarshal request: {exc}"
            if exchange.path.startswith("/v1/"):  # Ollama's compatibility routes: OpenAI's shape
                error = {"message": message, "type": "invalid_request_error", "param": None}
                body = json.dumps({"error": {**error, "code": None}}).encode()
                await exchange.respond(400, body, content_type="application/json")
                return
            await self._error(exchange, 400, message)


@dataclass
class Stack:
    url: str
    client: httpx.AsyncClient
    services: Services
    ollama: TolerantOllama
    openrouter: OpenAIEmulator


async def run_with_stack(
    body: Callable[[Stack], Awaitable[None]], *, timeout_s: float = 60.0, **config: Any
) -> None:
    """Start emulators and a gateway, run `body`, then stop the gateway cleanly."""
    async with trio.open_nursery() as nursery:
        ollama = TolerantOllama()
        await nursery.start(ollama.run)
        openrouter = OpenAIEmulator(api_key=OPENROUTER_KEY)
        await nursery.start(openrouter.run)
        settings_ = make_config(
            ollama.url,
            max_body_bytes=MAX_BODY,
            providers={"openrouter": {"base_url": f"{openrouter.url}/api/v1"}},
            **config,
        )
        stop, stopped = trio.Event(), trio.Event()

        async def run_gateway(task_status: trio.TaskStatus[Started]) -> None:
            try:
                await serve(
                    settings_,
                    environ={"OPENROUTER_API_KEY": OPENROUTER_KEY},
                    shutdown_trigger=stop.wait,
                    task_status=task_status,
                )
            finally:
                stopped.set()

        started: Started = await nursery.start(run_gateway)
        # A connection per request: an answer that closes its connection (a 413 before the
        # body is read) must not fail the next case (that defect has its own test).
        fresh = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(
            base_url=started.url, timeout=10.0, trust_env=False, limits=fresh
        ) as client:
            with trio.fail_after(timeout_s):
                await body(Stack(started.url, client, started.services, ollama, openrouter))
        stop.set()
        with trio.fail_after(10):
            await stopped.wait()
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- requests


class Case:
    """One request. A plain class, so hypothesis prints it with this short `repr`."""

    def __init__(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, bytes] | None = None,
        *,
        chunked: bool = False,
        model: str | None = None,
    ) -> None:
        self.method = method
        self.path = path
        self.body = body
        self.headers = headers or {}
        self.chunked = chunked  # sent without Content-Length, in pieces
        self.model = model if model is not None else _model_in(body)

    def __repr__(self) -> str:
        shown = self.body if len(self.body) <= 160 else self.body[:160] + b"..."
        extra = f" headers={self.headers!r}" if self.headers else ""
        extra += " chunked" if self.chunked else ""
        return f"Case({self.method} {self.path!r} body[{len(self.body)}]={shown!r}{extra})"


def _model_in(body: bytes) -> str | None:
    """The model name a body carries, if it is a JSON object with a string `model`."""
    try:
        decoded = json.loads(body)
    except (ValueError, RecursionError):
        return None
    model = decoded.get("model") if isinstance(decoded, dict) else None
    return model if isinstance(model, str) else None


def provider_of(name: str) -> str:
    """SPEC's routing table, restated independently of `gateway.providers.registry`."""
    lowered = name.lower()
    if lowered.startswith("ollama/"):
        return "local"
    for prefix in ("ollama_cloud/", "openrouter/", "opencode/", "kimi/"):
        if lowered.startswith(prefix):
            return prefix[:-1]
    tag = name.rpartition(":")[2].strip().lower() if ":" in name else ""
    if name.strip().rpartition(":")[0] and (
        tag == "cloud" or (tag.endswith("-cloud") and "/" not in tag)
    ):
        return "ollama_cloud"
    return "local"


async def send(stack: Stack, case: Case) -> httpx.Response:
    content: bytes | AsyncIterator[bytes] = case.body
    if case.chunked:

        async def pieces() -> AsyncIterator[bytes]:
            for start in range(0, len(case.body), 16 * 1024):
                yield case.body[start : start + 16 * 1024]

        content = pieces()
    request = stack.client.build_request(
        case.method, case.path, content=content, headers=case.headers
    )
    return await stack.client.send(request)


def error_message(path: str, case: Case, response: httpx.Response) -> str:
    """The error's message, checking the JSON shape of the route that answered."""
    try:
        body = response.json()
    except ValueError:
        pytest.fail(f"{case!r}: {response.status_code} without a JSON body: {response.content!r}")
    assert isinstance(body, dict), (case, body)
    error = body.get("error")
    if path in ("/v1/chat/completions", "/v1/embeddings", "/v1/models"):
        assert isinstance(error, dict), (case, body)  # OpenAI's shape, for the SDKs
        message = error.get("message")
        assert error.get("type"), (case, body)
    else:
        message = error  # Ollama's shape
    assert isinstance(message, str), (case, body)
    assert message.strip(), (case, body)
    assert not message.startswith(GENERIC), (case, body)
    return message


def tolerated_5xx(path: str, response: httpx.Response, message: str) -> bool:
    """ADR 0010: the router does not check a model name against any inventory; the
    provider's own 404 for it comes back as 502 naming that status. (For the front door
    forwarding a client's body verbatim this is a defect, pinned down below.)"""
    return response.status_code == 502 and path in ROUTER and "(upstream status 404)" in message


async def check(stack: Stack, case: Case) -> httpx.Response:
    """Send one case and check everything issue 5.1 asks of its answer."""
    seen_ollama = len(stack.ollama.requests)
    seen_openrouter = len(stack.openrouter.requests)
    response = await send(stack, case)
    status = response.status_code
    # The path as sent (httpx resolves dot segments) and as the gateway routes it.
    path = response.request.url.path
    query = response.request.url.query.decode("ascii")
    if status >= 400 and case.method != "HEAD":
        message = error_message(path, case, response)
        if status >= 500:
            assert tolerated_5xx(path, response, message), (case, status, message)
    else:
        assert status < 500, (case, status, response.content[:300])
    # Back to idle: no holder, no waiter, no tracked work.
    gate, drain = stack.services.gate, stack.services.drain
    await eventually(lambda: (gate.busy, gate.queued, drain.active) == (0, 0, 0))
    # The upstream URL is the route's own, whatever the client sent.
    allowed = UPSTREAM_PATHS.get(path, frozenset()) | POLLS
    for upstream in stack.ollama.requests[seen_ollama:]:
        assert upstream.path in allowed, (case, upstream.method, upstream.path)
        if upstream.path == path:  # a passthrough: the query and the body as received
            assert upstream.query == query, (case, upstream.query)
            # (`model` is the one rewrite, when an `ollama/` prefix is stripped.)
            if not (case.model or "").lower().startswith("ollama/"):
                assert upstream.body == case.body, case
        else:
            assert upstream.query == "", (case, upstream.query)
        if upstream.path == "/api/chat" and path in ROUTER:
            assert case.model is not None
            assert provider_of(case.model) == "local", (case, "reached local Ollama")
    for upstream in stack.openrouter.requests[seen_openrouter:]:
        if path == "/v1/models" and upstream.path == "/api/v1/models":
            continue  # the listing asks each provider for its models
        assert upstream.path == OPENROUTER_PATH, (case, upstream.path)
        assert upstream.headers.get("authorization") == f"Bearer {OPENROUTER_KEY}"
        assert path in ROUTER, (case, "reached OpenRouter")
        assert case.model is not None
        assert provider_of(case.model) == "openrouter", (case, "reached OpenRouter")
    return response


async def still_serves(stack: Stack) -> None:
    response = await stack.client.post("/api/chat", json=VALID["/api/chat"])
    assert response.status_code == 200, response.content
    assert response.json()["message"]["content"] == stack.ollama.reply
    routed = await stack.client.post("/v1/chat", json=VALID["/v1/chat"])
    assert routed.status_code == 200, routed.content
    assert routed.json()["content"] == stack.ollama.reply


async def run_cases(data: st.DataObject, strategy: st.SearchStrategy[Case], **config: Any) -> None:
    async def body(stack: Stack) -> None:
        for _ in range(CASES_PER_EXAMPLE):
            await check(stack, data.draw(strategy))
        await still_serves(stack)

    await run_with_stack(body, **config)


# ------------------------------------------------------------------------- strategies

JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
ROUTE = st.sampled_from(POST_ROUTES)
INVALID_UTF8 = st.sampled_from(
    [b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xa0\xa1", b"\xe2\x28\xa1", b"\xed\xa0\x80", b"\xf8\x88"]
)


def encode(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


@st.composite
def random_json(draw: st.DrawFn) -> Case:
    """Any JSON document at all, sent to a POST route."""
    return Case("POST", draw(ROUTE), encode(draw(JSON_VALUES)))


@st.composite
def malformed_json(draw: st.DrawFn) -> Case:
    """A valid body, then broken: cut short, bytes spliced in, invalid UTF-8 inside a
    string, a literal JSON does not have, trailing junk; or no JSON at all."""
    route = draw(ROUTE)
    body = encode(VALID[route])
    how = draw(
        st.sampled_from(
            ["truncate", "splice", "bad_utf8", "literal", "trailing", "binary", "blank", "bom"]
        )
    )
    if how == "truncate":
        body = body[: draw(st.integers(0, len(body) - 1))]
    elif how == "splice":
        at = draw(st.integers(0, len(body)))
        body = body[:at] + draw(st.binary(min_size=1, max_size=8)) + body[at:]
    elif how == "bad_utf8":
        # Inside the model name, or inside another string the gateway only skips.
        marker = b'"llama3"' if b'"llama3"' in body else b'"nomic-embed-text"'
        inside = draw(st.sampled_from([marker, b'"text"', b'"why is the sky blue?"', b'"why?"']))
        if inside not in body:
            inside = marker
        bad = draw(INVALID_UTF8)
        body = body.replace(inside, inside[:2] + bad + inside[2:], 1)
    elif how == "literal":
        literal = draw(
            st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"01", b"'x'"])
        )
        body = body[:-1] + b', "extra": ' + literal + b"}"
    elif how == "trailing":
        body += draw(st.sampled_from([b"}", b"]", b",", b"x", b"{}", b"\x00"]))
    elif how == "binary":
        body = draw(st.binary(max_size=64))
    elif how == "blank":
        body = draw(st.sampled_from([b"", b" ", b"\n", b"\r\n\t ", b"null", b"{}", b"[]", b'""']))
    else:
        body = b"\xef\xbb\xbf" + body
    return Case("POST", route, body)


def _wrong_value(correct: Any) -> st.SearchStrategy[Any]:
    return JSON_VALUES.filter(lambda v: type(v) is not type(correct))


@st.composite
def wrong_types(draw: st.DrawFn) -> Case:
    """One field of a valid body (top level or inside a message) given another JSON type;
    the classics `model` as a number, `messages` as a string, `stream` as "yes" included."""
    route = draw(ROUTE)
    body = json.loads(json.dumps(VALID[route]))
    fields = [*body, "stream"]
    if "messages" in body:
        fields += ["messages[0]", "messages[0].role", "messages[0].content"]
    where = draw(st.sampled_from(fields))
    classic = {"model": 42, "messages": "hi", "stream": "yes", "input": {"a": 1}, "prompt": [1]}
    if where in classic and draw(st.booleans()):
        value: Any = classic[where]
    elif where.startswith("messages[0]"):
        message = body["messages"][0]
        key = where.partition(".")[2]
        value = draw(_wrong_value(message[key] if key else message))
        if key:
            body["messages"] = [{**message, key: value}]
        else:
            body["messages"] = [value]
        return Case("POST", route, encode(body))
    else:
        value = draw(_wrong_value(body.get(where, False)))
    body[where] = value
    return Case("POST", route, encode(body))


SPECIAL_NAMES = [
    "..",
    "../..",
    "../../api/tags",
    "llama3/../../api/generate",
    "/api/chat",
    "%2F",
    "..%2F..%2Fapi%2Fps",
    "llama3%2F..",
    " llama3",
    "llama3 ",
    "llama 3",
    "llama3\n",
    "\nllama3",
    "llama3\r\nX-Injected: 1",
    "llama3?x=1",
    "llama3#frag",
    "http://evil.example/x",
    "//evil.example/x",
    "llama3\x00",
    "ollama/../llama3",
    "ollama/..%2Fx",
    "openrouter/../../x",
    "openrouter/openai/../../x",
    "openrouter/openai/gpt-4o-mini",
    "OpenRouter/openai/gpt-4o-mini",
    "openrouter/x",
    "openrouter/",
    "kimi/../openrouter/openai/gpt-4o-mini",
    "opencode/../../x",
    "ollama_cloud/../x",
    "x/../../x:cloud",
    "llama3:cloud",
    ":cloud",
    "ollama/",
    "",
    " ",
]


@st.composite
def model_names(draw: st.DrawFn) -> Case:
    """Model names built to move a URL or to slip to another provider."""
    name = draw(
        st.sampled_from(SPECIAL_NAMES)
        | st.text(max_size=40)
        | st.builds(
            lambda prefix, rest: prefix + rest,
            st.sampled_from(["", "openrouter/", "kimi/", "ollama/", "../", "%2e%2e/"]),
            st.text(alphabet="./%2Fa:\\ \n", max_size=20),
        )
        | st.integers(1000, 60_000).map(lambda n: "l" * n)
    )
    route = draw(ROUTE)
    body = {**VALID[route], "model": name}
    return Case("POST", route, encode(body), model=name)


@st.composite
def deep_nesting(draw: st.DrawFn) -> Case:
    """Arrays or objects nested up to ~30 000 deep (inside the body limit), as the body or
    as the value of a field (one the gateway reads, or one it only skips)."""
    depth = draw(st.sampled_from([64, 500, 1000, 3000, 10_000, 30_000]) | st.integers(1, 2000))
    kind = draw(st.sampled_from(["array", "object"]))
    if kind == "array":
        nested = b"[" * depth + b"]" * depth
    else:
        nested = b'{"a":' * depth + b"1" + b"}" * depth
    route = draw(ROUTE)
    where = draw(st.sampled_from(["body", "model", "messages", "extra", "input"]))
    if where == "body":
        return Case("POST", route, nested)
    head = encode({k: v for k, v in VALID[route].items() if k != where})
    return Case("POST", route, head[:-1] + b', "' + where.encode() + b'": ' + nested + b"}")


@st.composite
def oversized(draw: st.DrawFn) -> Case:
    """A body over the limit, with a Content-Length or streamed without one."""
    size = draw(st.integers(MAX_BODY + 1, 4 * MAX_BODY))
    filler = draw(st.sampled_from([b"x", b" ", b"["]))
    route = draw(ROUTE)
    prefix = encode(VALID[route])[:-1] + b', "pad": "'
    body = (prefix + filler * size)[:size]
    return Case("POST", route, body, chunked=draw(st.booleans()))


METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "BREW", "PROPFIND"]
CONTENT_TYPES = [
    b"application/json",
    b"text/plain",
    b"application/x-www-form-urlencoded",
    b"multipart/form-data; boundary=x",
    b"application/json; charset=latin-1",
    b"",
    b"*/*",
    b"application/\xff",
    b"\xe9t\xe9",
]
KNOWN_PATHS = [*POST_ROUTES, *GET_ROUTES]


@st.composite
def routes_methods_headers(draw: st.DrawFn) -> Case:
    """Known and unknown paths, any method, odd content types and headers, query strings."""
    path = draw(
        st.sampled_from(KNOWN_PATHS)
        | st.text(alphabet="abcz/.-_~%2F", min_size=1, max_size=24).map(lambda p: "/" + p)
        | st.sampled_from(["/api", "/api/", "/v1", "/v1/", "/api/chat/", "/API/CHAT", "/v2/chat"])
    )
    query = draw(st.sampled_from(["", "?", "?a=1", "?stream=true&model=x", "?%2F..%2F"]))
    method = draw(st.sampled_from(METHODS))
    headers: dict[str, bytes] = {}
    if draw(st.booleans()):
        headers["content-type"] = draw(st.sampled_from(CONTENT_TYPES))
    if draw(st.booleans()):
        headers["x-request-id"] = draw(st.sampled_from([b"abc", b"\xff\xfe", b"a" * 200, b"../x"]))
    if draw(st.booleans()):  # auth is off: ignored, and never forwarded
        headers["authorization"] = draw(st.sampled_from([b"Bearer x", b"Basic Zm9v", b"\xff"]))
    body = b""
    if method in ("POST", "PUT", "PATCH", "DELETE", "BREW") and draw(st.booleans()):
        route = path if path in VALID else "/api/chat"
        body = encode(VALID[route]) if draw(st.booleans()) else draw(st.binary(max_size=32))
    return Case(method, path + query, body, headers)


# -------------------------------------------------------------------------- the fuzz


@FUZZ
@given(data=st.data())
async def test_random_and_malformed_json_is_a_clear_4xx(data: st.DataObject) -> None:
    await run_cases(data, random_json() | malformed_json())


@FUZZ
@given(data=st.data())
async def test_wrong_types_for_every_field_are_a_clear_4xx(data: st.DataObject) -> None:
    await run_cases(data, wrong_types())


@FUZZ
@given(data=st.data())
async def test_model_names_never_move_the_upstream_url_or_provider(data: st.DataObject) -> None:
    await run_cases(data, model_names())


@FUZZ
@given(data=st.data())
async def test_deeply_nested_json_is_a_clear_4xx(data: st.DataObject) -> None:
    await run_cases(data, deep_nesting())


@FUZZ
@given(data=st.data())
async def test_unknown_routes_methods_and_content_types(data: st.DataObject) -> None:
    await run_cases(data, routes_methods_headers())


@settings(FUZZ, max_examples=3)
@given(data=st.data())
async def test_bodies_over_the_limit_get_413_in_the_routes_shape(data: st.DataObject) -> None:
    async def body(stack: Stack) -> None:
        for _ in range(8):
            case = data.draw(oversized())
            response = await check(stack, case)
            assert response.status_code == 413, (case, response.content)
            assert str(MAX_BODY) in error_message(case.path, case, response)
        assert stack.ollama.requests_to("/api/chat") == []
        await still_serves(stack)

    await run_with_stack(body)


# ------------------------------------------------- defects found by the fuzz, pinned down


@pytest.mark.parametrize(
    ("method", "route"),
    [
        (b"POST", b"/api/chat"),
        (b"POST", b"/v1/chat"),
        (b"POST", b"/v1/chat/completions"),
        (b"PUT", b"/api/chat"),
    ],
)
async def test_an_answer_that_closes_the_connection_says_so(method: bytes, route: bytes) -> None:
    """Answered before its body is read (413 from the declared length, 405), a request's
    connection cannot be reused and the server closes it: the answer must carry
    `Connection: close`, or a keep-alive client sends its next request into the closing
    socket and gets "Server disconnected without sending a response" (seen in the fuzz
    about one time in three with bodies of 300 kB)."""

    async def body(stack: Stack) -> None:
        host, port = stack.url.removeprefix("http://").rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            await stream.send_all(
                method + b" " + route + b" HTTP/1.1\r\nhost: gw\r\n"
                b"content-type: application/json\r\ncontent-length: 300000\r\n\r\n" + b" " * 1000
            )
            answer = b""
            closed = False
            with trio.move_on_after(3):
                while chunk := await stream.receive_some(65536):
                    answer += chunk
                closed = True
        head = answer.partition(b"\r\n\r\n")[0].lower()
        assert head.startswith(b"http/1.1 4"), answer
        if closed:
            assert b"\r\nconnection: close" in head, answer

    await run_with_stack(body)


INVALID_UTF8_BODIES = {
    "/api/chat": b'{"model":"ll\xffama3","messages":[]}',
    "/api/embed": b'{"model":"nomic\xff","input":"x"}',
    "/v1/chat": b'{"model":"ll\xffama3","messages":[{"role":"user","content":"x"}]}',
    "/v1/chat/completions": b'{"model":"ll\xffama3","messages":[{"role":"user","content":"x"}]}',
    "/v1/embeddings": b'{"model":"nomic\xff","input":"x"}',
}


@pytest.mark.parametrize("route", list(INVALID_UTF8_BODIES))
async def test_invalid_utf8_in_a_json_string_is_a_400(route: str) -> None:
    """msgspec raises `UnicodeDecodeError` (not `DecodeError`) for invalid UTF-8 inside a
    string; the decoders of every route must answer it with a 400, not a 500."""

    async def body(stack: Stack) -> None:
        case = Case("POST", route, INVALID_UTF8_BODIES[route])
        response = await send(stack, case)
        assert response.status_code == 400, (route, response.status_code, response.content)
        assert "utf-8" in error_message(case.path, case, response).lower()
        await still_serves(stack)

    await run_with_stack(body)


@pytest.mark.parametrize("route", ["/api/chat", "/api/embed", "/v1/chat", "/v1/chat/completions"])
@pytest.mark.parametrize("where", ["body", "field"])
async def test_json_nested_too_deep_is_a_400(route: str, where: str) -> None:
    """msgspec raises `RecursionError` past ~1000 levels; 4 KiB of `[` is enough."""
    nested = b"[" * 3000 + b"]" * 3000
    payload = nested if where == "body" else encode(VALID[route])[:-1] + b', "x": ' + nested + b"}"

    async def body(stack: Stack) -> None:
        case = Case("POST", route, payload)
        response = await send(stack, case)
        assert response.status_code == 400, (route, response.status_code, response.content)
        error_message(case.path, case, response)
        await still_serves(stack)

    await run_with_stack(body)


@pytest.mark.parametrize("route", ["/api/chat", "/api/embed", "/api/show"])
async def test_a_content_type_that_is_not_ascii_is_not_a_500(route: str) -> None:
    """The passthrough forwards the client's Content-Type upstream, decoded as latin-1;
    httpx encodes header values as ASCII and raises `UnicodeEncodeError`."""

    async def body(stack: Stack) -> None:
        case = Case("POST", route, encode(VALID[route]), {"content-type": b"application/\xff"})
        response = await send(stack, case)
        assert response.status_code < 500, (route, response.status_code, response.content)
        if response.status_code >= 400:
            error_message(case.path, case, response)
        await eventually(lambda: stack.services.gate.busy == 0)
        await still_serves(stack)

    await run_with_stack(body)


@pytest.mark.parametrize(
    "extra",
    [b'"user": "\xff"', b'"seed": 1e999', b'"metadata": ' + b"[" * 3000 + b"]" * 3000],
    ids=["invalid-utf8", "number-out-of-range", "deep"],
)
async def test_front_door_rejects_what_it_cannot_forward_with_a_400(extra: bytes) -> None:
    """`/v1/chat/completions` to an OpenAI-family provider decodes only `model` and
    `stream`, then rewrites `model` keeping every other value's bytes: what it cannot
    rewrite is a 400 (once a 500); what it can reaches the provider as sent."""
    body_ = encode(
        {"model": "openrouter/openai/gpt-4o-mini", "messages": MESSAGES, "stream": False}
    )
    payload = body_[:-1] + b", " + extra + b"}"

    async def body(stack: Stack) -> None:
        case = Case("POST", "/v1/chat/completions", payload)
        response = await send(stack, case)
        assert response.status_code < 500, (response.status_code, response.content)
        if response.status_code >= 400:
            error_message(case.path, case, response)
        if stack.openrouter.requests:  # forwarded: the value's bytes as the client sent them
            assert extra.partition(b": ")[2] in stack.openrouter.requests[-1].body
        await still_serves(stack)

    await run_with_stack(body)


@pytest.mark.parametrize(
    ("field", "value"),
    [("top_p", "high"), ("tools", 5), ("model", "openrouter/openai/no-such-model")],
)
async def test_front_door_keeps_a_providers_4xx_about_the_clients_body(
    field: str, value: object
) -> None:
    """The front door forwards the client's own body to an OpenAI-family provider; when the
    provider says that body is wrong (400, 404), the client must get that 4xx in OpenAI's
    shape, not a 502 that SDKs retry as a server fault (ADR 0011: statuses survive)."""
    payload = {"model": "openrouter/openai/gpt-4o-mini", "messages": MESSAGES, field: value}

    async def body(stack: Stack) -> None:
        if field != "model":
            # The emulator does not validate these fields: have it refuse as OpenAI does.
            stack.openrouter.faults.status = 400
        response = await stack.client.post("/v1/chat/completions", json=payload)
        assert 400 <= response.status_code < 500, (response.status_code, response.content)
        error_message("/v1/chat/completions", Case("POST", "/v1/chat/completions"), response)

    await run_with_stack(body)


@pytest.mark.parametrize(
    "target",
    [
        b"/api/blobs/../chat",
        b"/api/blobs/..%2Fchat",
        b"/api/blobs/%2E%2E/generate",
        b"/api/blobs/sha256:abc%2F..%2F..%2Fapi%2Fchat",
        b"/api/blobs//../../api/tags",
        b"/api/blobs/a%00b",
    ],
)
async def test_blob_paths_cannot_reach_another_upstream_route(target: bytes) -> None:
    """With model management enabled, `/api/blobs/<digest>` is forwarded with the decoded
    path appended to the target URL; dot segments (also percent-encoded) are resolved by
    httpx, so a client reaches `/api/chat` past the gate, or any other upstream path."""

    async def body(stack: Stack) -> None:
        payload = encode({**VALID["/api/chat"], "messages": [{"role": "user", "content": "x"}]})
        host, port = stack.url.removeprefix("http://").rsplit(":", 1)
        request = (
            b"POST " + target + b" HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(payload)).encode() + b"\r\nconnection: close\r\n\r\n"
        ) + payload
        before = len(stack.ollama.requests)
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            await stream.send_all(request)
            answer = b""
            while chunk := await stream.receive_some(65536):
                answer += chunk
        status = int(answer.split(b" ", 2)[1])
        reached = [r.path for r in stack.ollama.requests[before:]]
        assert all(path.startswith("/api/blobs/") for path in reached), (target, reached)
        assert status < 500, (target, answer[:300])
        assert stack.ollama.generation_order == []

    await run_with_stack(body, ollama={"allow_management": True})


async def test_malformed_http_is_refused_without_reaching_the_app() -> None:
    """Bytes that are not HTTP/1.1 (a request line with a non-ASCII target, a space in the
    target, a header line without a colon) are refused by the HTTP layer with a 400 in
    Ollama's error shape and a close: the app never runs, nothing is forwarded, and the
    gateway keeps serving."""

    async def body(stack: Stack) -> None:
        host, port = stack.url.removeprefix("http://").rsplit(":", 1)
        for head in [
            b"GET /\xff HTTP/1.1\r\nhost: gw\r\n",
            b"POST /api/chat x HTTP/1.1\r\nhost: gw\r\n",
            b"GET /health HTTP/1.1\r\nhost: gw\r\na header without a colon\r\n",
        ]:
            stream = await trio.open_tcp_stream(host, int(port))
            async with stream:
                await stream.send_all(head + b"content-length: 0\r\n\r\n")
                answer = b""
                while chunk := await stream.receive_some(65536):
                    answer += chunk
            status = int(answer.split(b" ", 2)[1])
            assert status == 400, (head, answer)
            assert b"malformed HTTP request" in answer.partition(b"\r\n\r\n")[2], answer
        assert stack.ollama.generation_order == []
        await still_serves(stack)

    await run_with_stack(body)


__all__ = ["Case", "Stack", "run_with_stack"]
