"""The pure parts of the client-API passthrough: cloud tags as Ollama reads them, the one
body rewrite, token counts from each protocol's usage, where a provider serves what."""

from __future__ import annotations

import json

import pytest

from gateway.errors import BadRequest, ProtocolNotServed
from gateway.providers.client_api import ClientAPI
from gateway.providers.http import ProviderHTTP, make_provider_client
from gateway.providers.keys import Secret
from gateway.providers.protocols import (
    CHAT_COMPLETIONS,
    EMBEDDINGS,
    MESSAGES,
    UsageTally,
    strip_cloud_tag,
    with_model,
)
from gateway.providers.sse import SseWatch


@pytest.mark.parametrize(
    ("name", "base"),
    [
        ("gpt-oss:120b-cloud", "gpt-oss:120b"),
        ("kimi-k2:cloud", "kimi-k2"),
        ("Kimi-K2:CLOUD", "Kimi-K2"),
        ("qwen3-coder:480b-Cloud", "qwen3-coder:480b"),
        ("llama3", None),
        ("llama3:8b", None),
        ("registry.example.com:5000/x-cloud", None),  # a host's port, not a tag
        ("my-cloud", None),  # no tag at all
        ("x:local", None),
    ],
)
def test_strip_cloud_tag_as_ollama_reads_it(name: str, base: str | None) -> None:
    assert strip_cloud_tag(name) == base


def test_with_model_rewrites_only_the_model() -> None:
    body = b'{"model": "ollama/llama3",\n "top_p": 0.50, "messages": [ {"role":"user"} ]}'
    out = with_model(body, "llama3")
    assert json.loads(out)["model"] == "llama3"
    assert b'"top_p":0.50' in out
    assert b'[ {"role":"user"} ]' in out
    with pytest.raises(BadRequest):
        with_model(b"[1, 2]", "x")


@pytest.mark.parametrize(
    ("documents", "counts"),
    [
        # OpenAI chat / completions: the last chunk or the whole answer.
        ([b'{"usage": {"prompt_tokens": 7, "completion_tokens": 3}}'], (7, 3)),
        # Responses: under `response` in `response.completed`.
        (
            [
                b'{"type": "response.completed", "response": {"usage": '
                b'{"input_tokens": 5, "output_tokens": 9}}}'
            ],
            (5, 9),
        ),
        # Anthropic: input in message_start, output in message_delta.
        (
            [
                b'{"type": "message_start", "message": {"usage": '
                b'{"input_tokens": 11, "output_tokens": 1}}}',
                b'{"type": "message_delta", "usage": {"output_tokens": 15}}',
            ],
            (11, 15),
        ),
        ([b'{"choices": []}', b'not json with "usage"'], (0, 0)),
    ],
)
def test_usage_tally_reads_each_protocol(documents: list[bytes], counts: tuple[int, int]) -> None:
    tally = UsageTally()
    for document in documents:
        tally.feed(document)
    assert (tally.tokens_in, tally.tokens_out) == counts


def test_sse_watch_counts_and_event_boundaries() -> None:
    watch = SseWatch()
    watch.feed(b'data: {"choices": []}\n\ndata: {"usage": {"prompt_tokens": 2, ')
    assert watch.mid_event
    watch.feed(b'"completion_tokens": 4}}\n\n')
    assert not watch.mid_event
    assert (watch.usage.tokens_in, watch.usage.tokens_out) == (2, 4)


async def test_client_api_paths_and_refusals() -> None:
    async with make_provider_client() as http:

        def api(name: str, base_url: str, protocols: tuple[str, ...]) -> ClientAPI:
            channel = ProviderHTTP(
                http, name=name, base_url=base_url, key=Secret("k"), timeout_s=1.0
            )
            return ClientAPI(channel, protocols)

        cloud = api("ollama_cloud", "https://ollama.com", ("chat_completions", "messages"))
        assert cloud.path_for(MESSAGES) == "/v1/messages"
        assert cloud.upstream_model("gpt-oss:120b-cloud") == "gpt-oss:120b"
        kimi = api("kimi", "https://api.kimi.com/coding/v1", ("chat_completions", "messages"))
        assert kimi.path_for(CHAT_COMPLETIONS) == "/chat/completions"
        assert kimi.path_for(MESSAGES) == "/messages"
        assert kimi.upstream_model("k2:cloud") == "k2:cloud"
        with pytest.raises(ProtocolNotServed, match=r"'kimi'.*OpenAI Embeddings"):
            kimi.path_for(EMBEDDINGS)
