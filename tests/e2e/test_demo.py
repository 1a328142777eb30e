"""``pibl demo``: three real replicas and PIBL, round robin, shared guestbook, clean stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support import wait_port

pytestmark = pytest.mark.e2e


def children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            out.append(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_demo_round_robin_guestbook_and_clean_stop(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pibl", "demo"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    replicas: list[int] = []
    try:
        wait_port(8080, timeout=30)
        replicas = children_of(proc.pid)
        assert len(replicas) == 3
        with httpx.Client(base_url="http://127.0.0.1:8080", timeout=10) as client:
            names = [client.get("/api/info").json()["replica"] for _ in range(6)]
            assert names == ["replica-1", "replica-2", "replica-3"] * 2
            page = client.get("/")
            assert page.headers["x-replica"] in page.text
            assert "X-Forwarded-For" in page.text or "x-forwarded-for" in page.text
            posted = client.post("/api/guestbook", json={"name": "demo", "message": "through PIBL"})
            assert posted.status_code == 201
        for port in (8001, 8002, 8003):
            entries = httpx.get(f"http://127.0.0.1:{port}/api/guestbook").json()
            assert any(e["message"] == "through PIBL" for e in entries), port
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in replicas:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 0
    assert b"http://127.0.0.1:8080/" in out
    assert b"Dashboard: http://127.0.0.1:9090/ (admin token: demo)" in out
    assert b" status, " in out and b"cache stats" in out  # how to reach the commands
    time.sleep(0.5)
    assert [pid for pid in replicas if alive(pid)] == []


def test_demo_sigterm_and_kill9_leave_no_orphans(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pibl", "demo"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    replicas: list[int] = []
    try:
        wait_port(8080, timeout=30)
        replicas = children_of(proc.pid)
        assert len(replicas) == 3
        proc.kill()  # even kill -9 of the demo must not leave replicas running
        proc.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(alive(p) for p in replicas):
            time.sleep(0.1)
    finally:
        for pid in replicas:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert [pid for pid in replicas if alive(pid)] == []
