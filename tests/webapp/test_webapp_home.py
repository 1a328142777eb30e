"""Tests of the home page, the X-Replica header and /headers."""

from __future__ import annotations

import re

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient


def test_home_shows_replica_and_request(client: TestClient, replica_name: str) -> None:
    response = client.get(
        "/?x=1",
        headers={
            "X-Forwarded-For": "203.0.113.7",
            "Via": "1.1 pibl",
            "X-Request-ID": "req-123",
        },
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["x-replica"] == replica_name
    assert response.headers["cache-control"] == "no-store"
    page = response.text
    assert f'<strong id="replica">{replica_name}</strong>' in page
    assert '<table id="request-headers"' in page
    for name, value in [
        ("x-forwarded-for", "203.0.113.7"),
        ("via", "1.1 pibl"),
        ("x-request-id", "req-123"),
    ]:
        assert f'<th scope="row">{name}</th><td>{value}</td>' in page
    assert "<td>GET</td>" in page
    assert "<td>/?x=1</td>" in page
    assert "<td>HTTP/1.1</td>" in page
    assert "<td>testclient:50000</td>" in page


def test_home_references_assets_and_links(client: TestClient) -> None:
    page = client.get("/").text
    assert '<link rel="stylesheet" href="/static/style.css">' in page
    assert re.search(r'<img src="/static/logo.svg"', page)
    assert '<script src="/static/app.js"' in page
    assert 'id="js-status"' in page
    assert 'href="/guestbook"' in page
    assert 'href="/api/info"' in page


def test_home_escapes_header_values(client: TestClient) -> None:
    page = client.get("/", headers={"X-Evil": "<script>alert('x')</script>"}).text
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page


def test_head_on_home(client: TestClient, replica_name: str) -> None:
    response = client.head("/")
    assert response.status_code == 200
    assert response.headers["x-replica"] == replica_name
    assert response.content == b""


def test_errors_carry_replica_header(client: TestClient, replica_name: str) -> None:
    not_found = client.get("/no/such/page")
    assert not_found.status_code == 404
    assert not_found.headers["x-replica"] == replica_name
    not_allowed = client.delete("/")
    assert not_allowed.status_code == 405
    assert not_allowed.headers["x-replica"] == replica_name


def test_unhandled_exception_500_carries_replica_header(app: Starlette, replica_name: str) -> None:
    async def boom(request: Request) -> Response:
        raise RuntimeError("boom")

    app.router.routes.append(Route("/boom", boom))
    with TestClient(app, raise_server_exceptions=False) as test_client:
        response = test_client.get("/boom")
    assert response.status_code == 500
    assert response.headers["x-replica"] == replica_name


def test_headers_endpoint_lists_headers_in_order(client: TestClient) -> None:
    response = client.get(
        "/headers",
        headers=[("X-B", "2"), ("X-A", "1"), ("X-A", "again")],
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    lines = response.text.splitlines()
    assert lines[0] == "host: testserver"
    custom = [line for line in lines if line.startswith("x-")]
    assert custom == ["x-b: 2", "x-a: 1", "x-a: again"]


def test_home_lists_its_own_requests_and_who_answered(
    client: TestClient, replica_name: str
) -> None:
    """A browser shows round robin per request: the page names the replica of each one."""
    page = client.get("/").text
    requests = page[page.index('<ol id="page-requests"') : page.index("</ol>")]
    assert f'<li data-replica="{replica_name}"><code>GET /</code>' in requests
    assert f"<strong>{replica_name}</strong>" in requests
    assert '<li id="api-request"><code>GET /api/info</code>' in requests
    script = client.get("/static/app.js").text
    assert 'getElementById("api-request")' in script and "showApiReplica(info.replica)" in script
