"""Attacks on the status page's routes (ADR 0021) through the whole gateway on real sockets:
oversized and malformed login forms, cross-site logins and logouts (login CSRF), forged
cookies, redirects, and the page's script, which must put every value in as text."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from importlib import resources

import httpx

from gateway.status.routes import COOKIE, LOGIN_MAX_BYTES
from tests.conftest import RunningGateway, StartGateway, make_config
from tests.emulators import OllamaEmulator

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
