"""Provider keys: the environment variable wins, a `.env` file is the fallback.

A key is held in a `Secret`, whose `repr` and `str` never show it, so it cannot leak into
a log line or an error message by accident.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dotenv import dotenv_values


class Secret:
    """A credential; only `reveal()` gives the value, for the one header that needs it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class ResolvedKey:
    secret: Secret | None
    source: str  # where it came from, or why there is none; never the value

    @property
    def present(self) -> bool:
        return self.secret is not None


def resolve_key(key_env: str, env_file: str, environ: Mapping[str, str]) -> ResolvedKey:
    """Look up `key_env` in the environment, then in `env_file` (python-dotenv syntax)."""
    value = environ.get(key_env, "").strip() if key_env else ""
    if value:
        return ResolvedKey(Secret(value), f"environment variable {key_env}")
    if not env_file:
        return ResolvedKey(None, f"{key_env} is not set and no env_file is configured")
    path = Path(env_file)
    try:
        if not path.is_file():
            return ResolvedKey(None, f"{key_env} is not set and {env_file} does not exist")
        values = dotenv_values(path)
    except OSError as exc:
        return ResolvedKey(None, f"{key_env} is not set and {env_file} unreadable: {exc.strerror}")
    except UnicodeDecodeError:
        return ResolvedKey(None, f"{key_env} is not set and {env_file} is not UTF-8 text")
    file_value = (values.get(key_env) or "").strip()
    if file_value:
        return ResolvedKey(Secret(file_value), f"{env_file} ({key_env})")
    return ResolvedKey(None, f"{key_env} is set neither in the environment nor in {env_file}")
