"""A worker process: the proxy on its event loop, forked by the master (``pibl.master``).

The master hands each worker its listening sockets, the validated configuration as JSON
and the shared balancing memory; the worker imports the proxy, serves until SIGTERM and
finishes its in-flight requests.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable

from pibl.balance.shared import SharedBalance
from pibl.config import Config, resolve_path
from pibl.observe.accesslog import AccessLog
from pibl.proxy.server import run_worker


def event_loop_factory(choice: str) -> tuple[Callable[[], asyncio.AbstractEventLoop], str]:
    """The loop constructor for ``[server] event_loop``, and a warning to log ("" if none).

    "auto" takes uvloop when it is installed (the default install has it), else asyncio's.
    """
    if choice == "asyncio":
        return asyncio.new_event_loop, ""
    try:
        import uvloop
    except ImportError:
        warning = "event_loop = uvloop but uvloop is not installed; using asyncio"
        return asyncio.new_event_loop, warning if choice == "uvloop" else ""
    return uvloop.new_event_loop, ""


def worker_main(
    config_json: str,
    sock: list[socket.socket],
    ready_fd: int,
    rotation: SharedBalance | None,
) -> int:
    """Serve until stopped; the exit code. ``ready_fd`` gets one byte once listening."""
    config = Config.model_validate_json(config_json)
    cfg = config.log
    path = str(resolve_path(cfg.file)) if cfg.file else None
    log = AccessLog(path=path, stdout=cfg.stdout, fmt=cfg.format)
    log.label = f"worker {os.getpid()}"  # each worker listens and checks health on its own

    def ready(_: object) -> None:
        os.write(ready_fd, b"R")
        os.close(ready_fd)

    new_loop, warning = event_loop_factory(config.server.event_loop)
    if warning:
        log.warning(warning)
    try:
        with asyncio.Runner(loop_factory=new_loop) as runner:
            runner.run(
                run_worker(config, log, sock=sock, on_ready=ready, announce=False, shared=rotation)
            )
    except Exception:
        log.exception("worker failed")
        log.close()
        return 1
    log.close()
    return 0
