"""A real browser (headless Chromium) renders the demo home page through PIBL."""

from __future__ import annotations

import contextlib
import itertools
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import free_port, start_pibl_process, wait_port, write_config

pytestmark = pytest.mark.e2e

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")


@contextlib.contextmanager
def running_demo_stack(tmp_path: Path, port: int, extra: str = "") -> Iterator[None]:
    """Three webapp replicas and a ``pibl run`` process listening on ``port`` (and on what
    ``extra`` adds to its config), all on free ports."""
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
                str(p),
                "--db",
                str(tmp_path / "gb.sqlite3"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i, p in enumerate(ports, start=1)
    ]
    cfg = write_config(
        tmp_path / "pibl.toml",
        port,
        [f"http://127.0.0.1:{p}" for p in ports],
        "[log]\nstdout = false\n" + extra,
    )
    try:
        for p in ports:
            wait_port(p, 20)
        procs.append(start_pibl_process(cfg, tmp_path, "--workers", "1"))
        wait_port(port)
        yield
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def headless_chrome(tmp_path: Path, *extra_args: str) -> Any:
    """Debian's Chromium under chromedriver, with the flags this closed network needs."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

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
        *extra_args,
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER or ""), options=options)
    driver.set_page_load_timeout(30)
    return driver


@pytest.fixture
def demo_stack(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    with running_demo_stack(tmp_path, port):
        yield port


@pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER), reason="Debian chromium and chromium-driver are not installed"
)
def test_home_page_renders_through_proxy(demo_stack: int, tmp_path: Path) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    driver = headless_chrome(tmp_path)
    try:
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


@pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER), reason="Debian chromium and chromium-driver are not installed"
)
def test_home_page_over_http2(tmp_path: Path) -> None:
    """Headless Chromium loads the demo home page over HTTP/2 through the HTTPS listener."""
    import trustme
    from selenium.webdriver.support.ui import WebDriverWait

    ca = trustme.CA(organization_name="PIBL browser test CA")
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    tls_port = free_port()
    tls = f'\n[tls]\nport = {tls_port}\ncert = "{cert}"\nkey = "{key}"\n'
    with running_demo_stack(tmp_path, free_port(), tls):
        wait_port(tls_port)
        # the test CA is not in the browser's store
        driver = headless_chrome(tmp_path, "--ignore-certificate-errors")
        try:
            driver.get(f"https://localhost:{tls_port}/")
            WebDriverWait(driver, 10).until(
                lambda d: d.find_element("tag name", "body").get_attribute("data-js") == "loaded"
            )
            assert driver.find_element("id", "replica").text.strip().startswith("replica-")
            assert driver.find_element("id", "js-status").text == "script loaded"
            natural = driver.execute_script(
                "var i = document.querySelector('img'); return i.complete ? i.naturalWidth : 0"
            )
            assert natural > 0
            page = driver.execute_script(
                "return performance.getEntriesByType('navigation')[0].nextHopProtocol"
            )
            assert page == "h2"
            assets = driver.execute_script(
                "return performance.getEntriesByType('resource').map(e => e.nextHopProtocol)"
            )
            assert assets and set(assets) == {"h2"}, assets
        finally:
            driver.quit()
