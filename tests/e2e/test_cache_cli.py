"""`pibl cache stats` and `pibl cache purge` on a cache directory, running or not."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support import (
    Backend,
    free_port,
    start_pibl_process,
    stop_process,
    wait_for,
    wait_port,
    write_config,
)

pytestmark = pytest.mark.e2e


def pibl(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pibl", *args], capture_output=True, text=True, cwd=cwd, timeout=30
    )


def test_cache_stats_and_purge(tmp_path: Path, backends: list[Backend]) -> None:
    port = free_port()
    cfg = write_config(
        tmp_path / "pibl.toml", port, [b.url for b in backends], "[log]\nstdout = false\n"
    )
    proc = start_pibl_process(cfg, tmp_path, "--workers", "1")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_port(port)
        for name in ("a", "b", "c"):
            httpx.get(f"{base}/cache/{name}?cc=max-age=600")

        def stats() -> dict[str, int]:
            result: dict[str, int] = json.loads(pibl("cache", "stats", cwd=tmp_path).stdout)
            return result

        # entries are committed just after their responses are delivered
        assert wait_for(lambda: stats()["entries"] == 3, timeout=5.0)
        assert stats()["bytes"] > 0
        # purge one URL while PIBL runs: the next request is a miss again
        out = pibl("cache", "purge", f"{base}/cache/a?cc=max-age=600", cwd=tmp_path)
        assert out.returncode == 0 and out.stdout.startswith("purged")
        assert "fwd=miss" in httpx.get(f"{base}/cache/a?cc=max-age=600").headers["cache-status"]
        assert "hit" in httpx.get(f"{base}/cache/b?cc=max-age=600").headers["cache-status"]
    finally:
        stop_process(proc)
    # and while it is stopped
    assert pibl("cache", "purge", "--all", cwd=tmp_path).stdout.startswith("purged")
    assert json.loads(pibl("cache", "stats", cwd=tmp_path).stdout)["entries"] == 0
    assert pibl("cache", "purge", "ftp://x/", cwd=tmp_path).returncode == 2


def test_cache_commands_without_a_config_use_the_default_directory(
    tmp_path: Path, backends: list[Backend]
) -> None:
    """As after ``./demo.sh``: a ./cache directory, no ./pibl.toml, no flags."""
    port = free_port()
    run_dir, other = tmp_path / "run", tmp_path / "other"
    run_dir.mkdir()
    other.mkdir()
    cfg = write_config(
        tmp_path / "elsewhere.toml", port, [b.url for b in backends], "[log]\nstdout = false\n"
    )
    proc = start_pibl_process(cfg, run_dir, "--workers", "1")
    try:
        wait_port(port)
        httpx.get(f"http://127.0.0.1:{port}/cache/a?cc=max-age=600")
        assert wait_for(lambda: (run_dir / "cache").is_dir(), timeout=5.0)
    finally:
        stop_process(proc)
    assert not (run_dir / "pibl.toml").exists()
    stats = pibl("cache", "stats", cwd=run_dir)
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout) == {
        "dir": str(run_dir / "cache"),
        "entries": 1,
        "bytes": json.loads(stats.stdout)["bytes"],
    }
    purge = pibl("cache", "purge", "--all", cwd=run_dir)
    assert purge.returncode == 0 and purge.stdout.startswith("purged 1 entries"), purge
    # no cache directory and no config: exit 1, saying which flag to give
    missing = pibl("cache", "stats", cwd=other)
    assert missing.returncode == 1
    assert "--dir" in missing.stderr and "--config" in missing.stderr
    assert str(other / "cache") in missing.stderr


def test_status_reads_the_admin_port_of_the_local_config(
    tmp_path: Path, backends: list[Backend]
) -> None:
    port, admin = free_port(), free_port()
    extra = f"[log]\nstdout = false\n[admin]\nport = {admin}\n"
    cfg = write_config(tmp_path / "pibl.toml", port, [b.url for b in backends], extra)
    proc = start_pibl_process(cfg, tmp_path, "--workers", "1")
    try:
        wait_port(admin)
        out = pibl("status", cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert f"admin        http://127.0.0.1:{admin}/" in out.stdout
        assert "uptime" in out.stdout
        # --url still wins; a config without [admin] says so instead of asking port 9090
        elsewhere = pibl("status", "--url", f"http://127.0.0.1:{admin}", cwd=tmp_path)
        assert f"http://127.0.0.1:{admin}/" in elsewhere.stdout
    finally:
        stop_process(proc)
    no_admin = tmp_path / "plain"
    no_admin.mkdir()
    write_config(no_admin / "pibl.toml", port, [backends[0].url])
    out = pibl("status", cwd=no_admin)
    assert out.returncode == 2
    assert "pibl.toml: admin:" in out.stderr and "[admin]" in out.stderr


def test_dashboard_cache_figures_follow_a_purge_from_the_command_line(
    tmp_path: Path, backends: list[Backend]
) -> None:
    port, admin = free_port(), free_port()
    extra = f"[log]\nstdout = false\n[admin]\nport = {admin}\n"
    cfg = write_config(tmp_path / "pibl.toml", port, [b.url for b in backends], extra)
    proc = start_pibl_process(cfg, tmp_path, "--workers", "2")
    base = f"http://127.0.0.1:{port}"

    def shown() -> int:  # what the dashboard shows, whichever worker answers
        with httpx.Client(timeout=5) as client:  # a new connection each time
            store = client.get(f"http://127.0.0.1:{admin}/api/status").json()["cache_store"]
        return int(store["entries"])

    try:
        wait_port(port)
        wait_port(admin)
        for name in ("a", "b", "c", "d"):
            httpx.get(f"{base}/cache/{name}?cc=max-age=600")
        # every worker counts what the others stored within a few seconds
        assert wait_for(lambda: all(shown() == 4 for _ in range(4)), timeout=12.0)
        out = pibl("cache", "purge", "--all", cwd=tmp_path)
        assert out.returncode == 0 and out.stdout.startswith("purged 4")
        started = time.monotonic()
        assert wait_for(lambda: all(shown() == 0 for _ in range(4)), timeout=5.0)
        assert time.monotonic() - started < 4.0
        # one URL purged from the command line: followed at the next resync
        for name in ("e", "f"):
            httpx.get(f"{base}/cache/{name}?cc=max-age=600")
        assert wait_for(lambda: all(shown() == 2 for _ in range(4)), timeout=12.0)
        pibl("cache", "purge", f"{base}/cache/e?cc=max-age=600", cwd=tmp_path)
        assert wait_for(lambda: all(shown() == 1 for _ in range(4)), timeout=12.0)
    finally:
        stop_process(proc)
