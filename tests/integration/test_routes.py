"""Routes, pools and per-route policies over real sockets: one PIBL, two applications."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import Backend, InFlight, ProxyThread, RawServer, start_backend, wait_for


def pools(backends: list[Backend], **extra: Any) -> dict[str, Any]:
    """web = b1, api = b2 and b3."""
    return {
        "web": {"backends": [{"url": backends[0].url}], **extra.get("web", {})},
        "api": {"backends": [{"url": b.url} for b in backends[1:]], **extra.get("api", {})},
    }


def served_by(r: httpx.Response) -> str:
    return r.headers.get("x-backend", "-")


def test_requests_reach_the_pool_their_route_names(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    proxy = make_proxy(
        [],
        pools=pools(backends),
        routes=[
            {"name": "api-host", "host": "api.example.com", "pool": "api"},
            {"name": "wild", "host": "*.internal.test", "pool": "api"},
            {"name": "v1", "path_prefix": "/v1/", "pool": "api"},
            {"name": "posts", "methods": ["POST"], "pool": "api"},
            {"name": "web", "pool": "web"},
        ],
    )
    with httpx.Client(base_url=proxy.url, timeout=5) as client:
        cases = [
            ("GET", "/", {"Host": "api.example.com"}, {"b2", "b3"}),
            ("GET", "/x", {"Host": "a.internal.test"}, {"b2", "b3"}),
            ("GET", "/v1/users", {"Host": "www.test"}, {"b2", "b3"}),
            ("POST", "/form", {"Host": "www.test"}, {"b2", "b3"}),
            ("GET", "/form", {"Host": "www.test"}, {"b1"}),
            ("GET", "/", {"Host": "internal.test"}, {"b1"}),
        ]
        for method, path, headers, expected in cases:
            r = client.request(method, path, headers=headers)
            assert r.status_code == 200
            assert served_by(r) in expected, (method, path, headers)
        # round robin stays strict inside the api pool
        got = [served_by(client.get("/v1/x")) for _ in range(4)]
    assert got in (["b2", "b3", "b2", "b3"], ["b3", "b2", "b3", "b2"])
    assert all(s.path.startswith("/") for s in backends[0].seen)
    assert {s.path for s in backends[0].seen} == {"/form", "/"}


def test_a_request_no_route_matches_gets_404_and_reaches_nothing(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    proxy = make_proxy([], pools=pools(backends), routes=[{"host": "a.test", "pool": "web"}])
    r = httpx.get(proxy.url + "/", headers={"Host": "b.test"}, timeout=5)
    assert r.status_code == 404
    assert [len(b.seen) for b in backends] == [0, 0, 0]


def test_prefix_strip_header_edits_redirect_and_fixed_answer(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    proxy = make_proxy(
        [],
        pools=pools(backends),
        routes=[
            {
                "path_prefix": "/api/",
                "strip_prefix": True,
                "pool": "web",
                "request_headers": {"add": {"X-App": "shop"}, "remove": ["Cookie"]},
                "response_headers": {"add": {"X-Served-By": "pibl"}, "remove": ["X-Backend"]},
            },
            {"path_prefix": "/old/", "redirect": {"to": "https://new.test$path", "status": 301}},
            {"path_prefix": "/ping", "respond": {"status": 200, "body": "pong"}},
            {"pool": "api"},
        ],
    )
    with httpx.Client(base_url=proxy.url, timeout=5) as client:
        r = client.get("/api/users?x=1", headers={"Cookie": "secret=1"})
        assert r.status_code == 200
        assert r.headers["x-served-by"] == "pibl" and "x-backend" not in r.headers
        seen = backends[0].seen[-1]
        assert seen.path == "/users?x=1"
        names = {k.lower(): v for k, v in seen.headers}
        assert names["x-app"] == "shop" and "cookie" not in names
        r = client.get("/old/a?b=2")
        assert r.status_code == 301 and r.headers["location"] == "https://new.test/old/a?b=2"
        r = client.get("/ping")
        assert (r.status_code, r.text) == (200, "pong")
        assert client.head("/ping").headers["content-length"] == "4"
    assert sum(len(b.seen) for b in backends) == 1


def test_per_route_cache_ttl(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread], tmp_path: Path
) -> None:
    proxy = make_proxy(
        [],
        pools=pools(backends),
        cache={"dir": str(tmp_path / "cache"), "ttl": 0},  # strict: nothing stored by default
        routes=[
            {"path_prefix": "/cache/static", "pool": "web", "cache_ttl": 3600},
            {"path_prefix": "/cache/nocache", "pool": "web", "cache": False},
            {"pool": "web"},
        ],
    )
    with httpx.Client(base_url=proxy.url, timeout=5) as client:
        client.get("/cache/static/a")
        assert wait_for(
            lambda: client.get("/cache/static/a").headers["cache-status"].startswith("pibl; hit")
        )
        client.get("/cache/other")
        assert "hit" not in client.get("/cache/other").headers["cache-status"]
        r = client.get("/cache/nocache?cc=max-age=60")
        r = client.get("/cache/nocache?cc=max-age=60")
        assert "cache-status" not in r.headers


def test_deny_by_network_gives_403_and_reaches_no_backend(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    proxy = make_proxy(
        [],
        pools=pools(backends),
        routes=[
            {"path_prefix": "/admin", "pool": "web", "allow": ["10.0.0.0/8"]},
            {"path_prefix": "/blocked", "pool": "web", "deny": ["127.0.0.0/8"]},
            {"pool": "web"},
        ],
    )
    with httpx.Client(base_url=proxy.url, timeout=5) as client:
        assert client.get("/admin/x").status_code == 403
        assert client.get("/blocked").status_code == 403
        assert client.get("/open").status_code == 200
    assert [s.path for s in backends[0].seen] == ["/open"]


def client_from(address: str) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=5)


def test_a_rate_limit_answers_429_past_rate_plus_burst_per_client(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    proxy = make_proxy(
        [],
        pools=pools(backends),
        routes=[{"pool": "web", "limit": {"rate": 2.0, "burst": 4, "key": "client"}}],
    )
    with client_from("127.0.0.1") as one, client_from("127.0.0.2") as two:
        first = [one.get(proxy.url + f"/r{i}") for i in range(8)]
        other = two.get(proxy.url + "/other")
    codes = [r.status_code for r in first]
    assert codes[:5] == [200] * 5  # burst + 1 at once
    assert 429 in codes[5:] and codes.count(200) <= 6
    refused = next(r for r in first if r.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1
    assert other.status_code == 200  # another client has its own bucket
    time.sleep(1.1)
    with client_from("127.0.0.1") as one:
        assert one.get(proxy.url + "/later").status_code == 200  # the bucket leaked


def test_a_delayed_limit_spaces_requests_instead_of_refusing(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    proxy = make_proxy(
        [],
        pools=pools(backends),
        routes=[{"pool": "web", "limit": {"rate": 10.0, "burst": 5, "delay": True}}],
    )
    started = time.monotonic()
    with httpx.Client(base_url=proxy.url, timeout=5) as client:
        codes = [client.get(f"/d{i}").status_code for i in range(6)]
    assert codes == [200] * 6
    assert time.monotonic() - started >= 0.4  # 5 within the burst, each 0.1 s after the last


def test_maxconn_keeps_two_in_flight_per_backend_and_refuses_the_overflow_fast(
    make_proxy: Callable[..., ProxyThread],
) -> None:
    slow = start_backend("slow")
    try:
        proxy = make_proxy(
            [],
            pools={
                "slow": {
                    "backends": [{"url": slow.url}],
                    "maxconn": 2,
                    "maxqueue": 2,
                    "queue_timeout": 5.0,
                }
            },
            routes=[{"pool": "slow"}],
            timeouts={"upstream_response": 10},
        )
        counter = InFlight(slow)

        def one(i: int) -> tuple[int, float]:
            started = time.monotonic()
            r = httpx.get(proxy.url + "/slow?s=1.5", timeout=10)
            return r.status_code, time.monotonic() - started

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(8)))
    finally:
        slow.stop()
    codes = [c for c, _ in results]
    assert counter.peak == 2
    assert codes.count(200) == 4  # two at once, two from the queue
    assert codes.count(503) == 4
    # refused at once, long before a slot could free up (the backend takes 1.5 s)
    assert max(t for c, t in results if c == 503) < 1.0


def test_a_mirror_gets_its_share_and_a_stalled_one_adds_no_latency(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    hold = threading.Event()

    def stalled(conn: Any) -> None:
        conn.recv(65536)
        hold.wait(10)

    black_hole = RawServer(stalled)
    try:
        proxy = make_proxy(
            [],
            pools={
                "web": {"backends": [{"url": backends[0].url}]},
                "shadow": {"backends": [{"url": backends[1].url}]},
                "stalled": {"backends": [{"url": black_hole.url}]},
            },
            routes=[
                {"path_prefix": "/half", "pool": "web", "mirror": {"pool": "shadow", "share": 0.5}},
                {"path_prefix": "/all", "pool": "web", "mirror": {"pool": "stalled"}},
                {"pool": "web"},
            ],
        )
        with httpx.Client(base_url=proxy.url, timeout=5) as client:
            for i in range(200):
                assert client.get(f"/half/{i}").status_code == 200
            assert wait_for(lambda: len(backends[1].seen) >= 60, 5)

            def p99(prefix: str) -> float:
                times = []
                for i in range(60):
                    started = time.monotonic()
                    assert client.get(f"{prefix}/{i}").status_code == 200
                    times.append(time.monotonic() - started)
                return statistics.quantiles(times, n=100)[98]

            plain, mirrored = p99("/plain"), p99("/all")
    finally:
        hold.set()
        black_hole.close()
    mirrored_share = len(backends[1].seen) / 200
    assert 0.35 < mirrored_share < 0.65, mirrored_share
    assert all(s.path.startswith("/half/") for s in backends[1].seen)
    assert mirrored < plain + 0.05, (plain, mirrored)
    print(
        f"mirror share {mirrored_share:.2f}; p99 {plain * 1000:.1f} ms plain, "
        f"{mirrored * 1000:.1f} ms with a stalled mirror"
    )


def test_a_single_list_file_is_one_pool_with_one_route(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    proxy = make_proxy(backends)
    assert proxy.worker is not None
    routes = proxy.worker.proxy.router.routes
    assert [(r.name, r.pool) for r in routes] == [("default", "default")]
    with httpx.Client(base_url=proxy.url, timeout=5) as client:
        assert [served_by(client.get("/")) for _ in range(3)] == ["b1", "b2", "b3"]


@pytest.mark.parametrize("policy", ["round_robin", "least_conn"])
def test_each_pool_has_its_own_policy(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread], policy: str
) -> None:
    proxy = make_proxy(
        [], pools=pools(backends, api={"balance": {"policy": policy}}), routes=[{"pool": "api"}]
    )
    assert proxy.worker is not None
    assert proxy.worker.proxy.groups["api"].balancer.policy == policy
    assert proxy.worker.proxy.groups["web"].balancer.policy == "round_robin"


def test_access_rules_use_the_address_a_trusted_proxy_forwards(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    proxy = make_proxy(
        [],
        server={"trusted_proxies": ["127.0.0.1"]},
        pools=pools(backends),
        routes=[{"pool": "web", "allow": ["203.0.113.0/24"]}],
    )
    with httpx.Client(base_url=proxy.url, timeout=5) as client:
        ok = client.get("/x", headers={"X-Forwarded-For": "203.0.113.5"})
        refused = client.get("/y", headers={"X-Forwarded-For": "198.51.100.1"})
    assert (ok.status_code, refused.status_code) == (200, 403)
    # from a peer that is not trusted the header proves nothing
    with client_from("127.0.0.2") as other:
        assert (
            other.get(proxy.url + "/z", headers={"X-Forwarded-For": "203.0.113.5"}).status_code
            == 403
        )


def test_the_proxy_protocol_header_names_the_client(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    from tests.support import raw_request

    proxy = make_proxy(
        [],
        server={"trusted_proxies": ["127.0.0.0/8"], "proxy_protocol": True},
        pools=pools(backends),
        routes=[{"pool": "web", "allow": ["192.0.2.0/24"]}],
    )
    good = raw_request(
        proxy.port,
        b"PROXY TCP4 192.0.2.44 10.0.0.1 50000 80\r\n"
        b"GET /p HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    assert good.startswith(b"HTTP/1.1 200")
    names = {k.lower(): v for k, v in backends[0].seen[-1].headers}
    assert names["x-forwarded-for"] == "192.0.2.44"
    other = raw_request(
        proxy.port,
        b"PROXY TCP4 198.51.100.2 10.0.0.1 50000 80\r\nGET /p HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    assert other.startswith(b"HTTP/1.1 403")
    missing = raw_request(proxy.port, b"GET /p HTTP/1.1\r\nHost: a\r\n\r\n")
    assert missing.startswith(b"HTTP/1.1 400")
    assert len(backends[0].seen) == 1


def test_plain_routes_take_the_fast_path_and_routes_with_policies_the_other(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    proxy = make_proxy(
        [],
        pools=pools(backends),
        routes=[
            {"path_prefix": "/guarded", "pool": "web", "deny": ["10.0.0.0/8"]},
            {"pool": "api"},
        ],
    )
    assert proxy.worker is not None
    worker = proxy.worker.proxy
    if not worker.fast_path:
        pytest.skip("the fast path is off (PIBL_FAST_PATH=0)")
    with httpx.Client(base_url=proxy.url, timeout=5) as client:
        for i in range(8):  # the first ones open the pooled connections
            assert served_by(client.get(f"/x{i}")) in ("b2", "b3")
        assert served_by(client.get("/guarded")) == "b1"
    assert worker.fast_served >= 4
    assert worker.fast_exits["route policy"] == 1


def test_an_early_answer_to_a_request_with_a_body_closes_the_connection(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    """403 before the body was read: the connection closes instead of stalling behind it."""
    proxy = make_proxy([], pools=pools(backends), routes=[{"pool": "web", "deny": ["127.0.0.0/8"]}])
    started = time.monotonic()
    r = httpx.post(proxy.url + "/upload", content=b"x" * 300_000, timeout=5)
    assert r.status_code == 403
    assert r.headers["connection"] == "close"
    assert time.monotonic() - started < 2
    assert len(backends[0].seen) == 0
