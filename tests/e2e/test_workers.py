"""Worker processes: reload and stop without dropping a request, survive a worker crash."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.support import (
    Backend,
    free_port,
    process_tree,
    rss_kib,
    start_backend,
    start_pibl_process,
    stop_process,
    wait_for,
    wait_port,
    write_config,
)

pytestmark = pytest.mark.e2e

BASE = "[cache]\nenabled = false\n[health]\nenabled = false\n[log]\nstdout = false\n"


class LoadLoop:
    """A bounded load of sequential GETs on several threads, recording every outcome."""

    def __init__(self, url: str, threads: int = 8, duration: float = 6.0) -> None:
        self.url = url
        self.results: list[tuple[float, int, str]] = []
        self.stop_at = time.monotonic() + duration
        self.threads = [threading.Thread(target=self._run) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while time.monotonic() < self.stop_at:
                try:
                    r = client.get(self.url)
                    self.results.append(
                        (time.monotonic(), r.status_code, r.headers.get("x-backend", ""))
                    )
                except httpx.HTTPError as exc:
                    self.results.append((time.monotonic(), 0, type(exc).__name__))

    def join(self) -> None:
        for t in self.threads:
            t.join(30)

    def failures(self) -> list[tuple[float, int, str]]:
        return [r for r in self.results if r[1] != 200]


def workers_of(pid: int) -> list[int]:
    return [p for p in process_tree(pid) if p != pid]


def test_sighup_reload_under_load(tmp_path: Path, backends: list[Backend]) -> None:
    extra = start_backend("b4")
    port = free_port()
    cfg = write_config(tmp_path / "pibl.toml", port, [b.url for b in backends[:2]], BASE)
    proc = start_pibl_process(cfg, tmp_path, "--workers", "2")
    try:
        wait_port(port)
        time.sleep(0.5)
        load = LoadLoop(f"http://127.0.0.1:{port}/r", duration=7.0)
        time.sleep(1.5)
        old_workers = set(workers_of(proc.pid))
        # 1. a changed backend list
        write_config(cfg, port, [backends[2].url, extra.url], BASE)
        log = tmp_path / "pibl.log"
        proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "reloaded" in log.read_text(), timeout=10.0)
        reloaded_at = time.monotonic()
        time.sleep(1.0)
        # 2. an invalid config: refused, the running one keeps serving
        cfg.write_text(cfg.read_text().replace("[cache]", "[cache]\nnot_a_key = 1"))
        proc.send_signal(signal.SIGHUP)
        load.join()
        new_workers = set(workers_of(proc.pid))
    finally:
        stop_process(proc)
        extra.stop()
    assert load.results
    assert load.failures() == [], load.failures()[:5]
    late = {b for t, _, b in load.results if t > reloaded_at + 0.5}
    assert late == {"b3", "b4"}, late  # the new list is in effect, the old one is not
    assert old_workers.isdisjoint(new_workers) and len(new_workers) == 2
    text = log.read_text()
    assert "reload refused" in text and "not_a_key: unknown key" in text
    print(f"requests={len(load.results)} failures=0 across two reloads")


def test_sigterm_lets_in_flight_slow_requests_finish(
    tmp_path: Path, backends: list[Backend]
) -> None:
    port = free_port()
    cfg = write_config(tmp_path / "pibl.toml", port, [b.url for b in backends], BASE)
    proc = start_pibl_process(cfg, tmp_path, "--workers", "2")
    results: list[int] = []
    try:
        wait_port(port)
        time.sleep(0.5)

        def slow() -> None:
            r = httpx.get(f"http://127.0.0.1:{port}/slow?s=2", timeout=10)
            results.append(r.status_code)

        threads = [threading.Thread(target=slow) for _ in range(6)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.ConnectError):  # no longer accepting
            httpx.get(f"http://127.0.0.1:{port}/new", timeout=2)
        for t in threads:
            t.join(10)
        proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert results == [200] * 6
    assert proc.returncode == 0


def test_kill9_a_worker_under_load(tmp_path: Path, backends: list[Backend]) -> None:
    port = free_port()
    cfg = write_config(tmp_path / "pibl.toml", port, [b.url for b in backends], BASE)
    proc = start_pibl_process(cfg, tmp_path, "--workers", "2")
    try:
        wait_port(port)
        time.sleep(0.5)
        load = LoadLoop(f"http://127.0.0.1:{port}/k", threads=8, duration=5.0)
        time.sleep(1.5)
        victim = workers_of(proc.pid)[0]
        os.kill(victim, signal.SIGKILL)
        load.join()
        replaced = workers_of(proc.pid)
    finally:
        stop_process(proc)
    assert victim not in replaced and len(replaced) == 2
    failures = load.failures()
    # only requests on the killed worker's open connections may fail: at most one per client
    assert len(failures) <= 8, failures
    assert len(load.results) > 100
    assert f"worker {victim} (slot" in (tmp_path / "pibl.log").read_text()
    print(f"requests={len(load.results)} failed={len(failures)} (8 client connections)")


def test_10000_idle_keepalive_connections(tmp_path: Path, backends: list[Backend]) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 12000:
        pytest.skip(f"needs 12000 file descriptors, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 12000), hard))
    port = free_port()
    cfg = write_config(
        tmp_path / "pibl.toml",
        port,
        [b.url for b in backends],
        BASE + "[timeouts]\nclient_header = 120\nclient_idle = 120\n",
    )
    proc = subprocess.Popen(
        [
            "bash",
            "-c",
            f"ulimit -n 12000 && exec {os.sys.executable} -m pibl run --config {cfg} --workers 1",
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    sockets: list[socket.socket] = []
    try:
        wait_port(port)
        time.sleep(0.5)
        worker = workers_of(proc.pid)[-1]
        before = rss_kib(worker)

        async def open_many(n: int) -> list[socket.socket]:
            loop = asyncio.get_running_loop()
            out: list[socket.socket] = []
            sem = asyncio.Semaphore(500)

            async def one() -> None:
                async with sem:
                    s = socket.socket()
                    s.setblocking(False)
                    await loop.sock_connect(s, ("127.0.0.1", port))
                    out.append(s)

            await asyncio.gather(*(one() for _ in range(n)))
            return out

        sockets = asyncio.run(open_many(10_000))
        # each makes one request and stays open (keep-alive), idle; in batches so that the
        # three small test backends are not the bottleneck
        answered = 0
        for i in range(0, len(sockets), 500):
            batch = sockets[i : i + 500]
            for s in batch:
                s.setblocking(True)
                s.sendall(b"GET /idle HTTP/1.1\r\nHost: x\r\n\r\n")
            for s in batch:
                s.settimeout(30)
                if s.recv(4096).startswith(b"HTTP/1.1 200"):
                    answered += 1
        assert answered == 10_000
        started = time.monotonic()
        r = httpx.get(f"http://127.0.0.1:{port}/other", timeout=5)
        elapsed = time.monotonic() - started
        assert r.status_code == 200 and elapsed < 0.5
        after = rss_kib(worker)
        per_conn = (after - before) * 1024 / 10_000
        print(
            f"worker RSS {before / 1024:.1f} -> {after / 1024:.1f} MiB, {per_conn:.0f} bytes per idle connection, other client {elapsed * 1000:.1f} ms"
        )
        assert after < before + 200 * 1024
    finally:
        for s in sockets:
            s.close()
        stop_process(proc)


def test_a_passive_ejection_reaches_every_worker(tmp_path: Path, backends: list[Backend]) -> None:
    import http.server

    class Failing(http.server.BaseHTTPRequestHandler):
        hits = 0

        def do_GET(self) -> None:
            Failing.hits += 1
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    bad = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    threading.Thread(target=bad.serve_forever, daemon=True).start()
    port = free_port()
    cfg = write_config(
        tmp_path / "pibl.toml",
        port,
        [backends[0].url, f"http://127.0.0.1:{bad.server_address[1]}"],
        "[cache]\nenabled = false\n[log]\nstdout = false\n[retries]\ntries = 1\n"
        "[health]\nenabled = false\nfail_statuses = [503]\nmax_fails = 2\ncooldown = 60\n",
    )
    proc = start_pibl_process(cfg, tmp_path, "--workers", "2")
    log = tmp_path / "pibl.log"
    try:
        wait_port(port)
        for _ in range(60):  # a new connection each time: both workers take some
            httpx.get(f"http://127.0.0.1:{port}/e", timeout=10)
            if "ejected" in log.read_text():
                break
        assert wait_for(lambda: "ejected after 503 answers" in log.read_text())
        hits = Failing.hits
        after = [httpx.get(f"http://127.0.0.1:{port}/a", timeout=10).status_code for _ in range(40)]
    finally:
        stop_process(proc)
        bad.shutdown()
    assert hits >= 2
    # the worker that did not eject it has not seen two failures itself, yet sends it nothing
    assert Failing.hits == hits
    assert after == [200] * 40


def _mapped(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_master_stays_small_at_rest(tmp_path: Path, backends: list[Backend]) -> None:
    """The master imports neither the proxy nor the schema library: ≤ 20 MiB at rest.

    The workers load them (their native modules are mapped there and not in the master);
    a reload validates the new file in a child and leaves the master as small as before.
    """
    port = free_port()
    cfg = write_config(tmp_path / "pibl.toml", port, [b.url for b in backends], "")
    proc = start_pibl_process(cfg, tmp_path)
    try:
        wait_port(port)
        assert httpx.get(f"http://127.0.0.1:{port}/x", timeout=5).status_code == 200
        assert wait_for(lambda: workers_of(proc.pid), 10)
        worker = workers_of(proc.pid)[0]
        for native in ("pydantic_core", "httptools", "uvloop"):
            # The port answers once one worker serves; this one may still be importing.
            assert wait_for(lambda native=native: native in _mapped(worker), 10), native
            assert native not in _mapped(proc.pid), f"the master loaded {native}"
        master = rss_kib(proc.pid)
        print(f"master {master / 1024:.1f} MiB, worker {rss_kib(worker) / 1024:.1f} MiB RSS")
        assert master <= 20 * 1024
        proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: workers_of(proc.pid) and worker not in workers_of(proc.pid), 15)
        assert "pydantic_core" not in _mapped(proc.pid)
        assert rss_kib(proc.pid) <= 20 * 1024
        assert httpx.get(f"http://127.0.0.1:{port}/x", timeout=5).status_code == 200
    finally:
        stop_process(proc)
