"""Tests of the proxy-exercising endpoints: slow, download, upload, status, ws."""

from __future__ import annotations

import hashlib
import time

import pytest
from starlette.testclient import TestClient

from webapp.data import BLOCK_SIZE, pattern_sha256


def test_slow_waits(client: TestClient, replica_name: str) -> None:
    start = time.monotonic()
    response = client.get("/slow?seconds=0.2")
    assert time.monotonic() - start >= 0.2
    assert response.status_code == 200
    assert response.json() == {"replica": replica_name, "slept": 0.2}


@pytest.mark.parametrize("value", ["61", "-1", "nan", "inf", "soon"])
def test_slow_validates_seconds(client: TestClient, value: str) -> None:
    response = client.get(f"/slow?seconds={value}")
    assert response.status_code == 400
    assert "seconds" in response.json()["error"]


def test_download_with_content_length(client: TestClient, replica_name: str) -> None:
    size = 3 * BLOCK_SIZE + 17
    response = client.get(f"/download?size={size}")
    assert response.status_code == 200
    assert response.headers["content-length"] == str(size)
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["x-replica"] == replica_name
    assert len(response.content) == size
    assert hashlib.sha256(response.content).hexdigest() == pattern_sha256(size)


def test_download_chunked_streams_blocks(client: TestClient) -> None:
    size = 2 * BLOCK_SIZE + 1
    with client.stream("GET", f"/download?size={size}&chunked=1") as response:
        assert response.status_code == 200
        assert "content-length" not in response.headers
        chunks = list(response.iter_raw())
    assert hashlib.sha256(b"".join(chunks)).hexdigest() == pattern_sha256(size)
    assert max(len(c) for c in chunks) <= BLOCK_SIZE


def test_download_head_and_empty(client: TestClient) -> None:
    head = client.head("/download?size=10737418240")  # 10 GiB, nothing generated
    assert head.status_code == 200
    assert head.headers["content-length"] == "10737418240"
    assert head.content == b""
    empty = client.get("/download?size=0")
    assert empty.status_code == 200
    assert empty.content == b""


@pytest.mark.parametrize("size", ["-1", "10737418241", "big"])
def test_download_validates_size(client: TestClient, size: str) -> None:
    response = client.get(f"/download?size={size}")
    assert response.status_code == 400
    assert "size" in response.json()["error"]


def test_upload_hashes_streamed_body(client: TestClient, replica_name: str) -> None:
    parts = [b"a" * 100_000, b"b" * 70_000, b"c"]
    response = client.post("/upload", content=iter(parts))
    assert response.status_code == 200
    body = b"".join(parts)
    assert response.json() == {
        "replica": replica_name,
        "bytes": len(body),
        "sha256": hashlib.sha256(body).hexdigest(),
    }
    empty = client.post("/upload", content=b"")
    assert empty.json()["bytes"] == 0
    assert empty.json()["sha256"] == hashlib.sha256(b"").hexdigest()


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (200, "200 OK\n"),
        (418, "418 I'm a Teapot\n"),
        (503, "503 Service Unavailable\n"),
        (599, "599 Unknown Status\n"),
    ],
)
def test_status_codes_with_body(client: TestClient, code: int, text: str) -> None:
    for method in ("GET", "POST"):
        response = client.request(method, f"/status/{code}", content=b"x" * 10)
        assert response.status_code == code
        assert response.text == text


@pytest.mark.parametrize("code", [204, 304])
def test_status_codes_without_body(client: TestClient, replica_name: str, code: int) -> None:
    response = client.get(f"/status/{code}")
    assert response.status_code == code
    assert response.content == b""
    assert "content-length" not in response.headers
    assert response.headers["x-replica"] == replica_name


def test_status_redirect_has_location(client: TestClient) -> None:
    response = client.get("/status/302", follow_redirects=False)
    assert response.status_code == 302
    assert response.headers["location"] == "/"


@pytest.mark.parametrize("code", ["100", "199", "600", "abc", "-200"])
def test_status_validates_code(client: TestClient, code: str) -> None:
    response = client.get(f"/status/{code}")
    assert response.status_code == 400
    assert "status code" in response.json()["error"]


def test_websocket_echo(client: TestClient, replica_name: str) -> None:
    with client.websocket_connect("/ws") as ws:
        assert (b"x-replica", replica_name.encode()) in (ws.extra_headers or [])
        ws.send_text("héllo")
        assert ws.receive_text() == "héllo"
        ws.send_bytes(b"\x00\x01\xff")
        assert ws.receive_bytes() == b"\x00\x01\xff"
        ws.send_text("")
        assert ws.receive_text() == ""
