"""Attacks on the status page's routes (ADR 0021) through the whole gateway on real sockets:
oversized and malformed login forms, cross-site logins and logouts (login CSRF), forged
cookies, redirects, and the page's script, which must put every value in as text."""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote

import httpx
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.status.routes import COOKIE, LOGIN_MAX_BYTES
from gateway.usage import store
from tests.conftest import RunningGateway, StartGateway, make_config
from tests.emulators import OllamaEmulator
from tests.emulators.http import Faults
from tests.test_fuzz import FUZZ, Stack, run_with_stack
from tests.test_status_browser import browser_paths, driver  # noqa: F401 (fixtures)

ALICE = "tok-alice-hardening"
TOKENS = {"GATEWAY_TOKENS": f"alice:{ALICE}"}
FORM = {"content-type": "application/x-www-form-urlencoded"}


async def _gateway(start_gateway: StartGateway, ollama: OllamaEmulator) -> RunningGateway:
    return await start_gateway(make_config(ollama.url), environ=TOKENS)


async def test_an_oversized_login_form_is_413_without_being_read_whole(
    start_gateway: StartGateway, ollama: OllamaEmulator
) -> None:
    """The login form is the one route a stranger may POST to with auth on: its body is
    bounded by a few KiB, not by `max_body_bytes` (64 MiB), with a length or chunked."""
    gw = await _gateway(start_gateway, ollama)
    body = b"token=" + b"a" * (LOGIN_MAX_BYTES + 1)
    response = await gw.client.post("/status/login", content=body, headers=FORM)
    assert response.status_code == 413
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.headers["connection"] == "close"
    assert "too large" in response.text
    assert "set-cookie" not in response.headers

    async def chunked() -> AsyncIterator[bytes]:
        yield b"token="
        for _ in range(64):
            yield b"a" * 4096

    async with httpx.AsyncClient(base_url=gw.url, trust_env=False) as fresh:
        response = await fresh.post("/status/login", content=chunked(), headers=FORM)
    assert response.status_code == 413
    # A form of many fields is refused too, not parsed into a dictionary of thousands.
    many = b"&".join([b"x=1"] * 2000)[: LOGIN_MAX_BYTES - 100]
    response = await gw.client.post("/status/login", content=many, headers=FORM)
    assert response.status_code == 400
    assert "fields" in response.text


async def test_a_login_that_is_not_a_form_says_so(
    start_gateway: StartGateway, ollama: OllamaEmulator
) -> None:
    gw = await _gateway(start_gateway, ollama)
    for content_type in ("application/json", "text/plain", None):
        headers = {"content-type": content_type} if content_type else {}
        response = await gw.client.post(
            "/status/login", content=f'{{"token": "{ALICE}"}}'.encode(), headers=headers
        )
        assert response.status_code == 415, content_type
        assert "application/x-www-form-urlencoded" in response.text
        assert "set-cookie" not in response.headers
    # Still a form: non-UTF-8 bytes and a token with CR/LF open nothing and set no header.
    for body in (b"token=%ff%fe\xff", b"token=" + ALICE.encode() + b"%0d%0aSet-Cookie:+x=y"):
        response = await gw.client.post("/status/login", content=body, headers=FORM)
        assert response.status_code == 401
        assert "set-cookie" not in response.headers
    # The real form's body, with its charset, signs in.
    response = await gw.client.post(
        "/status/login",
        content=f"token={ALICE}".encode(),
        headers={"content-type": "application/x-www-form-urlencoded; charset=UTF-8"},
    )
    assert response.status_code == 303


async def test_a_cross_site_login_or_logout_is_refused(
    start_gateway: StartGateway, ollama: OllamaEmulator
) -> None:
    """Login CSRF: another site's form that posts its own token would sign the victim's
    browser in as the attacker (SameSite restricts sending a cookie, not setting one);
    a cross-site logout would sign the victim out. The browser says where a POST comes
    from (Sec-Fetch-Site, else Origin): only the gateway's own page may sign in or out."""
    gw = await _gateway(start_gateway, ollama)
    host = gw.url.removeprefix("http://")
    refused = (
        {"sec-fetch-site": "cross-site", "origin": "http://evil.example"},
        {"sec-fetch-site": "same-site", "origin": f"http://other.{host}"},
        {"origin": "http://evil.example"},  # an older browser: Origin only
        {"origin": "null"},
    )
    for headers in refused:
        response = await gw.client.post("/status/login", data={"token": ALICE}, headers=headers)
        assert response.status_code == 403, headers
        assert "set-cookie" not in response.headers
        assert "another site" in response.text
        response = await gw.client.post("/status/logout", headers=headers)
        assert response.status_code == 403, headers
        assert "set-cookie" not in response.headers
    allowed = (
        {"sec-fetch-site": "same-origin", "origin": gw.url},
        {"sec-fetch-site": "none"},  # typed into the address bar, a bookmark
        {"origin": gw.url},
        {},  # not a browser (curl, a script): no ambient cookie to abuse
    )
    for headers in allowed:
        response = await gw.client.post("/status/login", data={"token": ALICE}, headers=headers)
        assert response.status_code == 303, headers
        assert response.headers["set-cookie"].startswith(f"{COOKIE}=")
        response = await gw.client.post("/status/logout", headers=headers)
        assert response.status_code == 303, headers


async def test_forged_cookies_and_redirect_parameters_open_nothing(
    start_gateway: StartGateway, ollama: OllamaEmulator
) -> None:
    """Tried and found sound; kept so that it stays so."""
    gw = await _gateway(start_gateway, ollama)
    forged = ["%%%%", "a" * 3000, "===", "Zm9yZ2Vk====", "__4=", "dG9r\\x00"]
    for cookie in forged:
        response = await gw.client.get("/status.json", headers={"cookie": f"{COOKIE}={cookie}"})
        assert response.status_code == 401, cookie
        assert response.json()["error"].startswith("a valid bearer token")
    many = "; ".join(f"c{i}=v" for i in range(500))
    response = await gw.client.get("/status.json", headers={"cookie": many})
    assert response.status_code == 401
    # No `next=`: every redirect goes to the page itself, whatever the query says.
    for query in ("next=http://evil.example", "next=//evil.example", "redirect=/x"):
        response = await gw.client.get(f"/status/login?{query}")
        assert response.headers["location"] == "/status"
        response = await gw.client.post(f"/status/login?{query}", data={"token": ALICE})
        assert response.headers["location"] == "/status"
    # Logout without a session is harmless.
    async with httpx.AsyncClient(base_url=gw.url, trust_env=False) as fresh:
        assert (await fresh.post("/status/logout")).status_code == 303


def test_the_page_script_never_writes_markup() -> None:
    """Every value reaches the page as text: no sink that parses HTML from data."""
    script = resources.files("gateway.status").joinpath("static", "status.js").read_text()
    sinks = re.findall(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(", script)
    assert sinks == []
    assert "textContent" in script


# ------------------------------------------------------------------ fuzzed with hypothesis

FUZZ_TOKEN = "tok-fuzz-status"
FORMISH = st.lists(
    st.tuples(st.sampled_from(["token", "x", "Token", "token[]", ""]), st.text(max_size=40)),
    max_size=6,
).map(lambda pairs: "&".join(f"{quote(k)}={quote(v)}" for k, v in pairs).encode())
CONTENT_TYPES = st.sampled_from(
    [
        None,
        "application/x-www-form-urlencoded",
        "application/x-www-form-urlencoded; charset=latin-1",
        "APPLICATION/X-WWW-FORM-URLENCODED",
        "multipart/form-data; boundary=zz",
        "application/json",
        "text/plain",
        "\u00e9/\u00e9",
    ]
)
SITES = st.sampled_from([None, "same-origin", "same-site", "cross-site", "none", "garbage"])
ORIGINS = st.sampled_from([None, "null", "http://evil.example", "SELF", "http://127.0.0.1"])
HEADER_TEXT = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=";,"), max_size=200
)


@st.composite
def status_cases(draw: st.DrawFn) -> tuple[str, str, bytes, dict[str, str]]:
    """One request to a status route: any body, content type, origin and cookie."""
    path = draw(st.sampled_from(["/status/login", "/status/logout", "/status", "/status.json"]))
    method = "GET" if path in ("/status", "/status.json") else "POST"
    headers: dict[str, str] = {}
    body = b""
    if method == "POST":
        body = draw(FORMISH | st.binary(max_size=6000) | st.just(f"token={FUZZ_TOKEN}".encode()))
        content_type = draw(CONTENT_TYPES)
        if content_type is not None:
            headers["content-type"] = content_type
    site, origin = draw(SITES), draw(ORIGINS)
    if site is not None:
        headers["sec-fetch-site"] = site
    if origin is not None:
        headers["origin"] = origin
    if draw(st.booleans()):
        headers["cookie"] = f"{COOKIE}={draw(HEADER_TEXT)}"
    if draw(st.booleans()):
        headers["authorization"] = "Bearer " + draw(HEADER_TEXT.filter(bool) | st.just(FUZZ_TOKEN))
    return method, path, body, headers


LOGIN_STATUSES = {303, 400, 401, 403, 413, 415}


@settings(FUZZ, max_examples=4)
@given(data=st.data())
async def test_fuzzed_status_requests_are_clear_4xx_and_set_no_foreign_cookie(
    data: st.DataObject,
) -> None:
    """Any status request: never a 5xx; the login and logout answer in the form's HTML;
    a cookie is set only by a same-site login with the right token; `/status.json`
    refuses in JSON; no answer echoes a token."""
    cases = data.draw(st.lists(status_cases(), min_size=25, max_size=25))
    with tempfile.TemporaryDirectory() as tmp:
        tokens = Path(tmp) / "tokens"
        tokens.write_text(f"fuzz:{FUZZ_TOKEN}\n")

        async def body(stack: Stack) -> None:
            own = stack.url.removeprefix("http://")
            for method, path, content, headers in cases:
                if headers.get("origin") == "SELF":
                    headers = {**headers, "origin": stack.url}
                raw = {key: value.encode() for key, value in headers.items()}  # any octets
                response = await stack.client.request(method, path, content=content, headers=raw)
                what = (method, path, content[:80], headers, response.status_code)
                assert response.status_code < 500, (what, response.text)
                assert FUZZ_TOKEN not in response.text, what
                cookie = response.headers.get("set-cookie", "")
                if path == "/status/login":
                    assert response.status_code in LOGIN_STATUSES, what
                    assert response.headers["content-type"].startswith("text/html"), what
                    if cookie and "Max-Age=0" not in cookie:
                        site = headers.get("sec-fetch-site")
                        origin = headers.get("origin")
                        assert site in (None, "same-origin", "none"), what
                        assert site is not None or origin in (None, stack.url), what
                        assert f"token={FUZZ_TOKEN}".encode() in content, what
                        assert own  # the cookie is the gateway's own, for its own host
                elif path == "/status/logout":
                    assert response.status_code in (303, 403), what
                elif path == "/status.json" and response.status_code != 200:
                    assert response.status_code == 401, what
                    assert response.json()["error"], what

        await run_with_stack(body, auth={"tokens_file": str(tokens)})


@settings(FUZZ, max_examples=4)
@given(queries=st.lists(st.text(max_size=60), min_size=20, max_size=20))
async def test_fuzzed_host_parameters_never_reach_upstream(queries: list[str]) -> None:
    """Any query on a management route: 200 from the one host, the host's own 4xx, or a
    400 naming the `host` parameter; the `host` parameter never reaches the host."""

    async def body(stack: Stack) -> None:
        for text in queries:
            query = text.encode("utf-8", "surrogatepass").decode("latin-1")
            query = "".join(c if 0x21 <= ord(c) <= 0x7E and c != "#" else quote(c) for c in query)
            for extra in ("", "&host=default", "&host=gpu"):
                response = await stack.client.request(
                    "DELETE", f"/api/delete?{query}{extra}", json={"model": "nope"}
                )
                what = (query + extra, response.status_code, response.text[:200])
                assert response.status_code in (200, 400, 404), what
                if response.status_code == 400:
                    assert "host" in response.json()["error"], what
        for request in stack.ollama.requests_to("/api/delete"):
            keys = {key for key, _ in parse_qsl(str(request.query), keep_blank_values=True)}
            assert "host" not in keys, request.query

    await run_with_stack(body, ollama={"allow_management": True})


MARKUP = '<img src=x onerror="window.__pwned=1">'


async def test_markup_from_clients_and_hosts_shows_as_text_in_a_real_browser(
    driver: Any,  # noqa: F811 (the browser test's fixture)
    start_gateway: StartGateway,
    nursery: trio.Nursery,
    tmp_path: Path,
) -> None:
    """A model name a client sent (kept by the ledger even when refused) and an error
    text a GPU host sent (its reason for being degraded) are markup here: the page shows
    them as text, and nothing in them runs."""
    ledger = tmp_path / "usage.db"
    conn = store.open_writer(ledger)
    try:
        row = (time.time(), "alice", "/api/chat", "ollama", "", MARKUP, 404, 1, 1, 0.0, 0.0, 1.0)
        store.insert(conn, [row])
    finally:
        conn.close()
    up = OllamaEmulator()
    await nursery.start(up.run)
    bad = OllamaEmulator()
    await nursery.start(bad.run)
    body = json.dumps({"error": MARKUP}).encode()
    bad.faults = Faults(status=500, status_body=body, fault_paths=frozenset({"/api/tags"}))
    hosts = {"up": {"url": up.url}, "bad": {"url": bad.url}}
    gw = await start_gateway(
        make_config(up.url, ollama={"hosts": hosts}, usage={"path": str(ledger)})
    )

    def look() -> tuple[str, str, object, int]:
        from selenium.webdriver.support.ui import WebDriverWait

        driver.get(f"{gw.url}/status")
        WebDriverWait(driver, 5, poll_frequency=0.05).until(
            lambda _: (
                MARKUP
                in driver.execute_script(
                    "const e = document.querySelector('#usage-models-today');"
                    "return e ? e.innerText : '';"
                )
            ),
            message="the model name never showed",
        )
        return (
            driver.execute_script("return document.querySelector('#usage-models-today').innerText"),
            driver.execute_script(
                "return Array.from(document.querySelectorAll('.host-why'))"
                ".map((e) => e.innerText).join(' | ')"
            ),
            driver.execute_script("return window.__pwned"),
            driver.execute_script("return document.querySelectorAll('img').length"),
        )

    models, why, pwned, images = await trio.to_thread.run_sync(look)
    assert MARKUP in models
    assert MARKUP in why
    assert pwned is None
    assert images == 0
