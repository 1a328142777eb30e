"""`pibl cache stats` and `pibl cache purge` on a cache directory, running or not."""

from __future__ import annotations

import json
import subprocess
import sys
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
