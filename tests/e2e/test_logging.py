"""Every exchange is logged exactly once, on stdout and in the file; logging never stops PIBL."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.support import (
    Backend,
    free_port,
    process_tree,
    raw_request,
    start_pibl_process,
    wait_for,
    wait_port,
    write_config,
)

pytestmark = pytest.mark.e2e


def run_pibl(
    tmp_path: Path, backends: list[Backend], extra: str, *args: str
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    cfg = write_config(tmp_path / "pibl.toml", port, [b.url for b in backends], extra)
    proc = start_pibl_process(cfg, tmp_path, *args)
    wait_port(port)
    time.sleep(0.3)  # every worker ready
    return proc, port


def stop(proc: subprocess.Popen[bytes]) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=20)
    return out.decode()


def access_lines(text: str) -> list[dict[str, object]]:
    out = []
    for line in text.splitlines():
        if line.startswith("{") and '"request"' in line:
            out.append(json.loads(line))
    return out


def test_one_record_per_exchange_on_stdout_and_file(
    tmp_path: Path, backends: list[Backend]
) -> None:
    extra = f'[log]\nformat = "json"\n[cache]\ndir = "{tmp_path / "cache"}"\n[health]\nenabled = false\n'
    proc, port = run_pibl(tmp_path, backends, extra, "--workers", "2")
    try:
        sent: list[tuple[str, int]] = []
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            for i in range(5):
                r = c.get(f"/plain/{i}", headers={"X-Request-ID": f"req-{i}"})
                sent.append((f"GET /plain/{i} HTTP/1.1", r.status_code))
            c.get("/cache/x?cc=max-age=60", headers={"X-Request-ID": "miss-1"})
            # committed to disk just after the response: then the other worker finds it too
            assert wait_for(lambda: any((tmp_path / "cache").glob("*/*.meta")), timeout=5.0)
            r = c.get("/cache/x?cc=max-age=60", headers={"X-Request-ID": "hit-1"})
            assert "hit" in r.headers["cache-status"]
            c.post("/post", content=b"12345", headers={"X-Request-ID": "post-1"})
        raw = raw_request(port, b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")  # malformed
        assert raw.startswith(b"HTTP/1.1 400")
        time.sleep(0.5)
    finally:
        out = stop(proc)
    stdout_records = access_lines(out)
    file_records = access_lines((tmp_path / "pibl.log").read_text())
    assert len(stdout_records) == 9
    assert sorted(map(json.dumps, stdout_records)) == sorted(map(json.dumps, file_records))
    by_id = {r["request_id"]: r for r in stdout_records}
    for i in range(5):
        rec = by_id[f"req-{i}"]
        assert rec["request"] == f"GET /plain/{i} HTTP/1.1"
        assert rec["status"] == 200 and rec["backend"] and rec["client"] == "127.0.0.1"
        assert rec["host"] == f"127.0.0.1:{port}" and rec["user_agent"].startswith("python-httpx")
        assert rec["bytes_out"] > 0 and rec["upstream_time"] is not None
    assert by_id["miss-1"]["cache"] == "MISS"
    assert by_id["hit-1"]["cache"] == "HIT" and by_id["hit-1"]["backend"] is None
    assert by_id["post-1"]["bytes_in"] == 5
    rejected = [r for r in stdout_records if r["status"] == 400]
    assert len(rejected) == 1 and "Host" in str(rejected[0]["detail"])


def test_verbose_shows_heads(tmp_path: Path, backends: list[Backend]) -> None:
    proc, port = run_pibl(
        tmp_path, backends, "[log]\nverbose = true\n[cache]\nenabled = false\n", "--workers", "1"
    )
    try:
        httpx.get(f"http://127.0.0.1:{port}/v", headers={"X-Custom": "shown"})
        time.sleep(0.3)
    finally:
        out = stop(proc)
    assert "  > GET /v HTTP/1.1" in out and "  > X-Custom: shown" in out
    assert "  < HTTP/1.1 200 OK" in out and "  < Via: 1.1 pibl" in out


def test_sigusr1_reopens_a_deleted_log_file(tmp_path: Path, backends: list[Backend]) -> None:
    proc, port = run_pibl(tmp_path, backends, "[cache]\nenabled = false\n", "--workers", "2")
    log = tmp_path / "pibl.log"
    try:
        httpx.get(f"http://127.0.0.1:{port}/before")
        assert wait_for(lambda: "/before" in log.read_text())
        log.rename(tmp_path / "pibl.log.1")  # what logrotate does
        proc.send_signal(signal.SIGUSR1)
        time.sleep(0.5)
        for i in range(4):  # reach both workers
            httpx.get(f"http://127.0.0.1:{port}/after/{i}")
        assert wait_for(lambda: log.exists() and log.read_text().count("/after/") == 4, 5.0)
        assert "/before" not in log.read_text()
        assert "/after/" not in (tmp_path / "pibl.log.1").read_text()
        assert "/before" in (tmp_path / "pibl.log.1").read_text()
    finally:
        stop(proc)


@pytest.mark.parametrize("target", ["/dev/full", "/proc/version"])
def test_full_or_read_only_log_target_keeps_serving(
    tmp_path: Path, backends: list[Backend], target: str
) -> None:
    proc, port = run_pibl(
        tmp_path,
        backends,
        f'[log]\nfile = "{target}"\n[cache]\nenabled = false\n',
        "--workers",
        "1",
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
            statuses = [c.get(f"/x/{i}").status_code for i in range(50)]
        assert statuses == [200] * 50
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /still HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 200")
    finally:
        out = stop(proc)
    assert proc.returncode == 0
    assert out.count('"GET /x/') == 50  # stdout still has every record


def test_worker_lines_name_their_worker(tmp_path: Path, backends: list[Backend]) -> None:
    """Each worker listens and checks health itself: its lines say which worker it is."""
    dead = f"http://127.0.0.1:{free_port()}"
    extra = "[cache]\nenabled = false\n[health]\ninterval = 0.2\ntimeout = 0.2\nfall = 1\n"
    port = free_port()
    cfg = write_config(tmp_path / "pibl.toml", port, [backends[0].url, dead], extra)
    proc = start_pibl_process(cfg, tmp_path, "--workers", "2")
    try:
        wait_port(port)  # (the master listens before its workers are forked)
        assert wait_for(lambda: len(process_tree(proc.pid)) == 3, 10)
        workers = [p for p in process_tree(proc.pid) if p != proc.pid]
        assert wait_for(lambda: (tmp_path / "pibl.log").read_text().count("is DOWN") >= 2, 10)
    finally:
        out = stop(proc)
    listening = [line for line in out.splitlines() if "listening on http://" in line]
    down = [line for line in out.splitlines() if "is DOWN" in line]
    for lines in (listening, down):
        named = {int(m.group(1)) for line in lines if (m := re.search(r"\] worker (\d+): ", line))}
        assert named == set(workers), lines
    master = next(line for line in out.splitlines() if "] master " in line)
    assert f"serving http://127.0.0.1:{port}" in master
    assert all(str(pid) in master for pid in workers)
