"""A real browser (headless Chromium) renders the demo home page through PIBL."""

from __future__ import annotations

import itertools
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import free_port, start_pibl_process, wait_port, write_config

pytestmark = pytest.mark.e2e

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture
def demo_stack(tmp_path: Path) -> Iterator[int]:
    """Three webapp replicas and a ``pibl run`` process, all on free ports."""
    ports = [free_port() for _ in range(3)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "webapp",
                "--name",
                f"replica-{i}",
                "--port",
                str(port),
                "--db",
                str(tmp_path / "gb.sqlite3"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i, port in enumerate(ports, start=1)
    ]
    proxy_port = free_port()
    cfg = write_config(
        tmp_path / "pibl.toml",
        proxy_port,
        [f"http://127.0.0.1:{p}" for p in ports],
        "[log]\nstdout = false\n",
    )
    try:
        for port in ports:
            wait_port(port, 20)
        procs.append(start_pibl_process(cfg, tmp_path, "--workers", "1"))
        wait_port(proxy_port)
        yield proxy_port
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER), reason="Debian chromium and chromium-driver are not installed"
)
def test_home_page_renders_through_proxy(demo_stack: int, tmp_path: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM or ""
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'chrome'}",
        "--window-size=1200,900",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER or ""), options=options)
    try:
        driver.set_page_load_timeout(30)
        seen = set()
        for _ in range(9):  # the page's own assets and API call also take turns
            if len(seen) == 3:
                break
            driver.get(f"http://127.0.0.1:{demo_stack}/")
            WebDriverWait(driver, 10).until(
                lambda d: d.find_element("tag name", "body").get_attribute("data-js") == "loaded"
            )
            seen.add(driver.find_element("id", "replica").text.strip())
        assert seen == {"replica-1", "replica-2", "replica-3"}
        # the stylesheet applied, the image decoded, the script ran: all fetched through PIBL
        color = driver.execute_script(
            "return getComputedStyle(document.getElementById('replica')).color"
        )
        assert color != "rgb(0, 0, 0)"
        natural = driver.execute_script(
            "var i = document.querySelector('img'); return i.complete ? i.naturalWidth : 0"
        )
        assert natural > 0
        assert driver.find_element("id", "js-status").text == "script loaded"
        assert "Via" in driver.find_element("id", "request-headers").text or "via" in (
            driver.find_element("id", "request-headers").text
        )
        # Round robin as the page shows it: the page and its script's /api/info call are
        # two consecutive turns, and the next load continues after them.
        order = ["replica-1", "replica-2", "replica-3"]

        def after(name: str) -> str:
            return order[(order.index(name) + 1) % 3]

        loads = []
        for _ in range(4):  # the assets are in the browser's cache by now
            driver.get(f"http://127.0.0.1:{demo_stack}/")
            WebDriverWait(driver, 10).until(
                lambda d: d.find_element("id", "api-request").get_attribute("data-replica")
            )
            page = driver.find_element("id", "replica").text.strip()
            api = driver.find_element("id", "api-request").get_attribute("data-replica")
            shown = driver.find_element("id", "page-requests").text
            assert f"GET / (this page) → {page}" in shown
            assert f"→ {api}" in shown
            loads.append((page, api))
        assert all(api == after(page) for page, api in loads), loads
        assert all(nxt == after(api) for (_, api), (nxt, _) in itertools.pairwise(loads)), loads
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "home-through-pibl.png"))
    finally:
        driver.quit()
