"""Configuration work for the master, done in a child process (see ``pibl.master``).

Validating a configuration needs the schema library and the proxy's own checks, which
the master never imports. These functions run in a child forked for the purpose and
return a JSON-able plan: the effective configuration for the workers and the few values
the master uses.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pibl.config import Config, read_config, resolve_path, validate
from pibl.discovery import Watcher, expanded_config, make_resolver, needs_discovery
from pibl.errors import ConfigError
from pibl.ports import config_addresses


def load_checked(path: str, overrides: dict[str, Any] | None = None) -> Config:
    """The validated config, its files checked too; every problem in one ConfigError."""
    from pibl.preflight import raw_problems
    from pibl.proxy.server import validate_runtime

    data = read_config(path, overrides)
    try:
        config = validate(data, path)
    except ConfigError as exc:
        raise ConfigError("\n".join([str(exc), *raw_problems(data, path)])) from None
    validate_runtime(config, path)
    return config


class _Lines:
    """Log lines collected for the master, which writes them to its own log."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def info(self, text: str) -> None:
        self.lines.append(("info", text))

    def warning(self, text: str) -> None:
        self.lines.append(("warning", text))


def _watcher(configured: Config) -> Watcher:
    d = configured.discovery
    return Watcher(make_resolver(d.nameservers, d.timeout).resolve, d.interval)


def _discovers(config: Config) -> bool:
    return any(needs_discovery(b) for b in config.backends)


def _plan(
    configured: Config,
    effective: Config,
    lines: _Lines,
    discovered: dict[str, list[str]],
) -> dict[str, Any]:
    tls = effective.tls if effective.tls is not None and effective.tls.enabled else None
    log = effective.log
    return {
        "config": effective.model_dump_json(),
        "configured": configured.model_dump_json(),
        "host": effective.server.host,
        "port": effective.server.port,
        "tls_port": tls.port if tls else None,
        "workers": effective.server.workers,
        "backlog": effective.server.listen_backlog,
        "addresses": [[a.host, a.port, a.role] for a in config_addresses(effective)],
        "backends": [b.label for b in effective.all_backends],
        "limited": any(r.limit is not None for r in effective.routes),
        "consistency": effective.consistency.enabled,
        "verifies_return": effective.consistency.verifies_return,
        "shutdown": effective.timeouts.shutdown,
        "log_file": str(resolve_path(log.file)) if log.file else None,
        "log_stdout": log.stdout,
        "log_format": log.format,
        "discovery_interval": configured.discovery.interval if _discovers(configured) else None,
        "discovered": discovered,
        "messages": lines.lines,
    }


def plan(path: str, overrides: dict[str, Any], *, announce: bool = False) -> dict[str, Any]:
    """Start and reload: the file validated and its discovered backends resolved.

    ``announce`` (at start) adds one line per backend, reachable or not, and the route
    warnings.
    """
    from pibl.routes import route_warnings

    configured = load_checked(path, overrides)
    lines = _Lines()
    effective, discovered = configured, {}
    if _discovers(configured):
        watcher = _watcher(configured)
        expansion = watcher.check(configured.backends, force=True)
        assert expansion is not None  # force: always an expansion
        lines.info(f"discovery: {expansion.summary()}")
        effective, discovered = expanded_config(configured, expansion), watcher.addresses
    if announce:
        from pibl.proxy.server import announce_backends

        asyncio.run(announce_backends(effective, lines))
        for warning in route_warnings(effective):
            lines.warning(warning)
    return _plan(configured, effective, lines, discovered)


def rediscover(configured_json: str, previous: dict[str, list[str]]) -> dict[str, Any] | None:
    """A new plan if DNS now gives other addresses than ``previous``; else None.

    A host that fails to resolve keeps its last known addresses, which is no change.
    """
    configured = Config.model_validate_json(configured_json)
    watcher = _watcher(configured)
    watcher.addresses = {host: list(addrs) for host, addrs in previous.items()}
    watcher.checked = True
    expansion = watcher.check(configured.backends)
    if expansion is None:
        return None
    lines = _Lines()
    lines.info(f"discovery: {expansion.summary()}")
    effective = expanded_config(configured, expansion)
    return _plan(configured, effective, lines, watcher.addresses)
