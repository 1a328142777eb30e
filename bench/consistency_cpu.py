"""CPU cost of ``[consistency] sample``: PIBL's CPU per request with sample = 0 and 0.01.

Three static nginx backends serve the same 1 KB file; ``pibl run`` (one worker, pinned to
core 1) is driven by wrk (pinned to core 0) for a fixed time, once with ``sample = 0``
and once with ``sample = 0.01``, alternating, ``--rounds`` times, in the same run. The
figure is CPU microseconds of the PIBL process tree per request completed (utime + stime
from /proc, as bench/compare.py measures), the median of the rounds; the shadow requests
(about 1 in 100 requests, each a second upstream exchange in the background) are part of
PIBL's CPU, not of the requests counted.

    .venv/bin/python bench/consistency_cpu.py                 # 3 rounds of 10 s
    .venv/bin/python bench/consistency_cpu.py --duration 20 --rounds 5

Needs nginx and wrk (Debian packages). Loopback only.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.comparison.peers import backends_conf
from bench.comparison.procs import free_port, nginx_supports_e, tree_cpu_seconds, wait_port


def pibl_config(path: Path, port: int, backends: list[int], sample: float, log: Path) -> None:
    lines = [
        "[server]",
        'host = "127.0.0.1"',
        f"port = {port}",
        "workers = 1",
        "[cache]",
        "enabled = false",
        "[log]",
        f'file = "{log}"',
        "stdout = false",
        "[consistency]",
        f"sample = {sample}",
        "rate = 1000",
    ]
    for p in backends:
        lines += ["[[backends]]", f'url = "http://127.0.0.1:{p}"']
    path.write_text("\n".join(lines) + "\n")


def one_run(
    workdir: Path, backends: list[int], sample: float, duration: float, connections: int
) -> tuple[float, int, str]:
    """(CPU us per request, requests, shadow counts) for one PIBL process."""
    port = free_port()
    cfg = workdir / f"pibl-{sample}.toml"
    log = workdir / f"pibl-{sample}.log"
    log.unlink(missing_ok=True)
    pibl_config(cfg, port, backends, sample, log)
    proc = subprocess.Popen(
        ["taskset", "-c", "1", sys.executable, "-m", "pibl", "run", "--config", str(cfg)],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        time.sleep(1.0)
        url = f"http://127.0.0.1:{port}/1k"
        subprocess.run(  # warm up
            ["taskset", "-c", "0", "wrk", "-t1", f"-c{connections}", "-d2s", url],
            capture_output=True,
            check=True,
        )
        before = tree_cpu_seconds(proc.pid)
        out = subprocess.run(
            ["taskset", "-c", "0", "wrk", "-t1", f"-c{connections}", f"-d{int(duration)}s", url],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        time.sleep(0.5)  # shadows still in flight finish
        after = tree_cpu_seconds(proc.pid)
        match = re.search(r"(\d+) requests in", out)
        assert match, out
        requests = int(match.group(1))
    finally:
        proc.terminate()
        proc.wait(30)
    text = log.read_text() if log.exists() else ""
    shadows = text.count(" shadow shadow ")
    return (after - before) / requests * 1e6, requests, f"{shadows} shadow requests"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(nginx) or not shutil.which("wrk"):
        raise SystemExit("needs nginx and wrk")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        www = workdir / "www"
        www.mkdir()
        (www / "1k").write_bytes(os.urandom(1024))
        prefix = workdir / "nginx"
        for sub in ("logs", "temp"):
            (prefix / sub).mkdir(parents=True)
        os.chmod(tmp, 0o755)
        ports = [free_port() for _ in range(3)]
        conf = prefix / "nginx.conf"
        conf.write_text(backends_conf(prefix, www, ports))
        argv = [nginx, "-p", f"{prefix}/", "-c", str(conf)]
        if nginx_supports_e(nginx):
            argv += ["-e", str(prefix / "logs" / "error.log")]
        backends = subprocess.Popen(
            ["taskset", "-c", "0", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            for p in ports:
                wait_port(p)
            results: dict[float, list[float]] = {0.0: [], 0.01: []}
            for r in range(args.rounds):
                for sample in results:
                    us, n, shadows = one_run(
                        workdir, ports, sample, args.duration, args.connections
                    )
                    results[sample].append(us)
                    print(
                        f"round {r + 1}: sample={sample:<5} {us:6.1f} us/request "
                        f"({n} requests, {shadows})",
                        flush=True,
                    )
        finally:
            backends.terminate()
            backends.wait(10)
    base = statistics.median(results[0.0])
    sampled = statistics.median(results[0.01])
    print(f"median CPU per request: sample=0 {base:.1f} us, sample=0.01 {sampled:.1f} us")
    print(f"overhead of sample = 0.01: {(sampled / base - 1) * 100:+.1f} %")


if __name__ == "__main__":
    main()
