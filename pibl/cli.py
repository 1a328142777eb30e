"""Command line: argv -> Config -> run. The only module that exits the process.

Exit codes: 0 ok, 2 bad usage or invalid config, 1 runtime failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

from pibl import __version__
from pibl.config import DEFAULT_CONFIG_FILE, Config, load_config, resolve_path
from pibl.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pibl",
        description="PIBL: an HTTP/1.1 reverse proxy and load balancer.",
    )
    parser.add_argument("--version", action="version", version=f"pibl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the proxy")
    run.add_argument(
        "--config", default=DEFAULT_CONFIG_FILE, help="TOML file (default ./pibl.toml)"
    )
    run.add_argument("--port", type=int, help="listening port (overrides [server] port)")
    run.add_argument("--workers", type=int, help="worker processes (overrides [server] workers)")
    run.add_argument(
        "--cache-ttl",
        type=float,
        metavar="SECONDS",
        help="lifetime of cached responses without explicit freshness (overrides [cache] ttl)",
    )

    check = sub.add_parser("check-config", help="validate a config and print effective settings")
    check.add_argument("file", nargs="?", default=DEFAULT_CONFIG_FILE)

    demo = sub.add_parser("demo", help="start three app replicas and the proxy on this machine")
    demo.add_argument("--port", type=int, default=8080)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if getattr(args, "port", None) is not None:
        out["server.port"] = args.port
    if getattr(args, "workers", None) is not None:
        out["server.workers"] = args.workers
    if getattr(args, "cache_ttl", None) is not None:
        out["cache.ttl"] = args.cache_ttl
    return out


def _effective(config: Config) -> str:
    return json.dumps(config.model_dump(mode="json"), indent=2)


def cmd_run(args: argparse.Namespace) -> int:
    from pibl.observe.accesslog import AccessLog
    from pibl.proxy.server import run_worker

    config = load_config(args.config, _overrides(args))
    log_path = str(resolve_path(config.log.file)) if config.log.file else None
    log = AccessLog(path=log_path, stdout=config.log.stdout, fmt=config.log.format)
    try:
        asyncio.run(run_worker(config, log))
    except OSError as exc:
        log.error(f"cannot start: {exc}")
        log.close()
        return 1
    log.close()
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    config = load_config(args.file)
    print(f"{args.file}: OK")
    print(_effective(config))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "check-config":
            return cmd_check(args)
        if args.command == "demo":
            from pibl.demo import run_demo

            return run_demo(port=args.port)
    except ConfigError as exc:
        print(f"pibl: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    parser.print_help()
    return 2
