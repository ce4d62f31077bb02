"""Which provider answers a model name, and under which upstream name.

| name                      | provider      | upstream model        |
|---------------------------|---------------|-----------------------|
| `ollama/<m>`              | local Ollama  | `<m>`                 |
| `ollama_cloud/<m>`        | Ollama Cloud  | `<m>`                 |
| `<m>:cloud`, `<m>:<t>-cloud` | Ollama Cloud | unchanged (the client-API routes strip the tag) |
| `openrouter/<vendor>/<m>` | OpenRouter    | `<vendor>/<m>`        |
| `opencode/<m>`            | OpenCode      | `<m>`                 |
| `kimi/<m>`                | Kimi          | `<m>`                 |
| anything else             | local Ollama  | unchanged             |

A cloud tag is read as Ollama reads it (`gpt-oss:120b-cloud`, `kimi-k2:cloud`:
`protocols.strip_cloud_tag`). An explicit prefix wins over the cloud tag
(`ollama/x:cloud` asks the local host, which may itself proxy cloud models). Prefixes
and the suffix match in any letter case; the model part is passed on as written. A
provider without a key is not registered: its names get 404 naming the missing
variable, never a fall-through to another provider.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import httpx

from gateway.config import Config, provider_names, redact_url
from gateway.errors import BadRequest, ProviderNotRegistered
from gateway.providers.base import Provider
from gateway.providers.client_api import ClientAPI
from gateway.providers.http import ProviderHTTP
from gateway.providers.keys import resolve_key
from gateway.providers.local import LocalOllama
from gateway.providers.ollama_cloud import OllamaCloud
from gateway.providers.openai_compat import OpenAICompatible
from gateway.providers.protocols import strip_cloud_tag

LOCAL = "ollama"
ORDER = (LOCAL, *provider_names())
_PREFIXES = {f"{name}/": name for name in ORDER}


@dataclass(frozen=True, slots=True)
class Resolved:
    provider: str
    model: str


def resolve(name: str) -> Resolved:
    """Map a client's model name to (provider name, upstream model name)."""
    if not name.strip():
        raise BadRequest("model is required")
    lowered = name.lower()
    for prefix, provider in _PREFIXES.items():
        if lowered.startswith(prefix):
            model = name[len(prefix) :]
            if not model.strip():
                raise BadRequest(f"model name missing after {prefix!r}")
            if provider == "openrouter" and "/" not in model.strip("/"):
                raise BadRequest(
                    f"OpenRouter models are named openrouter/<vendor>/<model>, got {name!r}"
                )
            return Resolved(provider, model)
    if strip_cloud_tag(name):
        return Resolved("ollama_cloud", name)
    return Resolved(LOCAL, name)


@dataclass(frozen=True, slots=True)
class ProviderInfo:
    name: str
    base_url: str
    available: bool


class Registry:
    def __init__(
        self,
        providers: Mapping[str, Provider],
        missing: Mapping[str, str],
        client_apis: Mapping[str, ClientAPI] | None = None,
    ) -> None:
        self._providers = dict(providers)
        self._missing = dict(missing)  # provider -> why it is not registered (no secret)
        self._client_apis = dict(client_apis or {})

    def route(self, name: str) -> tuple[Provider, str]:
        resolved = resolve(name)
        provider = self._providers.get(resolved.provider)
        if provider is None:
            raise self._unregistered(resolved.provider, name)
        return provider, resolved.model

    def _unregistered(self, provider: str, name: str) -> ProviderNotRegistered:
        reason = self._missing.get(provider, "it is not configured")
        return ProviderNotRegistered(
            f"provider {provider!r} for model {name!r} is not registered: {reason}"
        )

    def client_api(self, provider: str, name: str) -> ClientAPI:
        """The cloud provider `provider` as the passthrough routes reach it, or the 404
        that names its missing key (`name` is the client's model name, for the message)."""
        api = self._client_apis.get(provider)
        if api is None:
            raise self._unregistered(provider, name)
        return api

    def find_client_api(self, provider: str) -> ClientAPI | None:
        return self._client_apis.get(provider)

    def client_apis(self) -> list[ClientAPI]:
        return [self._client_apis[name] for name in ORDER if name in self._client_apis]

    def missing_reason(self, name: str) -> str:
        """Why provider `name` is not registered (the variable it misses), never a key."""
        return self._missing.get(name, "it is not configured")

    def get(self, name: str) -> Provider | None:
        return self._providers.get(name)

    def listing(self) -> list[ProviderInfo]:
        return [
            ProviderInfo(name, redact_url(self._providers[name].base_url), True)
            for name in ORDER
            if name in self._providers
        ]


def build_registry(
    config: Config, environ: Mapping[str, str], http: httpx.AsyncClient, local: LocalOllama
) -> Registry:
    """Register local Ollama always, and each cloud provider whose key is found."""
    providers: dict[str, Provider] = {LOCAL: local}
    client_apis: dict[str, ClientAPI] = {}
    missing: dict[str, str] = {}
    for name in provider_names():
        settings = getattr(config.providers, name)
        key = resolve_key(settings.key_env, settings.env_file, environ)
        if key.secret is None:
            missing[name] = key.source
            continue
        channel = ProviderHTTP(
            http,
            name=name,
            base_url=settings.base_url,
            key=key.secret,
            timeout_s=settings.timeout_s,
        )
        providers[name] = (
            OllamaCloud(channel) if name == "ollama_cloud" else OpenAICompatible(channel)
        )
        client_apis[name] = ClientAPI(channel, settings.protocols)
    return Registry(providers, missing, client_apis)
