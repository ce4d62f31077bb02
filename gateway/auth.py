"""Inbound bearer tokens: optional, named, compared in constant time.

Tokens come from a file (`name:token` a line, `#` comments) and/or an environment
variable (`name:token,name:token`); a bare token is named `token-N`. With none
configured, auth is off. When on, every route but `/health` needs one; with admin
tokens configured, the model-management routes need an admin token.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from pathlib import Path

from gateway.config import AuthConfig, ConfigError
from gateway.errors import Forbidden, Unauthorized

OPEN_PATHS = frozenset({"/health"})
# The status page checks its own callers (a bearer header or its login cookie), so that a
# browser without a token gets the login form rather than a JSON 401 (ADR 0021).
SELF_CHECKED_PATHS = frozenset({"/status", "/status.json", "/status/login", "/status/logout"})


def _parse(text: str, separator: str, source: str) -> dict[str, bytes]:
    tokens: dict[str, bytes] = {}
    for index, item in enumerate(text.split(separator), start=1):
        item = item.strip()
        if not item or item.startswith("#"):
            continue
        name, sep, token = item.partition(":")
        if not sep:
            name, token = f"token-{index}", name
        name, token = name.strip(), token.strip()
        if not token:
            raise ConfigError(f"{source}: entry {index} ({name!r}) has an empty token")
        tokens[name] = token.encode()
    return tokens


def _load(file: str, env: str, environ: Mapping[str, str], what: str) -> dict[str, bytes]:
    tokens: dict[str, bytes] = {}
    if file:
        try:
            text = Path(file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"auth.{what}_file: cannot read {file}: {exc.strerror}") from None
        tokens.update(_parse(text, "\n", file))
    if env and environ.get(env):
        tokens.update(_parse(environ[env], ",", f"environment variable {env}"))
    return tokens


class Auth:
    def __init__(self, tokens: Mapping[str, bytes], admin_tokens: Mapping[str, bytes]) -> None:
        self._tokens = list(tokens.items())
        self._admin = list(admin_tokens.items())

    @classmethod
    def from_config(cls, config: AuthConfig, environ: Mapping[str, str]) -> Auth:
        return cls(
            _load(config.tokens_file, config.tokens_env, environ, "tokens"),
            _load(config.admin_tokens_file, config.admin_tokens_env, environ, "admin_tokens"),
        )

    @property
    def enabled(self) -> bool:
        return bool(self._tokens or self._admin)

    @property
    def names(self) -> frozenset[str]:
        """The names of the inbound tokens (clients and admins); never the tokens."""
        return frozenset(name for name, _ in self._tokens + self._admin)

    def describe(self) -> str:
        if not self.enabled:
            return "off"
        return f"{len(self._tokens)} client tokens, {len(self._admin)} admin tokens"

    def check(self, path: str, authorization: bytes | None, *, admin: bool) -> str:
        """The caller's token name ("" with auth off); raise 401/403 otherwise."""
        if not self.enabled or path in OPEN_PATHS or path in SELF_CHECKED_PATHS:
            return ""
        presented = b""
        if authorization is not None:
            scheme, _, value = authorization.partition(b" ")
            if scheme.lower() == b"bearer":
                presented = value.strip()
        admin_name = _match(self._admin, presented)
        if admin and self._admin:
            if admin_name:
                return admin_name
            if _match(self._tokens, presented):
                raise Forbidden("this route needs an admin token")
            raise Unauthorized("an admin bearer token is required")
        name = admin_name or _match(self._tokens, presented)
        if not name:
            raise Unauthorized("a valid bearer token is required")
        return name

    def identify(self, presented: bytes) -> tuple[str, bool]:
        """The name of the token `presented` and whether it is an admin token; ("", False)
        when it is none (every token compared, each in constant time)."""
        admin_name = _match(self._admin, presented)
        name = _match(self._tokens, presented)
        return (admin_name, True) if admin_name else (name, False)


def _match(tokens: list[tuple[str, bytes]], presented: bytes) -> str:
    """Compare against every token, always all of them, each in constant time."""
    found = ""
    for name, token in tokens:
        if hmac.compare_digest(token, presented) and presented:
            found = found or name
    return found
