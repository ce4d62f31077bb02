"""The status page in a real headless browser (Debian's chromium and chromedriver, driven
by selenium): log in, watch a generation hold the GPU, another wait in the queue, and the
usage change, each on the page within a second. Saves `docs/status.png`.

The browser is installed by this test's set-up when it is missing and we may (root or
sudo without a password, apt-get present); anywhere else the test is skipped with a loud
reason. The screenshot goes to `docs/status.png` when that file is missing or
`GATEWAY_SCREENSHOT=1` is set (it changes on every run: a plain test run leaves the
tree clean). Selenium is blocking: it runs in a worker thread while the gateway, in the
test's own trio loop, serves the page.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from gateway.usage import store
from tests.conftest import RunningGateway, StartGateway, make_config
from tests.emulators import OllamaEmulator

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "status.png"
TOKENS = {
    "GATEWAY_TOKENS": "alice:tok-alice-browser,bob:tok-bob-browser,carol:tok-carol-browser",
    "GATEWAY_ADMIN_TOKENS": "ops:tok-ops-browser",
}
REPLY = " ".join(["Rayleigh scattering makes the sky look blue at noon."] * 5)
WITHIN_S = 1.0  # the page shows a change within a second of it


def _install_browser() -> str | None:
    """Install chromium and its driver with apt; None when done, else why it cannot."""
    if shutil.which("apt-get") is None:
        return "no apt-get on this machine"
    prefix: list[str] = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            return "not root and no sudo"
        if subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode != 0:
            return "not root and sudo asks for a password"
        prefix = ["sudo", "-n"]
    install = [*prefix, "apt-get", "install", "-y", "--no-install-recommends"]
    install += ["chromium", "chromium-driver"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(install, capture_output=True, env=env).returncode != 0:
        subprocess.run([*prefix, "apt-get", "update"], capture_output=True, env=env)
        done = subprocess.run(install, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            return f"apt-get install chromium chromium-driver failed: {done.stderr[-500:]}"
    return None


@pytest.fixture(scope="session")
def browser_paths() -> tuple[Path, Path]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        why = _install_browser()
        if why is not None or not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
            pytest.skip(
                "!!! NO BROWSER: the status page's real-browser test did NOT run: "
                f"{why or 'chromium or chromedriver still missing after apt-get'}. "
                "Install Debian's chromium and chromium-driver to run it. !!!"
            )
    return CHROMIUM, CHROMEDRIVER


@pytest.fixture
def driver(browser_paths: tuple[Path, Path], tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = browser_paths
    options = webdriver.ChromeOptions()
    options.binary_location = str(chromium)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1280,1900",
    ):
        options.add_argument(flag)
    # The driver's path is given: selenium-manager (which downloads) is never consulted.
    browser = webdriver.Chrome(options=options, service=Service(str(chromedriver)))
    try:
        yield browser
    finally:
        browser.quit()


def _seed_last_week(path: Path) -> None:
    """The ledger as earlier days left it, so the 7-day table and chart have history."""
    today = time.time() // 86400 * 86400
    rows: list[store.Row] = []
    for day in range(1, 7):
        for n, (client, model, provider) in enumerate(
            (
                ("alice", "llama3", "ollama"),
                ("bob", "qwen2.5:7b", "ollama"),
                ("carol", "gpt-oss:120b-cloud", "ollama_cloud"),
            )
        ):
            for request in range(1 + (day + n) % 4):
                ts = today - day * 86400 + 3600 * (9 + request)
                gpu = 0.0 if provider != "ollama" else 4.0 + request
                tokens = 300 + 170 * ((day * 3 + n + request) % 7)
                rows.append(
                    (ts, client, "/api/chat", provider, "", model, 200, 120, tokens, gpu, 0.3, 5.0)
                )
    conn = store.open_writer(path)
    try:
        store.insert(conn, rows)
    finally:
        conn.close()


def _seed_last_hour(gw: RunningGateway) -> None:
    """The sampler's last hour, as a busy morning would have left it, so the screenshot
    has charts with data; the assertions below look only at what the test makes happen."""
    history = gw.services.status.history
    now = trio.current_time()
    wall = time.time()
    seed, queue = 7, 0
    for step in range(360, 1, -1):
        seed = (seed * 1103515245 + 12345) % 2**31  # a fixed pseudo-random morning
        t = now - step * 10
        rush = 90 < step < 250
        if (seed >> 8) % 4 == 0:  # the queue moves one at a time
            queue = max(0, min(4 if rush else 1, queue + (1 if (seed >> 12) % 2 else -1)))
        busy = 1.0 if queue or (seed >> 16) % 3 else round(((seed >> 20) % 10) / 10, 1)
        history.note("default", "up", queue, busy, t, wall)


async def test_page_follows_the_gpu_and_the_usage_live(
    driver: Any, start_gateway: StartGateway, ollama: OllamaEmulator, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    ledger = tmp_path / "usage.db"
    _seed_last_week(ledger)
    gw = await start_gateway(
        make_config(ollama.url, usage={"path": str(ledger)}, gate={"max_queue": 8}),
        environ=TOKENS,
    )
    _seed_last_hour(gw)

    async def in_browser(call: Callable[[], Any]) -> Any:
        return await trio.to_thread.run_sync(call)

    # Read in one script call: the page redraws twice a second, so an element found by
    # one WebDriver call may be gone by the next.
    def text_of(css: str) -> str:
        script = (
            "return Array.from(document.querySelectorAll(arguments[0]))"
            ".map((e) => e.innerText).join(' | ');"
        )
        text: str = driver.execute_script(script, css)
        return text

    def wait_for(description: str, check: Callable[[], bool]) -> None:
        WebDriverWait(driver, WITHIN_S, poll_frequency=0.05).until(
            lambda _: check(), message=f"the page did not show {description} within 1 s"
        )

    def today_requests(client: str) -> int:
        for row in text_of("#usage-clients-today tr.usage-row").split(" | "):
            cells = row.split("\t")
            if cells[0] == client:
                return int(cells[1].replace(",", ""))
        return 0

    # Logged out, the page is the login form; the token logs in.
    def log_in() -> None:
        driver.get(f"{gw.url}/status")
        driver.find_element(By.ID, "token").send_keys("tok-ops-browser")
        driver.find_element(By.ID, "login-submit").click()
        wait_for("the hosts after logging in", lambda: "default" in text_of("#hosts .host h3"))

    await in_browser(log_in)

    async def chat(token: str, text: str, *, stream: bool) -> int:
        body = {"model": "llama3", "messages": [{"role": "user", "content": text}]}
        response = await gw.client.post(
            "/api/chat",
            json={**body, "stream": stream},
            headers={"authorization": f"Bearer {token}"},
            timeout=30,
        )
        return response.status_code

    # Some use earlier today.
    for token in ("tok-carol-browser", "tok-bob-browser", "tok-alice-browser"):
        assert await chat(token, "warm up", stream=False) == 200
    await in_browser(lambda: wait_for("this morning's usage", lambda: today_requests("alice") == 1))
    await in_browser(
        lambda: wait_for("an idle GPU", lambda: "idle" in text_of("#hosts table.generations"))
    )

    # A slow generation holds the GPU; the page shows who, and its tokens counting up.
    ollama.reply = REPLY
    ollama.token_delay_s = 0.06
    ollama.hold = trio.Event()
    done: dict[str, int] = {}
    finished = {"alice": trio.Event(), "bob": trio.Event()}

    async def run(name: str, token: str, text: str) -> None:
        done[name] = await chat(token, text, stream=True)
        finished[name].set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, "alice", "tok-alice-browser", "tell me why the sky is blue")
        await ollama.wait_until(lambda: ollama.active_generations == 1)
        await in_browser(
            lambda: wait_for("alice holding the GPU", lambda: "alice" in text_of("tr.generation"))
        )
        # Another client's request waits in the queue behind it.
        nursery.start_soon(run, "bob", "tok-bob-browser", "and why is the sunset red")
        await in_browser(
            lambda: wait_for("bob waiting in the queue", lambda: "bob" in text_of("tr.waiting"))
        )
        # Held after its first token; released, the count climbs while the page watches.
        first = await in_browser(lambda: text_of("tr.generation td:nth-child(5)"))
        ollama.hold.set()
        await in_browser(
            lambda: wait_for(
                "the tokens so far counting up",
                lambda: text_of("tr.generation td:nth-child(5)") not in ("", first),
            )
        )
        await in_browser(lambda: driver.save_screenshot(str(tmp_path / "status.png")))

        # When alice's generation ends, bob's starts and alice's usage grows.
        await finished["alice"].wait()
        await in_browser(
            lambda: wait_for("alice's finished request", lambda: today_requests("alice") == 2)
        )
        await in_browser(
            lambda: wait_for("bob on the GPU", lambda: "bob" in text_of("tr.generation"))
        )
        assert await in_browser(lambda: text_of("tr.waiting")) == ""
    assert done == {"alice": 200, "bob": 200}
    await in_browser(lambda: wait_for("bob's finished request", lambda: today_requests("bob") == 2))
    await in_browser(
        lambda: wait_for("an idle GPU again", lambda: "idle" in text_of("table.generations"))
    )
    # A model name is whatever a client sent (the ledger keeps it even for a 404): the page
    # shows it as text, never as markup.
    hostile = "<img src=x onerror=\"document.title='pwned'\">"
    response = await gw.client.post(
        "/api/chat",
        json={"model": hostile, "messages": []},
        headers={"authorization": "Bearer tok-carol-browser"},
    )
    assert response.status_code == 404
    await in_browser(
        lambda: wait_for("the hostile name as text", lambda: hostile in text_of("table.usage"))
    )
    assert await in_browser(lambda: driver.execute_script("return document.images.length")) == 0
    assert await in_browser(lambda: driver.title) == "Gateway status"
    if os.environ.get("GATEWAY_SCREENSHOT") == "1" or not SCREENSHOT.exists():
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(tmp_path / "status.png", SCREENSHOT)
