"""The `gateway` command: `serve`, `check-config` and `usage`."""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sqlite3
import sys
import time
from collections.abc import Mapping, Sequence
from functools import partial

import msgspec
import trio

from gateway import __version__, logs
from gateway.auth import Auth
from gateway.config import (
    Config,
    ConfigError,
    host_specs,
    load,
    provider_names,
    redact_url,
)
from gateway.errors import BadRequest
from gateway.providers.keys import resolve_key
from gateway.usage import parse_query, report, resolve_path, store

log = logging.getLogger("gateway")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway",
        description="A LAN gateway in front of one Ollama GPU host and cloud model providers.",
    )
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config_help = "TOML configuration file (default: $GATEWAY_CONFIG, else built-in defaults)"

    serve = commands.add_parser(
        "serve",
        help="run the gateway",
        description="Run the gateway until SIGINT or SIGTERM, then drain and exit 0.",
    )
    serve.add_argument("--config", metavar="FILE", help=config_help)
    serve.add_argument("--bind", metavar="HOST:PORT", help="override `bind`")

    check = commands.add_parser(
        "check-config",
        help="validate and print the resolved configuration, secrets redacted",
        description="Validate the configuration and print it resolved, with every secret"
        " redacted. Exits 1 on any error.",
    )
    check.add_argument("--config", metavar="FILE", help=config_help)

    usage = commands.add_parser(
        "usage",
        help="print the usage ledger's table (what GET /v1/usage answers)",
        description="Read the usage ledger ([usage] path) and print requests, errors,"
        " tokens, GPU-seconds and queue time per group. Times: an ISO 8601 date or time"
        " (UTC unless an offset is given), a duration ago (90m, 24h, 7d), 'today' or 'now'.",
    )
    usage.add_argument("--config", metavar="FILE", help=config_help)
    usage.add_argument("--since", metavar="TIME", help="from (default: today, 00:00 UTC)")
    usage.add_argument("--until", metavar="TIME", help="to (default: now)")
    usage.add_argument(
        "--group-by",
        metavar="KEYS",
        default="client",
        help="client, model, provider or day; several separated by commas (default: client)",
    )
    usage.add_argument("--json", action="store_true", help="print the JSON report instead")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    environ = dict(os.environ)
    if getattr(args, "bind", None):
        environ["GATEWAY_BIND"] = args.bind
    try:
        config = load(args.config, environ)
    except ConfigError as exc:
        print(f"gateway: configuration error: {exc}", file=sys.stderr)
        return 1
    try:
        auth = Auth.from_config(config.auth, environ)
        check_clients(config, auth)
        if args.command == "check-config":
            print(render_config(config, environ))
            print(f"# inbound auth: {auth.describe()}")
            ledger = resolve_path(config.usage.path, environ)
            print(f"# usage ledger: {ledger if ledger is not None else 'off'}")
            return 0
        if args.command == "usage":
            return print_usage(config, environ, args)
        logs.setup(config.log_format)
        trio.run(partial(_serve_until_signal, config, environ))
    except ConfigError as exc:
        print(f"gateway: configuration error: {exc}", file=sys.stderr)
        return 1
    return 0


def check_clients(config: Config, auth: Auth) -> None:
    """With auth on, a client is a token's name: `[clients.x]` for a name no token has
    would never apply, which is a mistake to say now rather than find out later."""
    if not auth.enabled:
        return
    unknown = sorted(set(config.clients) - auth.names)
    if unknown:
        known = ", ".join(sorted(auth.names))
        raise ConfigError(
            f"clients.{unknown[0]}: no inbound token is named {unknown[0]!r}; with auth on,"
            f" [clients.<name>] tables are keyed by token name (known: {known})"
        )


async def _serve_until_signal(config: Config, environ: Mapping[str, str]) -> None:
    from gateway.app import serve

    # Opened before serving, so a signal that arrives early is still a clean shutdown.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:

        async def until_signal() -> None:
            async for signum in signals:
                log.info(
                    "%s received; draining (grace %g s)",
                    signal.Signals(signum).name,
                    config.shutdown_grace_s,
                )
                return

        await serve(config, environ=environ, shutdown_trigger=until_signal)
    log.info("gateway stopped")


def print_usage(config: Config, environ: Mapping[str, str], args: argparse.Namespace) -> int:
    """`gateway usage`: the ledger's report, read from its file, as a table (or JSON)."""
    path = resolve_path(config.usage.path, environ)
    if path is None:
        print('gateway: the usage ledger is off (usage.path = "")', file=sys.stderr)
        return 1
    if not path.exists():
        print(f"gateway: no usage ledger at {path} (nothing recorded yet?)", file=sys.stderr)
        return 1
    given = {"since": args.since, "until": args.until, "group_by": args.group_by}
    try:
        query = parse_query({k: [v] for k, v in given.items() if v is not None}, time.time())
        rows = store.aggregate(path, query.since, query.until, query.group_by)
    except BadRequest as exc:
        print(f"gateway: {exc.message}", file=sys.stderr)
        return 2
    except (sqlite3.Error, OSError) as exc:
        print(f"gateway: cannot read the usage ledger {path}: {exc}", file=sys.stderr)
        return 1
    result = report.build(query, rows)
    print(msgspec.json.encode(result).decode() if args.json else report.render_table(result))
    return 0


def render_config(config: Config, environ: Mapping[str, str]) -> str:
    """The resolved configuration as TOML, with URLs' credentials and every key redacted."""
    data = msgspec.to_builtins(config)
    data["ollama"]["url"] = redact_url(config.ollama.url)
    for name, host in config.ollama.hosts.items():
        data["ollama"]["hosts"][name]["url"] = redact_url(host.url)
    for name in provider_names():
        table = data["providers"][name]
        table["base_url"] = redact_url(table["base_url"])
    lines = ["# resolved configuration (secrets redacted)"]
    _render_table(lines, "", data)
    lines.append("")
    lines.append("# credentials (values never shown)")
    if config.ollama.hosts:
        names = ", ".join(config.ollama.hosts)
        lines.append(f"# GPU hosts: {names} (ollama.url is not used: each host has its own)")
    for spec in host_specs(config):
        token_env = spec.ollama.token_env
        token_state = "set" if environ.get(token_env) else "not set"
        where = "" if spec.implicit else f" of host {spec.name}"
        lines.append(f"# ollama token{where}: {token_state} ({token_env})")
    for name in provider_names():
        provider = getattr(config.providers, name)
        key = resolve_key(provider.key_env, provider.env_file, environ)
        state = (
            f"registered, key from {key.source}" if key.present else f"not registered: {key.source}"
        )
        lines.append(f"# {name}: {state}")
    return "\n".join(lines)


def _render_table(lines: list[str], prefix: str, table: dict[str, object]) -> None:
    nested = []
    for key, value in table.items():
        if isinstance(value, dict):
            nested.append((key, value))
        elif value is not None:  # unset (TOML has no null)
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, value in nested:
        name = f"{prefix}{_toml_key(key)}"
        if any(not isinstance(v, dict) for v in value.values()):
            lines.append("")
            lines.append(f"[{name}]")
        _render_table(lines, f"{name}.", value)


def _toml_key(key: str) -> str:
    """A bare key when TOML allows one, else quoted (`models."qwen2.5:7b"`)."""
    return key if _BARE_KEY.fullmatch(key) else msgspec.json.encode(key).decode()


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return msgspec.json.encode(value).decode()
