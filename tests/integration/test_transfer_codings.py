"""Backend bodies delimited by close, and transfer codings other than chunked (RFC 9112 6.3)."""

from __future__ import annotations

import gzip
import socket
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import ProxyThread, RawServer, raw_request

BODY = b"".join(b"line %d of a body coded for transport\n" % i for i in range(3000))


def raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-15)
    return c.compress(data) + c.flush()


def chunked(data: bytes, size: int = 7000) -> bytes:
    parts = [
        b"%x\r\n%s\r\n" % (len(data[i : i + size]), data[i : i + size])
        for i in range(0, len(data), size)
    ]
    return b"".join(parts) + b"0\r\n\r\n"


CASES = {
    "gzip-until-close": (b"gzip", gzip.compress(BODY), False),
    "gzip-chunked": (b"gzip, chunked", chunked(gzip.compress(BODY)), True),
    "two-gzip-members": (b"gzip", gzip.compress(BODY[:5000]) + gzip.compress(BODY[5000:]), False),
    "deflate-zlib": (b"deflate", zlib.compress(BODY), False),
    "deflate-raw-chunked": (b"deflate, chunked", chunked(raw_deflate(BODY)), True),
    "no-length-no-coding": (b"", BODY, False),
}


def origin(te: bytes, payload: bytes, keep_open: bool, cache: str = "") -> RawServer:
    def handle(conn: socket.socket) -> None:
        conn.recv(65536)
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
        if te:
            head += b"Transfer-Encoding: " + te + b"\r\n"
        if cache:
            head += b"Cache-Control: " + cache.encode() + b"\r\n"
        conn.sendall(head + b"\r\n" + payload)
        if not keep_open:
            conn.shutdown(socket.SHUT_WR)

    return RawServer(handle)


@pytest.fixture
def servers() -> Iterator[list[RawServer]]:
    made: list[RawServer] = []
    yield made
    for s in made:
        s.close()


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_body_arrives_decoded_with_framing_the_client_can_trust(
    make_proxy: Callable[..., ProxyThread], servers: list[RawServer], case: str
) -> None:
    te, payload, keep_open = CASES[case]
    servers.append(origin(te, payload, keep_open))
    proxy = make_proxy([servers[-1].url])
    r = httpx.get(proxy.url + "/x", headers={"Accept-Encoding": "identity"}, timeout=5)
    assert r.status_code == 200
    assert r.content == BODY
    assert "transfer-encoding" not in r.headers or r.headers["transfer-encoding"] == "chunked"
    # an HTTP/1.0 client gets the body delimited by close
    raw = raw_request(proxy.port, b"GET /y HTTP/1.0\r\nAccept-Encoding: identity\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"chunked" not in head.lower()
    assert body == BODY


def test_a_transfer_coding_cut_short_is_not_delivered_as_whole(
    make_proxy: Callable[..., ProxyThread], servers: list[RawServer]
) -> None:
    servers.append(origin(b"gzip", gzip.compress(BODY)[:-20], False))
    proxy = make_proxy([servers[-1].url])
    with pytest.raises(httpx.HTTPError):
        httpx.get(proxy.url + "/x", headers={"Accept-Encoding": "identity"}, timeout=5)
    raw = raw_request(proxy.port, b"GET /y HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200")
    assert not raw.endswith(b"0\r\n\r\n")  # no last chunk: the client can tell it was cut


def test_a_body_delimited_by_close_may_be_stored(
    make_proxy: Callable[..., ProxyThread], servers: list[RawServer], tmp_path: Path
) -> None:
    servers.append(origin(b"gzip", gzip.compress(BODY), False, cache="max-age=60"))
    proxy = make_proxy([servers[-1].url], cache={"dir": str(tmp_path / "cache"), "ttl": 60})
    with httpx.Client(base_url=proxy.url, timeout=5) as client:
        first = client.get("/c", headers={"Accept-Encoding": "identity"})
        assert "stored" in first.headers["cache-status"]
        for _ in range(50):
            second = client.get("/c", headers={"Accept-Encoding": "identity"})
            if second.headers["cache-status"].startswith("pibl; hit"):
                break
    assert second.headers["cache-status"].startswith("pibl; hit")
    assert second.content == first.content == BODY
    assert second.headers["content-length"] == str(len(BODY))
    assert servers[-1].accepted == 1
