"""Routing rules: every prefix, the `:cloud` suffix, and the edges."""

import pytest

from gateway.errors import BadRequest
from gateway.providers.registry import Resolved, resolve


@pytest.mark.parametrize(
    ("name", "provider", "model"),
    [
        ("llama3", "ollama", "llama3"),
        ("llama3:8b", "ollama", "llama3:8b"),
        ("ollama/llama3", "ollama", "llama3"),
        ("ollama/library/llama3:8b", "ollama", "library/llama3:8b"),
        ("ollama_cloud/gpt-oss:120b", "ollama_cloud", "gpt-oss:120b"),
        ("kimi-k2.6:cloud", "ollama_cloud", "kimi-k2.6:cloud"),
        ("openrouter/openai/gpt-4o-mini", "openrouter", "openai/gpt-4o-mini"),
        ("opencode/grok-code", "opencode", "grok-code"),
        ("kimi/kimi-for-coding", "kimi", "kimi-for-coding"),
        # No known prefix: local Ollama, name untouched (its error comes back as 502).
        ("unknown/x", "ollama", "unknown/x"),
        ("hf.co/org/model:Q4", "ollama", "hf.co/org/model:Q4"),
        # An explicit prefix wins over the suffix.
        ("ollama/kimi-k2:cloud", "ollama", "kimi-k2:cloud"),
        ("openrouter/moonshot/kimi:cloud", "openrouter", "moonshot/kimi:cloud"),
        # Prefix and suffix match in any case; the model part is kept as written.
        ("OpenRouter/OpenAI/GPT-4o", "openrouter", "OpenAI/GPT-4o"),
        ("KIMI/K2", "kimi", "K2"),
        ("Kimi-K2:CLOUD", "ollama_cloud", "Kimi-K2:CLOUD"),
        # Ollama's `<model>:<tag>-cloud` (issue 12); the client-API routes strip the tag.
        ("gpt-oss:120b-cloud", "ollama_cloud", "gpt-oss:120b-cloud"),
        ("my-cloud", "ollama", "my-cloud"),
    ],
)
def test_routes(name: str, provider: str, model: str) -> None:
    assert resolve(name) == Resolved(provider, model)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "model is required"),
        ("   ", "model is required"),
        ("ollama/", "model name missing after 'ollama/'"),
        ("kimi/", "model name missing after 'kimi/'"),
        ("openrouter/gpt-4o", "openrouter/<vendor>/<model>"),
        ("openrouter/", "model name missing"),
    ],
)
def test_bad_names(name: str, message: str) -> None:
    with pytest.raises(BadRequest, match=message.replace("/", "/").replace("<", "<")):
        resolve(name)


def test_bare_cloud_suffix_is_not_a_model() -> None:
    assert resolve(":cloud") == Resolved("ollama", ":cloud")
