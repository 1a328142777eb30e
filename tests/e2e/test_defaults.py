"""A new user's first minutes with the defaults: ordinary backends, bursts, crashes."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import free_port, start_backend, wait_for, wait_port, write_config

pytestmark = pytest.mark.e2e


def run_pibl(cwd: Path, config: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``pibl run`` in its own process group (so a test can kill -9 all of it)."""
    return subprocess.Popen(
        [sys.executable, "-m", "pibl", "run", "--config", str(config)],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
        start_new_session=True,
    )


def stop_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> str:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.stdout.read().decode(errors="replace") if proc.stdout else ""


@pytest.fixture
def plain_http_server(tmp_path: Path) -> Iterator[str]:
    """Python's own ``http.server``: a backend with no /health URL (it answers 404)."""
    root = tmp_path / "site"
    root.mkdir()
    (root / "index.html").write_text("hello from a plain server\n")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 404
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_backend_without_a_health_url_serves_with_the_defaults(
    tmp_path: Path, plain_http_server: str
) -> None:
    port = free_port()
    config = write_config(tmp_path / "pibl.toml", port, [plain_http_server])
    proc = run_pibl(tmp_path, config)
    try:
        wait_port(port)
        time.sleep(2.5)  # past the first probes of the default interval (2 s)
        answers = [httpx.get(f"http://127.0.0.1:{port}/", timeout=5) for _ in range(5)]
    finally:
        out = stop_group(proc)
    assert [r.status_code for r in answers] == [200] * 5, out[-2000:]
    assert answers[0].text == "hello from a plain server\n"
    assert "DOWN" not in out


def test_a_configured_health_path_is_still_checked(tmp_path: Path, plain_http_server: str) -> None:
    port = free_port()
    config = write_config(
        tmp_path / "pibl.toml",
        port,
        [plain_http_server],
        '[health]\npath = "/health"\ninterval = 0.2\n[cache]\nenabled = false\n',
    )
    proc = run_pibl(tmp_path, config)
    try:
        wait_port(port)
        down = wait_for(
            lambda: httpx.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 503, 5
        )
    finally:
        out = stop_group(proc)
    assert down, out
    assert "is DOWN (health check GET /health: status 404)" in out


def listen_backlog(port: int) -> int:
    """The listen queue's size as ``ss -ltn`` shows it (Send-Q of a listening socket)."""
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    sizes = {int(line.split()[2]) for line in out.splitlines() if line.strip()}
    assert len(sizes) == 1, out
    return sizes.pop()


def somaxconn() -> int:
    return int(Path("/proc/sys/net/core/somaxconn").read_text())


def test_a_burst_of_3000_connections_is_accepted_at_once(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 12000)), hard))
    backend = start_backend("b1")
    port = free_port()
    config = write_config(tmp_path / "pibl.toml", port, [backend.url], "[log]\nstdout = false\n")
    proc = run_pibl(tmp_path, config)
    held: list[socket.socket] = []
    try:
        wait_port(port)
        assert listen_backlog(port) == somaxconn()
        started = time.monotonic()
        for _ in range(3000):  # one after another, each kept open (as browsers do)
            held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        elapsed = time.monotonic() - started
        # and every one of them is served: the last and the first get answers
        for s in (held[-1], held[0]):
            s.sendall(b"GET /burst HTTP/1.1\r\nHost: a\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 200")
    finally:
        for s in held:
            s.close()
        out = stop_group(proc)
        backend.stop()
    print(f"3,000 connections in {elapsed:.3f} s")
    assert elapsed < 1.0, f"3,000 connections took {elapsed:.2f} s"
    assert "Traceback" not in out


def test_the_backlog_setting_reaches_every_listener(tmp_path: Path) -> None:
    port, admin = free_port(), free_port()
    config = write_config(
        tmp_path / "pibl.toml",
        port,
        ["http://127.0.0.1:9"],
        f"backlog = 512\n[admin]\nport = {admin}\n[health]\nenabled = false\n",
    )
    proc = run_pibl(tmp_path, config)
    try:
        wait_port(port)
        wait_port(admin)
        assert listen_backlog(port) == 512
        assert listen_backlog(admin) == 512
    finally:
        stop_group(proc)


def test_crashes_leave_no_growing_state_behind(tmp_path: Path) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    backend = start_backend("b1")
    try:
        for _ in range(10):
            port = free_port()
            config = write_config(tmp_path / "pibl.toml", port, [backend.url])
            proc = run_pibl(tmp_path, config, env={"TMPDIR": str(tmpdir)})
            wait_port(port)
            assert httpx.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 200
            stop_group(proc, signal.SIGKILL)  # the whole group: master and workers
            left = [p.name for p in tmpdir.iterdir()]
            assert len(left) <= 1, left  # the crashed one's, until the next start
    finally:
        backend.stop()
    proc = run_pibl(tmp_path, config, env={"TMPDIR": str(tmpdir)})
    try:
        wait_port(port)
        # (a path never asked before: "/" may be in the cache, which survives the kills)
        gone = httpx.get(f"http://127.0.0.1:{port}/after-the-backend-stopped", timeout=5)
        assert gone.status_code in (502, 503)
        assert len(list(tmpdir.iterdir())) == 1  # its own
    finally:
        out = stop_group(proc)
    assert list(tmpdir.iterdir()) == [], out  # a clean stop removes its own
