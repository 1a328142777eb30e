"""Command line entry point: ``python -m webapp --name replica-1 --port 8001``.

Options fall back to environment variables: ``PIBL_REPLICA`` for the
replica name, ``PIBL_APP_DB`` for the database path (default
``./guestbook.sqlite3``) and ``PIBL_WEBAPP_RELEASE`` for the release the
replica claims to run (default: the package version; another value changes
``/version`` and the ``/about`` page, to watch PIBL's consistency checks
catch a replica left on another release).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping, Sequence

try:
    import uvicorn

    from webapp.app import create_app
except ImportError as exc:  # pibl installed without the app extra
    raise SystemExit(
        f'python -m webapp: {exc.name} is not installed: pip install "pibl[app]"'
    ) from None

from webapp import __version__
from webapp.replica import validate_release, validate_replica_name

DEFAULT_DB = "guestbook.sqlite3"


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    """Argument parser; defaults come from ``environ``."""
    parser = argparse.ArgumentParser(
        prog="python -m webapp", description="PIBL demo web application (one replica)."
    )
    parser.add_argument(
        "--name",
        default=environ.get("PIBL_REPLICA"),
        help="replica name sent in X-Replica (env PIBL_REPLICA; default replica-PORT)",
    )
    parser.add_argument(
        "--release",
        default=environ.get("PIBL_WEBAPP_RELEASE") or __version__,
        help=f"release this replica runs: /version and /about show it "
        f"(env PIBL_WEBAPP_RELEASE; default {__version__})",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8001, help="port to bind (default 8001)")
    parser.add_argument(
        "--db",
        default=environ.get("PIBL_APP_DB") or os.path.join(".", DEFAULT_DB),
        help="SQLite database shared by replicas (env PIBL_APP_DB; default ./guestbook.sqlite3)",
    )
    parser.add_argument(
        "--access-log", action="store_true", help="log every request (off by default)"
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="log level (default info)",
    )
    parser.add_argument(
        "--keep-alive",
        type=int,
        default=15,
        metavar="SECONDS",
        help="idle keep-alive timeout for client connections (default 15)",
    )
    parser.add_argument(
        "--graceful-timeout",
        type=int,
        default=10,
        metavar="SECONDS",
        help="on shutdown, wait at most this long for in-flight requests (default 10)",
    )
    return parser


def parse_args(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> argparse.Namespace:
    """Parse and check the command line (``environ`` defaults to ``os.environ``)."""
    parser = build_parser(os.environ if environ is None else environ)
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error("--port must be between 0 and 65535")
    if args.name is None:
        args.name = f"replica-{args.port}"
    try:
        validate_replica_name(args.name)
        validate_release(args.release)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Run one replica with uvicorn until interrupted."""
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    uvicorn.run(
        create_app(args.name, args.db, release=args.release),
        host=args.host,
        port=args.port,
        http="httptools",
        proxy_headers=False,
        access_log=args.access_log,
        log_level=args.log_level,
        timeout_keep_alive=args.keep_alive,
        timeout_graceful_shutdown=args.graceful_timeout,
    )


if __name__ == "__main__":
    main()
