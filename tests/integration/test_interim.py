"""Interim 1xx responses from a backend (RFC 9110 section 15.2)."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import ProxyThread, RawServer, raw_request

HINTS = (
    b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload; as=style\r\n"
    b"Connection: X-Secret\r\nX-Secret: no\r\n\r\n"
    b"HTTP/1.1 102 Processing\r\n\r\n"
)
FINAL = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nCache-Control: max-age=60\r\n\r\nhello"


@pytest.fixture
def hinting_origin() -> Iterator[RawServer]:
    def handle(conn: socket.socket) -> None:
        while conn.recv(65536):
            conn.sendall(HINTS + FINAL)

    server = RawServer(handle)
    yield server
    server.close()


def test_103_reaches_http11_clients_before_the_final_response(
    make_proxy: Callable[..., ProxyThread], hinting_origin: RawServer
) -> None:
    proxy = make_proxy([hinting_origin.url])
    raw = raw_request(proxy.port, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    first, _, rest = raw.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 103 Early Hints\r\n")
    assert b"Link: </style.css>; rel=preload; as=style" in first
    assert b"X-Secret" not in first  # named by Connection: hop-by-hop
    second, _, final = rest.partition(b"\r\n\r\n")
    assert second == b"HTTP/1.1 102 Processing"
    assert final.startswith(b"HTTP/1.1 200 OK\r\n")
    assert final.endswith(b"\r\n\r\nhello")


def test_http10_clients_never_see_interim_responses(
    make_proxy: Callable[..., ProxyThread], hinting_origin: RawServer
) -> None:
    proxy = make_proxy([hinting_origin.url])
    raw = raw_request(proxy.port, b"GET / HTTP/1.0\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"103" not in raw.split(b"\r\n", 1)[0]


def test_interim_responses_are_never_stored(
    make_proxy: Callable[..., ProxyThread], hinting_origin: RawServer, tmp_path: Path
) -> None:
    proxy = make_proxy([hinting_origin.url], cache={"dir": str(tmp_path / "c"), "ttl": 60})
    request = b"GET /c HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    assert raw_request(proxy.port, request).startswith(b"HTTP/1.1 103")
    for _ in range(50):
        hit = raw_request(proxy.port, request)
        if b"pibl; hit" in hit:
            break
    assert hit.startswith(b"HTTP/1.1 200 OK\r\n")  # the hit is the final response alone
    assert hit.endswith(b"hello")
