#!/usr/bin/env python3
"""HTTP/2 to clients: CPU per request of PIBL, nginx and HAProxy, with hypercorn as anchor.

Method (the same as ``compare.py``, see bench/README.md):

* One nginx master with ``worker_processes 1`` serves a 1 KiB file on three loopback ports:
  the HTTP/1.1 backends. Backends, h2load and this script run on ``--loadgen-cpu``; the
  server under test alone on ``--proxy-cpu``.
* Each proxy (PIBL ``--workers 1``, nginx ``worker_processes 1``, HAProxy ``nbthread 1``)
  terminates TLS with ALPN h2 (``--mode tls``, default) or speaks h2c with prior knowledge
  (``--mode h2c``) and balances round robin over the three backends with upstream
  keep-alive, access log off. hypercorn (one worker) answers the same 1 KiB body itself
  from a minimal ASGI app over HTTP/2: the cost of a Python HTTP/2 server with no proxying.
* ``pibl-h1`` (not in the default rows) is the same PIBL with HTTP/1.1 clients (``h2load
  --h1``, ``-m`` requests pipelined), to see what HTTP/2 itself costs.
* ``pibl-base`` (with ``--base DIR``) is PIBL again, run from another checkout (say a
  ``git worktree`` of an older commit) with the same interpreter: before and after a change
  in one run.
* Load: ``h2load -c<C> -m<M> -D<D>`` after a warm-up run; CPU microseconds per request = the
  server's process tree CPU time (utime + stime, /proc) during the run / requests completed.

Each run's rows are saved under bench/results/ (``h2-<time>-<mode>.json``); ``--chart PNG
--replot A.json B.json`` draws one chart from saved runs (say the tls and the h2c one) and
exits. Standard library only (plus hypercorn for its row, and matplotlib for the chart:
``.venv/bin/pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from comparison.common import BenchError, log_tail, say
from comparison.peers import backends_conf, nginx_temp_paths, nginx_user_line
from comparison.procs import ProcessManager, tree_cpu_seconds, wait_listening

REPO = Path(__file__).resolve().parents[1]
BODY = 1024
APP = """
BODY = b"x" * {size}


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({{"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/octet-stream")]}})
    await send({{"type": "http.response.body", "body": BODY}})
"""


def nginx_conf(prefix: Path, port: int, backends: list[int], tls: Path | None) -> str:
    servers = "\n".join(f"        server 127.0.0.1:{p};" for p in backends)
    if tls is not None:
        listen = (
            f"listen 127.0.0.1:{port} ssl http2;\n"
            f"        ssl_certificate {tls / 'cert.pem'};\n"
            f"        ssl_certificate_key {tls / 'key.pem'};"
        )
    else:
        listen = f"listen 127.0.0.1:{port} http2;"
    return f"""{nginx_user_line()}
worker_processes 1;
daemon off;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;  # (HTTP/2 requests per connection too, since nginx 1.19.7)
{nginx_temp_paths(prefix)}
    upstream backends {{
{servers}
        keepalive 32;
    }}
    server {{
        {listen}
        location / {{
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


def haproxy_conf(port: int, backends: list[int], tls: Path | None) -> str:
    servers = "\n".join(f"    server b{i} 127.0.0.1:{p}" for i, p in enumerate(backends, 1))
    bind = f"bind 127.0.0.1:{port}" + (
        f" ssl crt {tls / 'haproxy.pem'} alpn h2,http/1.1" if tls else " proto h2"
    )
    return f"""global
    nbthread 1
    maxconn 4096
defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend fe
    {bind}
    default_backend be
backend be
    balance roundrobin
    http-reuse always
{servers}
"""


def pibl_conf(port: int, backends: list[int], tls: Path | None, tls_port: int) -> str:
    urls = "".join(f'[[backends]]\nurl = "http://127.0.0.1:{p}"\n' for p in backends)
    tls_section = (
        f'[tls]\nport = {tls_port}\ncert = "{tls / "cert.pem"}"\nkey = "{tls / "key.pem"}"\n'
        if tls
        else ""
    )
    return (
        f'[server]\nhost = "127.0.0.1"\nport = {port}\nworkers = 1\nh2c = true\n'
        f'[log]\nfile = ""\nstdout = false\n[cache]\nenabled = false\n'
        f"[health]\nenabled = false\n{tls_section}{urls}"
    )


def h2load(
    url: str, args: argparse.Namespace, duration: float, h1: bool = False
) -> dict[str, float]:
    argv = [
        "taskset", "-c", str(args.loadgen_cpu), "h2load",
        "-c", str(args.clients), "-m", str(args.streams), "-D", f"{duration:g}", url,
    ]  # fmt: skip
    if h1:  # HTTP/1.1 with as many requests pipelined per connection as streams
        argv.insert(-1, "--h1")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60).stdout
    m = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out)
    rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    proto = re.search(r"Application protocol: (\S+)", out)
    codes = re.search(r"status codes: (.*)", out)
    if codes is not None and not codes.group(1).startswith(m.group(1) if m else "?"):
        say(f"  status codes: {codes.group(1)}")
    if m is None or rps is None:
        raise BenchError(f"h2load output not understood:\n{out[-1500:]}")
    return {
        "done": int(m.group(1)),
        "ok": int(m.group(2)),
        "rps": float(rps.group(1)),
        "protocol": proto.group(1) if proto else "?",  # type: ignore[dict-item]
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=["tls", "h2c"], default="tls")
    p.add_argument(
        "--servers",
        default="pibl,nginx,haproxy,hypercorn",
        help="rows to run; pibl-h1 is PIBL again with HTTP/1.1 clients (h2load --h1)",
    )
    p.add_argument("--duration", type=float, default=10)
    p.add_argument("--warmup", type=float, default=2)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--streams", type=int, default=10, help="concurrent streams per connection")
    p.add_argument("--loadgen-cpu", type=int, default=0)
    p.add_argument("--proxy-cpu", type=int, default=1)
    p.add_argument("--base-port", type=int, default=18400)
    p.add_argument("--python", default=str(REPO / ".venv" / "bin" / "python"))
    p.add_argument("--base", type=Path, help="checkout the pibl-base row runs PIBL from")
    p.add_argument("--chart", type=Path, help="PNG to draw from --replot files")
    p.add_argument("--replot", type=Path, nargs="*", default=[], help="saved runs (JSON)")
    p.add_argument("--note", help="the chart's subtitle (default: the saved runs' own notes)")
    args = p.parse_args()
    if args.replot:
        rows = [row for path in args.replot for row in json.loads(path.read_text())["rows"]]
        if args.chart is None:
            raise SystemExit("--replot needs --chart PNG")
        note = args.note or "; ".join(json.loads(path.read_text())["run"] for path in args.replot)
        return 0 if draw_chart(rows, args.chart, note) else 1
    if "pibl-base" in args.servers.split(",") and args.base is None:
        raise SystemExit("the pibl-base row needs --base DIR")
    for tool in ("h2load", "nginx", "haproxy", "taskset"):
        if shutil.which(tool) is None and tool in ("h2load", "taskset"):
            raise SystemExit(f"{tool} is needed (apt-get install nghttp2-client util-linux)")
    manager = ProcessManager()
    tmp = Path(tempfile.mkdtemp(prefix="pibl-h2bench-"))
    tmp.chmod(0o755)  # nginx workers started by root run as nobody and read the files
    results: list[dict[str, object]] = []
    try:
        tls: Path | None = None
        if args.mode == "tls":
            tls = tmp / "certs"
            subprocess.run(
                [args.python, "-m", "pibl.certs", "--dir", str(tls)],
                cwd=tmp, check=True, capture_output=True, timeout=120,
            )  # fmt: skip
            (tls / "haproxy.pem").write_bytes(
                (tls / "cert.pem").read_bytes() + (tls / "key.pem").read_bytes()
            )
        www = tmp / "www"
        www.mkdir()
        (www / "1k").write_bytes(b"x" * BODY)
        prefix = tmp / "backends"
        (prefix / "temp").mkdir(parents=True)
        (prefix / "logs").mkdir()
        ports = [args.base_port + i for i in (1, 2, 3)]
        conf = prefix / "nginx.conf"
        conf.write_text(backends_conf(prefix, www, ports))
        back = manager.start(
            "backends",
            ["taskset", "-c", str(args.loadgen_cpu), "nginx", "-c", str(conf), "-p", str(prefix)],
            tmp / "backends.log",
        )
        wait_listening(back, ports)
        port = args.base_port + 80
        scheme = "https" if tls else "http"
        for name in args.servers.split(","):
            work = tmp / name
            (work / "temp").mkdir(parents=True)
            pin = ["taskset", "-c", str(args.proxy_cpu)]
            listen = port
            if name in ("pibl", "pibl-h1", "pibl-base"):
                cfg = work / "pibl.toml"
                listen = port + 1 if tls else port
                cfg.write_text(pibl_conf(port, ports, tls, port + 1))
                code = args.base.resolve() if name == "pibl-base" else REPO
                env = dict(os.environ, PYTHONPATH=str(code))
                argv = [*pin, args.python, "-m", "pibl", "run", "--config", str(cfg)]
                item = manager.start(name, argv, work / "out.log", cwd=work, env=env)
            elif name == "nginx":
                cfg = work / "nginx.conf"
                cfg.write_text(nginx_conf(work, port, ports, tls))
                argv = [*pin, "nginx", "-c", str(cfg), "-p", str(work)]
                item = manager.start(name, argv, work / "out.log")
            elif name == "haproxy":
                cfg = work / "haproxy.cfg"
                cfg.write_text(haproxy_conf(port, ports, tls))
                item = manager.start(name, [*pin, "haproxy", "-f", str(cfg)], work / "out.log")
            elif name == "hypercorn":
                (work / "h2app.py").write_text(APP.format(size=BODY))
                hyper = str(Path(args.python).with_name("hypercorn"))
                argv = [*pin, hyper, "--workers", "1", "-b", f"127.0.0.1:{port}"]
                if tls:
                    argv += ["--certfile", str(tls / "cert.pem"), "--keyfile", str(tls / "key.pem")]
                item = manager.start(name, [*argv, "h2app:app"], work / "out.log", cwd=work)
            else:
                raise BenchError(f"unknown server {name}")
            wait_listening(item, [listen])
            url = f"{scheme}://127.0.0.1:{listen}/1k"
            h1 = name == "pibl-h1"
            h2load(url, args, args.warmup, h1)
            item.remember_tree()
            cpu0, t0 = tree_cpu_seconds(item.pid), time.monotonic()
            run = h2load(url, args, args.duration, h1)
            cpu = tree_cpu_seconds(item.pid) - cpu0
            wall = time.monotonic() - t0
            row = {
                "server": name,
                "mode": args.mode,
                **run,
                "cpu_us_per_req": round(cpu / max(1, int(run["ok"])) * 1e6, 1),
                "cpu_pct": round(100 * cpu / wall, 1),
            }
            results.append(row)
            say(
                f"{name:10} {row['protocol']:4} {run['rps']:10.0f} req/s  "
                f"{row['cpu_us_per_req']:8.1f} CPU us/req  ok {run['ok']}/{run['done']}"
            )
            manager.stop(item)
            if not run["ok"]:
                say(log_tail(item.log))
        print(json.dumps(results, indent=1))
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        saved = REPO / "bench" / "results" / f"h2-{stamp}-{args.mode}.json"
        saved.parent.mkdir(exist_ok=True)
        when = time.strftime("%d %b %Y %H:%M UTC", time.gmtime())
        run = f"{args.mode}, {when}, {os.cpu_count()} CPUs"
        saved.write_text(json.dumps({"run": run, "rows": results}, indent=1))
        say(f"saved {saved.relative_to(REPO)}")
    finally:
        manager.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


NAMES = {
    "pibl": "PIBL (proxying)",
    "pibl-pure": "PIBL, Python source (proxying)",
    "pibl-base": "PIBL before",
    "pibl-h1": "PIBL, HTTP/1.1 clients",
    "nginx": "nginx (proxying)",
    "haproxy": "HAProxy (proxying)",
    "hypercorn": "hypercorn (answering itself)",
}
COLORS = {
    "pibl": "#d9534f",
    "pibl-pure": "#e99a97",
    "pibl-base": "#f0a8a6",
    "pibl-h1": "#e8a33d",
    "nginx": "#2e8b57",
    "haproxy": "#3a6fb0",
    "hypercorn": "#8e6bb8",
}


def draw_chart(rows: list[dict[str, object]], path: Path, note: str) -> bool:
    """CPU microseconds per request by mode (tls, h2c) and server, one bar each."""
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        say("matplotlib is not importable; chart skipped (pip install -e '.[bench]')")
        return False
    modes = list(dict.fromkeys(str(r["mode"]) for r in rows))
    servers = list(dict.fromkeys(str(r["server"]) for r in rows))
    width = 0.8 / len(servers)
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for s, server in enumerate(servers):
        xs, ys = [], []
        for m, mode in enumerate(modes):
            for r in rows:
                if r["server"] == server and r["mode"] == mode and r.get("ok"):
                    xs.append(m + (s - (len(servers) - 1) / 2) * width)
                    ys.append(float(str(r["cpu_us_per_req"])))
        bars = ax.bar(xs, ys, width, label=NAMES.get(server, server), color=COLORS.get(server))
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks(range(len(modes)), [f"HTTP/2 over {m.upper()}" for m in modes])
    ax.set_ylabel("CPU microseconds per request (lower is better)")
    ax.set_title(f"HTTP/2 to clients, 1 KiB responses\n{note}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    say(f"chart written to {path}")
    return True


if __name__ == "__main__":
    sys.exit(main())
