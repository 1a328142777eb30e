"""Routes in a real ``pibl run`` with two workers: the node's limits and two applications."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.support import (
    Backend,
    free_port,
    start_pibl_process,
    stop_process,
    wait_port,
)

pytestmark = pytest.mark.e2e


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_rate_limit_holds_for_the_node_not_per_worker(
    tmp_path: Path, backends: list[Backend]
) -> None:
    port = free_port()
    config = write(
        tmp_path / "pibl.toml",
        f"""
[server]
host = "127.0.0.1"
port = {port}
workers = 2
[log]
stdout = false
[pools.web]
[[pools.web.backends]]
url = "{backends[0].url}"
[[routes]]
pool = "web"
limit = {{ rate = 0.2, burst = 4, key = "client" }}
""",
    )
    proc = start_pibl_process(config, tmp_path)
    try:
        wait_port(port)
        codes = []
        for i in range(20):  # a new connection each: both workers take some
            codes.append(httpx.get(f"http://127.0.0.1:{port}/r{i}", timeout=5).status_code)
    finally:
        stop_process(proc)
    assert codes.count(200) in (5, 6), codes  # burst + 1 (and one more if 5 s passed)
    assert codes.count(429) >= 14


def test_two_applications_behind_one_pibl(tmp_path: Path, backends: list[Backend]) -> None:
    port = free_port()
    config = write(
        tmp_path / "pibl.toml",
        f"""
[server]
host = "127.0.0.1"
port = {port}
[log]
stdout = false
[pools.shop]
[[pools.shop.backends]]
url = "{backends[0].url}"
[pools.api]
[[pools.api.backends]]
url = "{backends[1].url}"
[[pools.api.backends]]
url = "{backends[2].url}"
[[routes]]
host = "api.example.com"
pool = "api"
[[routes]]
path_prefix = "/"
pool = "shop"
""",
    )
    proc = start_pibl_process(config, tmp_path)
    try:
        wait_port(port)
        base = f"http://127.0.0.1:{port}"
        api = [httpx.get(base + f"/v1/{i}", headers={"Host": "api.example.com"}) for i in range(4)]
        shop = [httpx.get(base + "/", headers={"Host": "shop.example.com"}) for _ in range(2)]
        time.sleep(0.2)
    finally:
        stop_process(proc)
    assert {r.headers["x-backend"] for r in api} == {"b2", "b3"}
    assert {r.headers["x-backend"] for r in shop} == {"b1"}


def test_routes_change_with_a_reload(tmp_path: Path, backends: list[Backend]) -> None:
    import signal

    port = free_port()
    template = f"""
[server]
host = "127.0.0.1"
port = {port}
workers = 1
[cache]
enabled = false
[log]
stdout = false
[pools.one]
[[pools.one.backends]]
url = "{backends[0].url}"
[pools.two]
[[pools.two.backends]]
url = "{backends[1].url}"
[[routes]]
pool = "POOL"
"""
    config = write(tmp_path / "pibl.toml", template.replace("POOL", "one"))
    proc = start_pibl_process(config, tmp_path)
    try:
        wait_port(port)
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(base + "/a").headers["x-backend"] == "b1"
        write(config, template.replace("POOL", "two"))
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while httpx.get(base + "/b").headers["x-backend"] != "b2":
            assert time.monotonic() < deadline, "the reload did not take the new routes"
            time.sleep(0.1)
    finally:
        stop_process(proc)


def test_maxconn_holds_for_the_node_with_two_workers(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from tests.support import InFlight, start_backend

    slow = start_backend("slow")
    counter = InFlight(slow)
    port = free_port()
    config = write(
        tmp_path / "pibl.toml",
        f"""
[server]
host = "127.0.0.1"
port = {port}
workers = 2
[cache]
enabled = false
[health]
enabled = false
[log]
stdout = false
[pools.slow]
maxconn = 2
maxqueue = 2
queue_timeout = 10
[[pools.slow.backends]]
url = "{slow.url}"
[[routes]]
pool = "slow"
""",
    )
    proc = start_pibl_process(config, tmp_path)
    try:
        wait_port(port)

        def one(i: int) -> int:
            return httpx.get(f"http://127.0.0.1:{port}/slow?s=1", timeout=20).status_code

        with ThreadPoolExecutor(10) as pool:
            codes = list(pool.map(one, range(10)))
    finally:
        stop_process(proc)
        slow.stop()
    assert counter.peak <= 2, counter.peak  # the node as a whole, not 2 per worker
    assert codes.count(200) >= 2 and codes.count(503) >= 2, codes
