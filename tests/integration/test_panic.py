"""Passive checks never turn one bad URL into an outage (the panic threshold)."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from tests.support import Backend, ProxyThread


def test_one_backend_and_a_url_that_drops_connections(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    proxy = make_proxy(backends[:1], retries={"tries": 1})
    with httpx.Client(base_url=proxy.url, timeout=5) as client:
        assert [client.get("/drop").status_code for _ in range(4)] == [502] * 4
        # the backend was ejected (3 failures), but it is the only one: the rest of the
        # site keeps answering
        assert [client.get(f"/ok{i}").status_code for i in range(5)] == [200] * 5
    log = "\n".join(proxy.stream.getvalue().splitlines())
    assert "ejected" in log
    assert log.count("balancer panic:") == 1
    assert proxy.worker is not None and proxy.worker.proxy.balancer.panicking


def test_a_poisoned_url_never_empties_the_rotation(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    proxy = make_proxy(backends, health={"enabled": False, "max_fails": 1})
    with httpx.Client(base_url=proxy.url, timeout=5) as client:
        for _ in range(10):
            assert client.get("/drop").status_code in (502, 503)
        answers = [client.get(f"/page{i}") for i in range(6)]
    assert [r.status_code for r in answers] == [200] * 6
    assert {r.headers["x-backend"] for r in answers} == {"b1", "b2", "b3"}


def test_without_the_panic_threshold_the_service_empties(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    """What the threshold prevents (and what this test would see without it)."""
    proxy = make_proxy(
        backends[:1], retries={"tries": 1}, health={"enabled": False, "panic_threshold": 0}
    )
    with httpx.Client(base_url=proxy.url, timeout=5) as client:
        for _ in range(3):
            client.get("/drop")
        assert client.get("/ok").status_code == 503


def test_the_panic_shows_on_the_status_api_and_in_pibl_status(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread]
) -> None:
    from pibl.observe.admin import format_status
    from tests.support import free_port

    admin = free_port()
    proxy = make_proxy(
        backends[:1], retries={"tries": 1}, admin={"port": admin, "host": "127.0.0.1"}
    )
    status = httpx.get(f"http://127.0.0.1:{admin}/api/status", timeout=5).json()
    assert status["panic"] == 0
    assert "PANIC" not in format_status(status)
    with httpx.Client(base_url=proxy.url, timeout=5) as client:
        for _ in range(4):
            client.get("/drop")
        client.get("/ok")
    status = httpx.get(f"http://127.0.0.1:{admin}/api/status", timeout=5).json()
    assert status["panic"] == 1
    assert "balancer     PANIC" in format_status(status)
    page = httpx.get(f"http://127.0.0.1:{admin}/", timeout=5).text
    assert 'id="panic"' in page and '$("panic").hidden = !s.panic' in page
