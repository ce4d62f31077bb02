"""Configuration: one TOML file decoded into Structs, environment overrides, built-in defaults.

Every key has a default, so the gateway serves with no file at all. Unknown keys are an
error that names the key and the file. Durations end in `_s`, sizes in `_bytes`.
An environment variable `GATEWAY_<SECTION>_<KEY>` overrides any key (for example
`GATEWAY_GATE_MAX_QUEUE=8`); `GATEWAY_BIND` and `GATEWAY_OLLAMA_URL` are the common ones.
Secrets are never in this file: it names the variables and `.env` files that hold them.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

import msgspec

ENV_PREFIX = "GATEWAY_"
CONFIG_ENV = "GATEWAY_CONFIG"

Seconds = Annotated[float, msgspec.Meta(gt=0)]
SecondsOrOff = Annotated[float, msgspec.Meta(ge=0)]
Count = Annotated[int, msgspec.Meta(ge=0)]
S = TypeVar("S", bound=msgspec.Struct)


class ConfigError(Exception):
    """The configuration cannot be used; the message says which key and why."""


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Base of every config table: unknown keys are refused, values are immutable."""


class OllamaConfig(_Section, frozen=True):
    url: str = "http://127.0.0.1:11434"
    token_env: str = "GATEWAY_OLLAMA_TOKEN"
    poll_interval_s: Seconds = 30.0
    degraded_poll_interval_s: Seconds = 2.0
    embed_model: str = ""
    connect_timeout_s: Seconds = 3.0
    # Time allowed from sending a request to the response headers: covers a cold model load.
    first_byte_timeout_s: Seconds = 300.0
    # Longest silence allowed between two reads of an answer (body or stream line).
    idle_timeout_s: Seconds = 300.0
    max_connections: Annotated[int, msgspec.Meta(ge=1)] = 512
    allow_management: bool = False
    # Several GPU hosts (ADR 0020): each inherits every key above that it does not set.
    # None: one host, at `url`.
    hosts: dict[str, HostConfig] = msgspec.field(default_factory=dict)


class HostConfig(_Section, frozen=True):
    """One GPU host, `[ollama.hosts.<name>]`: a key left out is `[ollama]`'s (`capacity`:
    `[gate] capacity`)."""

    url: str
    token_env: str | None = None
    capacity: Annotated[int, msgspec.Meta(ge=1)] | None = None
    embed_model: str | None = None
    poll_interval_s: Seconds | None = None
    degraded_poll_interval_s: Seconds | None = None
    connect_timeout_s: Seconds | None = None
    first_byte_timeout_s: Seconds | None = None
    idle_timeout_s: Seconds | None = None
    max_connections: Annotated[int, msgspec.Meta(ge=1)] | None = None


# The one host of a configuration with no `[ollama.hosts]` table (ADR 0020).
DEFAULT_HOST = "default"
_HOST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


@dataclass(frozen=True, slots=True)
class HostSpec:
    """One GPU host, resolved: its name, its `[ollama]` settings (inheritance applied,
    `hosts` empty) and its gate capacity. `implicit`: the single host of a configuration
    without `[ollama.hosts]`."""

    name: str
    ollama: OllamaConfig
    capacity: int
    implicit: bool = False


def host_specs(config: Config) -> tuple[HostSpec, ...]:
    """The configured GPU hosts in file order; one named `default` when none is listed."""
    ollama = config.ollama
    if not ollama.hosts:
        return (HostSpec(DEFAULT_HOST, ollama, config.gate.capacity, implicit=True),)
    specs = []
    for name, host in ollama.hosts.items():
        changes = {
            key: getattr(host, key)
            for key in HostConfig.__struct_fields__
            if key != "capacity" and getattr(host, key) is not None
        }
        resolved = msgspec.structs.replace(ollama, hosts={}, **changes)
        specs.append(HostSpec(name, resolved, host.capacity or config.gate.capacity))
    return tuple(specs)


def _check_hosts(hosts: Mapping[str, HostConfig]) -> None:
    seen: dict[str, str] = {}
    for name, host in hosts.items():
        if not _HOST_NAME.fullmatch(name):
            raise ConfigError(
                f"ollama.hosts.{name!r}: a host name is letters, digits, '.', '_' or '-'"
                " (at most 63, starting with a letter or digit)"
            )
        _check_url(f"ollama.hosts.{name}.url", host.url)
        key = _url_key(host.url)
        if key in seen:
            raise ConfigError(
                f"ollama.hosts.{name}.url: the same host as ollama.hosts.{seen[key]}"
                f" ({redact_url(host.url)!r}); list each GPU host once"
            )
        seen[key] = name


def _url_key(url: str) -> str:
    """A URL as a host identity: scheme, host name, port (defaults filled in), path."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.scheme}://{(parts.hostname or '').lower()}:{port}{parts.path.rstrip('/')}"


class GateConfig(_Section, frozen=True):
    """The GPU host's gate and its scheduler (ADR 0007, ADR 0017)."""

    capacity: Annotated[int, msgspec.Meta(ge=1)] = 1
    max_queue: Count = 64
    # 0 waits as long as the client does.
    max_wait_s: SecondsOrOff = 0.0
    # "fair": priority, fair share, model affinity, bounded overtaking; "arrival": FIFO.
    order: Literal["fair", "arrival"] = "fair"
    # No request starts later than arrival order would have started it plus this.
    max_overtake_s: Seconds = 120.0
    # GPU-seconds served on the loaded model before a waiter for another model may take
    # over (0: no affinity). A swap costs seconds to tens of seconds.
    affinity_quantum_s: SecondsOrOff = 30.0
    # Fair share counts each client's GPU-seconds decaying with this time constant.
    fair_window_s: Seconds = 120.0


ProtocolName = Literal["chat_completions", "completions", "responses", "messages", "embeddings"]


class ProviderConfig(_Section, frozen=True):
    base_url: str
    key_env: str
    env_file: str = ""
    timeout_s: Seconds = 180.0
    # The client APIs this provider serves (ADR 0018); a request in another is a 400
    # naming the provider and the protocol, never a conversion.
    protocols: tuple[ProtocolName, ...] = ()


class OllamaCloudConfig(ProviderConfig, frozen=True):
    # List the cloud models the key can use in /api/tags, named `<m>:<tag>-cloud`, so
    # that Ollama-only UIs can pick them (ADR 0018).
    list_in_tags: bool = False


def _provider(
    base_url: str, key_env: str, name: str, protocols: tuple[ProtocolName, ...]
) -> ProviderConfig:
    return ProviderConfig(
        base_url=base_url,
        key_env=key_env,
        env_file=f"/etc/gateway/{name}.env",
        protocols=protocols,
    )


class ProvidersConfig(_Section, frozen=True):
    ollama_cloud: OllamaCloudConfig = msgspec.field(
        default_factory=lambda: OllamaCloudConfig(
            base_url="https://ollama.com",
            key_env="OLLAMA_CLOUD_KEY",
            env_file="/etc/gateway/ollama_cloud.env",
            protocols=("chat_completions", "completions", "responses", "messages", "embeddings"),
        )
    )
    openrouter: ProviderConfig = msgspec.field(
        default_factory=lambda: _provider(
            "https://openrouter.ai/api/v1",
            "OPENROUTER_API_KEY",
            "openrouter",
            ("chat_completions", "completions", "responses", "messages"),
        )
    )
    opencode: ProviderConfig = msgspec.field(
        default_factory=lambda: _provider(
            "https://opencode.ai/zen/v1",
            "OPENCODE_API_KEY",
            "opencode",
            ("chat_completions", "responses", "messages"),
        )
    )
    kimi: ProviderConfig = msgspec.field(
        default_factory=lambda: _provider(
            "https://api.kimi.com/coding/v1",
            "KIMI_API_KEY",
            "kimi",
            ("chat_completions", "messages"),
        )
    )


class AuthConfig(_Section, frozen=True):
    """Inbound bearer tokens, by reference: a file with one `name:token` a line, and/or an
    environment variable holding `name:token,name:token`. None set: no auth."""

    tokens_file: str = ""
    tokens_env: str = "GATEWAY_TOKENS"
    # When set, model-management routes need one of these instead.
    admin_tokens_file: str = ""
    admin_tokens_env: str = "GATEWAY_ADMIN_TOKENS"


class TlsConfig(_Section, frozen=True):
    """HTTPS on `bind`, served by hypercorn itself: PEM certificate chain and key files."""

    certfile: str = ""
    keyfile: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.certfile)


Priority = Literal["interactive", "normal", "batch"]


class ClientConfig(_Section, frozen=True):
    """Settings of one client, keyed by its name: an inbound token's name when auth is on,
    else the client's address (`RequestRecord.who`)."""

    # The scheduler serves a waiting "interactive" request before "normal", "normal"
    # before "batch".
    priority: Priority = "normal"
    # Share of GPU time among the clients of one priority.
    weight: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    # Optional daily caps on cloud use, per provider; 0 is no cap.
    cloud_tokens_per_day: Count = 0
    cloud_requests_per_day: Count = 0


# A Go duration as Ollama's keep_alive takes it ("30m", "1h30m", "-1s"), or seconds.
_KEEP_ALIVE = re.compile(r"-?(?:\d+(?:\.\d*)?(?:ns|us|µs|ms|s|m|h))+|-?\d+(?:\.\d*)?")


class ModelConfig(_Section, frozen=True):
    """Load-time options pinned for one model (ADR 0017): sent to Ollama whatever the
    client asked, so clients that disagree on them never make Ollama reload the model."""

    num_ctx: Annotated[int, msgspec.Meta(ge=1)] | None = None
    keep_alive: str | int | None = None


class UsageConfig(_Section, frozen=True):
    """The usage ledger: one SQLite row per finished request (ADR 0019)."""

    # "auto": `$STATE_DIRECTORY/usage.db` when systemd gives a state directory, else
    # `$XDG_STATE_HOME/gateway/usage.db` (default `~/.local/state/gateway/usage.db`).
    # "" turns the ledger off (budgets then count only since start-up).
    path: str = "auto"
    # Records older than this are pruned in the background; 0 keeps them forever.
    retention_days: Count = 90
    # After each write the writer waits this long, so that under load a write carries
    # many records (its cost is per write, not per record). A kill -9 loses the records
    # of the requests in flight and of those finished within this time.
    flush_interval_s: SecondsOrOff = 0.05
    # Records waiting to be written; past this, new ones are dropped and counted.
    buffer_records: Annotated[int, msgspec.Meta(ge=1)] = 10_000
    # The database's size limit (0: none); when reached, records are dropped, not requests.
    max_db_bytes: Count = 0


class StatusConfig(_Section, frozen=True):
    """The live status page, `GET /status` (ADR 0021)."""

    # False: a client token sees other clients under stable anonymous labels (its own
    # name stays); admin tokens always see every name.
    show_client_names: bool = True


class Config(_Section, frozen=True):
    bind: str = "127.0.0.1:11435"
    # On a loopback bind, requests whose Host is not a local name or an address get 403
    # (DNS rebinding, ADR 0013). Names to allow too (a reverse proxy's); "*": no check.
    allowed_hosts: list[str] = msgspec.field(default_factory=list)
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 64 * 1024 * 1024
    # A client that accepts no bytes for this long is dropped, freeing the gate.
    write_timeout_s: Seconds = 30.0
    # Idle keep-alive connections close after this; so does a request head that takes
    # longer, and a request body that stops arriving this long gets 408.
    keep_alive_timeout_s: Seconds = 5.0
    # A request body must arrive whole within this long of its head, else 408.
    request_body_timeout_s: Seconds = 60.0
    # On SIGINT/SIGTERM, running requests get this long to finish before they are ended.
    shutdown_grace_s: SecondsOrOff = 30.0
    # "auto": JSON lines when stderr is not a terminal, readable text when it is.
    log_format: Literal["auto", "json", "text"] = "auto"
    ollama: OllamaConfig = msgspec.field(default_factory=OllamaConfig)
    gate: GateConfig = msgspec.field(default_factory=GateConfig)
    providers: ProvidersConfig = msgspec.field(default_factory=ProvidersConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    tls: TlsConfig = msgspec.field(default_factory=TlsConfig)
    clients: dict[str, ClientConfig] = msgspec.field(default_factory=dict)
    models: dict[str, ModelConfig] = msgspec.field(default_factory=dict)
    usage: UsageConfig = msgspec.field(default_factory=UsageConfig)
    status: StatusConfig = msgspec.field(default_factory=StatusConfig)

    def client(self, name: str) -> ClientConfig:
        """A client's settings; one not configured gets the defaults."""
        return self.clients.get(name) or _DEFAULT_CLIENT

    def bind_host_port(self) -> tuple[str, int]:
        return parse_bind(self.bind)


_DEFAULT_CLIENT = ClientConfig()


def parse_bind(bind: str) -> tuple[str, int]:
    """Split `host:port` (IPv6 as `[::1]:port`) and check the port."""
    host, sep, port_text = bind.rpartition(":")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(f"bind: expected HOST:PORT, got {bind!r}")
    return host.strip("[]"), int(port_text)


def _check_url(key: str, url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{key}: expected an http:// or https:// URL, got {redact_url(url)!r}")


def load(path: str | os.PathLike[str] | None, environ: Mapping[str, str]) -> Config:
    """Resolve the configuration: built-in defaults < TOML file < `GATEWAY_*` environment."""
    if path is None and environ.get(CONFIG_ENV):
        path = environ[CONFIG_ENV]
    raw: dict[str, Any] = {}
    source = "built-in defaults"
    if path is not None:
        source = str(path)
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{source}: no such file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{source}: cannot read: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    config = _apply_env(from_mapping(raw, source=source), environ)
    try:
        parse_bind(config.bind)
        _check_url("ollama.url", config.ollama.url)
        _check_hosts(config.ollama.hosts)
        for name in provider_names():
            _check_url(f"providers.{name}.base_url", getattr(config.providers, name).base_url)
        _check_tls(config.tls)
        _check_models(config.models)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return config


def from_mapping(raw: Mapping[str, Any], *, source: str = "configuration") -> Config:
    """Decode a TOML-shaped mapping (what the file holds) into a `Config`."""
    _check_host_tables(raw, source)
    try:
        return msgspec.convert(_with_provider_defaults(dict(raw)), Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {_explain(exc)}") from None


def _check_host_tables(raw: Mapping[str, Any], source: str) -> None:
    """Decode each `[ollama.hosts.<name>]` alone first, so that an error names the host
    (msgspec says `hosts[...]` for a key of a dict)."""
    ollama = raw.get("ollama")
    hosts = ollama.get("hosts") if isinstance(ollama, dict) else None
    if not isinstance(hosts, dict):
        return
    for name, table in hosts.items():
        try:
            msgspec.convert(table, HostConfig)
        except msgspec.ValidationError as exc:
            text = _explain(exc)
            where = f"ollama.hosts.{name}"
            if text.startswith("unknown key '"):
                raise ConfigError(f"{source}: unknown key '{where}.{text[13:]}") from None
            raise ConfigError(f"{source}: {where}: {text}") from None


def _check_tls(tls: TlsConfig) -> None:
    if bool(tls.certfile) != bool(tls.keyfile):
        raise ConfigError("tls: set both certfile and keyfile, or neither")
    for key in ("certfile", "keyfile"):
        path = getattr(tls, key)
        if path and not Path(path).is_file():
            raise ConfigError(f"tls.{key}: no such file {path!r}")


def _check_models(models: Mapping[str, ModelConfig]) -> None:
    for name, pin in models.items():
        if isinstance(pin.keep_alive, str) and not _KEEP_ALIVE.fullmatch(pin.keep_alive):
            raise ConfigError(
                f'models.{name!r}.keep_alive: expected a duration such as "30m" or'
                f" a number of seconds, got {pin.keep_alive!r}"
            )


def _with_provider_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """A `[providers.x]` table only states what differs: fill in x's defaults under it."""
    tables = raw.get("providers")
    if not isinstance(tables, dict):
        return raw
    defaults = msgspec.to_builtins(ProvidersConfig())
    merged = {
        name: {**defaults[name], **table} if name in defaults and isinstance(table, dict) else table
        for name, table in tables.items()
    }
    return {**raw, "providers": merged}


def provider_names() -> tuple[str, ...]:
    return ProvidersConfig.__struct_fields__


def _explain(exc: msgspec.ValidationError) -> str:
    # msgspec says "Object contains unknown field `x` - at `$.ollama`"; say it as a key path.
    text = str(exc)
    message, _, where = text.partition(" - at `$")
    where = where.rstrip("`").lstrip(".")
    if message.startswith("Object contains unknown field"):
        key = message.split("`")[1]
        return f"unknown key {'.'.join(p for p in (where, key) if p)!r}"
    return f"{where or 'top level'}: {message}" if where else message


def _apply_env(section: S, environ: Mapping[str, str], prefix: str = "") -> S:
    """Return `section` with every `GATEWAY_<PATH>` variable applied to its leaf."""
    changes: dict[str, Any] = {}
    for field in msgspec.structs.fields(section):
        value = getattr(section, field.name)
        path = f"{prefix}{field.name}"
        if isinstance(value, msgspec.Struct):
            changes[field.name] = _apply_env(value, environ, f"{path}_")
            continue
        env_name = f"{ENV_PREFIX}{path}".upper()
        if env_name in environ:
            try:
                changes[field.name] = msgspec.convert(environ[env_name], field.type, strict=False)
            except msgspec.ValidationError as exc:
                raise ConfigError(f"{env_name}: {exc}") from None
    return msgspec.structs.replace(section, **changes) if changes else section


def redact_url(url: str) -> str:
    """Hide the credential a URL's userinfo carries: its password (`user:***@`), or the
    whole userinfo when there is no password, since then the user is the credential (a
    token, as in `https://<token>@host`). Host and port are kept as written."""
    try:
        parts = urlsplit(url)
    except ValueError:  # not a URL (a bad `[` host): hide anything before an `@`
        _, at, rest = url.rpartition("@")
        return f"***@{rest}" if at else url
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at:
        return url
    user, colon, _ = userinfo.partition(":")
    shown = f"{user}:***" if colon else "***"
    return urlunsplit(parts._replace(netloc=f"{shown}@{hostport}"))
