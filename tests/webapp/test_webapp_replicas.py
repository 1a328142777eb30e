"""End-to-end test: three real replicas sharing one database file."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

STARTUP_TIMEOUT = 15.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until_healthy(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"replica exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    pytest.fail(f"replica at {url} did not become healthy:\n{log.read_text()}")


@pytest.fixture
def replicas(tmp_path: Path, subprocess_env: dict[str, str]) -> Iterator[dict[str, str]]:
    """Start replica-1..3 on free loopback ports; yield name -> base URL."""
    db = tmp_path / "shared.sqlite3"
    procs: list[subprocess.Popen[bytes]] = []
    started: list[tuple[str, subprocess.Popen[bytes], Path]] = []
    try:
        for n in (1, 2, 3):
            name, port = f"replica-{n}", free_port()
            log = tmp_path / f"{name}.log"
            with log.open("wb") as log_file:
                proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "webapp",
                        "--name",
                        name,
                        "--port",
                        str(port),
                        "--db",
                        str(db),
                    ],
                    env=subprocess_env,
                    cwd=tmp_path,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                )
            procs.append(proc)
            started.append((f"http://127.0.0.1:{port}", proc, log))
        for url, proc, log in started:
            wait_until_healthy(url, proc, log)
        yield {f"replica-{n}": url for n, (url, _, _) in enumerate(started, start=1)}
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.mark.e2e
def test_entry_posted_to_one_replica_is_seen_by_all(replicas: dict[str, str]) -> None:
    with httpx.Client(timeout=5.0) as client:
        post = client.post(
            f"{replicas['replica-1']}/guestbook",
            data={"name": "Eve", "message": "hello from replica 1"},
            follow_redirects=False,
        )
        assert post.status_code == 303
        assert post.headers["x-replica"] == "replica-1"

        seen_by = {}
        for name, url in replicas.items():
            response = client.get(f"{url}/api/guestbook")
            assert response.status_code == 200
            assert response.headers["x-replica"] == name
            seen_by[name] = response.json()
            page = client.get(f"{url}/guestbook")
            assert "hello from replica 1" in page.text

    assert set(seen_by) == {"replica-1", "replica-2", "replica-3"}
    for entries in seen_by.values():
        assert [(e["name"], e["message"], e["replica"]) for e in entries] == [
            ("Eve", "hello from replica 1", "replica-1")
        ]
