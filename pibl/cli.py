"""Command line: argv -> Config -> run. The only module that exits the process.

Exit codes: 0 ok, 2 bad usage or invalid config, 1 runtime failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pibl import BUILD, BUILD_REASON, DEFAULT_CONFIG_FILE, __version__
from pibl.errors import ConfigError

if TYPE_CHECKING:  # the schema is imported by the commands that need it: not by `run`
    from pibl.config import Config

DEFAULT_ADMIN_URL = "http://127.0.0.1:9090"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pibl",
        description="PIBL: an HTTP/1.1 reverse proxy and load balancer.",
    )
    build = "compiled with mypyc" if BUILD == "compiled" else f"pure Python: {BUILD_REASON}"
    parser.add_argument("--version", action="version", version=f"pibl {__version__} ({build})")
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

    cache = sub.add_parser("cache", help="inspect or purge a cache directory (running or not)")
    cache_sub = cache.add_subparsers(dest="cache_command", metavar="ACTION")
    for name, text in (("stats", "entries and size"), ("purge", "remove entries")):
        action = cache_sub.add_parser(name, help=text)
        action.add_argument(
            "--config",
            help="the config naming [cache] dir (default: ./pibl.toml if present, else ./cache)",
        )
        action.add_argument("--dir", help="the cache directory (overrides the config)")
        if name == "purge":
            action.add_argument("url", nargs="?", help="the URL as clients request it")
            action.add_argument("--all", action="store_true", help="remove every entry")

    status = sub.add_parser("status", help="print the live overview from the admin listener")
    status.add_argument(
        "--url",
        help="the admin listener (default: [admin] of ./pibl.toml if it exists, "
        "else http://127.0.0.1:9090)",
    )
    status.add_argument("--config", help="read the admin address from this config instead")

    sub.add_parser(
        "cert",
        help="create a local CA and a certificate for development and the demo",
        add_help=False,
    )

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


def load_checked(path: str, overrides: dict[str, Any] | None = None) -> Config:
    """The validated config, its files checked too; every problem in one ConfigError."""
    from pibl.loader import load_checked as checked

    return checked(path, overrides)


def cmd_run(args: argparse.Namespace) -> int:
    from pibl.master import run  # small: the proxy and the schema load in child processes

    return run(args.config, _overrides(args))


def cmd_check(args: argparse.Namespace) -> int:
    from pibl.routes import route_warnings

    config = load_checked(args.file)
    print(f"{args.file}: OK")
    for warning in route_warnings(config):
        print(f"{args.file}: warning: {warning}")
    print(_effective(config))
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from urllib.parse import urlsplit

    from pibl.cache.key import primary_key
    from pibl.cache.store import DiskStore
    from pibl.config import CacheConfig, load_config, resolve_path

    if args.dir:
        directory, source = resolve_path(args.dir), "--dir"
    elif args.config or Path(DEFAULT_CONFIG_FILE).is_file():
        config_file = args.config or DEFAULT_CONFIG_FILE
        directory, source = resolve_path(load_config(config_file).cache.dir), config_file
    else:  # no config here: the documented default, as PIBL itself would use it
        directory = resolve_path(CacheConfig.model_fields["dir"].default)
        source = f"the default (no ./{DEFAULT_CONFIG_FILE} here)"
    if not directory.is_dir():
        print(
            f"pibl cache: no cache directory at {directory} (from {source}); "
            "give --dir DIR or --config FILE",
            file=sys.stderr,
        )
        return 1
    store = DiskStore(directory, max_size=2**62, fsync=True)
    if args.cache_command == "stats":
        entries, size = store.entries_on_disk()
        print(json.dumps({"dir": str(directory), "entries": entries, "bytes": size}))
        return 0
    if args.all:
        print(f"purged {store.purge_all()} entries from {directory}")
        return 0
    if not args.url:
        print("pibl cache purge: give a URL or --all", file=sys.stderr)
        return 2
    parts = urlsplit(args.url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        print(f"pibl cache purge: {args.url!r} is not an http(s) URL", file=sys.stderr)
        return 2
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    key = primary_key(parts.scheme.encode(), parts.netloc.encode(), target.encode())
    removed = store.invalidate(key)
    print(f"{'purged' if removed else 'not cached'}: {args.url}")
    return 0


def _admin_url(args: argparse.Namespace) -> str:
    """--url, else the [admin] listener of --config or ./pibl.toml, else the default."""
    from pibl.config import load_config

    if args.url:
        return str(args.url)
    config_file = args.config or (
        DEFAULT_CONFIG_FILE if Path(DEFAULT_CONFIG_FILE).is_file() else None
    )
    if config_file is None:
        return DEFAULT_ADMIN_URL
    admin = load_config(config_file).admin
    if admin is None or not admin.enabled:
        raise ConfigError(
            f"{config_file}: admin: no admin listener to ask (add an [admin] section)"
        )
    host = "127.0.0.1" if admin.host in ("0.0.0.0", "") else admin.host
    host = "[::1]" if host == "::" else (f"[{host}]" if ":" in host else host)
    return f"http://{host}:{admin.port}"


def cmd_status(args: argparse.Namespace) -> int:
    import urllib.request

    from pibl.observe.admin import format_status

    base = _admin_url(args).rstrip("/")
    url = base + "/api/status"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            data = json.loads(response.read())
    except (OSError, ValueError) as exc:
        print(f"pibl status: cannot read {url}: {exc}", file=sys.stderr)
        return 1
    lines = format_status(data).splitlines()
    lines.insert(1, f"  admin        {base}/")  # which instance answered
    print("\n".join(lines))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["cert"]:
        from pibl.certs import main as cert_main

        return cert_main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "check-config":
            return cmd_check(args)
        if args.command == "cache" and args.cache_command:
            return cmd_cache(args)
        if args.command == "status":
            return cmd_status(args)
        if args.command == "demo":
            from pibl.demo import run_demo

            return run_demo(port=args.port)
    except ConfigError as exc:
        print(f"pibl: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # `pibl check-config | head`: the reader went away
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keep interpreter exit quiet
        return 0
    parser.print_help()
    return 2
