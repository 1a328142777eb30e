"""One active health probe against real sockets: a connect by default, GET <path> when set."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from pibl.balance.checker import probe_once
from pibl.config import BackendConfig
from tests.support import Backend, free_port, start_backend


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """Accepts connections and never says a word (not HTTP at all)."""
    sock = socket.create_server(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


async def test_without_a_path_a_connect_is_enough(silent_listener: int) -> None:
    backend = BackendConfig(url=f"http://127.0.0.1:{silent_listener}")
    assert await probe_once(backend, None, 1.0, (200, 399)) == (True, "connected")


async def test_without_a_path_a_refused_connect_is_down() -> None:
    backend = BackendConfig(url=f"http://127.0.0.1:{free_port()}")
    ok, reason = await probe_once(backend, None, 1.0, (200, 399))
    assert (not ok and "refused" in reason.lower()) or "failed" in reason.lower()


async def test_with_a_path_the_status_decides() -> None:
    b: Backend = start_backend("b")
    try:
        backend = BackendConfig(url=b.url)
        assert await probe_once(backend, "/status?code=404", 1.0, (200, 399)) == (
            False,
            "status 404",
        )
        assert await probe_once(backend, "/health", 1.0, (200, 399)) == (True, "status 200")
    finally:
        b.stop()


async def test_with_a_path_a_silent_server_times_out(silent_listener: int) -> None:
    backend = BackendConfig(url=f"http://127.0.0.1:{silent_listener}")
    assert await probe_once(backend, "/health", 0.3, (200, 399)) == (False, "timed out")
