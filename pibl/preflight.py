"""Checks of what a configuration names outside itself: certificates, keys, CA files, packages.

The schema (``pibl.config``) checks the file's own values; these checks open the files it
names. Both report in one form, ``<config file>: <key path>: <problem>``, and ``pibl
check-config`` reports every problem of both kinds in one run: when the schema refuses the
file, the sections that are valid on their own still have their files checked, so a missing
certificate is not discovered only after every other error was fixed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from pibl.config import BackendConfig, Config, TLSConfig, resolve_path
from pibl.tls import CertPair, ReloadableServerContext, TLSConfigError
from pibl.tls import _check_private_key as check_private_key

__all__ = ["config_problems", "raw_problems"]


def _tls_problems(tls: TLSConfig, source: str) -> list[str]:
    """Each certificate pair checked on its own, so every bad file is named."""
    pairs: list[tuple[str, str, str, tuple[str, ...]]] = [("tls", tls.cert, tls.key, ())]
    pairs += [
        (f"tls.certificates[{i}]", c.cert, c.key, tuple(c.names))
        for i, c in enumerate(tls.certificates)
    ]
    problems = []
    for prefix, cert, key, names in pairs:
        pair = CertPair(resolve_path(cert), resolve_path(key), names)
        try:
            ReloadableServerContext([pair])
        except TLSConfigError as exc:
            if "server name" in exc.problem:
                where, value = "names", ", ".join(names)
            elif exc.path == pair.key:
                where, value = "key", key
            else:
                where, value = "cert", cert
            problems.append(f"{source}: {prefix}.{where}: {value}: {exc.problem}")
            if where == "cert":  # the key was not looked at yet: say what is wrong with it too
                try:
                    check_private_key(pair.key)
                except TLSConfigError as key_exc:
                    problems.append(f"{source}: {prefix}.key: {key}: {key_exc.problem}")
    if not problems and tls.certificates:  # what only shows with all pairs together
        from pibl.proxy.server import make_tls

        try:
            make_tls(tls)
        except TLSConfigError as exc:
            problems.append(f"{source}: tls.certificates: {exc}")
    return problems


def _backend_problems(index: int, backend: BackendConfig, source: str) -> list[str]:
    from pibl.proxy.upstream import upstream_tls

    try:
        upstream_tls(backend)
    except TLSConfigError as exc:
        named = {
            "ca_file": backend.ca_file,
            "client_cert": backend.client_cert,
            "client_key": backend.client_key,
        }
        for where, value in named.items():
            if value is not None and resolve_path(value) == exc.path:
                return [f"{source}: backends[{index}].{where}: {value}: {exc.problem}"]
        return [f"{source}: backends[{index}]: {exc}"]
    return []


def config_problems(config: Config, source: str) -> list[str]:
    """Every problem with the files and packages a valid configuration needs."""
    problems = []
    if config.cache.enabled and config.cache.store == "redis":
        try:
            import redis  # noqa: F401
        except ImportError:
            problems.append(
                f'{source}: cache.store: "redis" needs the redis package '
                '(pip install "pibl[redis]")'
            )
    if config.tls is not None and config.tls.enabled:
        problems += _tls_problems(config.tls, source)
    for index, backend in enumerate(config.backends):
        problems += _backend_problems(index, backend, source)
    return problems


def _section(model: Callable[[Any], Any], data: object) -> Any | None:
    try:
        return model(data)
    except (ValidationError, TypeError, ValueError):
        return None  # the schema's own message already says what is wrong


def raw_problems(data: dict[str, Any], source: str) -> list[str]:
    """The file checks of the sections that are valid on their own, for a refused config."""
    problems = []
    tls = _section(TLSConfig.model_validate, data.get("tls"))
    if isinstance(tls, TLSConfig) and tls.enabled:
        problems += _tls_problems(tls, source)
    backends = data.get("backends")
    if isinstance(backends, list):
        for index, raw in enumerate(backends):
            backend = _section(BackendConfig.model_validate, raw)
            if isinstance(backend, BackendConfig):
                problems += _backend_problems(index, backend, source)
    return problems
