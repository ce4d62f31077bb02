"""Smoke test: the real `gateway serve` process in front of the in-process Ollama emulator.

Run from the repository root as `.venv/bin/python scripts/smoke.py` (`just smoke`).
Prints `PASS <step>` or `FAIL <step>: reason` per step, then `smoke: N passed, M failed`,
and exits 1 if any step failed. The whole run is bounded (`DEADLINE_S`) and the gateway
process is always killed.

To add a step (for example a router step): write `async def step_x(smoke: Smoke) -> None`
that raises `StepFailed` (via `check`) or any exception on failure, and add it to `STEPS`
before the shutdown step, which must stay last.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import trio  # noqa: E402

from tests.emulators import OllamaEmulator, OpenAIEmulator  # noqa: E402

DEADLINE_S = 30.0  # the whole run
START_TIMEOUT_S = 15.0  # until the gateway answers /health
STEP_TIMEOUT_S = 5.0  # each step
GRACE_S = 5.0  # the gateway's shutdown_grace_s


class StepFailed(Exception):
    """A step's check did not hold; the message is the reason printed after FAIL."""


def check(condition: bool, reason: str) -> None:
    if not condition:
        raise StepFailed(reason)


@dataclass
class Smoke:
    """What every step gets: the gateway's URL and process, a client, the emulator."""

    url: str
    process: trio.Process
    client: httpx.AsyncClient
    emulator: OllamaEmulator
    provider: OpenAIEmulator  # registered as openrouter
    stderr_path: Path

    def stderr_tail(self, lines: int = 5) -> str:
        text = self.stderr_path.read_text(encoding="utf-8", errors="replace")
        return " | ".join(text.strip().splitlines()[-lines:])


Step = Callable[[Smoke], Awaitable[None]]


# ---------------------------------------------------------------------------- steps


async def step_health(smoke: Smoke) -> None:
    response = await smoke.client.get("/health")
    check(response.status_code == 200, f"status {response.status_code}")
    health = response.json()
    check(health.get("status") == "ok", f"status {health.get('status')!r}, not 'ok'")
    check(health.get("degraded") is False, "degraded")
    check(health.get("target") == smoke.emulator.url, f"target {health.get('target')!r}")
    check(health.get("models") == len(smoke.emulator.models), f"models {health.get('models')}")


async def step_tags(smoke: Smoke) -> None:
    response = await smoke.client.get("/api/tags")
    check(response.status_code == 200, f"status {response.status_code}")
    names = sorted(m["name"] for m in response.json()["models"])
    check(names == sorted(smoke.emulator.models), f"models {names}")


async def step_streaming_chat(smoke: Smoke) -> None:
    body = {"model": "llama3", "messages": [{"role": "user", "content": "why is the sky blue?"}]}
    async with smoke.client.stream("POST", "/api/chat", json=body) as response:
        check(response.status_code == 200, f"status {response.status_code}")
        content_type = response.headers.get("content-type", "")
        check(content_type == "application/x-ndjson", f"content-type {content_type!r}")
        data = await response.aread()
    check(data.endswith(b"\n"), "the stream does not end with a newline")
    lines = [json.loads(line) for line in data.splitlines()]
    check(len(lines) >= 2, f"{len(lines)} lines")
    check(lines[-1].get("done") is True, f"last line {lines[-1]}")
    check(all(line.get("done") is False for line in lines[:-1]), "done before the last line")
    text = "".join(line["message"]["content"] for line in lines)
    check(text == smoke.emulator.reply, f"content {text!r}")


async def step_unknown_model(smoke: Smoke) -> None:
    body = {"model": "no-such-model:1b", "messages": [{"role": "user", "content": "hi"}]}
    response = await smoke.client.post("/api/chat", json=body)
    check(response.status_code == 404, f"status {response.status_code}")
    error = response.json().get("error", "")
    check("no-such-model:1b" in error and "not found" in error, f"error {error!r}")


async def step_embed(smoke: Smoke) -> None:
    body = {"model": "nomic-embed-text", "input": ["first", "second"]}
    response = await smoke.client.post("/api/embed", json=body)
    check(response.status_code == 200, f"status {response.status_code}")
    embeddings = response.json().get("embeddings", [])
    check(len(embeddings) == 2, f"{len(embeddings)} embeddings for 2 inputs")
    check(all(len(v) > 0 for v in embeddings), "an empty embedding")


MESSAGES = [{"role": "user", "content": "why is the sky blue?"}]


async def step_providers(smoke: Smoke) -> None:
    response = await smoke.client.get("/v1/chat/providers")
    check(response.status_code == 200, f"status {response.status_code}")
    names = [p["name"] for p in response.json()["providers"]]
    check(names == ["ollama", "openrouter"], f"providers {names}")


async def step_router_local(smoke: Smoke) -> None:
    response = await smoke.client.post("/v1/chat", json={"model": "llama3", "messages": MESSAGES})
    check(response.status_code == 200, f"status {response.status_code}: {response.text}")
    answer = response.json()
    check(answer["provider"] == "ollama", f"provider {answer['provider']!r}")
    check(answer["content"] == smoke.emulator.reply, f"content {answer['content']!r}")
    check(answer["input_tokens"] > 0 and answer["output_tokens"] > 0, f"tokens {answer}")
    check(isinstance(answer["latency_ms"], int), f"latency {answer.get('latency_ms')!r}")


async def step_router_prefix(smoke: Smoke) -> None:
    body = {"model": "ollama/llama3", "messages": MESSAGES}
    response = await smoke.client.post("/v1/chat", json=body)
    check(response.status_code == 200, f"status {response.status_code}")
    sent = smoke.emulator.requests_to("/api/chat")[-1].json()["model"]
    check(sent == "llama3", f"upstream saw model {sent!r}")


async def step_router_cloud_unregistered(smoke: Smoke) -> None:
    body = {"model": "kimi-k2:cloud", "messages": MESSAGES}
    response = await smoke.client.post("/v1/chat", json=body)
    check(response.status_code == 404, f"status {response.status_code}")
    check("OLLAMA_CLOUD_KEY" in response.json()["error"], response.text)


async def step_router_unknown_prefix(smoke: Smoke) -> None:
    body = {"model": "unknown/x", "messages": MESSAGES}
    response = await smoke.client.post("/v1/chat", json=body)
    check(response.status_code == 502, f"status {response.status_code}")


async def step_router_missing_model(smoke: Smoke) -> None:
    response = await smoke.client.post("/v1/chat", json={"messages": MESSAGES})
    check(response.status_code == 400, f"status {response.status_code}")
    check(response.json()["error"] == "model is required", response.text)


def _openai_stream(url: str, model: str) -> str:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="smoke", max_retries=0, timeout=5)
    stream = client.chat.completions.create(model=model, messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)


async def step_openai_sdk_stream(smoke: Smoke) -> None:
    local = await trio.to_thread.run_sync(_openai_stream, smoke.url, "llama3")
    check(local == smoke.emulator.reply, f"local stream {local!r}")
    remote = await trio.to_thread.run_sync(
        _openai_stream, smoke.url, "openrouter/openai/gpt-4o-mini"
    )
    check(remote == smoke.provider.reply, f"openrouter stream {remote!r}")


async def step_sigterm(smoke: Smoke) -> None:
    await smoke.client.aclose()
    smoke.process.send_signal(signal.SIGTERM)
    with trio.move_on_after(GRACE_S) as waited:
        code = await smoke.process.wait()
    check(not waited.cancelled_caught, f"still running {GRACE_S:g} s after SIGTERM")
    check(code == 0, f"exit code {code}: {smoke.stderr_tail()}")


# Router steps go before the shutdown step, which must stay last.
STEPS: list[tuple[str, Step]] = [
    ("health ok", step_health),
    ("/api/tags lists the emulator's models", step_tags),
    ("streaming /api/chat ends with done:true", step_streaming_chat),
    ("unknown model -> 404", step_unknown_model),
    ("/api/embed", step_embed),
    ("router: providers lists ollama and openrouter", step_providers),
    ("router: bare model -> local, content, tokens, latency", step_router_local),
    ("router: ollama/<m> prefix stripped at the upstream", step_router_prefix),
    ("router: <m>:cloud unregistered -> 404", step_router_cloud_unregistered),
    ("router: unknown/<m> -> local -> 502", step_router_unknown_prefix),
    ("router: missing model -> 400", step_router_missing_model),
    ("OpenAI SDK streaming: local and openrouter", step_openai_sdk_stream),
    ("SIGTERM -> exit 0", step_sigterm),
]


# ---------------------------------------------------------------------------- runner


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def wait_until_serving(smoke: Smoke) -> str | None:
    """None once /health answers, else why not (the process is another process: poll)."""
    with trio.move_on_after(START_TIMEOUT_S):
        while smoke.process.returncode is None:
            try:
                await smoke.client.get("/health")
                return None
            except httpx.TransportError:
                await trio.sleep(0.05)
        return f"the gateway exited with {smoke.process.returncode}: {smoke.stderr_tail()}"
    return f"no answer on {smoke.url}/health within {START_TIMEOUT_S:g} s: {smoke.stderr_tail()}"


async def run_steps(smoke: Smoke, results: list[tuple[str, str | None]]) -> None:
    problem = await wait_until_serving(smoke)
    for name, step in STEPS:
        if problem is None:
            try:
                with trio.fail_after(STEP_TIMEOUT_S):
                    await step(smoke)
            except trio.TooSlowError:
                reason: str | None = f"no result within {STEP_TIMEOUT_S:g} s"
            except Exception as exc:  # noqa: BLE001 - any failure is this step's result
                reason = str(exc) or type(exc).__name__
            else:
                reason = None
        else:
            reason = f"not run: {problem}"
        results.append((name, reason))
        print(f"PASS {name}" if reason is None else f"FAIL {name}: {reason}", flush=True)


async def smoke(results: list[tuple[str, str | None]]) -> None:
    async with trio.open_nursery() as nursery:
        emulator = OllamaEmulator()
        await nursery.start(emulator.run)
        provider = OpenAIEmulator(api_key="sk-smoke-openrouter")
        await nursery.start(provider.run)
        port = free_port()
        keys = ("OLLAMA_CLOUD_KEY", "OPENROUTER_API_KEY", "OPENCODE_API_KEY", "KIMI_API_KEY")
        env = {
            k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_") and k not in keys
        }
        env.update(
            GATEWAY_BIND=f"127.0.0.1:{port}",
            GATEWAY_OLLAMA_URL=emulator.url,
            GATEWAY_SHUTDOWN_GRACE_S=str(GRACE_S),
            GATEWAY_PROVIDERS_OPENROUTER_BASE_URL=f"{provider.url}/api/v1",
            OPENROUTER_API_KEY="sk-smoke-openrouter",
        )
        # Only keys given here count: no key file of the machine running the smoke.
        for name in ("OLLAMA_CLOUD", "OPENROUTER", "OPENCODE", "KIMI"):
            env[f"GATEWAY_PROVIDERS_{name}_ENV_FILE"] = ""
        with tempfile.TemporaryDirectory(prefix="gateway-smoke-") as tmp:
            # The usage ledger in the run's own directory, not the user's state directory.
            env["GATEWAY_USAGE_PATH"] = str(Path(tmp) / "usage.db")
            stderr_path = Path(tmp) / "gateway.log"
            with stderr_path.open("wb") as log:
                process = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "gateway", "serve"],
                    env=env,
                    cwd=ROOT,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                )
            url = f"http://127.0.0.1:{port}"
            client = httpx.AsyncClient(base_url=url, timeout=STEP_TIMEOUT_S, trust_env=False)
            try:
                context = Smoke(url, process, client, emulator, provider, stderr_path)
                await run_steps(context, results)
            finally:
                await client.aclose()
                if process.returncode is None:
                    process.kill()
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await process.wait()
                nursery.cancel_scope.cancel()


async def main() -> int:
    results: list[tuple[str, str | None]] = []
    with trio.move_on_after(DEADLINE_S):
        await smoke(results)
    for name, _ in STEPS[len(results) :]:
        results.append((name, f"not run: the smoke run passed its {DEADLINE_S:g} s deadline"))
        print(f"FAIL {name}: {results[-1][1]}", flush=True)
    failed = sum(1 for _, reason in results if reason is not None)
    print(f"smoke: {len(results) - failed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(trio.run(main))
