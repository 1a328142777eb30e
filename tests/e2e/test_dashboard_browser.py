"""The dashboard in headless Chromium: live numbers and charts while traffic flows."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pibl.observe.admin import start_admin
from pibl.observe.status import ProxyAdmin
from tests.support import Backend, ProxyThread


def _binary(name: str) -> str | None:
    """The Debian package's binary, or one on PATH."""
    path = Path("/usr/bin") / name
    return str(path) if path.exists() else shutil.which(name)


CHROMIUM = _binary("chromium")
CHROMEDRIVER = _binary("chromedriver")
TOKEN = "t0ken"
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not (CHROMIUM and CHROMEDRIVER),
        reason="Debian chromium and chromium-driver are not installed (apt install chromium "
        "chromium-driver)",
    ),
]


@pytest.fixture
def traffic_and_admin(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread], tmp_path: Path
) -> Iterator[str]:
    """A proxy with a cache, steady traffic through it, and the admin listener on its loop."""
    proxy = make_proxy(backends, cache={"dir": str(tmp_path / "cache")})
    assert proxy.worker is not None
    server = asyncio.run_coroutine_threadsafe(
        start_admin(ProxyAdmin(proxy.worker.proxy), host="127.0.0.1", port=0, token=TOKEN),
        proxy.loop,
    ).result(5)
    stop = threading.Event()

    def send() -> None:
        with httpx.Client(base_url=proxy.url, timeout=5) as client:
            i = 0
            while not stop.is_set():
                # a mix of uncached pages and a few cacheable resources (hits after the first)
                path = f"/cache/r{i % 4}?cc=max-age=600" if i % 3 == 0 else f"/page/{i}"
                client.get(path)
                i += 1
                time.sleep(0.01)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        stop.set()
        sender.join(5)
        proxy.loop.call_soon_threadsafe(server.close)


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM or ""
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chrome'}",
        "--window-size=1280,1000",
    ):
        options.add_argument(arg)
    chrome = webdriver.Chrome(service=Service(CHROMEDRIVER or ""), options=options)
    chrome.set_page_load_timeout(15)
    try:
        yield chrome
    finally:
        chrome.quit()


def _rows(driver: Any) -> dict[str, dict[str, str]]:
    """The backend table as {name: {column: text}}, read in one script call."""
    result: dict[str, dict[str, str]] = driver.execute_script(
        """
        const out = {};
        for (const tr of document.querySelectorAll('#backends tbody tr')) {
          const row = {};
          for (const td of tr.cells) row[td.className.split(' ')[0].slice(2)] = td.innerText.trim();
          out[tr.dataset.backend] = row;
        }
        return out;
        """
    )
    return result


def _count(text: str) -> int:
    return int(text.replace(",", "") or 0)


def test_dashboard_updates_live(
    traffic_and_admin: str, backends: list[Backend], driver: Any
) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(traffic_and_admin + "/")
    wait = WebDriverWait(driver, 10, poll_frequency=0.1)
    names = {f"127.0.0.1:{b.port}" for b in backends}

    # the table fills in with the three backends, all serving
    wait.until(
        lambda d: (
            set(_rows(d)) == names and all(_count(r["requests"]) > 0 for r in _rows(d).values())
        )
    )
    rows = _rows(driver)
    for row in rows.values():
        assert row["state"] == "up"
        assert row["weight"] == "1"
        assert float(row["latency"]) > 0
    badge_color = driver.execute_script(
        "return getComputedStyle(document.querySelector('#backends .badge')).backgroundColor"
    )
    assert badge_color == "rgb(31, 157, 85)"  # green for "up"

    # the request-rate chart draws a line once the proxy has a few per-second samples
    wait.until(
        lambda d: (
            "L"
            in (d.find_element("css selector", "#chart-rate path.line").get_attribute("d") or "")
        )
    )
    box = driver.execute_script(
        "const b = document.querySelector('#chart-rate path.line').getBBox();"
        "return [b.width, b.height];"
    )
    assert box[0] > 0
    assert driver.find_element("id", "requests").text not in ("", "-")
    assert driver.find_element("id", "uptime").text not in ("", "-")
    assert driver.find_element("id", "hit-ratio").text.endswith("%")
    assert driver.find_element("id", "updated").text.startswith("last update")

    # no reload: the same document keeps counting up
    driver.execute_script("window.__sameDocument = true;")
    updates = int(driver.find_element("tag name", "body").get_attribute("data-updates"))
    before = {name: _count(r["requests"]) for name, r in _rows(driver).items()}

    def counted_up(d: Any) -> bool:
        after_updates = int(d.find_element("tag name", "body").get_attribute("data-updates"))
        after = {name: _count(r["requests"]) for name, r in _rows(d).items()}
        return after_updates >= updates + 2 and all(after[n] > before[n] for n in names)

    wait.until(counted_up)  # every second, without reloading
    assert driver.execute_script("return window.__sameDocument === true")
    hits_path = driver.find_element("css selector", "#chart-hits path.line").get_attribute("d")
    assert hits_path  # cacheable traffic flows, so the hit-ratio chart has data

    # an action from the page: the token is asked once, then the badge turns "draining"
    target = sorted(names)[1]
    button = f'#backends tr[data-backend="{target}"] button[data-kind="drain"]'
    driver.find_element("css selector", button).click()
    alert = wait.until(lambda d: d.switch_to.alert)
    alert.send_keys(TOKEN)
    alert.accept()
    wait.until(lambda d: _rows(d)[target]["state"] == "draining")
    assert "done" in driver.find_element("id", "message").text
    badge_color = driver.execute_script(
        f"return getComputedStyle(document.querySelector("
        f"'#backends tr[data-backend=\"{target}\"] .badge')).backgroundColor"
    )
    assert badge_color == "rgb(217, 139, 0)"  # orange for "draining"

    ARTIFACTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / "dashboard.png"))

    assert driver.find_element("css selector", button).text == "Enable"
    driver.find_element("css selector", button).click()  # the token is remembered
    wait.until(lambda d: _rows(d)[target]["state"] == "up")
    logs = [entry for entry in driver.get_log("browser") if entry.get("level") == "SEVERE"]
    assert logs == []  # no script errors, no CSP violations


def test_dashboard_shows_a_divergent_replica(
    make_proxy: Callable[..., ProxyThread], driver: Any
) -> None:
    """[consistency]: the replica whose pages differ is listed with the URL and the diff."""
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.support import start_backend

    # the test backends answer "<name> GET <path>": two alike, one on "another release"
    replicas = [start_backend("app"), start_backend("app"), start_backend("app-old")]
    proxy = make_proxy(replicas, consistency={"sample": 1.0, "rate": 1000})
    assert proxy.worker is not None
    server = asyncio.run_coroutine_threadsafe(
        start_admin(ProxyAdmin(proxy.worker.proxy), host="127.0.0.1", port=0, token=TOKEN),
        proxy.loop,
    ).result(5)
    odd = f"127.0.0.1:{replicas[2].port}"
    try:
        with httpx.Client(base_url=proxy.url, timeout=5) as client:
            for i in range(30):
                client.get(f"/page/{i % 3}")
        admin = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        driver.get(admin + "/")
        wait = WebDriverWait(driver, 10, poll_frequency=0.1)
        wait.until(lambda d: d.find_elements("css selector", "#divergences tr.divergence"))
        rows = driver.execute_script(
            "return [...document.querySelectorAll('#divergences tr.divergence')]"
            ".map((tr) => [tr.dataset.backend, ...[...tr.cells].map((c) => c.innerText)])"
        )
        assert {r[0] for r in rows} == {odd}, rows
        assert all(r[2].startswith("/page/") and "digest" in r[3] for r in rows)
        assert driver.find_element("id", "consistency-panel").is_displayed()
        assert "on divergence: report" in driver.find_element("id", "consistency-sub").text
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "dashboard-divergence.png"))
        logs = [entry for entry in driver.get_log("browser") if entry.get("level") == "SEVERE"]
        assert logs == []
    finally:
        proxy.loop.call_soon_threadsafe(server.close)
        for b in replicas:
            b.stop()
