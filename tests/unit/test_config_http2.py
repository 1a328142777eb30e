"""The HTTP/2 settings: [server] h2c, [tls] alpn and [http2], with their defaults."""

from __future__ import annotations

from typing import Any

import pytest

from pibl.config import validate
from pibl.errors import ConfigError

BACKENDS = {"backends": [{"url": "http://127.0.0.1:8001"}]}
TLS = {"cert": "c.pem", "key": "k.pem"}


def config(**sections: Any) -> Any:
    return validate({**BACKENDS, **sections}, "t.toml")


def test_defaults() -> None:
    c = config(tls=TLS)
    assert c.server.h2c is False  # prior knowledge on the plain port is opt-in
    assert c.tls is not None and c.tls.alpn == ("h2", "http/1.1")
    h = c.http2
    assert h.max_concurrent_streams == 128
    assert (h.stream_window, h.connection_window, h.stream_buffer) == (262144, 1048576, 262144)
    assert (h.max_frame_size, h.max_header_list_size, h.header_table_size) == (16384, 32768, 4096)
    assert (h.max_resets, h.reset_interval) == (200, 10.0)
    assert (h.idle_timeout, h.ping_interval, h.ping_timeout) == (75.0, 30.0, 10.0)


def test_alpn_http11_only_and_order() -> None:
    assert config(tls={**TLS, "alpn": ["http/1.1"]}).tls.alpn == ("http/1.1",)
    assert config(tls={**TLS, "alpn": ["http/1.1", "h2"]}).tls.alpn == ("http/1.1", "h2")


@pytest.mark.parametrize("alpn", [[], ["h3"], ["h2", "h2"], ["spdy/3"]])
def test_bad_alpn_lists_are_refused(alpn: list[str]) -> None:
    with pytest.raises(ConfigError, match="alpn"):
        config(tls={**TLS, "alpn": alpn})


@pytest.mark.parametrize(
    "key, value",
    [
        ("max_concurrent_streams", 0),
        ("stream_window", 1000),  # below the protocol's initial 65535
        ("stream_window", 2**31),  # above the largest window
        ("max_frame_size", 1000),
        ("max_frame_size", 2**24),
        ("header_table_size", -1),
        ("max_resets", 0),
        ("ping_timeout", 0),
        ("unknown", 1),
    ],
)
def test_bad_http2_values_are_refused(key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=f"http2.{key}"):
        config(http2={key: value})
