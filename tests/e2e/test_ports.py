"""One PIBL per port: a second instance is refused with the port and the PID that holds it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support import (
    Backend,
    free_port,
    process_tree,
    stop_process,
    wait_for,
    wait_port,
    write_config,
)

pytestmark = pytest.mark.e2e

BASE = '[cache]\nenabled = false\n[health]\nenabled = false\n[log]\nfile = ""\n'


def run_pibl(cfg: Path, cwd: Path, env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "pibl", "run", "--config", str(cfg), *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    runtime = tmp_path / "run"
    return dict(os.environ, PYTHONUNBUFFERED="1", PIBL_RUNTIME_DIR=str(runtime))


def second(
    cfg: Path, cwd: Path, env: dict[str, str], *args: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pibl", "run", "--config", str(cfg), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_second_instance_is_refused_and_reload_still_works(
    tmp_path: Path, backends: list[Backend], env: dict[str, str]
) -> None:
    port, admin = free_port(), free_port()
    extra = BASE + f'[admin]\nport = {admin}\ntoken = "t"\n'
    cfg = write_config(tmp_path / "pibl.toml", port, [b.url for b in backends], extra)
    first = run_pibl(cfg, tmp_path, env, "--workers", "2")
    try:
        wait_port(port)
        wait_port(admin)
        # the same port: refused, naming the port and the first instance's PID
        out = second(cfg, tmp_path, env, "--workers", "1")
        assert out.returncode == 1, out
        assert f"port {port}" in out.stderr
        assert f"PID {first.pid}" in out.stderr
        assert "pibl run" in out.stderr
        # another port but the same admin port: refused as well
        out = second(cfg, tmp_path, env, "--port", str(free_port()))
        assert out.returncode == 1, out
        assert f"port {admin}" in out.stderr and f"PID {first.pid}" in out.stderr
        # every request still reaches the first instance (nothing else joined the port)
        pids = {int(p) for p in process_tree(first.pid)}
        with httpx.Client(timeout=5) as client:
            assert [client.get(f"http://127.0.0.1:{port}/x").status_code for _ in range(6)] == [
                200
            ] * 6
        listeners = subprocess.run(
            ["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True
        ).stdout
        holders = {int(part.split("=")[1]) for part in listeners.split(",") if "pid=" in part}
        if holders:  # ss shows the processes: all of them belong to the first instance
            assert holders <= pids
        # a reload of the first instance (same ports, new workers) does not trip over itself
        old = set(process_tree(first.pid)) - {first.pid}
        first.send_signal(signal.SIGHUP)
        assert wait_for(lambda: not (set(process_tree(first.pid)) & old), timeout=20)
        assert first.poll() is None
        assert httpx.get(f"http://127.0.0.1:{port}/x", timeout=5).status_code == 200
        # and the port is still refused to a newcomer after the reload
        assert second(cfg, tmp_path, env).returncode == 1
    finally:
        stop_process(first)
    _, err = first.communicate(timeout=10)
    assert b"reload refused" not in err


def test_reload_to_more_workers_keeps_the_ports(
    tmp_path: Path, backends: list[Backend], env: dict[str, str]
) -> None:
    port, admin = free_port(), free_port()
    extra = BASE + f"[admin]\nport = {admin}\n"
    cfg = write_config(tmp_path / "pibl.toml", port, [b.url for b in backends], extra)
    cfg.write_text(cfg.read_text().replace("[server]\n", "[server]\nworkers = 1\n"))
    first = run_pibl(cfg, tmp_path, env)
    try:
        wait_port(port)  # (the master listens before its worker is forked)
        assert wait_for(lambda: len(process_tree(first.pid)) == 2, 10)
        old = set(process_tree(first.pid)) - {first.pid}
        cfg.write_text(cfg.read_text().replace("workers = 1", "workers = 2"))
        first.send_signal(signal.SIGHUP)
        assert wait_for(lambda: len(set(process_tree(first.pid)) - {first.pid} - old) == 2, 20)
        assert wait_for(lambda: not (set(process_tree(first.pid)) & old), timeout=20)
        for _ in range(9):  # new connections each: none may land on a socket nobody serves
            assert httpx.get(f"http://127.0.0.1:{port}/x", timeout=5).status_code == 200
        assert httpx.get(f"http://127.0.0.1:{admin}/health", timeout=5).status_code == 200
    finally:
        stop_process(first)
    out, _ = first.communicate(timeout=10)
    assert b"reloaded" in out


def test_kill_9_leaves_no_stale_lock(
    tmp_path: Path, backends: list[Backend], env: dict[str, str]
) -> None:
    port = free_port()
    cfg = write_config(tmp_path / "pibl.toml", port, [b.url for b in backends], BASE)
    first = run_pibl(cfg, tmp_path, env, "--workers", "1")
    try:
        wait_port(port)
        assert list((tmp_path / "run").rglob(f"{port}@*.lock"))
        first.kill()
        first.wait(10)
        # the workers die with their master; the lock file may stay, its lock does not
        assert wait_for(lambda: _port_free(port), timeout=10)
        again = run_pibl(cfg, tmp_path, env, "--workers", "1")
        try:
            wait_port(port)
            assert again.poll() is None
            assert httpx.get(f"http://127.0.0.1:{port}/x", timeout=5).status_code == 200
        finally:
            stop_process(again)
        assert again.returncode == 0
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert list((tmp_path / "run").rglob(f"{port}*.lock")) == []  # a clean stop removes them


def test_port_held_by_another_program_names_it(
    tmp_path: Path, backends: list[Backend], env: dict[str, str]
) -> None:
    port = free_port()
    cfg = write_config(tmp_path / "pibl.toml", port, [b.url for b in backends], BASE)
    holder = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        out = second(cfg, tmp_path, env, "--workers", "1")
    finally:
        holder.terminate()
        holder.wait(10)
    assert out.returncode == 1
    assert f"port {port} is already in use by PID {holder.pid}" in out.stderr
    assert "http.server" in out.stderr
    assert "Traceback" not in out.stderr


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_demo_refuses_a_second_demo(tmp_path: Path) -> None:
    """The demo's ports (8080, 8443, 9090, the replicas) are held the same way."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PIBL_RUNTIME_DIR=str(tmp_path / "run"))
    first_dir, second_dir = tmp_path / "one", tmp_path / "two"
    first_dir.mkdir()
    second_dir.mkdir()
    demo = subprocess.Popen(
        [sys.executable, "-m", "pibl", "demo"],
        cwd=first_dir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        wait_port(8080, timeout=30)
        started = time.monotonic()
        out = subprocess.run(
            [sys.executable, "-m", "pibl", "demo"],
            cwd=second_dir,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 1
        assert "port 8080" in out.stderr and f"PID {demo.pid}" in out.stderr
        assert time.monotonic() - started < 10  # refused before starting any replica
        assert not (second_dir / "guestbook.sqlite3").exists()
    finally:
        demo.send_signal(signal.SIGINT)
        try:
            demo.wait(30)
        except subprocess.TimeoutExpired:
            demo.kill()
            demo.wait()


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"),
    reason="needs root, unshare and ip to make a network namespace",
)
def test_another_network_namespace_may_use_the_same_port(
    tmp_path: Path, backends: list[Backend], env: dict[str, str]
) -> None:
    """Ports belong to a network namespace: the HA pair on one machine runs two PIBLs on 8080."""
    port = free_port()
    cfg = write_config(tmp_path / "pibl.toml", port, [b.url for b in backends], BASE)
    first = run_pibl(cfg, tmp_path, env, "--workers", "1")
    try:
        wait_port(port)
        output = tmp_path / "netns.out"
        with output.open("wb") as sink:
            other = subprocess.Popen(
                [
                    "unshare",
                    "--net",
                    "sh",
                    "-c",
                    f"ip link set lo up && exec {sys.executable} -m pibl run"
                    f" --config {cfg} --workers 1",
                ],
                cwd=tmp_path,
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        try:
            assert wait_for(lambda: "serving http" in output.read_text(), timeout=20), (
                output.read_text()
            )
            assert other.poll() is None
        finally:
            stop_process(other)
        assert "already in use" not in output.read_text()
        # and in the first namespace the port is still refused
        assert second(cfg, tmp_path, env, "--workers", "1").returncode == 1
    finally:
        stop_process(first)
