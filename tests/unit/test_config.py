"""Configuration: TOML -> validated, frozen Config; errors name file, key path and problem."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from pibl.config import (
    BackendConfig,
    Config,
    load_config,
    resolve_path,
    validate,
)
from pibl.errors import ConfigError

MINIMAL = '[[backends]]\nurl = "http://127.0.0.1:9001"\n'


def write(tmp_path: Path, text: str, name: str = "pibl.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(data: dict[str, Any], source: str = "site.toml") -> str:
    with pytest.raises(ConfigError) as info:
        validate(data, source)
    return str(info.value)


def one_backend(**extra: Any) -> dict[str, Any]:
    return {"backends": [{"url": "http://127.0.0.1:9001"}], **extra}


# -- valid files ----------------------------------------------------------------------


def test_minimal_file_uses_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    assert config.server.port == 8080
    assert config.server.host == "0.0.0.0"
    assert config.server.via == "pibl"
    assert config.limits.max_head_bytes == 32 * 1024
    assert config.limits.max_target_bytes == 8 * 1024
    assert config.limits.max_headers == 100
    assert len(config.backends) == 1
    backend = config.backends[0]
    assert backend.url == "http://127.0.0.1:9001"
    assert backend.weight == 1
    assert backend.host == "127.0.0.1"
    assert backend.port == 9001
    assert backend.label == "127.0.0.1:9001"


def test_full_file(tmp_path: Path) -> None:
    text = """
[server]
host = "127.0.0.1"
port = 8181
via = "edge"
workers = 2

[timeouts]
client_header = 2.5
upstream_connect = 1

[limits]
max_head_bytes = 4096
max_headers = 20

[upstream]
pool_idle_max = 0
retry_reused = false

[log]
file = ""
format = "json"

[[backends]]
url = "http://a.internal:8000"
name = "a"
weight = 5

[[backends]]
url = "https://b.internal"
"""
    config = load_config(write(tmp_path, text))
    assert config.server.port == 8181
    assert config.server.via == "edge"
    assert config.timeouts.client_header == 2.5
    assert config.timeouts.upstream_connect == 1.0
    assert config.limits.max_headers == 20
    assert config.upstream.retry_reused is False
    assert config.log.format == "json"
    assert [b.label for b in config.backends] == ["a", "b.internal:443"]
    assert [b.weight for b in config.backends] == [5, 1]
    assert config.backends[1].scheme == "https"


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    with pytest.raises(ValidationError):
        config.server.port = 1


def test_default_port_for_http_backend_without_port() -> None:
    backend = BackendConfig(url="http://example.com")
    assert backend.port == 80
    assert backend.label == "example.com:80"


def test_validate_returns_config() -> None:
    config = validate(one_backend(), "x.toml")
    assert isinstance(config, Config)
    assert config.server.port == 8080


# -- overrides ------------------------------------------------------------------------


def test_override_applied(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL), {"server.port": 9000})
    assert config.server.port == 9000


def test_override_replaces_file_value(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 1234\nvia = 'x'\n" + MINIMAL)
    config = load_config(path, {"server.port": 9000, "log.verbose": True})
    assert config.server.port == 9000
    assert config.server.via == "x"  # untouched siblings stay
    assert config.log.verbose is True


def test_override_is_validated(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError) as info:
        load_config(path, {"server.port": 70000})
    assert str(path) in str(info.value)
    assert "server.port" in str(info.value)


def test_override_unknown_key_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"server\.prot: unknown key"):
        load_config(write(tmp_path, MINIMAL), {"server.prot": 1})


def test_override_into_non_table(tmp_path: Path) -> None:
    path = write(tmp_path, "server = 3\n" + MINIMAL)
    with pytest.raises(ConfigError, match="server: must be a table"):
        load_config(path, {"server.port": 9000})


# -- errors ---------------------------------------------------------------------------


def test_unknown_key_names_file_path_and_problem(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nprot = 8080\n" + MINIMAL, name="mysite.toml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "mysite.toml" in message
    assert "server.prot" in message
    assert "unknown key" in message


def test_unknown_top_level_key() -> None:
    message = config_error(one_backend(bogus=1))
    assert "site.toml: bogus: unknown key" in message


def test_unknown_key_inside_backend_names_index() -> None:
    message = config_error(
        {"backends": [{"url": "http://a:1"}, {"url": "http://b:1", "wieght": 2}]}
    )
    assert "site.toml: backends[1].wieght: unknown key" in message


def test_single_bad_backend_gives_one_error_line() -> None:
    message = config_error({"backends": [{"url": "http://a:1", "wieght": 2}]})
    assert message.splitlines() == ["site.toml: backends[0].wieght: unknown key"]


def test_bad_url_scheme_names_backend_url() -> None:
    message = config_error({"backends": [{"url": "http://a:1"}, {"url": "ftp://b"}]})
    assert "site.toml: backends[1].url:" in message
    assert "http://" in message


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("ftp://host", "must start with http:// or https://"),
        ("host:80", "must start with http:// or https://"),
        ("http://", "has no host"),
        ("http://host:99999", "invalid port"),
        ("http://host/path", "must not have a path, query or fragment"),
        ("http://host/?q=1", "must not have a path, query or fragment"),
        ("http://host/#frag", "must not have a path, query or fragment"),
    ],
)
def test_bad_backend_urls(url: str, problem: str) -> None:
    message = config_error({"backends": [{"url": "http://ok:1"}, {"url": url}]})
    assert "backends[1].url" in message
    assert problem in message


@pytest.mark.parametrize("url", ["http://h", "https://h:8443", "http://h/", "http://[::1]:81"])
def test_good_backend_urls(url: str) -> None:
    assert validate({"backends": [{"url": url}]}, "x").backends[0].url == url


def test_missing_backends() -> None:
    message = config_error({})
    assert "site.toml: backends:" in message
    assert "required" in message.lower()


def test_empty_backends() -> None:
    message = config_error({"backends": []})
    assert "site.toml: backends:" in message


@pytest.mark.parametrize("port", [0, -1, 65536, 70000])
def test_port_out_of_range(port: int) -> None:
    message = config_error(one_backend(server={"port": port}))
    assert "site.toml: server.port:" in message


@pytest.mark.parametrize("port", [1, 80, 65535])
def test_port_in_range(port: int) -> None:
    assert validate(one_backend(server={"port": port}), "x").server.port == port


def test_wrong_type_is_reported() -> None:
    message = config_error(one_backend(server={"port": "eighty"}))
    assert "server.port" in message


def test_duplicate_backend_names() -> None:
    message = config_error(
        {"backends": [{"url": "http://a:1", "name": "x"}, {"url": "http://b:1", "name": "x"}]}
    )
    assert "site.toml" in message
    assert "'x'" in message
    assert "twice" in message


def test_duplicate_backend_urls_without_names() -> None:
    message = config_error({"backends": [{"url": "http://a:1"}, {"url": "http://a:1"}]})
    assert "'a:1'" in message
    assert "twice" in message


def test_same_host_different_names_is_fine() -> None:
    config = validate(
        {"backends": [{"url": "http://a:1", "name": "one"}, {"url": "http://a:1", "name": "two"}]},
        "x",
    )
    assert [b.label for b in config.backends] == ["one", "two"]


@pytest.mark.parametrize("weight", [0, -1, 1001])
def test_weight_bounds(weight: int) -> None:
    message = config_error({"backends": [{"url": "http://a:1", "weight": weight}]})
    assert "backends[0].weight" in message


def test_log_format_choices() -> None:
    message = config_error(one_backend(log={"format": "xml"}))
    assert "log.format" in message


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("timeouts", "client_header", 0),
        ("timeouts", "upstream_response", -1.0),
        ("limits", "max_head_bytes", 10),
        ("limits", "max_headers", 1),
        ("limits", "max_target_bytes", 5),
        ("server", "workers", 0),
    ],
)
def test_limits_and_timeouts_bounds(section: str, key: str, value: float) -> None:
    message = config_error(one_backend(**{section: {key: value}}))
    assert f"{section}.{key}" in message


def test_several_errors_are_all_reported() -> None:
    message = config_error(one_backend(server={"port": 0, "prot": 1}))
    assert "server.port" in message
    assert "server.prot: unknown key" in message
    assert len(message.splitlines()) == 2


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[server\nport = 1\n", name="broken.toml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(str(path))
    assert "invalid TOML" in message


def test_file_not_found(tmp_path: Path) -> None:
    path = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: file not found"


def test_directory_cannot_be_read(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_resolve_path() -> None:
    base = Path("/srv/pibl")
    assert resolve_path("logs/a.log", base) == base / "logs/a.log"
    assert resolve_path("/var/log/a.log", base) == Path("/var/log/a.log")
    assert resolve_path("a.log") == Path.cwd() / "a.log"


def test_redis_url_is_checked() -> None:
    with pytest.raises(ConfigError) as raised:
        validate(
            {"backends": [{"url": "http://a:1"}], "cache": {"redis_url": "localhost:6379"}},
            "x.toml",
        )
    assert "x.toml: cache.redis_url: must be a redis://" in str(raised.value)
    config = validate(
        {"backends": [{"url": "http://a:1"}], "cache": {"redis_url": "rediss://r:6380/1"}}, "x.toml"
    )
    assert config.cache.redis_url == "rediss://r:6380/1"


# -- defaults a new user meets ---------------------------------------------------------


def test_health_checks_connect_unless_a_path_is_configured() -> None:
    assert validate(one_backend(), "t").health.path is None
    assert validate(one_backend(health={"path": "/health"}), "t").health.path == "/health"
    assert "health.path" in config_error(one_backend(health={"path": "health"}))


def test_listen_backlog_defaults_to_somaxconn() -> None:
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    assert validate(one_backend(), "t").server.listen_backlog == somaxconn
    assert validate(one_backend(server={"backlog": 512}), "t").server.listen_backlog == 512
    assert "server.backlog" in config_error(one_backend(server={"backlog": 0}))
