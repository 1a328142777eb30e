"""The admin listener: routes, token rules and limits, then against a real proxy."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pibl.observe import admin as admin_module
from pibl.observe.admin import MAX_BODY, NO_TOKEN, format_status, start_admin
from pibl.observe.status import ProxyAdmin
from tests.support import Backend, ProxyThread, read_responses, wait_for

TOKEN = "s3cret-token"
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def fake_status() -> dict[str, Any]:
    now = time.time()
    return {
        "workers": 2,
        "pids": [101, 102],
        "started": now - 3725,
        "time": now,
        "connections": 5,
        "in_flight": 1,
        "requests": 120,
        "by_class": {"2xx": 110, "5xx": 10},
        "cache": {"HIT": 30, "MISS": 10, "BYPASS": 50},
        "cache_store": {"entries": 12, "bytes": 3 * 1024 * 1024},
        "backends": [
            {
                "name": "alpha",
                "url": "http://10.0.0.1:8080",
                "state": "up",
                "weight": 2,
                "requests": 80,
                "errors": 0,
                "active": 1,
                "ejections": 0,
                "latency_ms": 1.25,
            },
            {
                "name": "beta",
                "url": "http://10.0.0.2:8080",
                "state": "draining",
                "weight": 1,
                "requests": 40,
                "errors": 10,
                "active": 0,
                "ejections": 1,
                "latency_ms": 12.5,
            },
        ],
        "history": [
            {"t": int(now) - 1, "requests": 4, "latency_ms": 2.0, "hit_ratio": 0.5},
            {"t": int(now), "requests": 6, "latency_ms": 3.0, "hit_ratio": None},
        ],
    }


class FakeSource:
    """Records what the admin listener asked for."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, Any]] = []
        self.fail = False

    def status(self) -> dict[str, Any]:
        if self.fail:
            raise RuntimeError("boom")
        return fake_status()

    def metrics(self) -> bytes:
        return b'# HELP pibl_requests_total Requests\n# TYPE pibl_requests_total counter\npibl_requests_total{code="2xx",backend="alpha"} 3.0\n'

    def drain(self, backend: str, on: bool = True) -> bool:
        self.calls.append(("drain", backend, on))
        return backend in ("alpha", "beta", "10.0.0.1:8080")

    def set_enabled(self, backend: str, enabled: bool) -> bool:
        self.calls.append(("enabled", backend, enabled))
        return backend in ("alpha", "beta")

    def purge(self, url: str | None) -> int:
        self.calls.append(("purge", url, None))
        if url is not None and not url.startswith("http"):
            raise ValueError(f"{url!r} is not an http(s) URL")
        return 7 if url is None else 1


async def serve(source: FakeSource, token: str | None) -> tuple[asyncio.Server, str]:
    server = await start_admin(source, host="127.0.0.1", port=0, token=token)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


# -- against a fake source ----------------------------------------------------------------


async def test_read_routes() -> None:
    source = FakeSource()
    server, base = await serve(source, TOKEN)
    try:
        async with httpx.AsyncClient(base_url=base) as client:
            health = await client.get("/health")
            assert health.status_code == 200
            assert health.text.strip() == "ok"

            page = await client.get("/")
            assert page.status_code == 200
            assert page.headers["content-type"].startswith("text/html")
            for marker in ('id="backends"', 'id="chart-rate"', 'id="chart-latency"'):
                assert marker in page.text
            assert 'id="chart-hits"' in page.text and 'id="updated"' in page.text
            # self-contained: nothing loaded from elsewhere
            assert not re.search(r"(src|href)=[\"']?(https?:)?//", page.text)
            assert "@import" not in page.text and "url(" not in page.text
            csp = page.headers["content-security-policy"]
            assert "script-src 'sha256-" in csp and "connect-src 'self'" in csp

            status = await client.get("/api/status")
            assert status.headers["content-type"] == "application/json"
            assert status.json()["backends"][1]["name"] == "beta"

            metrics = await client.get("/metrics")
            assert metrics.headers["content-type"] == METRICS_TYPE
            assert metrics.content == source.metrics()

            for response in (health, page, status, metrics):
                assert response.headers["cache-control"] == "no-store"

            head = await client.head("/")
            assert head.status_code == 200 and head.content == b""
            assert int(head.headers["content-length"]) == len(page.content)

            assert (await client.get("/api/status?x=1")).status_code == 200
            assert (await client.get("/nope")).status_code == 404
            wrong = await client.post("/metrics", content=b"")
            assert wrong.status_code == 405
            assert wrong.headers["allow"] == "GET, HEAD"
            wrong = await client.get("/api/backends/alpha/drain")
            assert wrong.status_code == 405
            assert wrong.headers["allow"] == "POST"
        assert source.calls == []
    finally:
        server.close()


async def test_actions_need_the_token() -> None:
    source = FakeSource()
    server, base = await serve(source, TOKEN)
    try:
        async with httpx.AsyncClient(base_url=base) as client:
            url = "/api/backends/alpha/drain"
            missing = await client.post(url)
            assert missing.status_code == 401
            assert missing.headers["www-authenticate"].startswith("Bearer")
            wrong = await client.post(url, headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401
            basic = await client.post(url, headers={"Authorization": f"Basic {TOKEN}"})
            assert basic.status_code == 401
            assert source.calls == []

            auth = {"Authorization": f"Bearer {TOKEN}"}
            ok = await client.post(url, headers=auth)
            assert ok.status_code == 200
            assert ok.json() == {"ok": True, "backend": "alpha", "action": "drain"}
            assert ok.headers["cache-control"] == "no-store"
            for action in ("undrain", "disable", "enable"):
                r = await client.post(f"/api/backends/beta/{action}", headers=auth)
                assert r.status_code == 200, r.text
            # names are percent-decoded (default names are host:port)
            r = await client.post("/api/backends/10.0.0.1%3A8080/drain", headers=auth)
            assert r.status_code == 200
            assert source.calls == [
                ("drain", "alpha", True),
                ("drain", "beta", False),
                ("enabled", "beta", False),
                ("enabled", "beta", True),
                ("drain", "10.0.0.1:8080", True),
            ]
            unknown = await client.post("/api/backends/zeta/drain", headers=auth)
            assert unknown.status_code == 404
            assert "zeta" in unknown.json()["error"]
            assert (
                await client.post("/api/backends/alpha/explode", headers=auth)
            ).status_code == 404
    finally:
        server.close()


async def test_actions_refused_without_a_configured_token() -> None:
    source = FakeSource()
    server, base = await serve(source, None)
    try:
        async with httpx.AsyncClient(base_url=base) as client:
            for auth in ({}, {"Authorization": "Basic eDp5"}, {"Authorization": "Bearer anything"}):
                r = await client.post("/api/backends/alpha/drain", headers=auth)
                assert r.status_code == 403
                assert r.json()["error"] == NO_TOKEN
            r = await client.post("/api/cache/purge", json={"all": True})
            assert r.status_code == 403
            assert (await client.get("/api/status")).status_code == 200  # reads stay open
        assert source.calls == []
    finally:
        server.close()


async def test_purge_bodies() -> None:
    source = FakeSource()
    server, base = await serve(source, TOKEN)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        async with httpx.AsyncClient(base_url=base, headers=auth) as client:
            r = await client.post("/api/cache/purge", json={"url": "http://example.com/a"})
            assert r.status_code == 200
            assert r.json()["purged"] == 1
            r = await client.post("/api/cache/purge", json={"all": True})
            assert r.json() == {"ok": True, "purged": 7}
            for bad in (b"not json", b"{}", b'{"all": 1}', b'{"url": 5}', b"[1]", b"\xff"):
                r = await client.post("/api/cache/purge", content=bad)
                assert r.status_code == 400, bad
            r = await client.post("/api/cache/purge", json={"url": "ftp://example.com/"})
            assert r.status_code == 400
            assert "not an http(s) URL" in r.json()["error"]
            assert (await client.get("/api/cache/purge")).status_code == 405
        assert source.calls == [
            ("purge", "http://example.com/a", None),
            ("purge", None, None),
            ("purge", "ftp://example.com/", None),
        ]
    finally:
        server.close()


def _recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


async def test_keep_alive_pipelining_and_limits() -> None:
    source = FakeSource()
    server, base = await serve(source, TOKEN)
    port = int(base.rsplit(":", 1)[1])

    def client_side() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(
                b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n"
                b"GET /api/status HTTP/1.1\r\nHost: a\r\n\r\n"
                b"HEAD /metrics HTTP/1.1\r\nHost: a\r\n\r\n"
            )
            first, second, third = read_responses(s, 3, frozenset({2}))
            assert first.startswith(b"HTTP/1.1 200 ") and first.endswith(b"ok\n")
            assert b"Connection: keep-alive" in first
            assert json.loads(second.split(b"\r\n\r\n", 1)[1])["workers"] == 2
            assert third.startswith(b"HTTP/1.1 200 ") and b"version=0.0.4" in third
            # the same connection still serves, then closes when asked to
            s.sendall(b"GET /health HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            last = _recv_all(s)
            assert last.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in last
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            big = MAX_BODY + 1
            s.sendall(
                b"POST /api/cache/purge HTTP/1.1\r\nHost: a\r\n"
                b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
                b"Content-Length: %d\r\n\r\n" % big
            )
            answer = _recv_all(s)
            assert answer.startswith(b"HTTP/1.1 413 ")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            # chunked bodies are counted as they arrive
            s.sendall(
                b"POST /api/cache/purge HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            block = b"x" * 16384
            try:
                for _ in range(5):
                    s.sendall(b"%x\r\n%b\r\n" % (len(block), block))
            except OSError:
                pass
            assert _recv_all(s).startswith(b"HTTP/1.1 413 ")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /health HTTP/1.1\r\n\r\n")  # no Host
            assert _recv_all(s).startswith(b"HTTP/1.1 400 ")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: a\r\n\r\n")
            assert _recv_all(s).startswith(b"HTTP/1.1 414 ")

    try:
        await asyncio.to_thread(client_side)
        assert source.calls == []
    finally:
        server.close()


async def test_slow_and_idle_clients_are_cut_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admin_module, "REQUEST_TIMEOUT", 0.3)
    monkeypatch.setattr(admin_module, "IDLE_TIMEOUT", 0.3)
    server, base = await serve(FakeSource(), TOKEN)
    port = int(base.rsplit(":", 1)[1])

    def client_side() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHo")
            assert _recv_all(s).startswith(b"HTTP/1.1 408 ")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n")
            answer = _recv_all(s)  # answered, then closed once idle
            assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"ok\n")

    try:
        started = time.monotonic()
        await asyncio.to_thread(client_side)
        assert time.monotonic() - started < 3
    finally:
        server.close()


async def test_a_failing_source_is_a_500_not_a_dead_listener() -> None:
    source = FakeSource()
    source.fail = True
    server, base = await serve(source, TOKEN)
    try:
        async with httpx.AsyncClient(base_url=base) as client:
            r = await client.get("/api/status")
            assert r.status_code == 500
            assert r.json()["error"] == "internal error: RuntimeError"
            source.fail = False
            assert (await client.get("/api/status")).status_code == 200
    finally:
        server.close()


def test_format_status() -> None:
    text = format_status(fake_status())
    assert "2 workers (pid 101, 102)" in text
    assert "uptime       1h 02m 05s" in text
    assert "5 open, 1 in flight" in text
    assert "120  (2xx 110, 5xx 10)" in text
    assert "hit ratio 75.0%" in text and "12 entries, 3.0 MiB" in text
    assert "5.0 req/s" in text
    lines = text.splitlines()
    header = next(line for line in lines if line.strip().startswith("BACKEND"))
    for column in ("STATE", "WEIGHT", "REQUESTS", "ERRORS", "ACTIVE", "LATENCY"):
        assert column in header
    beta = next(line for line in lines if line.strip().startswith("beta"))
    assert beta.split()[:6] == ["beta", "draining", "1", "40", "10", "0"]
    assert "12.5 ms" in beta
    # a status without cache or history still renders
    bare = fake_status() | {"cache": {}, "cache_store": None, "history": []}
    assert "cache        off" in format_status(bare)


# -- against a real proxy -----------------------------------------------------------------


AdminFactory = Callable[..., str]


@pytest.fixture
def admin_for() -> Iterator[AdminFactory]:
    """Start the admin listener on a ProxyThread's own loop; returns its base URL."""
    started: list[tuple[ProxyThread, asyncio.Server]] = []

    def factory(proxy: ProxyThread, token: str | None = TOKEN) -> str:
        assert proxy.worker is not None
        source = ProxyAdmin(proxy.worker.proxy)
        future = asyncio.run_coroutine_threadsafe(
            start_admin(source, host="127.0.0.1", port=0, token=token), proxy.loop
        )
        server = future.result(5)
        started.append((proxy, server))
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield factory
    for proxy, server in started:
        proxy.loop.call_soon_threadsafe(server.close)


def _pibl_requests(admin: httpx.Client) -> dict[tuple[str, str], float]:
    response = admin.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == METRICS_TYPE
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == "pibl_requests_total":
                out[(sample.labels["code"], sample.labels["backend"])] = sample.value
    return out


def _backend_name(backend: Backend) -> str:
    return f"127.0.0.1:{backend.port}"


def test_metrics_and_status_follow_real_traffic(
    backends: list[Backend], proxy: ProxyThread, admin_for: AdminFactory
) -> None:
    base = admin_for(proxy)
    with httpx.Client(base_url=proxy.url) as client, httpx.Client(base_url=base) as admin:
        for i in range(7):
            assert client.get(f"/item/{i}").status_code == 200
        assert client.get("/status?code=404").status_code == 404
        deadline = time.monotonic() + 3
        while True:  # the exchange records just after the last byte is written
            counts = _pibl_requests(admin)
            if sum(counts.values()) >= 8 or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert sum(v for (code, _), v in counts.items() if code == "2xx") == 7
        assert sum(v for (code, _), v in counts.items() if code == "4xx") == 1
        names = {_backend_name(b) for b in backends}
        assert {backend for (_, backend) in counts} == names
        per_backend = sorted(sum(v for (_, b), v in counts.items() if b == name) for name in names)
        assert per_backend == [2, 3, 3]  # round robin over three

        status = admin.get("/api/status").json()
        assert status["workers"] == 1
        assert status["requests"] == 8
        assert status["by_class"] == {"2xx": 7, "4xx": 1}
        assert status["connections"] >= 1
        assert status["cache_store"] is None
        assert isinstance(status["history"], list)
        rows = {b["name"]: b for b in status["backends"]}
        assert set(rows) == names
        for backend in backends:
            row = rows[_backend_name(backend)]
            assert row["url"] == backend.url
            assert row["state"] == "up"
            assert row["weight"] == 1
            assert row["errors"] == 0
            assert row["active"] == 0
            assert row["latency_ms"] > 0
            assert set(row) >= {"ejections", "requests"}
        assert sum(b["requests"] for b in rows.values()) == 8

        text = format_status(status)
        for name in names:
            assert name in text
        page = admin.get("/")
        assert page.status_code == 200 and 'id="backends"' in page.text

        # the status counts finished exchanges when it is read, not only once a second
        for i in range(3):
            assert client.get(f"/more/{i}").status_code == 200
        assert wait_for(lambda: proxy.worker is not None and proxy.worker.proxy.in_flight == 0)
        assert admin.get("/api/status").json()["requests"] == 11


def _post(admin: httpx.Client, path: str, token: str | None = TOKEN, **kw: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return admin.post(path, headers=headers, **kw)


def _states(admin: httpx.Client) -> dict[str, str]:
    return {b["name"]: b["state"] for b in admin.get("/api/status").json()["backends"]}


def test_drain_disable_and_enable_a_real_backend(
    backends: list[Backend], proxy: ProxyThread, admin_for: AdminFactory
) -> None:
    base = admin_for(proxy)
    b2 = backends[1]
    name = _backend_name(b2)
    with httpx.Client(base_url=proxy.url) as client, httpx.Client(base_url=base) as admin:
        assert _post(admin, f"/api/backends/{name}/drain", token=None).status_code == 401
        assert _post(admin, f"/api/backends/{name}/drain", token="wrong").status_code == 401
        assert _states(admin)[name] == "up"

        r = _post(admin, f"/api/backends/{name}/drain")
        assert r.status_code == 200, r.text
        assert _states(admin)[name] == "draining"
        before = len(b2.seen)
        for i in range(6):
            assert client.get(f"/drained/{i}").status_code == 200
        assert len(b2.seen) == before
        assert sum(len(b.seen) for b in backends) == before + 6

        # enable returns a drained backend to service (undrain is an older name for it)
        assert _post(admin, f"/api/backends/{name}/enable").status_code == 200
        assert _states(admin)[name] == "up"
        assert _post(admin, f"/api/backends/{name}/drain").status_code == 200
        assert _post(admin, f"/api/backends/{name}/undrain").status_code == 200
        assert _states(admin)[name] == "up"
        # drained, then disabled: one enable brings it back
        assert _post(admin, f"/api/backends/{name}/drain").status_code == 200
        assert _post(admin, f"/api/backends/{name}/disable").status_code == 200
        assert _states(admin)[name] == "disabled"
        for i in range(6):
            assert client.get(f"/disabled/{i}").status_code == 200
        assert len(b2.seen) == before

        assert _post(admin, f"/api/backends/{name}/enable").status_code == 200
        assert _states(admin) == {_backend_name(b): "up" for b in backends}
        for i in range(6):
            assert client.get(f"/enabled/{i}").status_code == 200
        assert len(b2.seen) == before + 2

        assert _post(admin, "/api/backends/nosuch:1/drain").status_code == 404


def test_actions_refused_when_no_token_is_configured(
    backends: list[Backend], proxy: ProxyThread, admin_for: AdminFactory
) -> None:
    base = admin_for(proxy, token=None)
    name = _backend_name(backends[0])
    with httpx.Client(base_url=base) as admin:
        r = _post(admin, f"/api/backends/{name}/drain", token="anything")
        assert r.status_code == 403
        assert r.json()["error"] == NO_TOKEN
        assert _states(admin)[name] == "up"


def test_purge_a_real_cache(
    backends: list[Backend],
    make_proxy: Callable[..., ProxyThread],
    admin_for: AdminFactory,
    tmp_path: Path,
) -> None:
    proxy = make_proxy(backends[:1], cache={"dir": str(tmp_path / "c")})
    base = admin_for(proxy)
    origin = backends[0]
    with httpx.Client(base_url=proxy.url) as client, httpx.Client(base_url=base) as admin:
        for path in ("/cache/a?cc=max-age=300", "/cache/b?cc=max-age=300"):
            client.get(path)
            assert client.get(path).headers["cache-status"].startswith("pibl; hit")
        assert origin.hits == 2
        store = admin.get("/api/status").json()["cache_store"]
        assert store["entries"] == 2

        r = _post(admin, "/api/cache/purge", json={"url": f"{proxy.url}/cache/a?cc=max-age=300"})
        assert r.status_code == 200, r.text
        assert r.json()["purged"] == 1
        assert (
            client.get("/cache/a?cc=max-age=300")
            .headers["cache-status"]
            .startswith("pibl; fwd=miss")
        )
        assert client.get("/cache/b?cc=max-age=300").headers["cache-status"].startswith("pibl; hit")
        assert origin.hits == 3
        # purging what is not cached is not an error
        r = _post(admin, "/api/cache/purge", json={"url": f"{proxy.url}/cache/none"})
        assert r.json()["purged"] == 0
        assert _post(admin, "/api/cache/purge", json={"url": "/cache/a"}).status_code == 400

        # the refetched entry is committed to disk just after its response was delivered
        assert wait_for(lambda: admin.get("/api/status").json()["cache_store"]["entries"] == 2)
        r = _post(admin, "/api/cache/purge", json={"all": True})
        assert r.status_code == 200
        assert r.json()["purged"] == 2
        assert (
            client.get("/cache/b?cc=max-age=300")
            .headers["cache-status"]
            .startswith("pibl; fwd=miss")
        )
        assert origin.hits == 4
        assert _post(admin, "/api/cache/purge", token=None, json={"all": True}).status_code == 401
