"""A cloud provider's own endpoints for the client APIs (OpenAI, Responses, Anthropic).

Bodies go on as the client sent them, only `model` rewritten; the provider's answer comes
back as it arrives. Where each protocol lives (ADR 0018):

- Ollama Cloud's `base_url` is the Ollama host (`https://ollama.com`): each route is at
  its own path (`/v1/chat/completions`, `/v1/messages`...), where a local Ollama sends
  cloud models itself (`server/cloud_proxy.go`), and the native API at `/api/*`.
- The OpenAI family's `base_url` ends in `/v1`, as their documentation gives it: a route
  is at `base_url` + the route without `/v1` (`.../v1/messages` for Anthropic Messages).

A protocol not in the provider's `protocols` is a `ProtocolNotServed` (400).
"""

from __future__ import annotations

from collections.abc import Iterable

from gateway.errors import ProtocolNotServed
from gateway.providers.http import ProviderHTTP
from gateway.providers.protocols import Protocol, strip_cloud_tag

OLLAMA_CLOUD = "ollama_cloud"


class ClientAPI:
    """One registered cloud provider, as the passthrough routes reach it."""

    def __init__(self, http: ProviderHTTP, protocols: Iterable[str]) -> None:
        self.http = http
        self.name = http.name
        self.protocols = frozenset(protocols)
        self.is_ollama = self.name == OLLAMA_CLOUD

    def path_for(self, protocol: Protocol) -> str:
        """The provider's path for `protocol`, or a 400 naming both."""
        if protocol.name not in self.protocols:
            served = ", ".join(sorted(self.protocols)) or "none"
            raise ProtocolNotServed(
                f"provider {self.name!r} does not serve the {protocol.title} API"
                f" ({protocol.path}); it serves: {served}"
                f" (providers.{self.name}.protocols)"
            )
        return self.route_path(protocol.path)

    def route_path(self, path: str) -> str:
        """Where a gateway route (`/v1/...`) lives under this provider's base URL."""
        return path if self.is_ollama else path.removeprefix("/v1")

    def upstream_model(self, model: str) -> str:
        """The name the provider knows: Ollama Cloud gets the base name, the cloud tag
        stripped as a local Ollama strips it before forwarding."""
        if self.is_ollama:
            return strip_cloud_tag(model) or model
        return model
