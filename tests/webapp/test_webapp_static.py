"""Tests of static assets: content, caching headers and conditional requests."""

from __future__ import annotations

import hashlib
from email.utils import formatdate, parsedate_to_datetime

import pytest
from starlette.testclient import TestClient

from webapp.static import STATIC_DIR

ASSETS = [
    ("style.css", "text/css"),
    ("logo.svg", "image/svg+xml"),
    ("app.js", "javascript"),
]


@pytest.mark.parametrize(("name", "media_type"), ASSETS)
def test_asset_served_with_cache_headers(
    client: TestClient, replica_name: str, name: str, media_type: str
) -> None:
    response = client.get(f"/static/{name}")
    content = (STATIC_DIR / name).read_bytes()
    assert response.status_code == 200
    assert response.content == content
    assert media_type in response.headers["content-type"]
    assert response.headers["cache-control"] == "public, max-age=3600"
    assert response.headers["etag"] == '"' + hashlib.sha256(content).hexdigest()[:32] + '"'
    assert parsedate_to_datetime(response.headers["last-modified"]) is not None
    assert response.headers["x-replica"] == replica_name


@pytest.mark.parametrize(("name", "media_type"), ASSETS)
def test_if_none_match_gives_304(
    client: TestClient, replica_name: str, name: str, media_type: str
) -> None:
    etag = client.get(f"/static/{name}").headers["etag"]
    response = client.get(f"/static/{name}", headers={"If-None-Match": etag})
    assert response.status_code == 304
    assert response.content == b""
    assert response.headers["etag"] == etag
    assert response.headers["cache-control"] == "public, max-age=3600"
    assert response.headers["x-replica"] == replica_name
    other = client.get(f"/static/{name}", headers={"If-None-Match": '"something-else"'})
    assert other.status_code == 200


def test_if_modified_since(client: TestClient) -> None:
    last_modified = client.get("/static/style.css").headers["last-modified"]
    fresh = client.get("/static/style.css", headers={"If-Modified-Since": last_modified})
    assert fresh.status_code == 304
    old = client.get("/static/style.css", headers={"If-Modified-Since": formatdate(0, usegmt=True)})
    assert old.status_code == 200
    assert old.content == (STATIC_DIR / "style.css").read_bytes()


def test_css_styles_replica_element(client: TestClient) -> None:
    css = client.get("/static/style.css").text
    assert "#replica {" in css
    assert "color: rgb(0, 102, 204);" in css


def test_script_marks_page_as_loaded(client: TestClient) -> None:
    script = client.get("/static/app.js").text
    assert 'setAttribute("data-js", "loaded")' in script
    assert '"script loaded"' in script
    assert 'getElementById("js-status")' in script


def test_missing_asset_is_404_with_replica(client: TestClient, replica_name: str) -> None:
    response = client.get("/static/missing.css")
    assert response.status_code == 404
    assert response.headers["x-replica"] == replica_name
    assert "cache-control" not in response.headers
