#!/usr/bin/env python3
"""Bootstrap for a machine with nothing but python3: make `.venv`, install the project and
its tools into it (again only when pyproject.toml changed), then run a command from it.

    python3 dev.py gateway serve      # the gateway on its built-in defaults
    python3 dev.py just verify        # lint, types, tests, smoke
    python3 dev.py --sync             # only bring .venv up to date
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".installed-from"


def _wanted() -> str:
    return hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()


def sync() -> None:
    if not (BIN / "python").exists():
        print("dev.py: creating .venv", file=sys.stderr)
        venv.EnvBuilder(with_pip=True).create(VENV)
    if STAMP.exists() and STAMP.read_text().strip() == _wanted():
        return
    print("dev.py: installing the project and its dev tools into .venv", file=sys.stderr)
    pip = [str(BIN / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "-e", f"{ROOT}[dev]"], check=True)
    STAMP.write_text(_wanted())


def main(argv: list[str]) -> int:
    sync()
    if not argv or argv == ["--sync"]:
        return 0
    command = argv[0]
    exe = BIN / command
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env["VIRTUAL_ENV"] = str(VENV)
    args = [str(exe) if exe.exists() else command, *argv[1:]]
    os.chdir(ROOT)
    os.execvpe(args[0], args, env)
    return 0  # pragma: no cover - exec does not return


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
