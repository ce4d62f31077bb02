"""`GET /status` (the page), `GET /status.json` (what it polls twice a second), and the
login form's `POST /status/login` and `POST /status/logout` (ADR 0021).

With inbound auth on, a caller shows a token as a bearer header or in the cookie the
login form sets (HttpOnly, SameSite=Strict, Secure under TLS; the token itself, base64url
encoded, checked in constant time by `Auth.identify` on every request, so that a token
removed from the configuration stops working at once). A browser without one gets the
login form, not a JSON 401; `/status.json` answers the JSON 401 a script expects.

The login form is the one route a stranger may POST to when auth is on, so its body is
bounded by a few KiB (not `max_body_bytes`) and must be a urlencoded form; and since
SameSite limits where a cookie is sent, not who may set it, a sign-in or sign-out that
the browser says comes from another site is refused (login CSRF).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import html
import logging
from importlib import resources
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlsplit

import msgspec
from quart import Quart, Response, request

from gateway.errors import error_body

if TYPE_CHECKING:
    from gateway.services import Services

log = logging.getLogger("gateway.status")

COOKIE = "gateway_status"
COOKIE_MAX_AGE_S = 30 * 86400
POLL_MS = 500
LOGIN_MAX_BYTES = 4096  # a token and a submit button; the form has one field
LOGIN_MAX_FIELDS = 8
_FORM = "application/x-www-form-urlencoded"
_encode = msgspec.json.Encoder().encode


def _static(name: str) -> str:
    return resources.files("gateway.status").joinpath("static", name).read_text("utf-8")


def _csp_hash(text: str) -> str:
    digest = base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()
    return f"'sha256-{digest}'"


class Pages:
    """The page and the login form, built once from `static/` with their script and
    style inline (one response, nothing fetched from elsewhere), and the policy that
    allows exactly those."""

    def __init__(self) -> None:
        style = _static("status.css")
        script = _static("status.js").replace("__POLL_MS__", str(POLL_MS))
        self.page = (
            _static("status.html").replace("/*__STYLE__*/", style).replace("/*__SCRIPT__*/", script)
        )
        self._login = _static("login.html").replace("/*__STYLE__*/", style)
        self.csp = (
            "default-src 'none'; "
            f"script-src {_csp_hash(script)}; style-src {_csp_hash(style)}; "
            "connect-src 'self'; img-src 'self' data:; form-action 'self'; "
            "base-uri 'none'; frame-ancestors 'none'"
        )

    def login(self, message: str) -> str:
        return self._login.replace("__MESSAGE__", html.escape(message))


def presented_token() -> bytes:
    """The token the caller shows: a bearer header first, else the login cookie."""
    authorization = request.headers.get("Authorization", "")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip().encode()
    cookie = request.cookies.get(COOKIE, "")
    if not cookie:
        return b""
    try:
        return base64.urlsafe_b64decode(cookie.encode("ascii") + b"==")
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return b""


def cross_site() -> bool:
    """Whether the browser says this request comes from another site: its Sec-Fetch-Site,
    else its Origin against the Host it asked for. A client that sends neither is not a
    browser on another site (curl, a script), so it has no ambient cookie to abuse."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        return site.lower() not in ("same-origin", "none")
    origin = request.headers.get("Origin")
    if origin is None:
        return False
    return urlsplit(origin).netloc.lower() != request.headers.get("Host", "").lower()


class FormRefused(Exception):
    """The login body is not a small urlencoded form: the status and what to say."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def login_token() -> bytes:
    """The `token` field of the login form, read at most `LOGIN_MAX_BYTES` into memory."""
    mimetype = request.headers.get("Content-Type", "").partition(";")[0].strip().lower()
    if mimetype != _FORM:
        raise FormRefused(415, f"The sign-in form must be sent as {_FORM}.")
    too_large = FormRefused(413, f"The sign-in form is too large (over {LOGIN_MAX_BYTES} bytes).")
    length = request.content_length
    if length is not None and length > LOGIN_MAX_BYTES:
        raise too_large
    data = bytearray()
    async for chunk in request.body:
        data += chunk
        if len(data) > LOGIN_MAX_BYTES:
            raise too_large
    try:
        fields = parse_qsl(
            data.decode("utf-8", "replace"),
            keep_blank_values=True,
            errors="replace",
            max_num_fields=LOGIN_MAX_FIELDS,
        )
    except ValueError:
        raise FormRefused(400, "The sign-in form has too many fields.") from None
    token = next((value for key, value in fields if key == "token"), "")
    return token.strip().encode()


def register(app: Quart, services: Services) -> None:
    pages = Pages()
    auth = services.auth
    board = services.status
    secure = services.config.tls.enabled

    def html_response(body: str, status: int = 200) -> Response:
        return Response(
            body,
            status=status,
            content_type="text/html; charset=utf-8",
            headers={
                "Content-Security-Policy": pages.csp,
                "Cache-Control": "no-store",
                "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer",
            },
        )

    def viewer() -> tuple[str, bool] | None:
        """(token name, admin) of the caller; None when auth is on and it shows none."""
        if not auth.enabled:
            return "", False
        name, admin = auth.identify(presented_token())
        return (name, admin) if name else None

    def login_form(message: str, status: int = 401) -> Response:
        response = html_response(pages.login(message), status)
        if request.cookies.get(COOKIE):  # a stale cookie (token removed): forget it
            response.delete_cookie(COOKIE, path="/", secure=secure, httponly=True)
        return response

    @app.get("/status")
    async def status_page() -> Response:
        if viewer() is None:
            stale = bool(request.cookies.get(COOKIE) or request.headers.get("Authorization"))
            return login_form("That token is not valid." if stale else "")
        return html_response(pages.page)

    @app.get("/status.json")
    async def status_json() -> Response:
        who = viewer()
        if who is None:
            return Response(
                error_body("a valid bearer token or the status page's login cookie is required"),
                status=401,
                content_type="application/json; charset=utf-8",
                headers={"WWW-Authenticate": "Bearer", "Cache-Control": "no-store"},
            )
        status = await board.snapshot(services, who[0], admin=who[1])
        return Response(
            _encode(status),
            content_type="application/json",
            headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
        )

    @app.get("/status/login")
    async def login_get() -> Response:
        return Response("", status=303, headers={"Location": "/status"})

    def refused_from_elsewhere() -> Response:
        return html_response(
            pages.login("A sign-in or sign-out from another site is refused."), 403
        )

    @app.post("/status/login")
    async def login() -> Response:
        if cross_site():
            return refused_from_elsewhere()
        try:
            token = await login_token()
        except FormRefused as exc:
            response = html_response(pages.login(exc.message), exc.status)
            if exc.status == 413:  # the rest of the body is not read: no reuse
                response.headers["Connection"] = "close"
            return response
        if auth.enabled:
            name, _ = auth.identify(token)
            if not name:
                # The status routes are quiet in the access log: a refused login is said here.
                client = (request.scope.get("client") or ("?", 0))[0]
                log.warning("status page: a login with a token that is not valid, from %s", client)
                return login_form("That token is not valid.")
        response = Response("", status=303, headers={"Location": "/status"})
        if auth.enabled:
            response.set_cookie(
                COOKIE,
                base64.urlsafe_b64encode(token).decode("ascii").rstrip("="),
                max_age=COOKIE_MAX_AGE_S,
                path="/",
                secure=secure,
                httponly=True,
                samesite="Strict",
            )
        return response

    @app.post("/status/logout")
    async def logout() -> Response:
        if cross_site():
            return refused_from_elsewhere()
        response = Response("", status=303, headers={"Location": "/status"})
        response.delete_cookie(COOKIE, path="/", secure=secure, httponly=True, samesite="Strict")
        return response
