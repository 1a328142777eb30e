#!/usr/bin/env python3
"""What routing costs per request: one catch-all route against fifty, in the same run.

PIBL (one worker, cache off, pinned to CPU 1) proxies 1 KB keep-alive requests to an nginx
serving a static file; wrk and nginx run on CPU 0. With fifty routes the request matches
the last one: forty-nine routes by other hosts and path prefixes come first, the worst case
for first-match routing. Each configuration is measured ``--rounds`` times, alternating,
and the CPU time of PIBL's process tree (utime + stime from /proc) is divided by the
requests wrk completed. Usage: ``.venv/bin/python bench/routing.py [--seconds 8]``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.comparison.procs import (  # noqa: E402  (the same CPU accounting)
    free_port,
    tree_cpu_seconds,
    wait_port,
)


def pibl_config(port: int, backend: int, routes: int) -> str:
    lines = [
        "[server]",
        'host = "127.0.0.1"',
        f"port = {port}",
        "workers = 1",
        "[cache]",
        "enabled = false",
        "[health]",
        "enabled = false",
        "[log]",
        "stdout = false",
        'file = ""',
        "[pools.app]",
        "[[pools.app.backends]]",
        f'url = "http://127.0.0.1:{backend}"',
    ]
    for i in range(routes - 1):  # routes that never match this benchmark's requests:
        lines += ["[[routes]]", f'path_prefix = "/p{i}/"', 'pool = "app"']  # half by path only,
        if i % 2:  # half by host and path
            lines.insert(len(lines) - 2, f'host = "app{i}.example.com"')
    lines += ["[[routes]]", 'path_prefix = "/"', 'pool = "app"']
    return "\n".join(lines) + "\n"


def run(routes: int, seconds: float, work: Path, backend: int) -> float:
    port = free_port()
    config = work / f"routes-{routes}.toml"
    config.write_text(pibl_config(port, backend, routes))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        ["taskset", "-c", "1", sys.executable, "-m", "pibl", "run", "--config", str(config)],
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        url = f"http://127.0.0.1:{port}/file"
        subprocess.run(
            ["taskset", "-c", "0", "wrk", "-t1", "-c50", "-d2s", url],
            check=True,
            capture_output=True,
        )
        before = tree_cpu_seconds(proc.pid)
        out = subprocess.run(
            ["taskset", "-c", "0", "wrk", "-t1", "-c50", f"-d{int(seconds)}s", url],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        used = tree_cpu_seconds(proc.pid) - before
        done = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
        if "Non-2xx" in out:
            raise RuntimeError(out)
        return used / done * 1e6
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for tool in ("nginx", "wrk", "taskset"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"routing.py needs {tool} (apt-get install nginx wrk util-linux)")
            return 2
    work = Path(tempfile.mkdtemp(prefix="pibl-bench-routing-"))
    (work / "www").mkdir()
    (work / "www" / "file").write_bytes(os.urandom(1024))
    backend = free_port()
    (work / "nginx.conf").write_text(
        f"""daemon off; worker_processes 1; pid {work}/nginx.pid; error_log {work}/error.log;
events {{ worker_connections 1024; }}
http {{ access_log off; client_body_temp_path {work}; proxy_temp_path {work};
  fastcgi_temp_path {work}; uwsgi_temp_path {work}; scgi_temp_path {work};
  server {{ listen 127.0.0.1:{backend}; root {work}/www; keepalive_requests 100000; }} }}
"""
    )
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    backend_proc = subprocess.Popen(
        ["taskset", "-c", "0", nginx, "-c", str(work / "nginx.conf"), "-e", str(work / "e.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(backend)
        results: dict[int, list[float]] = {1: [], 50: []}
        for _ in range(args.rounds):
            for routes in (1, 50):
                results[routes].append(run(routes, args.seconds, work, backend))
    finally:
        backend_proc.send_signal(signal.SIGTERM)
        backend_proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    one = sorted(results[1])[len(results[1]) // 2]
    fifty = sorted(results[50])[len(results[50]) // 2]
    stamp = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    print(f"routing cost, {stamp} UTC, {os.uname().nodename}, median of {args.rounds} rounds:")
    print(f"  1 route:   {one:6.1f} us CPU per request  {results[1]}")
    print(f"  50 routes: {fifty:6.1f} us CPU per request  {results[50]}")
    print(f"  50 routes cost {100 * (fifty / one - 1):+.1f}% per request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
