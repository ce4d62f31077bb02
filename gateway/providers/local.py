"""The local Ollama hosts as a router provider: `/api/chat`, placed on a GPU host and run
under its gate (pinned load options applied, ADR 0017, ADR 0020).

It shares the hosts and their gates with the Ollama passthrough, so a `/v1/chat`
call waits behind an `/api/chat` stream like any other generation. Reasoning is off by
default (`think: false`), so low-budget callers get an answer, not an empty thought.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from gateway.errors import UpstreamError, UpstreamUnavailable
from gateway.hosts import Host, Hosts
from gateway.pinning import Pins, pin_for, pin_request
from gateway.providers.base import ChatRequest, ChatResult, Delta, finish_reason
from gateway.record import RequestRecord
from gateway.target.wire import ChatChunk


def ollama_chat_body(request: ChatRequest, model: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if request.max_tokens is not None:
        options["num_predict"] = request.max_tokens
    if request.temperature is not None:
        options["temperature"] = request.temperature
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": m.role, "content": m.content} for m in request.messages],
        "think": False,
    }
    if options:
        body["options"] = options
    if request.format == "json":
        body["format"] = "json"
    return body


class LocalOllama:
    name = "ollama"

    def __init__(self, hosts: Hosts, pins: Pins | None = None) -> None:
        self._hosts = hosts
        self._pins = pins or {}
        self.base_url = hosts.first.url

    def _body(self, request: ChatRequest, model: str) -> dict[str, Any]:
        body = ollama_chat_body(request, model)
        pin = pin_for(self._pins, model)
        return body if pin is None else pin_request(body, pin)

    def admit(self) -> None:
        hosts = self._hosts
        if hosts.single:
            hosts.first.inventory.require_reachable()
            hosts.first.gate.check_admission()
        elif not hosts.ready:
            hosts.first.inventory.require_reachable()  # every host is down: say so now

    async def chat(self, request: ChatRequest, model: str, record: RequestRecord) -> ChatResult:
        self.admit()
        answers: list[ChatChunk] = []

        async def work(host: Host) -> None:
            try:
                answer = await host.target.chat(self._body(request, model))
            except UpstreamUnavailable:
                raise  # nothing reached the host: the hosts layer may try another
            except UpstreamError as exc:
                raise host.inventory.note_failure(exc) from exc
            record.load_s = answer.load_duration / 1e9 if answer.load_duration else None
            answers.append(answer)

        await self._hosts.generate(record, model, work)
        [answer] = answers
        return ChatResult(
            model=model,
            provider=self.name,
            content=answer.message.content,
            input_tokens=answer.prompt_eval_count,
            output_tokens=answer.eval_count,
            finish_reason=finish_reason(answer.done_reason, answer.done),
        )

    async def stream(
        self, request: ChatRequest, model: str, record: RequestRecord
    ) -> AsyncGenerator[Delta, None]:
        self.admit()
        # A stream yields while it holds the gate, so it cannot hand its work to
        # `Hosts.generate`; it retries itself, on the same terms: only while nothing of
        # the request reached a host (connection refused), never once a chunk came back.
        tried: set[str] = set()
        while True:
            yielded = False
            used: list[Host] = []
            try:
                async with self._hosts.serve(record, model, exclude=frozenset(tried)) as host:
                    used.append(host)
                    try:
                        async with aclosing(
                            host.target.chat_stream(self._body(request, model))
                        ) as chunks:
                            async for chunk in chunks:
                                yielded = True
                                if chunk.done:
                                    if chunk.load_duration:
                                        record.load_s = chunk.load_duration / 1e9
                                    yield Delta(
                                        content=chunk.message.content,
                                        finish_reason=finish_reason(chunk.done_reason, True),
                                        input_tokens=chunk.prompt_eval_count,
                                        output_tokens=chunk.eval_count,
                                    )
                                elif chunk.message.content:
                                    yield Delta(content=chunk.message.content)
                    except UpstreamUnavailable:
                        raise  # nothing reached the host: maybe another one
                    except UpstreamError as exc:
                        raise host.inventory.note_failure(exc) from exc
                return
            except UpstreamUnavailable as exc:
                if not used:
                    raise
                error = used[0].inventory.note_failure(exc)
                tried.add(used[0].name)
                others = self._hosts.candidates(model, frozenset(tried))
                if yielded or self._hosts.single or not others:
                    raise error from exc
