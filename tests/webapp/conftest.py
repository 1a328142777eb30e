"""Fixtures for the demo web application tests."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.exceptions import StarletteDeprecationWarning

import webapp
from webapp.app import create_app

with warnings.catch_warnings():
    # starlette.testclient prefers the httpx2 package and warns, at import
    # time only, when it falls back to httpx.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

REPLICA = "test-replica"
SOURCE_ROOT = Path(webapp.__file__).resolve().parent.parent


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "guestbook.sqlite3")


@pytest.fixture
def replica_name() -> str:
    return REPLICA


@pytest.fixture
def app(db_path: str, replica_name: str) -> Starlette:
    return create_app(replica_name, db_path)


@pytest.fixture
def client(app: Starlette) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    """Environment for child Python processes that must import ``webapp``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(SOURCE_ROOT), env.get("PYTHONPATH", "")) if p
    )
    env.pop("PIBL_REPLICA", None)
    env.pop("PIBL_APP_DB", None)
    env.pop("PIBL_WEBAPP_RELEASE", None)
    return env
