"""Headless Chromium loads the demo home page over HTTP/2 through PIBL's HTTPS listener."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.support import free_port, start_pibl_process, wait_port, write_config

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture
def tls_demo_stack(tmp_path: Path) -> Iterator[int]:
    """Three webapp replicas and a ``pibl run`` process with an HTTPS listener; its port."""
    ca = trustme.CA(organization_name="PIBL browser test CA")
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    ports = [free_port() for _ in range(3)]
    db = str(tmp_path / "gb.sqlite3")
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
                db,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i, port in enumerate(ports, start=1)
    ]
    tls_port = free_port()
    cfg = write_config(
        tmp_path / "pibl.toml",
        free_port(),
        [f"http://127.0.0.1:{p}" for p in ports],
        f'[log]\nstdout = false\n\n[tls]\nport = {tls_port}\ncert = "{cert}"\nkey = "{key}"\n',
    )
    try:
        for port in ports:
            wait_port(port, 20)
        procs.append(start_pibl_process(cfg, tmp_path, "--workers", "1"))
        wait_port(tls_port)
        yield tls_port
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
def test_home_page_over_http2(tls_demo_stack: int, tmp_path: Path) -> None:
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
        "--ignore-certificate-errors",  # the test CA is not in the browser's store
        f"--user-data-dir={tmp_path / 'chrome'}",
        "--window-size=1200,900",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER or ""), options=options)
    try:
        driver.set_page_load_timeout(30)
        driver.get(f"https://localhost:{tls_demo_stack}/")
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
