"""Fault tests with real processes under a bounded load: nobody notices a dead backend."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.support import (
    free_port,
    start_pibl_process,
    stop_process,
    wait_port,
    wait_serving,
    write_config,
)

pytestmark = pytest.mark.e2e

INTERVAL = 0.5
HEALTH = f"""
[health]
interval = {INTERVAL}
timeout = 0.4
rise = 2
fall = 2
max_fails = 3
window = 5
cooldown = 30

[timeouts]
upstream_response = 1.0

[cache]
enabled = false

[log]
stdout = false
"""


class Replica:
    def __init__(self, name: str, port: int, db: Path) -> None:
        self.name, self.port, self.db = name, port, db
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "webapp",
                "--name",
                self.name,
                "--port",
                str(self.port),
                "--db",
                str(self.db),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port, 20)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Result:
    started: float
    elapsed: float
    status: int
    replica: str


@dataclass
class Load:
    results: list[Result] = field(default_factory=list)

    def failures(self) -> list[Result]:
        return [r for r in self.results if r.status != 200]


async def _run_load(url: str, connections: int, duration: float, load: Load) -> None:
    stop_at = time.monotonic() + duration

    async def worker() -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            while time.monotonic() < stop_at:
                t0 = time.monotonic()
                try:
                    r = await client.get(url)
                    status, replica = r.status_code, r.headers.get("x-replica", "")
                except httpx.HTTPError:
                    status, replica = 0, ""
                load.results.append(Result(t0, time.monotonic() - t0, status, replica))

    await asyncio.gather(*(worker() for _ in range(connections)))


def run_load_in_thread(
    url: str, connections: int, duration: float
) -> tuple[threading.Thread, Load]:
    load = Load()
    thread = threading.Thread(
        target=lambda: asyncio.run(_run_load(url, connections, duration, load))
    )
    thread.start()
    return thread, load


@contextlib.contextmanager
def running_cluster(
    tmp_path: Path, extra: str
) -> Iterator[tuple[list[Replica], int, subprocess.Popen[bytes], Path]]:
    """Three demo replicas and ``pibl run`` in front of them (``extra`` in its config)."""
    replicas = [Replica(f"replica-{i}", free_port(), tmp_path / "gb.sqlite3") for i in (1, 2, 3)]
    port = free_port()
    cfg = write_config(tmp_path / "pibl.toml", port, [r.url for r in replicas], extra)
    proc = None
    try:
        for r in replicas:
            r.start()
        proc = start_pibl_process(cfg, tmp_path)
        wait_port(port)
        wait_serving(tmp_path)
        yield replicas, port, proc, tmp_path
    finally:
        if proc is not None:
            stop_process(proc)
        for r in replicas:
            r.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[list[Replica], int, subprocess.Popen[bytes], Path]]:
    with running_cluster(tmp_path, HEALTH) as running:
        yield running


def log_events(workdir: Path) -> list[str]:
    return (workdir / "pibl.log").read_text().splitlines()


def access_totals(workdir: Path, status: int, expected: int | None = None) -> list[float]:
    """PIBL's own measure of each answer with this status (the ``total=`` field).

    The log is written in batches a few milliseconds behind the traffic: with ``expected``,
    wait (briefly) until that many records are there.
    """
    deadline = time.monotonic() + 3
    while True:
        out = []
        for line in log_events(workdir):
            if f'" {status} ' in line and " total=" in line:
                out.append(float(line.split(" total=")[1].split()[0]))
        if expected is None or len(out) >= expected or time.monotonic() > deadline:
            return out
        time.sleep(0.1)


def test_kill9_one_backend_zero_failures_and_recovery(
    cluster: tuple[list[Replica], int, subprocess.Popen[bytes], Path],
) -> None:
    replicas, port, _, workdir = cluster
    victim = replicas[1]
    thread, load = run_load_in_thread(f"http://127.0.0.1:{port}/api/info", 32, 9.0)
    time.sleep(2.0)
    killed_at = time.monotonic()
    victim.kill9()
    time.sleep(3.0)
    victim.start()
    restarted_at = time.monotonic()  # its port accepts again
    thread.join(30)

    assert load.results, "no requests were made"
    assert load.failures() == [], f"{len(load.failures())} failed requests"
    served_by_victim_after_kill = [
        r for r in load.results if r.replica == victim.name and r.started > killed_at + 0.05
    ]
    returned = [r.started for r in served_by_victim_after_kill if r.started > restarted_at]
    assert [r for r in served_by_victim_after_kill if r.started < restarted_at] == []
    assert returned, "the restarted backend never came back into rotation"
    back_after = min(returned) - restarted_at
    assert back_after <= 2 * INTERVAL + 0.5, f"back in rotation after {back_after:.2f} s"
    events = "\n".join(log_events(workdir))
    assert f"backend {victim.url.removeprefix('http://')} is DOWN" in events
    assert f"backend {victim.url.removeprefix('http://')} is UP again" in events
    print(f"requests={len(load.results)} failures=0 back_in_rotation_after={back_after:.2f}s")


def test_all_backends_killed_fast_503(
    cluster: tuple[list[Replica], int, subprocess.Popen[bytes], Path],
) -> None:
    replicas, port, _, workdir = cluster
    for r in replicas:
        r.kill9()
    thread, load = run_load_in_thread(f"http://127.0.0.1:{port}/api/info", 8, 2.0)
    thread.join(30)
    assert load.results
    statuses = {r.status for r in load.results}
    assert statuses == {503}, statuses
    # PIBL answers each at once: refused dials, no timeout waited for (the connect timeout
    # is 5 s; the bound leaves room for a machine busy with other work, typically < 10 ms);
    # the client sees no hang either (its own loop adds delay)
    totals = access_totals(workdir, 503, len(load.results))
    assert len(totals) == len(load.results)
    assert max(totals) < 0.25, f"slowest answer took {max(totals) * 1000:.1f} ms"
    assert max(r.elapsed for r in load.results) < 1.0
    print(f"503s={len(totals)} slowest={max(totals) * 1000:.1f} ms")


class BlackHole:
    """Accepts connections and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.conns: list[socket.socket] = []
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = self.sock.accept()
                self.conns.append(conn)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def close(self) -> None:
        self.stop.set()
        for c in self.conns:
            c.close()
        self.sock.close()


def test_stalled_backend_504_and_taken_out(tmp_path: Path) -> None:
    hole = BlackHole()
    replicas = [Replica(f"replica-{i}", free_port(), tmp_path / "gb.sqlite3") for i in (1, 2)]
    port = free_port()
    # health checks off: the passive checks alone must take the stalled backend out
    cfg = write_config(
        tmp_path / "pibl.toml",
        port,
        [replicas[0].url, hole.url, replicas[1].url],
        HEALTH.replace("[health]", "[health]\nenabled = false"),
    )
    proc = None
    try:
        for r in replicas:
            r.start()
        proc = start_pibl_process(cfg, tmp_path, "--workers", "1")  # one passive-check state
        wait_port(port)
        thread, load = run_load_in_thread(f"http://127.0.0.1:{port}/api/info", 32, 6.0)
        thread.join(30)
    finally:
        if proc is not None:
            stop_process(proc)
        for r in replicas:
            r.stop()
        hole.close()
    timeouts = [r for r in load.results if r.status == 504]
    ok = [r for r in load.results if r.status == 200]
    assert {r.status for r in load.results} <= {200, 504}
    assert timeouts, "no request reached the stalled backend"
    # within the configured 1 s timeout, as PIBL measured it; never a hang for the client
    totals = access_totals(tmp_path, 504, len(timeouts))
    assert len(totals) == len(timeouts)
    assert all(0.99 < t < 1.3 for t in totals), totals
    assert all(r.elapsed < 5.0 for r in timeouts)  # the client's own loop is busy too
    # taken out after max_fails: only the requests already routed to it time out
    assert len(timeouts) <= 3 + 32
    last_timeout_start = max(r.started for r in timeouts)
    assert all(r.status == 200 for r in load.results if r.started > last_timeout_start + 0.01)
    ok_late = sorted(r.elapsed for r in ok if r.started > last_timeout_start)
    assert ok_late, "no traffic after the stalled backend was ejected"
    p50 = ok_late[len(ok_late) // 2]
    assert p50 < 0.25, f"p50 of healthy requests {p50 * 1000:.0f} ms"
    assert "ejected" in (tmp_path / "pibl.log").read_text()
    print(f"504s={len(timeouts)} ok={len(ok)} healthy p50={p50 * 1000:.1f} ms")


def test_with_the_default_settings_a_restarted_backend_is_back_within_1_5_s(
    tmp_path: Path,
) -> None:
    """Defaults only (cache off to count every request): kill -9, restart, back in 1.5 s."""
    with running_cluster(tmp_path, "[cache]\nenabled = false\n[log]\nstdout = false\n") as (
        replicas,
        port,
        _,
        _,
    ):
        victim = replicas[0]
        thread, load = run_load_in_thread(f"http://127.0.0.1:{port}/api/info", 16, 8.0)
        time.sleep(1.5)
        victim.kill9()
        time.sleep(3.0)
        victim.start()
        restarted_at = time.monotonic()
        thread.join(30)
    assert load.failures() == [], f"{len(load.failures())} failed requests"
    returned = [
        r.started for r in load.results if r.replica == victim.name and r.started > restarted_at
    ]
    assert returned, "the restarted backend never came back into rotation"
    back_after = min(returned) - restarted_at
    print(f"back in rotation after {back_after:.2f} s")
    assert back_after <= 1.5, f"back in rotation after {back_after:.2f} s"


def refused_connects(admin_port: int, backend: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{admin_port}/metrics", timeout=5).text
    assert "pibl_backend_connects_refused_total{" in text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("pibl_backend_connects_refused_total{") and f'"{backend}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_killed_backend_is_dialled_at_most_three_times_per_worker(tmp_path: Path) -> None:
    admin, workers = free_port(), 2
    extra = (
        f"workers = {workers}\n[cache]\nenabled = false\n[log]\nstdout = false\n"
        f"[admin]\nport = {admin}\n"
    )
    with running_cluster(tmp_path, extra) as (replicas, port, _, _):
        wait_port(admin)
        victim = replicas[1]
        thread, load = run_load_in_thread(f"http://127.0.0.1:{port}/api/info", 32, 4.0)
        time.sleep(1.5)
        victim.kill9()
        thread.join(30)
        time.sleep(1.2)  # the workers' metrics are flushed once a second
        refused = refused_connects(admin, f"127.0.0.1:{victim.port}")
    assert load.failures() == [], f"{len(load.failures())} failed requests"
    print(f"refused connects to the killed backend: {refused:g} ({workers} workers)")
    assert refused <= 3 * workers
