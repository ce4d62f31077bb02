# The developer loop. Every recipe first brings .venv up to date (python3 dev.py --sync),
# so `python3 dev.py just verify` works on a machine with nothing but python3.
set shell := ["bash", "-euo", "pipefail", "-c"]

bin := justfile_directory() / ".venv/bin"

# lint, types, tests (warnings are errors), smoke: what CI runs
verify: sync lint types test smoke

sync:
    python3 dev.py --sync

lint: sync
    {{bin}}/ruff check gateway tests scripts dev.py
    {{bin}}/ruff format --check gateway tests scripts dev.py

types: sync
    {{bin}}/mypy

test *ARGS: sync
    {{bin}}/python -m pytest -q {{ARGS}}

smoke: sync
    {{bin}}/python scripts/smoke.py

fmt: sync
    {{bin}}/ruff format gateway tests scripts dev.py
    {{bin}}/ruff check --fix gateway tests scripts dev.py

# the gateway on built-in defaults (or: just serve --config gateway.toml)
serve *ARGS: sync
    {{bin}}/gateway serve {{ARGS}}
