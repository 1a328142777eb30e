"""Tests of the command line parsing."""

from __future__ import annotations

import pytest

from webapp.__main__ import parse_args


def test_defaults() -> None:
    args = parse_args([], environ={})
    assert args.name == "replica-8001"
    assert args.port == 8001
    assert args.host == "127.0.0.1"
    assert args.db == "./guestbook.sqlite3"
    assert args.access_log is False


def test_environment_fallbacks() -> None:
    env = {"PIBL_REPLICA": "from-env", "PIBL_APP_DB": "/tmp/shared.sqlite3"}
    args = parse_args(["--port", "8002"], environ=env)
    assert args.name == "from-env"
    assert args.db == "/tmp/shared.sqlite3"
    assert args.port == 8002


def test_options_override_environment() -> None:
    env = {"PIBL_REPLICA": "from-env", "PIBL_APP_DB": "/tmp/env.sqlite3"}
    args = parse_args(
        ["--name", "replica-1", "--db", "x.db", "--host", "0.0.0.0", "--access-log"],
        environ=env,
    )
    assert (args.name, args.db, args.host, args.access_log) == (
        "replica-1",
        "x.db",
        "0.0.0.0",
        True,
    )


@pytest.mark.parametrize("argv", [["--name", "bad\nname"], ["--name", ""], ["--port", "70000"]])
def test_invalid_arguments_exit(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        parse_args(argv, environ={})
    assert excinfo.value.code == 2
    assert "error:" in capsys.readouterr().err
