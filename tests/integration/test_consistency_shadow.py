"""Shadow requests on real sockets: marked, linked to the primary, never seen by the client."""

from __future__ import annotations

import time

import httpx

from tests.support import Backend, ProxyThread, wait_for


def _proxy(backends: list[Backend], consistency: dict[str, object]) -> ProxyThread:
    return ProxyThread({"backends": [{"url": b.url} for b in backends], "consistency": consistency})


def _shadow_requests(backends: list[Backend]) -> list[tuple[str, dict[str, str]]]:
    out = []
    for b in backends:
        for seen in b.seen:
            headers = {k.lower(): v for k, v in seen.headers}
            if "pibl-shadow" in headers:
                out.append((b.name, headers))
    return out


def test_sampled_requests_are_shadowed_to_another_replica(backends: list[Backend]) -> None:
    proxy = _proxy(backends, {"sample": 1.0, "rate": 1000, "max_concurrent": 64})
    try:
        with httpx.Client() as client:
            responses = [client.get(f"{proxy.url}/download?size=2000") for _ in range(12)]
        assert all(r.status_code == 200 and len(r.content) == 2000 for r in responses)
        assert all("pibl-shadow" not in r.headers for r in responses)
        assert wait_for(lambda: len(_shadow_requests(backends)) >= 12, 10)
        shadows = _shadow_requests(backends)
        ids = {r.headers["x-request-id"]: r.headers.get("x-backend") for r in responses}
        for name, headers in shadows:
            assert headers["pibl-shadow"] == "1"
            assert headers["x-request-id"] in ids  # linked to the primary ...
            assert ids[headers["x-request-id"]] != name  # ... and sent to another replica
        worker = proxy.worker
        assert worker is not None and worker.proxy.shadow is not None
        if worker.proxy.fast_path:  # sampled requests leave the fast path
            assert worker.proxy.fast_exits["consistency sample"] == 12
        assert worker.proxy.shadow.reports == {}  # identical replicas: no divergence
        access = [ln for ln in proxy.log_lines() if " total=" in ln and " shadow " not in ln]
        assert len(access) == 12  # the shadows are not client requests ...
        assert (
            len([line for line in proxy.stream.getvalue().splitlines() if " shadow " in line]) >= 12
        )
    finally:
        proxy.stop()


def test_post_and_cookies_are_never_shadowed(backends: list[Backend]) -> None:
    proxy = _proxy(backends, {"sample": 1.0, "rate": 1000})
    try:
        with httpx.Client() as client:
            client.post(f"{proxy.url}/upload", content=b"x" * 100)
            client.get(f"{proxy.url}/download?size=10", headers={"Cookie": "s=1"})
        time.sleep(0.3)
        assert _shadow_requests(backends) == []
    finally:
        proxy.stop()


def test_off_by_default(backends: list[Backend]) -> None:
    proxy = _proxy(backends, {})
    try:
        with httpx.Client() as client:
            for _ in range(20):
                client.get(f"{proxy.url}/download?size=10")
        time.sleep(0.2)
        assert proxy.worker is not None and proxy.worker.proxy.shadow is None
        assert _shadow_requests(backends) == []
    finally:
        proxy.stop()
