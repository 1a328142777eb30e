"""Tests of the JSON API and the health check."""

from __future__ import annotations

import os
from datetime import datetime
from email.utils import parsedate_to_datetime
from pathlib import Path

from starlette.testclient import TestClient

from webapp.app import create_app


def test_info(client: TestClient, replica_name: str) -> None:
    first = client.get("/api/info")
    assert first.status_code == 200
    data = first.json()
    assert data["replica"] == replica_name
    assert data["pid"] == os.getpid()
    assert datetime.fromisoformat(data["started"]) <= datetime.fromisoformat(data["time"])
    assert first.headers["cache-control"] == "no-store"
    second = client.get("/api/info").json()
    assert second["requests_served"] == data["requests_served"] + 1


def test_echo_preserves_header_order_and_repeats(client: TestClient, replica_name: str) -> None:
    response = client.get(
        "/api/echo?a=1&a=2&b=x%20y",
        headers=[("X-Forwarded-For", "198.51.100.1"), ("X-Dup", "one"), ("X-Dup", "two")],
    )
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    data = response.json()
    assert data["replica"] == replica_name
    assert data["method"] == "GET"
    assert data["path"] == "/api/echo"
    assert data["query"] == "a=1&a=2&b=x%20y"
    assert data["query_params"] == [["a", "1"], ["a", "2"], ["b", "x y"]]
    assert data["client"] == "testclient:50000"
    custom = [pair for pair in data["headers"] if pair[0].startswith("x-")]
    assert custom == [["x-forwarded-for", "198.51.100.1"], ["x-dup", "one"], ["x-dup", "two"]]


def test_cacheable(client: TestClient) -> None:
    first = client.get("/api/cacheable?ttl=30")
    second = client.get("/api/cacheable?ttl=30")
    assert first.status_code == 200
    assert first.headers["cache-control"] == "public, max-age=30"
    assert first.headers["etag"].startswith('"')
    assert parsedate_to_datetime(first.headers["last-modified"]) is not None
    assert first.json()["ttl"] == 30
    assert first.json()["nonce"] != second.json()["nonce"]
    assert first.headers["etag"] != second.headers["etag"]
    default = client.get("/api/cacheable")
    assert default.headers["cache-control"] == "public, max-age=60"


def test_cacheable_rejects_bad_ttl(client: TestClient) -> None:
    for value in ("abc", "-1", "999999999"):
        response = client.get(f"/api/cacheable?ttl={value}")
        assert response.status_code == 400
        assert "ttl" in response.json()["error"]


def test_health_ok(client: TestClient, replica_name: str) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "replica": replica_name}
    assert response.headers["cache-control"] == "no-store"


def test_health_503_when_database_cannot_be_opened(tmp_path: Path) -> None:
    app = create_app("broken", str(tmp_path / "missing-dir" / "db.sqlite3"))
    with TestClient(app) as client:
        response = client.get("/health")
        assert response.status_code == 503
        assert response.json()["status"] == "unavailable"
        assert response.headers["x-replica"] == "broken"
        # Guestbook endpoints report the database problem as 503 as well.
        listing = client.get("/api/guestbook")
        assert listing.status_code == 503
        assert listing.json()["error"] == "database unavailable"
        # Once the directory exists the replica recovers without a restart.
        (tmp_path / "missing-dir").mkdir()
        assert client.get("/health").status_code == 200
