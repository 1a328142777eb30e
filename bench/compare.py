#!/usr/bin/env python3
"""Compare the CPU cost per request of PIBL, nginx and HAProxy on this machine.

Method (see bench/README.md):

* One nginx master with ``worker_processes 1`` serves a 1 KiB and a 100 KiB file on three
  loopback ports; these are the backends. The backends, wrk and this script run on one CPU
  (``--loadgen-cpu``, default 0), the proxy under test alone on another (``--proxy-cpu``,
  default 1).
* Every proxy (PIBL with and without its access log file, nginx, HAProxy) gets its own port
  and balances round robin over the same three backends with upstream keep-alive.
* For each proxy, connection mode and response size: a warm-up wrk run, then a measured
  ``wrk -t1 -c<C> -d<D>s --latency`` run. The proxy's process tree CPU time (utime + stime
  of the process and all its descendants, from /proc) is read before and after; CPU
  microseconds per request = CPU time / requests completed. Peak RSS of the tree is sampled
  every 0.2 s during the measured run.

Standard library only. A PNG chart is drawn when matplotlib happens to be importable.
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import hashlib
import http.client
import json
import os
import platform
import pwd
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS_DIR = HERE / "results"

ALL_PROXIES = ("pibl", "pibl-nolog", "nginx", "haproxy")
SIZES = {"1k": 1024, "100k": 100 * 1024}
MODES = ("keepalive", "close")
# Offsets from --base-port.
BACKEND_OFFSETS = (1, 2, 3)
PROXY_OFFSETS = {"pibl": 80, "pibl-nolog": 81, "nginx": 82, "haproxy": 83}

CLK_TCK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 20.0  # seconds for a process to start listening
STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL


class BenchError(Exception):
    """A failure with a message meant for the person running the benchmark."""


def say(message: str = "") -> None:
    print(message, flush=True)


_ACCESS_LINE = re.compile(r'^\S+ - \S+ \[[^]]*\] "')


def log_tail(*paths: Path, lines: int = 25) -> str:
    """The last lines of each file, leaving out access-log lines (combined format)."""
    out = []
    for path in paths:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        tail = [line for line in text.splitlines() if not _ACCESS_LINE.match(line)][-lines:]
        if tail:
            out.append(f"--- last {len(tail)} lines of {path} (access lines left out) ---")
            out.extend(tail)
    return "\n".join(out) if out else "(no log output)"


# -- /proc: process trees, CPU time, memory --------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (the command name may contain spaces and parentheses)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            data = fh.read()
    except OSError:
        return None
    return data[data.rfind(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants that are alive now (parents found via stat ppid)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat_fields(int(name))
        if fields is None:
            continue
        children.setdefault(int(fields[1]), []).append(int(name))
    if _stat_fields(root) is None:
        return []
    out: list[int] = []
    stack = [root]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(children.get(pid, ()))
    return out


def tree_cpu_seconds(root: int) -> float:
    """Sum of utime + stime (stat fields 14 and 15) over the process tree, in seconds."""
    ticks = 0
    for pid in process_tree(root):
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def _status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def tree_memory_kb(root: int) -> tuple[int, int]:
    """(sum of VmRSS, sum of Pss) over the process tree, in KiB."""
    rss = pss = 0
    for pid in process_tree(root):
        rss += _status_kb(pid, "VmRSS:")
        pss += _pss_kb(pid)
    return rss, pss


class MemorySampler(threading.Thread):
    """Samples the tree's memory every ``interval`` seconds and keeps the peaks."""

    def __init__(self, root: int, interval: float = 0.2) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.root = root
        self.interval = interval
        self.peak_rss_kb = 0
        self.peak_pss_kb = 0
        self.samples = 0
        self._stop_event = threading.Event()

    def _sample(self) -> None:
        rss, pss = tree_memory_kb(self.root)
        self.peak_rss_kb = max(self.peak_rss_kb, rss)
        self.peak_pss_kb = max(self.peak_pss_kb, pss)
        self.samples += 1

    def run(self) -> None:
        self._sample()
        while not self._stop_event.wait(self.interval):
            self._sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)
        self._sample()


_STAT_NAMES = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def cpu_stat(cpu: int) -> list[int]:
    """The ``cpuN`` line of /proc/stat (clock ticks), empty if not found."""
    try:
        with open("/proc/stat") as fh:
            for line in fh:
                if line.startswith(f"cpu{cpu} "):
                    return [int(x) for x in line.split()[1 : 1 + len(_STAT_NAMES)]]
    except (OSError, ValueError):
        pass
    return []


def cpu_stat_pct(before: list[int], after: list[int], wall: float) -> dict[str, float]:
    if not before or not after or wall <= 0:
        return {}
    return {
        name: round(100 * (a - b) / CLK_TCK / wall, 1)
        for name, b, a in zip(_STAT_NAMES, before, after, strict=False)
    }


# -- processes ------------------------------------------------------------------------------


def _start_time(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return fields[19] if fields is not None else None  # field 22: starttime


@dataclass
class Managed:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    # (pid, starttime) of every descendant seen so far, so that they can be ended even if
    # the root dies first and they are re-parented.
    seen: dict[int, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def remember_tree(self) -> None:
        for pid in process_tree(self.pid):
            if pid != self.pid:
                start = _start_time(pid)
                if start is not None:
                    self.seen.setdefault(pid, start)


class ProcessManager:
    """Starts processes, remembers their PIDs and ends every one of them (TERM, then KILL)."""

    def __init__(self) -> None:
        self.items: list[Managed] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        log: Path,
        *,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> Managed:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            try:
                proc = subprocess.Popen(
                    list(argv),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=cwd,
                    env=env,
                )
            except OSError as exc:
                raise BenchError(f"{name}: cannot run {argv[0]}: {exc}") from None
        item = Managed(name, proc, log)
        self.items.append(item)
        return item

    def stop(self, item: Managed, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait, SIGKILL; then the same for descendants still alive. Returns rc."""
        if item.proc.poll() is None:
            item.remember_tree()
            try:
                item.proc.send_signal(signal.SIGTERM)
                item.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                say(f"  {item.name} (pid {item.pid}) alive {timeout:.0f} s after SIGTERM: SIGKILL")
                item.proc.kill()
                try:
                    item.proc.wait(5)
                except subprocess.TimeoutExpired:
                    say(f"  {item.name} (pid {item.pid}) survived SIGKILL")
            except ProcessLookupError:
                pass
        leftovers = [pid for pid, st in item.seen.items() if _start_time(pid) == st]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in leftovers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                leftovers = [pid for pid in leftovers if _is_running(pid, item.seen[pid])]
                if not leftovers:
                    break
                time.sleep(0.05)
            if not leftovers:
                break
        if item in self.items:
            self.items.remove(item)
        return item.proc.returncode

    def stop_all(self) -> None:
        for item in reversed(list(self.items)):
            try:
                self.stop(item)
            except Exception as exc:  # keep going: every process must be ended
                say(f"  error while stopping {item.name} (pid {item.pid}): {exc}")


def _is_running(pid: int, start: str) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[19] == start and fields[0] != "Z"


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_listening(item: Managed, ports: Sequence[int], extra_logs: Sequence[Path] = ()) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    pending = list(ports)
    while pending:
        if item.proc.poll() is not None:
            raise BenchError(
                f"{item.name} exited with status {item.proc.returncode} before listening on "
                f"127.0.0.1:{pending[0]}\n{log_tail(item.log, *extra_logs)}"
            )
        try:
            with socket.create_connection(("127.0.0.1", pending[0]), timeout=0.5):
                pending.pop(0)
                continue
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BenchError(
                f"{item.name} is not listening on 127.0.0.1:{pending[0]} after "
                f"{START_TIMEOUT:.0f} s\n{log_tail(item.log, *extra_logs)}"
            )
        time.sleep(0.05)
    item.remember_tree()


# -- tools ----------------------------------------------------------------------------------


def find_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for directory in ("/usr/sbin", "/sbin", "/usr/local/sbin", "/usr/local/bin", "/usr/bin"):
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def ensure_tools(needed: Sequence[str]) -> dict[str, str]:
    """Paths of the needed programs; installs missing ones with apt-get when run as root."""
    missing = [name for name in needed if find_tool(name) is None]
    if missing:
        if os.geteuid() != 0 or find_tool("apt-get") is None:
            raise BenchError(
                f"missing programs: {', '.join(missing)}; install them first, for example "
                f"`sudo apt-get install -y {' '.join(missing)}`"
            )
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        install = ["apt-get", "install", "-y", *missing]
        say(f"installing {', '.join(missing)}: {' '.join(install)}")
        result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            say("apt-get install failed; running apt-get update and trying again")
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=900)
            result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
        still = [name for name in needed if find_tool(name) is None]
        if result.returncode != 0 or still:
            tail = "\n".join((result.stdout + result.stderr).splitlines()[-20:])
            raise BenchError(f"could not install {', '.join(still or missing)}:\n{tail}")
    if find_tool("taskset") is None:
        raise BenchError("taskset not found (it is part of util-linux)")
    paths = {name: find_tool(name) for name in (*needed, "taskset")}
    return {name: path for name, path in paths.items() if path is not None}


def tool_version(
    argv: Sequence[str], *, need_success: bool = False, env: dict[str, str] | None = None
) -> str:
    """First line of the program's output (``wrk -v`` prints it and exits with status 1)."""
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, timeout=30, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    lines = (result.stdout + result.stderr).strip().splitlines()
    if need_success and result.returncode != 0:
        return f"unavailable ({lines[-1] if lines else f'exit status {result.returncode}'})"
    return lines[0] if lines else "unknown"


def nginx_supports_e(nginx: str) -> bool:
    """``-e`` (error log at startup) exists since nginx 1.19.5."""
    match = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", tool_version([nginx, "-v"]))
    if match is None:
        return False
    return tuple(int(x) for x in match.groups()) >= (1, 19, 5)


# -- configuration files --------------------------------------------------------------------


def nginx_user_line() -> str:
    """Workers started by root switch user; name a group that exists on this machine."""
    if os.geteuid() != 0:
        return ""
    try:
        user = pwd.getpwnam("nobody")
        group = grp.getgrgid(user.pw_gid).gr_name
    except KeyError:
        return "user root root;"
    return f"user nobody {group};"


def nginx_temp_paths(prefix: Path) -> str:
    names = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    return "\n".join(f"    {n}_temp_path {prefix / 'temp' / n};" for n in names)


def backends_conf(prefix: Path, www: Path, ports: Sequence[int]) -> str:
    listens = "\n".join(f"        listen 127.0.0.1:{p};" for p in ports)
    return f"""# three static backends: one master, one worker, three ports
{nginx_user_line()}
worker_processes 1;
daemon off;
master_process on;
pid {prefix / "nginx.pid"};
error_log {prefix / "logs" / "error.log"} warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
{nginx_temp_paths(prefix)}
    server {{
{listens}
        root {www};
        location / {{
            add_header X-Backend $server_port;
        }}
        # for proxies with active health checks (PIBL probes GET /health by default)
        location = /health {{
            default_type text/plain;
            return 200 "ok\\n";
        }}
    }}
}}
"""


def nginx_proxy_conf(prefix: Path, port: int, backends: Sequence[int]) -> str:
    servers = "\n".join(f"        server 127.0.0.1:{p};" for p in backends)
    return f"""# nginx as the reverse proxy under test
{nginx_user_line()}
worker_processes 1;
daemon off;
master_process on;
pid {prefix / "nginx.pid"};
error_log {prefix / "logs" / "error.log"} warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log {prefix / "logs" / "access.log"};
    keepalive_timeout 75s;
    keepalive_requests 1000000;
{nginx_temp_paths(prefix)}
    upstream backends {{
{servers}
        keepalive 32;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering on;
        }}
    }}
}}
"""


def haproxy_conf(port: int, backends: Sequence[int]) -> str:
    servers = "\n".join(f"    server b{i} 127.0.0.1:{p}" for i, p in enumerate(backends, start=1))
    return f"""# HAProxy as the reverse proxy under test; no log directive, so nothing is logged
global
    nbthread 1
    maxconn 4096

defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-request 10s
    timeout http-keep-alive 75s

frontend fe
    bind 127.0.0.1:{port}
    default_backend be

backend be
    balance roundrobin
    http-reuse always
{servers}
"""


def pibl_conf(port: int, backends: Sequence[int], log_file: str, *, no_cache: bool) -> str:
    urls = "\n".join(f'[[backends]]\nurl = "http://127.0.0.1:{p}"\n' for p in backends)
    # nginx and HAProxy are set up without a response cache, so PIBL's is turned off too
    # (in versions that have one): every request must reach a backend.
    cache = "[cache]\nenabled = false\n\n" if no_cache else ""
    return f"""[server]
host = "127.0.0.1"
port = {port}
workers = 1

[log]
file = {json.dumps(log_file)}
stdout = false

{cache}{urls}"""


def pibl_env() -> dict[str, str]:
    """Environment for PIBL: this checkout first on the import path, unbuffered output."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def pibl_effective_config(python: str, path: Path) -> dict[str, Any]:
    """``pibl check-config`` on ``path``: the effective settings, or BenchError."""
    try:
        result = subprocess.run(
            [python, "-m", "pibl", "check-config", str(path)],
            cwd=path.parent,
            env=pibl_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BenchError(f"pibl check-config {path}: {exc}") from None
    text = result.stdout
    if result.returncode != 0 or "{" not in text:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise BenchError(f"pibl check-config {path} failed (status {result.returncode}):\n{tail}")
    try:
        effective: dict[str, Any] = json.loads(text[text.index("{") :])
    except ValueError as exc:
        raise BenchError(f"pibl check-config {path}: unreadable output ({exc})") from None
    return effective


# -- wrk ------------------------------------------------------------------------------------

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_NUM_UNIT = r"([\d.]+)(us|ms|s|m|h)"


def parse_wrk(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    match = re.search(r"^\s*(\d+) requests in " + _NUM_UNIT + r", ([\d.]+)(\w+) read", text, re.M)
    if match:
        out["requests"] = int(match.group(1))
        out["wrk_duration_s"] = float(match.group(2)) * _UNITS[match.group(3)]
        out["read"] = match.group(4) + match.group(5)
    match = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    if match:
        out["rps"] = float(match.group(1))
    for pct in ("50", "75", "90", "99"):
        match = re.search(rf"^\s+{pct}%\s+{_NUM_UNIT}\s*$", text, re.M)
        if match:
            out[f"p{pct}_ms"] = float(match.group(1)) * _UNITS[match.group(2)] * 1000
    match = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if match:
        keys = ("connect", "read", "write", "timeout")
        out["socket_errors"] = {k: int(v) for k, v in zip(keys, match.groups(), strict=True)}
        out["socket_errors_line"] = match.group(0)
    match = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if match:
        out["non2xx"] = int(match.group(1))
        out["non2xx_line"] = match.group(0)
    return out


# -- the benchmark --------------------------------------------------------------------------


@dataclass
class Result:
    proxy: str
    mode: str
    size: str
    ok: bool = False
    error: str = ""
    requests: int = 0
    rps: float = 0.0
    wall_s: float = 0.0
    proxy_cpu_s: float = 0.0
    cpu_us_per_req: float | None = None
    cpu_ratio_vs_nginx: float | None = None
    proxy_cpu_pct: float | None = None
    loadgen_cpu_pct: float | None = None
    backend_cpu_us_per_req: float | None = None
    # Whole-CPU time split from /proc/stat (percent of the run's wall time), and the proxy
    # CPU's busy time not charged to the proxy tree (other processes, uncharged interrupts).
    proxy_cpu_stat: dict[str, float] = field(default_factory=dict)
    loadgen_cpu_stat: dict[str, float] = field(default_factory=dict)
    others_on_proxy_cpu_pct: float | None = None
    p50_ms: float | None = None
    p75_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    peak_rss_mb: float | None = None
    peak_pss_mb: float | None = None
    rss_samples: int = 0
    non2xx: int = 0
    socket_errors: dict[str, int] = field(default_factory=dict)
    warmup_requests: int = 0
    wrk_command: str = ""
    wrk_output: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass
class ProxyState:
    name: str
    item: Managed
    port: int
    logs: list[Path]
    access_log: Path | None = None
    requests_sent: int = 0  # sanity + warm-up + measured requests completed
    rotation: list[str] = field(default_factory=list)


class Bench:
    def __init__(self, args: argparse.Namespace, tools: dict[str, str], tmp: Path) -> None:
        self.args = args
        self.tools = tools
        self.tmp = tmp
        self.pm = ProcessManager()
        self.results: list[Result] = []
        self.failures: list[dict[str, str]] = []
        self.logs_info: dict[str, Any] = {}
        self.backend: Managed | None = None
        self.backend_ports = [args.base_port + o for o in BACKEND_OFFSETS]
        self.deadline = 0.0
        self.pibl_configs: dict[str, dict[str, Any]] = {}
        self._pibl_has_cache: bool | None = None

    def pibl_has_cache(self) -> bool:
        """Whether this PIBL's configuration has a [cache] section (checked once)."""
        if self._pibl_has_cache is None:
            probe = self.tmp / "pibl-probe.toml"
            probe.write_text(pibl_conf(1, self.backend_ports, "", no_cache=False))
            self._pibl_has_cache = "cache" in pibl_effective_config(self.args.python, probe)
        return self._pibl_has_cache

    # -- helpers ---

    def pin(self, cpu: int) -> list[str]:
        return [self.tools["taskset"], "-c", str(cpu)]

    def http_get(self, port: int, path: str) -> tuple[int, int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", path, headers={"Connection": "close"})
            response = conn.getresponse()
            body = response.read()
            return response.status, len(body), response.getheader("X-Backend") or "?"
        finally:
            conn.close()

    def check_responses(self, name: str, port: int) -> list[str]:
        """Right status and body size for every size; returns the backends seen in order."""
        for size, nbytes in SIZES.items():
            status, length, _ = self.http_get(port, f"/{size}")
            if status != 200 or length != nbytes:
                raise BenchError(
                    f"{name}: GET /{size} on port {port} gave status {status} and {length} "
                    f"bytes, expected 200 and {nbytes}"
                )
        return [self.http_get(port, "/1k")[2] for _ in range(6)]

    def free_ports(self, ports: Sequence[int]) -> None:
        busy = [p for p in ports if not port_is_free(p)]
        if busy:
            raise BenchError(
                f"port(s) {', '.join(map(str, busy))} on 127.0.0.1 already in use; "
                "stop whatever listens there or choose another --base-port"
            )

    # -- backends ---

    def start_backends(self) -> None:
        www = self.tmp / "www"
        www.mkdir()
        for size, nbytes in SIZES.items():
            line = (f"{size} " * 64)[:63] + "\n"
            data = (line * (nbytes // len(line) + 1))[:nbytes]
            (www / size).write_text(data)
        prefix = self.tmp / "backends"
        (prefix / "logs").mkdir(parents=True)
        (prefix / "temp").mkdir()
        conf = prefix / "nginx.conf"
        conf.write_text(backends_conf(prefix, www, self.backend_ports))
        self.free_ports(self.backend_ports)
        argv = [*self.pin(self.args.loadgen_cpu), *self.nginx_argv(prefix, conf)]
        say(
            f"backends: nginx on 127.0.0.1:{','.join(map(str, self.backend_ports))} "
            f"(CPU {self.args.loadgen_cpu})"
        )
        self.backend = self.pm.start("backend nginx", argv, prefix / "logs" / "stdout.log")
        wait_listening(self.backend, self.backend_ports, [prefix / "logs" / "error.log"])
        for port in self.backend_ports:
            for size, nbytes in SIZES.items():
                status, length, _ = self.http_get(port, f"/{size}")
                if status != 200 or length != nbytes:
                    raise BenchError(
                        f"backend 127.0.0.1:{port}/{size}: status {status}, {length} bytes\n"
                        + log_tail(prefix / "logs" / "error.log")
                    )

    def nginx_argv(self, prefix: Path, conf: Path) -> list[str]:
        argv = [self.tools["nginx"], "-p", f"{prefix}/", "-c", str(conf)]
        if nginx_supports_e(self.tools["nginx"]):
            argv += ["-e", str(prefix / "logs" / "error.log")]
        return argv

    # -- proxies ---

    def start_proxy(self, name: str) -> ProxyState:
        port = self.args.base_port + PROXY_OFFSETS[name]
        self.free_ports([port])
        cpu = self.pin(self.args.proxy_cpu)
        if name in ("pibl", "pibl-nolog"):
            d = self.tmp / name
            d.mkdir()
            access = d / "access.log" if name == "pibl" else None
            conf = d / "pibl.toml"
            conf.write_text(
                pibl_conf(
                    port,
                    self.backend_ports,
                    str(access) if access else "",
                    no_cache=self.pibl_has_cache(),
                )
            )
            self.pibl_configs[name] = pibl_effective_config(self.args.python, conf)
            argv = [*cpu, self.args.python, "-m", "pibl", "run", "--config", str(conf)]
            # Run in its own directory so that relative paths stay out of the work tree.
            item = self.pm.start(name, argv, d / "stdout.log", cwd=d, env=pibl_env())
            logs = [d / "stdout.log"] + ([access] if access else [])
        elif name == "nginx":
            prefix = self.tmp / "nginx"
            (prefix / "logs").mkdir(parents=True)
            (prefix / "temp").mkdir()
            conf = prefix / "nginx.conf"
            conf.write_text(nginx_proxy_conf(prefix, port, self.backend_ports))
            item = self.pm.start(
                name, [*cpu, *self.nginx_argv(prefix, conf)], prefix / "logs" / "stdout.log"
            )
            access = prefix / "logs" / "access.log"
            logs = [prefix / "logs" / "stdout.log", prefix / "logs" / "error.log"]
        elif name == "haproxy":
            d = self.tmp / "haproxy"
            d.mkdir()
            conf = d / "haproxy.cfg"
            conf.write_text(haproxy_conf(port, self.backend_ports))
            item = self.pm.start(
                name, [*cpu, self.tools["haproxy"], "-db", "-f", str(conf)], d / "stdout.log"
            )
            access = None
            logs = [d / "stdout.log"]
        else:
            raise BenchError(f"unknown proxy {name!r}")
        state = ProxyState(name, item, port, logs, access)
        wait_listening(item, [port], logs[1:])
        try:
            state.rotation = self.check_responses(name, port)
        except (OSError, http.client.HTTPException) as exc:
            raise BenchError(f"{name}: test request failed: {exc}\n{log_tail(*logs)}") from None
        state.requests_sent += len(SIZES) + 6
        seen = set(state.rotation)
        expected = {str(p) for p in self.backend_ports}
        note = "round robin ok" if seen == expected else "NOT all three backends used"
        say(
            f"{name}: pid {item.pid}, port {port}, CPU {self.args.proxy_cpu}; "
            f"backends for 6 requests: {' '.join(state.rotation)} ({note})"
        )
        return state

    # -- one measurement ---

    def wrk(self, port: int, size: str, mode: str, duration: int) -> tuple[str, list[str]]:
        argv = [
            *self.pin(self.args.loadgen_cpu),
            self.tools["wrk"],
            "-t1",
            f"-c{self.args.connections}",
            f"-d{duration}s",
            "--latency",
        ]
        if mode == "close":
            argv += ["-H", "Connection: close"]
        argv.append(f"http://127.0.0.1:{port}/{size}")
        log = self.tmp / "wrk.log"
        log.write_bytes(b"")
        item = self.pm.start("wrk", argv, log)
        try:
            item.proc.wait(duration + 30)
        except subprocess.TimeoutExpired:
            self.pm.stop(item)
            raise BenchError(f"wrk did not finish within {duration + 30} s") from None
        self.pm.stop(item)
        text = log.read_text(errors="replace")
        if item.proc.returncode != 0:
            raise BenchError(f"wrk exited with status {item.proc.returncode}:\n{text}")
        return text, argv

    def measure(self, state: ProxyState, mode: str, size: str) -> Result:
        args = self.args
        result = Result(state.name, mode, size)
        assert self.backend is not None
        if args.warmup > 0:
            text, _ = self.wrk(state.port, size, mode, args.warmup)
            warm = parse_wrk(text)
            result.warmup_requests = warm.get("requests", 0)
            state.requests_sent += result.warmup_requests
            if warm.get("non2xx") or any(warm.get("socket_errors", {}).values()):
                result.notes.append(
                    "warm-up: "
                    + "; ".join(warm[k] for k in ("non2xx_line", "socket_errors_line") if k in warm)
                )
        if state.item.proc.poll() is not None:
            raise BenchError(
                f"{state.name} exited (status {state.item.proc.returncode}) during warm-up\n"
                + log_tail(*state.logs)
            )
        state.item.remember_tree()
        sampler = MemorySampler(state.item.pid, 0.2)
        cpu_before = tree_cpu_seconds(state.item.pid)
        backend_before = tree_cpu_seconds(self.backend.pid)
        ru_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        stat_before = {cpu: cpu_stat(cpu) for cpu in (args.proxy_cpu, args.loadgen_cpu)}
        sampler.start()
        started = time.monotonic()
        try:
            text, argv = self.wrk(state.port, size, mode, args.duration)
        finally:
            wall = time.monotonic() - started
            cpu_after = tree_cpu_seconds(state.item.pid)
            backend_after = tree_cpu_seconds(self.backend.pid)
            ru_after = resource.getrusage(resource.RUSAGE_CHILDREN)
            stat_after = {cpu: cpu_stat(cpu) for cpu in stat_before}
            sampler.stop()
        parsed = parse_wrk(text)
        result.wrk_command = " ".join(a if " " not in a else f'"{a}"' for a in argv)
        result.wrk_output = text
        result.wall_s = round(wall, 3)
        result.requests = parsed.get("requests", 0)
        state.requests_sent += result.requests
        result.rps = parsed.get("rps", 0.0)
        for key in ("p50_ms", "p75_ms", "p90_ms", "p99_ms"):
            setattr(result, key, parsed.get(key))
        result.non2xx = parsed.get("non2xx", 0)
        result.socket_errors = parsed.get("socket_errors", {})
        for key in ("non2xx_line", "socket_errors_line"):
            if key in parsed:
                result.notes.append(parsed[key])
        result.proxy_cpu_s = round(cpu_after - cpu_before, 3)
        result.proxy_cpu_pct = round(100 * (cpu_after - cpu_before) / wall, 1)
        wrk_cpu = ru_after.ru_utime - ru_before.ru_utime + ru_after.ru_stime - ru_before.ru_stime
        backend_cpu = backend_after - backend_before
        result.loadgen_cpu_pct = round(100 * (wrk_cpu + backend_cpu) / wall, 1)
        pcpu, lcpu = args.proxy_cpu, args.loadgen_cpu
        result.proxy_cpu_stat = cpu_stat_pct(stat_before[pcpu], stat_after[pcpu], wall)
        result.loadgen_cpu_stat = cpu_stat_pct(stat_before[lcpu], stat_after[lcpu], wall)
        pstat = result.proxy_cpu_stat
        if pstat:
            busy = 100.0 - pstat["idle"] - pstat["iowait"] - pstat["steal"]
            result.others_on_proxy_cpu_pct = round(max(0.0, busy - result.proxy_cpu_pct), 1)
        result.peak_rss_mb = round(sampler.peak_rss_kb / 1024, 1)
        result.peak_pss_mb = round(sampler.peak_pss_kb / 1024, 1) if sampler.peak_pss_kb else None
        result.rss_samples = sampler.samples
        if result.requests > 0:
            result.cpu_us_per_req = round(1e6 * (cpu_after - cpu_before) / result.requests, 2)
            result.backend_cpu_us_per_req = round(1e6 * backend_cpu / result.requests, 2)
        if state.item.proc.poll() is not None:
            result.error = (
                f"{state.name} exited (status {state.item.proc.returncode}) during the run\n"
                + log_tail(*state.logs)
            )
        elif result.requests == 0:
            result.error = "wrk completed no requests\n" + text
        else:
            result.ok = True
        return result

    # -- whole run ---

    def run(self) -> None:
        args = self.args
        per_run = args.warmup + args.duration + 5
        budget = len(args.proxies) * (len(args.modes) * len(args.sizes) * per_run + 45) + 60
        self.deadline = time.monotonic() + budget
        runs = len(args.proxies) * len(args.modes) * len(args.sizes)
        estimate = runs * (args.warmup + args.duration + 1) + 5 * len(args.proxies)
        say(f"estimated time: about {estimate} s (hard limit {budget} s)")
        self.start_backends()
        for name in args.proxies:
            if time.monotonic() > self.deadline:
                self.fail(name, "-", "-", "time limit reached; skipped")
                continue
            say()
            try:
                state = self.start_proxy(name)
            except BenchError as exc:
                self.fail(name, "-", "-", f"failed to start: {exc}")
                self.stop_named(name)
                continue
            try:
                self.measure_proxy(state)
            finally:
                lines_before = count_lines(state.access_log)
                stopping = time.monotonic()
                rc = self.pm.stop(state.item)
                stop_s = time.monotonic() - stopping
                if rc not in (0, None, -signal.SIGTERM):
                    say(f"  {name} exit status after SIGTERM: {rc}")
                self.record_log(state)
                self.logs_info[name].update(
                    lines_before_stop=lines_before, exit_status=rc, stop_seconds=round(stop_s, 2)
                )

    def measure_proxy(self, state: ProxyState) -> None:
        args = self.args
        for mode in args.modes:
            for size in args.sizes:
                if time.monotonic() > self.deadline:
                    self.fail(state.name, mode, size, "time limit reached; skipped")
                    continue
                if state.item.proc.poll() is not None:
                    self.fail(state.name, mode, size, "proxy is no longer running; skipped")
                    continue
                say(
                    f"  {state.name} {mode} /{size}: warm-up {args.warmup} s, "
                    f"measure {args.duration} s, {args.connections} connections"
                )
                try:
                    result = self.measure(state, mode, size)
                except BenchError as exc:
                    self.fail(state.name, mode, size, str(exc))
                    continue
                self.results.append(result)
                self.print_result(result)
                if not result.ok:
                    self.failures.append(
                        {"proxy": state.name, "mode": mode, "size": size, "error": result.error}
                    )

    def stop_named(self, name: str) -> None:
        for item in list(self.pm.items):
            if item.name == name:
                self.pm.stop(item)

    def fail(self, proxy: str, mode: str, size: str, message: str) -> None:
        say(f"  ERROR {proxy} {mode} {size}: {message}")
        self.failures.append({"proxy": proxy, "mode": mode, "size": size, "error": message})

    def print_result(self, r: Result) -> None:
        if r.ok:
            say(
                f"    {r.requests} requests, {r.rps:.0f} req/s, {fmt(r.cpu_us_per_req)} us/req, "
                f"proxy CPU {r.proxy_cpu_pct}%, load side CPU {r.loadgen_cpu_pct}%, "
                f"p50 {fmt_ms(r.p50_ms)}, p99 {fmt_ms(r.p99_ms)}, peak RSS {r.peak_rss_mb} MB"
            )
        else:
            say(f"    FAILED: {r.error}")
        for note in r.notes:
            say(f"    wrk: {note}")

    def record_log(self, state: ProxyState) -> None:
        path = state.access_log
        info: dict[str, Any] = {"requests_completed_by_wrk": state.requests_sent}
        if path is None:
            info["access_log"] = None
        else:
            info["access_log"] = str(path)
            info["lines"] = count_lines(path)
            info["bytes"] = path.stat().st_size if path.exists() else 0
        self.logs_info[state.name] = info


def count_lines(path: Path | None) -> int | None:
    """Access-log lines (``] "GET ``) in the file; PIBL's file also holds event lines."""
    if path is None:
        return None
    try:
        with open(path, "rb") as fh:
            return sum(1 for line in fh if b'] "GET ' in line)
    except OSError:
        return None


# -- output ---------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.0f}us"
    if value < 1000:
        return f"{value:.2f}ms"
    return f"{value / 1000:.2f}s"


def add_ratios(results: list[Result]) -> None:
    base = {(r.mode, r.size): r.cpu_us_per_req for r in results if r.proxy == "nginx" and r.ok}
    for r in results:
        ref = base.get((r.mode, r.size))
        if r.ok and ref and r.cpu_us_per_req is not None:
            r.cpu_ratio_vs_nginx = round(r.cpu_us_per_req / ref, 2)


def table(results: list[Result]) -> str:
    head = (
        "proxy",
        "mode",
        "size",
        "req/s",
        "CPU us/req",
        "vs nginx",
        "proxy CPU%",
        "load CPU%",
        "others CPU%",
        "p50",
        "p99",
        "peak RSS MB",
        "errors",
    )
    rows = []
    for r in results:
        errors = r.non2xx + sum(r.socket_errors.values())
        rows.append(
            (
                r.proxy,
                r.mode,
                r.size,
                f"{r.rps:.0f}" if r.ok else "FAILED",
                fmt(r.cpu_us_per_req),
                "-" if r.cpu_ratio_vs_nginx is None else f"{r.cpu_ratio_vs_nginx:.2f}x",
                fmt(r.proxy_cpu_pct, 0),
                fmt(r.loadgen_cpu_pct, 0),
                fmt(r.others_on_proxy_cpu_pct, 0),
                fmt_ms(r.p50_ms),
                fmt_ms(r.p99_ms),
                fmt(r.peak_rss_mb),
                str(errors),
            )
        )
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    lines = []
    for i, row in enumerate([head, *rows]):
        cells = [
            str(c).ljust(w) if j < 3 else str(c).rjust(w)
            for j, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def draw_chart(results: list[Result], path: Path) -> bool:
    try:
        import matplotlib  # type: ignore[import-not-found]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found]
    except ImportError:
        say("matplotlib is not importable; chart skipped")
        return False
    ok = [r for r in results if r.ok and r.cpu_us_per_req is not None]
    if not ok:
        return False
    groups = list(dict.fromkeys((r.mode, r.size) for r in ok))
    proxies = list(dict.fromkeys(r.proxy for r in ok))
    value = {(r.proxy, r.mode, r.size): r.cpu_us_per_req for r in ok}
    width = 0.8 / len(proxies)
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(groups)), 4.5))
    for i, proxy in enumerate(proxies):
        xs = [g + (i - (len(proxies) - 1) / 2) * width for g in range(len(groups))]
        ys = [value.get((proxy, m, s), 0) for m, s in groups]
        bars = ax.bar(xs, ys, width, label=proxy)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"/{s}\n{m}" for m, s in groups])
    ax.set_ylabel("proxy CPU microseconds per request")
    ax.set_title("CPU cost per request (lower is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def pibl_tree_digest() -> str:
    """Size and mtime of every file under pibl/, to notice the code changing during a run."""
    entries = []
    for path in sorted((REPO / "pibl").rglob("*.py")):
        try:
            st = path.stat()
        except OSError:
            continue
        entries.append(f"{path.relative_to(REPO)}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


def git_status_pibl() -> list[str] | None:
    """Uncommitted changes under pibl/ (read-only ``git status``), None if git failed."""
    try:
        result = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "pibl"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.splitlines() if result.returncode == 0 else None


def machine_info(args: argparse.Namespace, tools: dict[str, str]) -> dict[str, Any]:
    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = tool_version(["git", "-C", str(REPO), "rev-parse", "HEAD"])
    return {
        "kernel": platform.release(),
        "cpu_model": cpu_model,
        "cpus_online": os.cpu_count(),
        "clk_tck": CLK_TCK,
        "python_for_pibl": args.python,
        "pibl_version": tool_version(
            [args.python, "-m", "pibl", "--version"], need_success=True, env=pibl_env()
        ),
        "git_commit": commit,
        "git_status_pibl": git_status_pibl(),
        "nginx": tool_version([tools["nginx"], "-v"]) if "nginx" in tools else None,
        "haproxy": tool_version([tools["haproxy"], "-v"]) if "haproxy" in tools else None,
        "wrk": tool_version([tools["wrk"], "-v"]),
    }


# -- command line ---------------------------------------------------------------------------


def _list(choices: Sequence[str]) -> Any:
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {', '.join(choices)}"
            )
        return list(dict.fromkeys(items))

    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    default_python = REPO / ".venv" / "bin" / "python"
    p = argparse.ArgumentParser(
        description="CPU cost per request of PIBL vs nginx vs HAProxy (loopback, pinned CPUs)."
    )
    p.add_argument(
        "--proxies",
        type=_list(ALL_PROXIES),
        default=list(ALL_PROXIES),
        help=f"comma-separated subset of {','.join(ALL_PROXIES)} (default: all)",
    )
    p.add_argument(
        "--sizes",
        type=_list(tuple(SIZES)),
        default=list(SIZES),
        help="comma-separated subset of 1k,100k (default: both)",
    )
    p.add_argument(
        "--mode",
        choices=(*MODES, "both"),
        default="keepalive",
        help="client connections: keep-alive, 'Connection: close' on every "
        "request, or both passes (default keepalive)",
    )
    p.add_argument("--duration", type=int, default=None, help="seconds per measured run (10)")
    p.add_argument("--warmup", type=int, default=None, help="seconds of warm-up per run (2)")
    p.add_argument("--connections", type=int, default=16, help="wrk connections (16)")
    p.add_argument("--quick", action="store_true", help="3 s runs with 1 s warm-up")
    p.add_argument("--loadgen-cpu", type=int, default=0, help="CPU for backends and wrk (0)")
    p.add_argument("--proxy-cpu", type=int, default=1, help="CPU for the proxy under test (1)")
    p.add_argument(
        "--base-port",
        type=int,
        default=18000,
        help="backends listen on BASE+1..3, proxies on BASE+80..83 (18000)",
    )
    p.add_argument(
        "--python",
        default=str(default_python if default_python.exists() else Path(sys.executable)),
        help="interpreter that runs PIBL (default: the project's .venv)",
    )
    p.add_argument(
        "--keep-tmp", action="store_true", help="keep the temporary directory with configs and logs"
    )
    args = p.parse_args(argv)
    args.duration = args.duration or (3 if args.quick else 10)
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    args.modes = list(MODES) if args.mode == "both" else [args.mode]
    if args.duration < 1 or args.warmup < 0 or args.connections < 1:
        p.error("--duration and --connections must be positive, --warmup not negative")
    if not 1024 < args.base_port < 65000:
        p.error("--base-port must be between 1025 and 64999")
    return args


def _on_signal(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not sys.platform.startswith("linux"):
        say("this benchmark reads /proc and needs Linux")
        return 2
    allowed = os.sched_getaffinity(0)
    for cpu in (args.loadgen_cpu, args.proxy_cpu):
        if cpu not in allowed:
            say(
                f"CPU {cpu} is not available here (usable CPUs: {sorted(allowed)}); "
                "use --loadgen-cpu / --proxy-cpu"
            )
            return 2
    if args.loadgen_cpu == args.proxy_cpu:
        say(
            "warning: proxy and load generator share one CPU; CPU per request is still "
            "measured, req/s and latency are not meaningful"
        )
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)

    needed = ["nginx", "wrk"] + (["haproxy"] if "haproxy" in args.proxies else [])
    try:
        tools = ensure_tools(needed)
    except BenchError as exc:
        say(f"error: {exc}")
        return 2
    # This script's own sampling stays on the load-generator CPU, away from the proxy.
    os.sched_setaffinity(0, {args.loadgen_cpu})

    stamp = time.strftime("%Y%m%d-%H%M%S")
    tmp = Path(tempfile.mkdtemp(prefix="pibl-bench-"))
    tmp.chmod(0o755)  # nginx workers run as an unprivileged user and read files in it
    say(f"temporary directory: {tmp}")
    info = machine_info(args, tools)
    code_before = pibl_tree_digest()
    say(
        f"{info['pibl_version']} | {info['nginx']} | {info['haproxy'] or 'haproxy not used'}"
        f" | {info['wrk']}"
    )
    bench = Bench(args, tools, tmp)
    interrupted = False
    try:
        bench.run()
    except BenchError as exc:
        bench.fail("-", "-", "-", str(exc))
    except KeyboardInterrupt:
        interrupted = True
        say("\ninterrupted; stopping processes")
    finally:
        bench.pm.stop_all()

    add_ratios(bench.results)
    code_after = (
        tool_version(["git", "-C", str(REPO), "rev-parse", "HEAD"]),
        git_status_pibl(),
        pibl_tree_digest(),
    )
    code_changed = code_after != (info["git_commit"], info["git_status_pibl"], code_before)
    say()
    say(
        f"wrk -t1 -c{args.connections} -d{args.duration}s --latency, warm-up {args.warmup} s; "
        f"proxy on CPU {args.proxy_cpu}, backends + wrk on CPU {args.loadgen_cpu}"
    )
    say(
        "CPU us/req = (utime+stime of the proxy process tree) / requests completed; "
        "'load CPU%' = backends + wrk on the load CPU; "
        "'others CPU%' = time on the proxy CPU used by other processes"
    )
    say(table(bench.results))
    for r in bench.results:
        if r.non2xx or any(r.socket_errors.values()):
            say(f"errors in {r.proxy}/{r.mode}/{r.size}: wrk reported " + "; ".join(r.notes))
    disturbed = [r for r in bench.results if r.ok and (r.others_on_proxy_cpu_pct or 0) >= 5]
    if disturbed:
        say(
            f"note: other processes used >= 5% of CPU {args.proxy_cpu} during "
            + ", ".join(f"{r.proxy}/{r.mode}/{r.size}" for r in disturbed)
            + "; those rows may be disturbed, run again on a quiet machine"
        )
    saturated = [r for r in bench.results if r.ok and (r.loadgen_cpu_pct or 0) >= 90]
    if saturated:
        say(
            "note: the load CPU was >= 90% busy in "
            + ", ".join(f"{r.proxy}/{r.mode}/{r.size}" for r in saturated)
            + "; req/s there is limited by wrk + backends, not by the proxy"
        )
    had_errors = any(r.non2xx or any(r.socket_errors.values()) for r in bench.results)
    keep = args.keep_tmp or bool(bench.failures) or had_errors
    kept = "" if keep else " (removed at exit; --keep-tmp keeps it)"
    for name, log in bench.logs_info.items():
        if log.get("access_log"):
            say(
                f"{name} access log: {log['access_log']}: {log.get('lines', '?')} lines "
                f"({log.get('lines_before_stop', '?')} before SIGTERM), "
                f"{log.get('bytes', 0) / 1e6:.1f} MB, for {log['requests_completed_by_wrk']} "
                f"requests completed by wrk{kept}"
            )
    for name, log in bench.logs_info.items():
        normal = (0, None, -signal.SIGTERM)
        if log.get("exit_status") not in normal or (log.get("stop_seconds") or 0) > 3:
            say(
                f"{name}: exit status {log.get('exit_status')} "
                f"{log.get('stop_seconds')} s after SIGTERM"
            )
    if code_changed:
        say(
            "warning: the files under pibl/ changed while the benchmark ran; PIBL rows may "
            "come from different versions of the code"
        )
    for failure in bench.failures:
        say(
            f"FAILED {failure['proxy']} {failure['mode']} {failure['size']}: "
            f"{failure['error'].splitlines()[0] if failure['error'] else ''}"
        )

    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"{stamp}.json"
    payload = {
        "timestamp": stamp,
        "parameters": {
            "proxies": args.proxies,
            "sizes": args.sizes,
            "modes": args.modes,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "connections": args.connections,
            "wrk_threads": 1,
            "loadgen_cpu": args.loadgen_cpu,
            "proxy_cpu": args.proxy_cpu,
            "base_port": args.base_port,
        },
        "machine": info,
        "results": [asdict(r) for r in bench.results],
        "failures": bench.failures,
        "access_logs": bench.logs_info,
        "pibl_effective_config": bench.pibl_configs,
        "interrupted": interrupted,
        "pibl_code_changed_during_run": code_changed,
    }
    out.write_text(json.dumps(payload, indent=2) + "\n")
    say(f"results: {out}")
    chart = RESULTS_DIR / f"{stamp}.png"
    if draw_chart(bench.results, chart):
        say(f"chart: {chart}")
    if keep:
        say(f"kept {tmp} (configs and logs)")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    if interrupted:
        return 130
    return 1 if bench.failures or not bench.results else 0


if __name__ == "__main__":
    sys.exit(main())
