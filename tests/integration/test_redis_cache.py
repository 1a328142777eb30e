"""Two PIBL nodes sharing a real redis-server as their second cache tier."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from pibl.observe.status import ProxyAdmin
from tests.support import Backend, ProxyThread, free_port, wait_for, wait_port

REDIS = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(
    REDIS is None, reason="redis-server (Debian package) is not installed"
)


class RedisServer:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.workdir = workdir

    def start(self) -> None:
        assert REDIS is not None
        self.proc = subprocess.Popen(
            [
                REDIS,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def wait_published(self, count: int = 1, timeout: float = 10.0) -> None:
        """Wait until ``count`` entries' metadata is in Redis (published after a local commit)."""
        import redis as redis_client

        with redis_client.Redis.from_url(self.url) as client:
            ok = wait_for(lambda: len(client.keys("pibl:m:*")) >= count, timeout)
        assert ok, f"fewer than {count} entries published to Redis"


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def nodes(
    backends: list[Backend],
    make_proxy: Callable[..., ProxyThread],
    redis: RedisServer,
    tmp_path: Path,
) -> tuple[ProxyThread, ProxyThread]:
    def node(name: str) -> ProxyThread:
        return make_proxy(
            backends[:1],
            cache={
                "dir": str(tmp_path / name),
                "store": "redis",
                "redis_url": redis.url,
                "lock_timeout": 10,
            },
        )

    return node("a"), node("b")


def get(proxy: ProxyThread, path: str, **kw: Any) -> httpx.Response:
    # both nodes see the same Host, as they would behind one virtual IP
    kw.setdefault("headers", {"Host": "shop.test"})
    return httpx.get(proxy.url + path, timeout=20, **kw)


def test_fetched_through_a_is_a_hit_on_b(
    nodes: tuple[ProxyThread, ProxyThread], backends: list[Backend], redis: RedisServer
) -> None:
    a, b = nodes
    first = get(a, "/cache/shared?cc=max-age=60&size=700000")
    assert "stored" in first.headers["cache-status"]
    redis.wait_published()
    second = get(b, "/cache/shared?cc=max-age=60&size=700000")
    assert second.headers["cache-status"].startswith("pibl; hit")
    assert second.content == first.content
    assert backends[0].hits == 1


def test_50_concurrent_cold_requests_over_both_nodes_reach_the_backend_once(
    nodes: tuple[ProxyThread, ProxyThread], backends: list[Backend]
) -> None:
    a, b = nodes

    def fetch(i: int) -> bytes:
        r = get(a if i % 2 else b, "/cache/cold?cc=max-age=60&delay=0.7")
        assert r.status_code == 200
        return r.content

    with ThreadPoolExecutor(50) as pool:
        bodies = list(pool.map(fetch, range(50)))
    assert backends[0].hits == 1
    assert len(set(bodies)) == 1


def test_purge_on_a_is_honoured_by_b(
    nodes: tuple[ProxyThread, ProxyThread], backends: list[Backend], redis: RedisServer
) -> None:
    a, b = nodes
    url = "/cache/purged?cc=max-age=600"
    get(a, url)
    redis.wait_published()
    assert "hit" in get(b, url).headers["cache-status"]  # b has its own local copy now
    assert a.worker is not None
    admin = ProxyAdmin(a.worker.proxy)  # as the admin listener calls it, on a's loop
    a.loop.call_soon_threadsafe(admin.purge, f"http://shop.test{url}")
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        if "hit" not in get(b, url).headers["cache-status"]:
            break
        time.sleep(0.1)
    else:
        pytest.fail("node b still serves the purged entry")


def test_unsafe_request_on_a_invalidates_b(
    nodes: tuple[ProxyThread, ProxyThread], backends: list[Backend], redis: RedisServer
) -> None:
    a, b = nodes
    # both nodes see the same Host, as behind one virtual IP
    headers = {"Host": "shop.test"}
    url = "/cache/inv?cc=max-age=600"
    get(a, url, headers=headers)
    redis.wait_published()
    assert "hit" in get(b, url, headers=headers).headers["cache-status"]
    httpx.post(a.url + url, headers=headers)  # through a only
    deadline = time.monotonic() + 3
    while "hit" in get(b, url, headers=headers).headers["cache-status"]:
        assert time.monotonic() < deadline, "b kept serving an invalidated entry"
        time.sleep(0.1)


def test_redis_stopped_mid_test_both_nodes_keep_answering(
    nodes: tuple[ProxyThread, ProxyThread], backends: list[Backend], redis: RedisServer
) -> None:
    a, b = nodes
    get(a, "/cache/before?cc=max-age=60")
    redis.stop()
    for i in range(10):
        for node in (a, b):
            r = get(node, f"/cache/after/{i}?cc=max-age=60")
            assert r.status_code == 200
        assert get(a, "/cache/before?cc=max-age=60").status_code == 200
    assert a.worker is not None and a.worker.proxy.cache is not None
    remote = a.worker.proxy.cache.remote
    assert remote is not None and remote.errors > 0
    assert "redis" in a.stream.getvalue() and "local tier only" in a.stream.getvalue()


def test_a_fleet_rate_limit_holds_across_nodes_and_falls_back_when_redis_stops(
    backends: list[Backend],
    make_proxy: Callable[..., ProxyThread],
    redis: RedisServer,
    tmp_path: Path,
) -> None:
    limit = {"rate": 0.5, "burst": 3, "key": "route", "shared": "fleet"}

    def node(name: str) -> ProxyThread:
        return make_proxy(
            backends[:1],
            cache={"dir": str(tmp_path / name), "store": "redis", "redis_url": redis.url},
            routes=[{"name": "api", "pool": "default", "limit": limit}],
        )

    a, b = node("a"), node("b")
    codes = [get(p, f"/r{i}").status_code for i in range(4) for p in (a, b)]
    assert codes.count(200) == 4, codes  # burst + 1 for the fleet, not per node
    assert codes.count(429) == 4
    redis.stop()
    # Redis is gone: each node limits on its own (its own bucket starts empty)
    later = [get(a, f"/s{i}").status_code for i in range(6)]
    assert later[:4] == [200] * 4 and later[4:] == [429, 429]
