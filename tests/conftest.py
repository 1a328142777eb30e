"""Shared fixtures: three real backends on loopback and a PIBL worker in front of them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import settings

from tests.support import Backend, ProxyThread, start_backend

# Property tests must not fail on a busy machine because one example was slow.
settings.register_profile("pibl", deadline=None)
settings.load_profile("pibl")


@pytest.fixture
def backends() -> Iterator[list[Backend]]:
    started = [start_backend(f"b{i}") for i in (1, 2, 3)]
    yield started
    for b in started:
        b.stop()


@pytest.fixture
def make_proxy() -> Iterator[Callable[..., ProxyThread]]:
    proxies: list[ProxyThread] = []

    def factory(backends: list[Any], **sections: Any) -> ProxyThread:
        entries = [
            b if isinstance(b, dict) else {"url": b if isinstance(b, str) else b.url}
            for b in backends
        ]
        settings: dict[str, Any] = {"backends": entries, **sections}
        log_path = sections.pop("log_path", None)
        settings.pop("log_path", None)
        proxy = ProxyThread(settings, log_path=log_path)
        proxies.append(proxy)
        return proxy

    yield factory
    for p in proxies:
        p.stop()


@pytest.fixture
def proxy(backends: list[Backend], make_proxy: Callable[..., ProxyThread]) -> ProxyThread:
    return make_proxy(backends)
