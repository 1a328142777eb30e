"""Tests of the guestbook pages and JSON API."""

from __future__ import annotations

from starlette.testclient import TestClient


def test_form_post_redirects_and_lists_newest_first(client: TestClient, replica_name: str) -> None:
    empty = client.get("/guestbook")
    assert empty.status_code == 200
    assert "No entries yet" in empty.text
    assert '<form method="post" action="/guestbook">' in empty.text
    for name, message in [("Alice", "first!"), ("Bob", "second")]:
        response = client.post(
            "/guestbook", data={"name": name, "message": message}, follow_redirects=False
        )
        assert response.status_code == 303
        assert response.headers["location"] == "/guestbook"
        assert response.headers["x-replica"] == replica_name
    page = client.get("/guestbook")
    assert page.headers["cache-control"] == "no-store"
    assert page.text.index("second") < page.text.index("first!")
    assert f"via {replica_name}" in page.text


def test_html_output_is_escaped(client: TestClient) -> None:
    client.post(
        "/guestbook",
        data={"name": "<b>Mallory</b>", "message": '<script>alert("x")</script>'},
    )
    page = client.get("/guestbook").text
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "&lt;b&gt;Mallory&lt;/b&gt;" in page
    # The stored data itself is unchanged.
    assert client.get("/api/guestbook").json()[0]["name"] == "<b>Mallory</b>"


def test_form_validation_errors(client: TestClient) -> None:
    cases = [
        ({"name": "", "message": "hi"}, "name must not be empty"),
        ({"name": "Al", "message": "   "}, "message must not be empty"),
        ({"name": "x" * 81, "message": "hi"}, "name must be at most 80 characters"),
        ({"name": "Al", "message": "m" * 1001}, "message must be at most 1000 characters"),
        ({"message": "hi"}, "name is required"),
    ]
    for data, expected in cases:
        response = client.post("/guestbook", data=data)
        assert response.status_code == 400, data
        assert expected in response.text
    # The rejected input is shown back (escaped) so it can be corrected.
    response = client.post("/guestbook", data={"name": "<Al>", "message": ""})
    assert 'value="&lt;Al&gt;"' in response.text
    assert client.get("/api/guestbook").json() == []


def test_form_requires_urlencoded_body(client: TestClient) -> None:
    response = client.post("/guestbook", json={"name": "Al", "message": "hi"})
    assert response.status_code == 415


def test_api_create_and_list(client: TestClient, replica_name: str) -> None:
    response = client.post("/api/guestbook", json={"name": " Carol ", "message": "hello\r\nworld"})
    assert response.status_code == 201
    entry = response.json()
    assert entry["name"] == "Carol"
    assert entry["message"] == "hello\nworld"
    assert entry["replica"] == replica_name
    assert isinstance(entry["id"], int)
    client.post("/api/guestbook", json={"name": "Dave", "message": "later"})
    listing = client.get("/api/guestbook")
    assert listing.status_code == 200
    assert [e["name"] for e in listing.json()] == ["Dave", "Carol"]
    assert listing.json()[1] == entry
    assert [e["name"] for e in client.get("/api/guestbook?limit=1").json()] == ["Dave"]
    assert client.get("/api/guestbook?limit=0").status_code == 400


def test_api_create_rejects_bad_input(client: TestClient) -> None:
    malformed = client.post(
        "/api/guestbook", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert malformed.status_code == 400
    assert "valid JSON" in malformed.json()["error"]
    not_object = client.post("/api/guestbook", json=["Al", "hi"])
    assert not_object.status_code == 400
    invalid = client.post("/api/guestbook", json={"name": "", "message": 5})
    assert invalid.status_code == 422
    assert invalid.json()["fields"] == {
        "name": "name must not be empty",
        "message": "message must be a string",
    }
    too_big = client.post("/api/guestbook", content=b"x" * (65 * 1024))
    assert too_big.status_code == 413
    assert client.get("/api/guestbook").json() == []
