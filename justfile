# The developer loop. Every recipe first brings .venv up to date (python3 dev.py --sync),
# so `python3 dev.py just verify` works on a machine with nothing but python3.
set shell := ["bash", "-euo", "pipefail", "-c"]

bin := justfile_directory() / ".venv/bin"

# lint, types, tests (warnings are errors), smoke: what CI runs
verify: sync lint types test smoke

sync:
    python3 dev.py --sync

lint: sync
    {{bin}}/ruff check gateway tests scripts bench e2e dev.py
    {{bin}}/ruff format --check gateway tests scripts bench e2e dev.py

types: sync
    {{bin}}/mypy

test *ARGS: sync
    {{bin}}/python -m pytest -q {{ARGS}}

smoke: sync
    {{bin}}/python scripts/smoke.py

# the real-model tier: llama-server + SmolLM2 + ollama-proxy-plus (first run builds, ~10-14 min)
e2e: sync
    {{bin}}/python e2e/prepare.py
    {{bin}}/python -m pytest e2e -q -p no:cacheprovider

# benchmarks: direct vs through the gateway, side by side (docs/benchmarks.md)
bench *ARGS: sync
    {{bin}}/python -m bench.run {{ARGS}}

# the leak soak at full length (just verify runs a short one)
soak: sync
    GATEWAY_SOAK_REQUESTS=3000 {{bin}}/python -m pytest -q -m soak tests/test_soak.py

fmt: sync
    {{bin}}/ruff format gateway tests scripts bench e2e dev.py
    {{bin}}/ruff check --fix gateway tests scripts bench e2e dev.py

# the gateway on built-in defaults (or: just serve --config gateway.toml)
serve *ARGS: sync
    {{bin}}/gateway serve {{ARGS}}
