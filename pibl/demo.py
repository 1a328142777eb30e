"""``pibl demo``: the whole system on one machine.

Starts three replicas of the demo web application (``python -m webapp``, ports 8001-8003,
sharing one SQLite guestbook in the current directory), waits until each answers
``/health``, then runs PIBL in this process with the bundled ``demo.toml``. Ctrl-C or
SIGTERM stops PIBL gracefully and then the replicas, by PID. The replicas also ask the
kernel to terminate them if this process dies (``PR_SET_PDEATHSIG``), so even a
``kill -9`` of the demo leaves no orphan behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from importlib import resources
from pathlib import Path

from pibl.config import load_config, resolve_path
from pibl.observe.accesslog import AccessLog
from pibl.ports import Listen, PortInUse, PortLocks, config_addresses
from pibl.procs import die_with_parent
from pibl.proxy.server import run_worker

REPLICA_PORTS = (8001, 8002, 8003)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    die_with_parent(signal.SIGTERM)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def demo_config_path() -> Path:
    return Path(str(resources.files("pibl").joinpath("demo.toml")))


def start_replicas(
    db: Path, ports: tuple[int, ...] = REPLICA_PORTS
) -> list[subprocess.Popen[bytes]]:
    procs = []
    for i, port in enumerate(ports, start=1):
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "webapp",
                    "--name",
                    f"replica-{i}",
                    "--port",
                    str(port),
                    "--db",
                    str(db),
                ],
                preexec_fn=_die_with_parent,
            )
        )
    return procs


def wait_healthy(
    ports: tuple[int, ...], procs: list[subprocess.Popen[bytes]], timeout: float = 20.0
) -> None:
    deadline = time.monotonic() + timeout
    pending = set(ports)
    while pending and time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"replica with PID {proc.pid} exited with {proc.returncode}")
        for port in list(pending):
            url = f"http://127.0.0.1:{port}/health"
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    pending.discard(port)
        time.sleep(0.1)
    if pending:
        raise RuntimeError(f"replicas on ports {sorted(pending)} did not become healthy")


def stop_processes(procs: list[subprocess.Popen[bytes]], timeout: float = 10.0) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def demo_certificates(directory: Path) -> tuple[Path, Path] | None:
    """A local CA and a certificate for localhost, made once in ./certs (None if impossible)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    if cert.exists() and key.exists():
        return cert, key
    try:
        from pibl.certs import create_dev_ca_and_cert

        create_dev_ca_and_cert(directory)
    except (ImportError, OSError) as exc:
        print(f"pibl demo: HTTPS disabled ({exc})", file=sys.stderr)
        return None
    return cert, key


APP_PACKAGES = ("uvicorn", "starlette")  # what the demo web application imports


def missing_app_packages() -> list[str]:
    """The demo application's packages that are not installed (the ``app`` extra)."""
    missing = []
    for name in APP_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def commands_hint() -> str:
    """How to run ``pibl status`` and friends from another terminal in this directory."""
    script = Path(sys.executable).parent / "pibl"
    if shutil.which("pibl") or not script.exists():
        return "  In another terminal here: pibl status, pibl cache stats.\n"
    where = os.path.relpath(script) if script.is_relative_to(Path.cwd()) else str(script)
    activate = script.with_name("activate")
    shown = os.path.relpath(activate) if activate.is_relative_to(Path.cwd()) else str(activate)
    return (
        f"  In another terminal here: {where} status, {where} cache stats"
        f" (or first: . {shown}, then pibl ...).\n"
    )


def run_demo(*, port: int = 8080, tls_port: int = 8443) -> int:
    missing = missing_app_packages()
    if missing:
        print(
            f"pibl demo: the demo web application needs {', '.join(missing)}: "
            'pip install "pibl[app]" (./demo.sh installs everything)',
            file=sys.stderr,
        )
        return 1
    overrides: dict[str, object] = {"server.port": port, "server.workers": 1}
    certs = demo_certificates(Path.cwd() / "certs")
    if certs is not None:
        overrides.update(
            {"tls.cert": str(certs[0]), "tls.key": str(certs[1]), "tls.port": tls_port}
        )
    config = load_config(demo_config_path(), overrides)
    locks = PortLocks()
    try:  # before the replicas start: a second demo stops here, naming the first one
        locks.acquire(
            [*config_addresses(config), *(Listen("127.0.0.1", p, "replica") for p in REPLICA_PORTS)]
        )
    except PortInUse as exc:
        print(f"pibl demo: cannot start: {exc}", file=sys.stderr)
        return 1
    log_path = str(resolve_path(config.log.file)) if config.log.file else None
    log = AccessLog(path=log_path, stdout=True, fmt=config.log.format)
    db = Path.cwd() / "guestbook.sqlite3"
    procs = start_replicas(db)
    # Until PIBL's loop installs its own handlers, a signal stops the start-up cleanly.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        wait_healthy(REPLICA_PORTS, procs)
        https = ""
        if certs is not None:
            https = (
                f"  HTTPS: https://localhost:{tls_port}/ (trust certs/ca.pem, e.g."
                f" curl --cacert certs/ca.pem https://localhost:{tls_port}/)\n"
            )
        dashboard = ""
        if config.admin is not None and config.admin.enabled:
            token = f" (admin token: {config.admin.token})" if config.admin.token else ""
            dashboard = f"  Dashboard: http://{config.admin.host}:{config.admin.port}/{token}\n"
        print(
            f"\n  PIBL demo is up: open http://127.0.0.1:{port}/ in a browser"
            f" (replicas on ports {', '.join(map(str, REPLICA_PORTS))}).\n"
            f"{https}"
            f"{dashboard}"
            f"{commands_hint()}"
            "  Reload the page: it lists the replica that answered each of its requests."
            " Ctrl-C stops everything.\n",
            flush=True,
        )
        asyncio.run(run_worker(config, log))
    except KeyboardInterrupt:
        pass
    except (RuntimeError, OSError) as exc:
        print(f"pibl demo: {exc}", file=sys.stderr)
        return 1
    finally:
        stop_processes(procs)
        log.close()
        locks.release_all()
    return 0


__all__ = ["run_demo", "start_replicas", "stop_processes"]

if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(run_demo(port=int(os.environ.get("PIBL_PORT", "8080"))))
