"""The master's plan: workers get the validated configuration as JSON, unchanged."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from pibl.config import Config, validate
from pibl.errors import ConfigError
from pibl.master import Plan, in_child, load_plan

RICH = """
[server]
port = 8080
workers = 3
trusted_proxies = ["10.0.0.0/8"]

[timeouts]
upstream_response = 12.5

[cache]
ttl = 30
targeted_field = "PIBL-Cache-Control"

[compression]
encodings = ["br", "gzip"]
min_size = 512

[health]
path = "/health"
panic_threshold = 0.3

[http2]
max_concurrent_streams = 64

[log]
file = "logs/p.log"
format = "json"

[[backends]]
url = "http://10.0.0.11:8000"
weight = 3
[[backends]]
url = "https://app.internal:8443"
discover = true

[pools.api]
maxconn = 50
maxqueue = 100
[[pools.api.backends]]
url = "http://10.0.0.21:9000"
[pools.api.health]
interval = 1.5

[pools.staging]
[[pools.staging.backends]]
url = "http://10.0.0.31:9000"

[[routes]]
name = "api"
host = "api.example.com"
path_prefix = "/v1/"
pool = "api"
cache = false
limit = { rate = 10.0, burst = 20, key = "client" }
mirror = { pool = "staging", share = 0.1 }
[routes.request_headers]
add = { "X-Env" = "prod" }
remove = ["Cookie"]

[[routes]]
name = "admin"
path_prefix = "/admin"
allow = ["10.0.0.0/8", "::1"]

[[routes]]
name = "static"
path_prefix = "/static/"
cache_ttl = 86400
"""


def rich() -> Config:
    return validate(tomllib.loads(RICH), "rich.toml")


def test_config_survives_the_trip_to_the_workers() -> None:
    config = rich()
    again = Config.model_validate_json(config.model_dump_json())
    assert again == config
    assert again.model_dump() == config.model_dump()
    assert [b.label for b in again.all_backends] == [b.label for b in config.all_backends]


def test_plan_holds_what_the_master_needs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pibl.toml").write_text(RICH.replace("discover = true\n", ""))
    plan = load_plan("pibl.toml", {"server.workers": 2})
    assert isinstance(plan, Plan)
    assert (plan.port, plan.workers, plan.tls_port) == (8080, 2, None)
    assert plan.limited and plan.discovery_interval is None
    assert plan.log_file == str(tmp_path / "logs/p.log") and plan.log_format == "json"
    assert len(plan.backends) == 4
    assert [a.role for a in plan.addresses] == ["http"]
    config = Config.model_validate_json(plan.config)
    assert config.server.workers == 2 and config.routes[0].limit is not None


def test_a_bad_file_is_refused_with_its_problems(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[server]\nport = 'x'\nworkers = 0\n")
    with pytest.raises(ConfigError) as info:
        load_plan(str(path), {})
    assert "server.port" in str(info.value) and "server.workers" in str(info.value)


def test_a_crash_in_the_child_is_an_error_here() -> None:
    def boom() -> None:
        raise RuntimeError("schema exploded")

    with pytest.raises(ConfigError, match="schema exploded"):
        in_child(boom)
    assert in_child(lambda: {"a": [1, 2]}) == {"a": [1, 2]}
