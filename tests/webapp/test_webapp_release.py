"""A replica on another release: /version and /about say so, nothing else changes."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
from starlette.exceptions import StarletteDeprecationWarning

import webapp
from webapp.__main__ import parse_args
from webapp.app import create_app

with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient


def _client(tmp_path: Path, name: str, release: str | None = None) -> TestClient:
    kwargs = {} if release is None else {"release": release}
    return TestClient(create_app(name, str(tmp_path / "db.sqlite3"), **kwargs))


def _without_time(page: str) -> str:
    return re.sub(r"<time>[^<]*</time>", "", page)


def test_version_is_the_package_version_by_default(tmp_path: Path) -> None:
    with _client(tmp_path, "r1") as client:
        response = client.get("/version")
    assert response.status_code == 200
    assert response.text.strip() == webapp.__version__
    assert response.headers["cache-control"] == "no-store"


def test_about_is_the_same_on_every_replica_of_a_release_but_for_the_time(
    tmp_path: Path,
) -> None:
    with _client(tmp_path, "r1") as one, _client(tmp_path, "r2") as two:
        a, b = one.get("/about"), two.get("/about")
    assert a.status_code == b.status_code == 200
    assert "r1" not in a.text and "r2" not in b.text
    assert re.search(r"<time>\d{4}-\d\d-\d\dT[^<]+</time>", a.text)
    assert _without_time(a.text) == _without_time(b.text)


def test_another_release_changes_version_and_about(tmp_path: Path) -> None:
    with _client(tmp_path, "r1") as same, _client(tmp_path, "r3", "9.9-old") as other:
        assert other.get("/version").text.strip() == "9.9-old"
        about_same, about_other = same.get("/about").text, other.get("/about").text
        assert "What is new in release 9.9-old" in about_other
        assert _without_time(about_same) != _without_time(about_other)
        # the rest of the application is unchanged
        assert same.get("/static/style.css").content == other.get("/static/style.css").content


def test_release_flag_and_environment() -> None:
    assert parse_args([], environ={}).release == webapp.__version__
    assert parse_args([], environ={"PIBL_WEBAPP_RELEASE": "2.0"}).release == "2.0"
    assert parse_args(["--release", "3.1"], environ={"PIBL_WEBAPP_RELEASE": "2.0"}).release == "3.1"


def test_bad_release_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(["--release", " bad "], environ={})
    assert exc.value.code == 2
