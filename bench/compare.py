#!/usr/bin/env python3
"""Compare the CPU cost per request of PIBL, nginx and HAProxy on this machine.

Method (see bench/README.md):

* One nginx master with ``worker_processes 1`` serves a 1 KiB and a 100 KiB file on three
  loopback ports; these are the backends. The backends, wrk and this script run on one CPU
  (``--loadgen-cpu``, default 0), the proxy under test alone on another (``--proxy-cpu``,
  default 1).
* Scenarios: ``proxy`` (every request reaches a backend), ``cache`` (cache hits: PIBL's
  disk cache, nginx ``proxy_cache``, HAProxy's memory cache), ``tls`` (HTTPS termination)
  and ``logging`` (access log on and off). In each, PIBL (``--workers 1``: one worker and
  its master), nginx (``worker_processes 1``) and HAProxy (``nbthread 1``) balance round
  robin over the same three backends with upstream keep-alive, one at a time.
* For each proxy, connection mode and response size: a warm-up wrk run, then a measured
  ``wrk -t1 -c<C> -d<D>s --latency`` run. The proxy's process tree CPU time (utime + stime
  of the process and all its descendants, from /proc) is read before and after; CPU
  microseconds per request = CPU time / requests completed. Peak RSS of the tree is sampled
  every 0.2 s during the measured run.

Standard library only. A PNG chart is drawn when matplotlib is importable.
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
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS_DIR = HERE / "results"

ALL_SCENARIOS = ("proxy", "cache", "tls", "logging")
ALL_PROXIES = ("pibl", "pibl-nolog", "nginx", "nginx-nolog", "haproxy")
SIZES = {"1k": 1024, "100k": 100 * 1024}
MODES = ("keepalive", "close")
# Offsets from --base-port: backends on BASE+1..3, proxies on BASE+80 upward (one or two
# ports for every proxy started, in order).
BACKEND_OFFSETS = (1, 2, 3)
PROXY_PORT_OFFSET = 80
CACHED_PREFIX = "/cached"  # backend location with cacheable responses (cache scenario)
CACHE_TTL = 600  # seconds: backends' max-age, PIBL's [cache] ttl, nginx proxy_cache_valid


@dataclass(frozen=True)
class Variant:
    """One proxy set up for one scenario; ``name`` is the row label in the table."""

    scenario: str
    name: str
    kind: str  # pibl | nginx | haproxy
    log: str  # none | file | file+stdout | stdout
    cache: bool = False
    tls: bool = False

    @property
    def describe(self) -> str:
        parts = [
            {
                "none": "no access log",
                "file": "access log to a file",
                "file+stdout": "access log to a file and to stdout (redirected to a file)",
                "stdout": "access log to stdout (redirected to a file)",
            }[self.log]
        ]
        if self.cache:
            parts.append("response cache on")
        if self.tls:
            parts.append("HTTPS listener")
        return ", ".join(parts)


SCENARIOS: dict[str, tuple[Variant, ...]] = {
    "proxy": (
        Variant("proxy", "pibl", "pibl", "file"),
        Variant("proxy", "nginx", "nginx", "file"),
        Variant("proxy", "haproxy", "haproxy", "none"),
    ),
    "cache": (
        Variant("cache", "pibl", "pibl", "file", cache=True),
        Variant("cache", "nginx", "nginx", "file", cache=True),
        Variant("cache", "haproxy", "haproxy", "none", cache=True),
    ),
    "tls": (
        Variant("tls", "pibl", "pibl", "file", tls=True),
        Variant("tls", "nginx", "nginx", "file", tls=True),
        Variant("tls", "haproxy", "haproxy", "none", tls=True),
    ),
    "logging": (
        Variant("logging", "pibl", "pibl", "file+stdout"),
        Variant("logging", "pibl-nolog", "pibl", "none"),
        Variant("logging", "nginx", "nginx", "file"),
        Variant("logging", "nginx-nolog", "nginx", "none"),
        Variant("logging", "haproxy", "haproxy", "stdout"),
    ),
}
SCENARIO_TEXT = {
    "proxy": "plain HTTP, every request proxied to a backend (no response cache)",
    "cache": "plain HTTP, cache hits (responses cacheable for 10 min, cache warmed first)",
    "tls": "HTTPS termination, plain HTTP to the backends (no response cache)",
    "logging": "plain HTTP proxied, access log on and off (no response cache)",
}

CLK_TCK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 20.0  # seconds for a process to start listening
STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL


class BenchError(Exception):
    """A failure with a message meant for the person running the benchmark."""


def say(message: str = "") -> None:
    print(message, flush=True)


# combined format (PIBL, nginx) or HAProxy's httplog format
_ACCESS_LINE = re.compile(r'^\S+ - \S+ \[[^]]*\] "|^\S+:\d+ \[[^]]*\] \S+ \S+/')


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
        # the same files, cacheable by shared caches for {CACHE_TTL} s (cache scenario only)
        location {CACHED_PREFIX}/ {{
            alias {www}/;
            add_header X-Backend $server_port;
            add_header Cache-Control "public, max-age={CACHE_TTL}";
        }}
        # for proxies with active health checks (PIBL probes GET /health by default)
        location = /health {{
            default_type text/plain;
            return 200 "ok\\n";
        }}
    }}
}}
"""


@dataclass(frozen=True)
class TLSFiles:
    cert: Path  # server certificate + CA (PEM)
    key: Path
    ca: Path
    combined: Path  # cert + key in one file, for HAProxy


def nginx_proxy_conf(
    prefix: Path,
    port: int,
    backends: Sequence[int],
    *,
    access_log: bool = True,
    cache_dir: Path | None = None,
    tls: TLSFiles | None = None,
) -> str:
    servers = "\n".join(f"        server 127.0.0.1:{p};" for p in backends)
    log = f"access_log {prefix / 'logs' / 'access.log'};" if access_log else "access_log off;"
    cache_path = cache_loc = ""
    if cache_dir is not None:
        cache_path = (
            f"    proxy_cache_path {cache_dir} levels=1:2 keys_zone=c1:10m max_size=1g "
            "inactive=60m use_temp_path=off;\n"
        )
        cache_loc = (
            "            proxy_cache c1;\n"
            f"            proxy_cache_valid 200 {CACHE_TTL // 60}m;\n"
            "            proxy_cache_lock on;\n"
            "            add_header X-Cache-Status $upstream_cache_status;\n"
        )
    if tls is not None:
        listen = (
            f"        listen 127.0.0.1:{port} ssl;\n"
            f"        ssl_certificate {tls.cert};\n"
            f"        ssl_certificate_key {tls.key};\n"
            "        ssl_protocols TLSv1.2 TLSv1.3;\n"
            "        ssl_session_cache shared:SSL:10m;\n"
            "        ssl_session_timeout 10m;"
        )
    else:
        listen = f"        listen 127.0.0.1:{port};"
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
    {log}
    keepalive_timeout 75s;
    keepalive_requests 1000000;
{nginx_temp_paths(prefix)}
{cache_path}    upstream backends {{
{servers}
        keepalive 32;
        keepalive_requests 1000000;
    }}
    server {{
{listen}
        location / {{
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering on;
{cache_loc}        }}
    }}
}}
"""


def haproxy_conf(
    port: int,
    backends: Sequence[int],
    *,
    log: bool = False,
    cache: bool = False,
    tls: TLSFiles | None = None,
) -> str:
    servers = "\n".join(f"    server b{i} 127.0.0.1:{p}" for i, p in enumerate(backends, start=1))
    what = "access log to stdout (httplog)" if log else "no log directive, so nothing is logged"
    glob = ["    nbthread 1", "    maxconn 4096"]
    defaults = []
    if log:
        glob.append("    log stdout format raw local0 info")
        defaults = ["    log global", "    option httplog"]
    if tls is not None:
        glob.append("    ssl-default-bind-options ssl-min-ver TLSv1.2")
    bind = f"    bind 127.0.0.1:{port}" + (f" ssl crt {tls.combined}" if tls else "")
    front_extra: list[str] = []
    back_extra: list[str] = []
    cache_section = ""
    if cache:
        cache_section = f"cache c1\n    total-max-size 64\n    max-age {CACHE_TTL}\n\n"
        back_extra = ["    http-request cache-use c1", "    http-response cache-store c1"]
        # a response from the cache has no server: label it, to check that hits happen
        front_extra = [
            "    http-response set-header X-Cache-Status HIT if !{ srv_id -m found }",
            "    http-response set-header X-Cache-Status MISS if { srv_id -m found }",
        ]

    def lines(items: Sequence[str]) -> str:
        return "".join(f"{item}\n" for item in items)

    return f"""# HAProxy as the reverse proxy under test; {what}
global
{lines(glob)}
defaults
    mode http
{lines(defaults)}    option http-keep-alive
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-request 10s
    timeout http-keep-alive 75s

{cache_section}frontend fe
{bind}
{lines(front_extra)}    default_backend be

backend be
    balance roundrobin
    http-reuse always
{lines(back_extra)}{servers}
"""


def pibl_conf(
    port: int,
    backends: Sequence[int],
    log_file: str,
    *,
    no_cache: bool,
    log_stdout: bool = False,
    cache_dir: Path | None = None,
    tls: TLSFiles | None = None,
    tls_port: int = 0,
) -> str:
    urls = "\n".join(f'[[backends]]\nurl = "http://127.0.0.1:{p}"\n' for p in backends)
    if cache_dir is not None:
        cache = (
            f"[cache]\nenabled = true\nttl = {CACHE_TTL}\ndir = {json.dumps(str(cache_dir))}\n\n"
        )
    elif no_cache:
        # Outside the cache scenario nginx and HAProxy do not cache, so PIBL's cache is off
        # too (in versions that have one): every request must reach a backend.
        cache = "[cache]\nenabled = false\n\n"
    else:
        cache = ""
    tls_section = ""
    if tls is not None:
        tls_section = (
            f"[tls]\nport = {tls_port}\ncert = {json.dumps(str(tls.cert))}\n"
            f"key = {json.dumps(str(tls.key))}\n\n"
        )
    return f"""[server]
host = "127.0.0.1"
port = {port}
workers = 1

[log]
file = {json.dumps(log_file)}
stdout = {"true" if log_stdout else "false"}

{cache}{tls_section}{urls}"""


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
    scenario: str
    proxy: str
    mode: str
    size: str
    ok: bool = False
    error: str = ""
    url: str = ""
    # what was checked before measuring: cache hit header, TLS version and cipher
    check: str = ""
    processes: int = 0  # processes in the proxy's tree when the measured run started
    requests: int = 0
    rps: float = 0.0
    wall_s: float = 0.0
    proxy_cpu_s: float = 0.0
    cpu_us_per_req: float | None = None
    cpu_ratio_vs_nginx: float | None = None
    proxy_cpu_pct: float | None = None
    loadgen_cpu_pct: float | None = None
    backend_cpu_us_per_req: float | None = None
    # Whole-CPU time split from /proc/stat (percent of the run's wall time); the proxy CPU's
    # interrupt time (irq + softirq: packet processing, charged to no process); its other
    # busy time not charged to the proxy tree (other processes).
    proxy_cpu_stat: dict[str, float] = field(default_factory=dict)
    loadgen_cpu_stat: dict[str, float] = field(default_factory=dict)
    irq_on_proxy_cpu_pct: float | None = None
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
    proxy_log_tail: str = ""  # the proxy's own log lines, kept when wrk reported errors
    # with --repeat: CPU per request of every measured run (the row is the median run)
    repeat_cpu_us_per_req: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.scenario}/{self.proxy}/{self.mode}/{self.size}"


@dataclass
class ProxyState:
    variant: Variant
    item: Managed
    port: int  # the port measured (the HTTPS one in the tls scenario)
    ports: list[int]  # every port it listens on
    scheme: str
    prefix: str  # path prefix of the files: "" or CACHED_PREFIX
    logs: list[Path]
    access_logs: list[Path] = field(default_factory=list)
    requests_sent: int = 0  # test + warm-up + measured requests completed
    rotation: list[str] = field(default_factory=list)
    check: str = ""

    @property
    def name(self) -> str:
        return self.variant.name

    @property
    def key(self) -> str:
        return f"{self.variant.scenario}/{self.variant.name}"

    def url(self, size: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{self.prefix}/{size}"


class SkipVariant(BenchError):
    """This proxy cannot be set up for this scenario here; it is skipped, not failed."""


def build_plan(args: argparse.Namespace) -> list[tuple[Variant, list[str]]]:
    """(variant, connection modes) in run order, after --scenarios and --proxies."""
    return [
        (variant, args.modes_for[scenario])
        for scenario in args.scenarios
        for variant in SCENARIOS[scenario]
        if variant.name in args.proxies
    ]


class Bench:
    def __init__(self, args: argparse.Namespace, tools: dict[str, str], tmp: Path) -> None:
        self.args = args
        self.tools = tools
        self.tmp = tmp
        self.pm = ProcessManager()
        self.results: list[Result] = []
        self.failures: list[dict[str, str]] = []
        self.skipped: list[dict[str, str]] = []
        self.logs_info: dict[str, Any] = {}
        self.setups: dict[str, dict[str, Any]] = {}
        self.backend: Managed | None = None
        self.backend_ports = [args.base_port + o for o in BACKEND_OFFSETS]
        self.next_port = args.base_port + PROXY_PORT_OFFSET
        self.deadline = 0.0
        self.pibl_configs: dict[str, dict[str, Any]] = {}
        self.tls_files: TLSFiles | None = None
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

    def client_tls(self) -> ssl.SSLContext:
        """Verifies the proxies' certificate against the CA made for this run."""
        assert self.tls_files is not None
        return ssl.create_default_context(cafile=str(self.tls_files.ca))

    def http_get(
        self, port: int, path: str, scheme: str = "http"
    ) -> tuple[int, int, dict[str, str]]:
        """(status, body length, headers with lower-case names) of one GET."""
        conn: http.client.HTTPConnection
        if scheme == "https":
            conn = http.client.HTTPSConnection(
                "127.0.0.1", port, timeout=10, context=self.client_tls()
            )
        else:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", path, headers={"Connection": "close"})
            response = conn.getresponse()
            body = response.read()
            headers = {k.lower(): v for k, v in response.getheaders()}
            return response.status, len(body), headers
        finally:
            conn.close()

    def tls_session(self, port: int) -> str:
        """Protocol and cipher negotiated by Python's OpenSSL client (wrk's is alike)."""
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            self.client_tls().wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            cipher = tls.cipher()
            return f"{tls.version()} {cipher[0] if cipher else '?'}"

    def free_ports(self, ports: Sequence[int]) -> None:
        busy = [p for p in ports if not port_is_free(p)]
        if busy:
            raise BenchError(
                f"port(s) {', '.join(map(str, busy))} on 127.0.0.1 already in use; "
                "stop whatever listens there or choose another --base-port"
            )

    def take_ports(self, count: int) -> list[int]:
        ports = list(range(self.next_port, self.next_port + count))
        self.next_port += count
        self.free_ports(ports)
        return ports

    # -- certificates, backends ---

    def make_certs(self) -> TLSFiles:
        """A development CA and a server certificate from ``python -m pibl.certs``."""
        directory = self.tmp / "certs"
        argv = [self.args.python, "-m", "pibl.certs", "--dir", str(directory)]
        try:
            result = subprocess.run(
                argv, cwd=self.tmp, env=pibl_env(), capture_output=True, text=True, timeout=120
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BenchError(f"{' '.join(argv)}: {exc}") from None
        files = TLSFiles(
            directory / "cert.pem",
            directory / "key.pem",
            directory / "ca.pem",
            directory / "haproxy.pem",
        )
        if result.returncode != 0 or not all(
            p.is_file() for p in (files.cert, files.key, files.ca)
        ):
            tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
            raise BenchError(f"{' '.join(argv)} failed (status {result.returncode}):\n{tail}")
        cert = files.cert.read_bytes()
        files.combined.write_bytes(
            cert + (b"" if cert.endswith(b"\n") else b"\n") + files.key.read_bytes()
        )
        files.combined.chmod(0o600)
        say(f"certificates: {directory} (python -m pibl.certs)")
        return files

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
            for path in ("", CACHED_PREFIX):
                for size, nbytes in SIZES.items():
                    status, length, headers = self.http_get(port, f"{path}/{size}")
                    cacheable = "max-age" in headers.get("cache-control", "")
                    if status != 200 or length != nbytes or cacheable != bool(path):
                        raise BenchError(
                            f"backend 127.0.0.1:{port}{path}/{size}: status {status}, "
                            f"{length} bytes, Cache-Control {headers.get('cache-control')!r}\n"
                            + log_tail(prefix / "logs" / "error.log")
                        )

    def nginx_argv(self, prefix: Path, conf: Path) -> list[str]:
        argv = [self.tools["nginx"], "-p", f"{prefix}/", "-c", str(conf)]
        if nginx_supports_e(self.tools["nginx"]):
            argv += ["-e", str(prefix / "logs" / "error.log")]
        return argv

    # -- proxies ---

    def start_proxy(self, v: Variant) -> ProxyState:
        key = f"{v.scenario}/{v.name}"
        d = self.tmp / v.scenario / v.name
        d.mkdir(parents=True)
        cpu = self.pin(self.args.proxy_cpu)
        tls = self.tls_files if v.tls else None
        if v.tls and tls is None:
            raise BenchError("no certificates")
        access_logs: list[Path] = []
        setup: dict[str, Any] = {"kind": v.kind, "description": v.describe}
        if v.kind == "pibl":
            ports = self.take_ports(2 if v.tls else 1)
            access = d / "access.log" if v.log in ("file", "file+stdout") else None
            conf = d / "pibl.toml"
            conf.write_text(
                pibl_conf(
                    ports[0],
                    self.backend_ports,
                    str(access) if access else "",
                    no_cache=self.pibl_has_cache(),
                    log_stdout=v.log == "file+stdout",
                    cache_dir=d / "cache" if v.cache else None,
                    tls=tls,
                    tls_port=ports[-1],
                )
            )
            self.pibl_configs[key] = pibl_effective_config(self.args.python, conf)
            argv = [*cpu, self.args.python, "-m", "pibl", "run", "--config", str(conf)]
            argv += ["--workers", "1"]
            # Run in its own directory so that relative paths stay out of the work tree.
            item = self.pm.start(key, argv, d / "stdout.log", cwd=d, env=pibl_env())
            logs = [d / "stdout.log"] + ([access] if access else [])
            access_logs = ([access] if access else []) + (
                [d / "stdout.log"] if v.log == "file+stdout" else []
            )
        elif v.kind == "nginx":
            ports = self.take_ports(1)
            (d / "logs").mkdir()
            (d / "temp").mkdir()
            conf = d / "nginx.conf"
            conf.write_text(
                nginx_proxy_conf(
                    d,
                    ports[0],
                    self.backend_ports,
                    access_log=v.log == "file",
                    cache_dir=d / "cache" if v.cache else None,
                    tls=tls,
                )
            )
            argv = [*cpu, *self.nginx_argv(d, conf)]
            item = self.pm.start(key, argv, d / "logs" / "stdout.log")
            logs = [d / "logs" / "stdout.log", d / "logs" / "error.log"]
            access_logs = [d / "logs" / "access.log"] if v.log == "file" else []
        elif v.kind == "haproxy":
            ports = self.take_ports(1)
            conf = d / "haproxy.cfg"
            conf.write_text(
                haproxy_conf(
                    ports[0], self.backend_ports, log=v.log == "stdout", cache=v.cache, tls=tls
                )
            )
            check = subprocess.run(
                [self.tools["haproxy"], "-c", "-f", str(conf)],
                capture_output=True,
                text=True,
                timeout=60,
            )
            if check.returncode != 0:
                message = f"haproxy -c -f {conf} failed:\n{(check.stdout + check.stderr).strip()}"
                raise SkipVariant(message) if v.cache else BenchError(message)
            argv = [*cpu, self.tools["haproxy"], "-db", "-f", str(conf)]
            item = self.pm.start(key, argv, d / "stdout.log")
            logs = [d / "stdout.log"]
            access_logs = [d / "stdout.log"] if v.log == "stdout" else []
        else:
            raise BenchError(f"unknown proxy kind {v.kind!r}")
        state = ProxyState(
            v,
            item,
            ports[-1],
            ports,
            "https" if v.tls else "http",
            CACHED_PREFIX if v.cache else "",
            logs,
            access_logs,
        )
        wait_listening(item, ports, logs[1:])
        try:
            self.check_proxy(state)
        except (OSError, http.client.HTTPException, ssl.SSLError) as exc:
            raise BenchError(f"{key}: test request failed: {exc}\n{log_tail(*logs)}") from None
        setup.update(
            config=str(conf),
            ports=ports,
            urls=[state.url(size) for size in self.args.sizes],
            check=state.check,
            rotation=state.rotation,
            processes_at_start=len(process_tree(item.pid)),
        )
        self.setups[key] = setup
        if state.rotation:
            seen = set(state.rotation)
            expected = {str(p) for p in self.backend_ports}
            note = "round robin ok" if seen == expected else "NOT all three backends used"
            rotation = f"; backends for 6 requests: {' '.join(state.rotation)} ({note})"
        else:
            rotation = ""
        say(
            f"{key}: {v.describe}; pid {item.pid}, port {state.port}, "
            f"CPU {self.args.proxy_cpu}{rotation}"
        )
        if state.check:
            say(f"  checked: {state.check}")
        return state

    def check_proxy(self, state: ProxyState) -> None:
        """Right status and body size for every size; round robin, cache hits, TLS."""
        v = state.variant
        for size, nbytes in SIZES.items():
            status, length, _ = self.http_get(state.port, f"{state.prefix}/{size}", state.scheme)
            state.requests_sent += 1
            if status != 200 or length != nbytes:
                raise BenchError(
                    f"{state.key}: GET {state.prefix}/{size} on port {state.port} gave status "
                    f"{status} and {length} bytes, expected 200 and {nbytes}\n"
                    + log_tail(*state.logs)
                )
        checks = []
        if v.cache:
            checks.append(self.check_cache_hits(state))
        else:
            # responses from a cache would all name one backend, so only checked without it
            for _ in range(6):
                state.rotation.append(
                    self.http_get(state.port, "/1k", state.scheme)[2].get("x-backend", "?")
                )
                state.requests_sent += 1
        if v.tls:
            checks.append(f"https: {self.tls_session(state.port)}, certificate verified")
        state.check = "; ".join(checks)

    def check_cache_hits(self, state: ProxyState) -> str:
        """Asks for every size until the proxy says it answered from its cache."""
        v = state.variant
        header = "cache-status" if v.kind == "pibl" else "x-cache-status"
        seen = []
        for size in SIZES:
            path = f"{state.prefix}/{size}"
            value = None
            for _ in range(50):
                status, _, headers = self.http_get(state.port, path, state.scheme)
                state.requests_sent += 1
                value = headers.get(header)
                hit = value is not None and (
                    value.startswith("pibl; hit") if v.kind == "pibl" else value == "HIT"
                )
                if status == 200 and hit:
                    break
                time.sleep(0.1)
            else:
                message = (
                    f"{state.key}: no cache hit for GET {path} after 50 requests "
                    f"(last status {status}, {header}: {value!r})"
                )
                if v.kind == "haproxy":
                    raise SkipVariant(message)
                raise BenchError(message + "\n" + log_tail(*state.logs))
            seen.append(f"{path} {header.title()}: {value}")
        return "; ".join(seen)

    # -- one measurement ---

    def wrk(self, url: str, mode: str, duration: int) -> tuple[str, list[str]]:
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
        argv.append(url)
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

    def measure_median(self, state: ProxyState, mode: str, size: str) -> Result:
        """``--repeat`` measured runs (one warm-up); the run with the median CPU per request."""
        runs = []
        for i in range(self.args.repeat):
            if i and (time.monotonic() > self.deadline or state.item.proc.poll() is not None):
                break
            runs.append(self.measure(state, mode, size, warmup=i == 0))
            if not runs[-1].ok:
                return runs[-1]
        if len(runs) == 1:
            return runs[0]
        values = [r.cpu_us_per_req or 0.0 for r in runs]
        chosen = sorted(runs, key=lambda r: r.cpu_us_per_req or 0.0)[(len(runs) - 1) // 2]
        chosen.repeat_cpu_us_per_req = values
        chosen.warmup_requests = runs[0].warmup_requests
        chosen.non2xx = sum(r.non2xx for r in runs)
        chosen.socket_errors = (
            {
                k: sum(r.socket_errors.get(k, 0) for r in runs)
                for k in ("connect", "read", "write", "timeout")
            }
            if any(r.socket_errors for r in runs)
            else {}
        )
        chosen.notes = [f"run {i + 1}: {n}" for i, r in enumerate(runs) for n in r.notes]
        if chosen.non2xx or any(chosen.socket_errors.values()):
            errored = next(r for r in runs if r.non2xx or any(r.socket_errors.values()))
            chosen.proxy_log_tail = errored.proxy_log_tail
            if errored is not chosen:
                chosen.wrk_output += "\n--- run with errors ---\n" + errored.wrk_output
        return chosen

    def measure(self, state: ProxyState, mode: str, size: str, *, warmup: bool = True) -> Result:
        args = self.args
        result = Result(state.variant.scenario, state.name, mode, size)
        result.url = state.url(size)
        result.check = state.check
        assert self.backend is not None
        if warmup and args.warmup > 0:
            text, _ = self.wrk(result.url, mode, args.warmup)
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
                f"{state.key} exited (status {state.item.proc.returncode}) during warm-up\n"
                + log_tail(*state.logs)
            )
        state.item.remember_tree()
        result.processes = len(process_tree(state.item.pid))
        sampler = MemorySampler(state.item.pid, 0.2)
        cpu_before = tree_cpu_seconds(state.item.pid)
        backend_before = tree_cpu_seconds(self.backend.pid)
        ru_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        stat_before = {cpu: cpu_stat(cpu) for cpu in (args.proxy_cpu, args.loadgen_cpu)}
        sampler.start()
        started = time.monotonic()
        try:
            text, argv = self.wrk(result.url, mode, args.duration)
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
            # Interrupt time (mostly the loopback network stack) is charged to no process.
            busy = 100.0 - pstat["idle"] - pstat["iowait"] - pstat["steal"]
            result.irq_on_proxy_cpu_pct = round(pstat["irq"] + pstat["softirq"], 1)
            others = busy - result.irq_on_proxy_cpu_pct - result.proxy_cpu_pct
            result.others_on_proxy_cpu_pct = round(max(0.0, others), 1)
        result.peak_rss_mb = round(sampler.peak_rss_kb / 1024, 1)
        result.peak_pss_mb = round(sampler.peak_pss_kb / 1024, 1) if sampler.peak_pss_kb else None
        result.rss_samples = sampler.samples
        if result.requests > 0:
            result.cpu_us_per_req = round(1e6 * (cpu_after - cpu_before) / result.requests, 2)
            result.backend_cpu_us_per_req = round(1e6 * backend_cpu / result.requests, 2)
            if state.variant.cache and result.backend_cpu_us_per_req > 2:
                result.notes.append(
                    f"backends used {result.backend_cpu_us_per_req} us per request during a "
                    "cache run: some requests were not cache hits"
                )
        if result.non2xx or any(result.socket_errors.values()):
            result.proxy_log_tail = log_tail(*state.logs)
        if state.item.proc.poll() is not None:
            result.error = (
                f"{state.key} exited (status {state.item.proc.returncode}) during the run\n"
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
        plan = build_plan(args)
        runs = sum(len(modes) * len(args.sizes) for _, modes in plan) * args.repeat
        per_run = args.warmup / args.repeat + args.duration + 5
        budget = int(runs * per_run + 45 * len(plan) + 60)
        self.deadline = time.monotonic() + budget
        estimate = int(runs * (args.warmup / args.repeat + args.duration + 1) + 5 * len(plan))
        say(f"{runs} measured runs; estimated time: about {estimate} s (hard limit {budget} s)")
        if any(v.tls for v, _ in plan):
            self.tls_files = self.make_certs()
        self.start_backends()
        scenario = None
        for variant, modes in plan:
            key = f"{variant.scenario}/{variant.name}"
            if variant.scenario != scenario:
                scenario = variant.scenario
                say()
                say(f"== {scenario}: {SCENARIO_TEXT[scenario]}")
            if time.monotonic() > self.deadline:
                self.fail(variant.scenario, variant.name, "-", "-", "time limit reached; skipped")
                continue
            try:
                state = self.start_proxy(variant)
            except SkipVariant as exc:
                self.skip(variant, str(exc))
                self.stop_named(key)
                continue
            except BenchError as exc:
                self.fail(variant.scenario, variant.name, "-", "-", f"failed to start: {exc}")
                self.stop_named(key)
                continue
            try:
                self.measure_proxy(state, modes)
            finally:
                lines_before = [count_lines(p) for p in state.access_logs]
                stopping = time.monotonic()
                rc = self.pm.stop(state.item)
                stop_s = time.monotonic() - stopping
                if rc not in (0, None, -signal.SIGTERM):
                    say(f"  {key} exit status after SIGTERM: {rc}")
                self.record_log(state, lines_before)
                self.logs_info[key].update(exit_status=rc, stop_seconds=round(stop_s, 2))

    def measure_proxy(self, state: ProxyState, modes: Sequence[str]) -> None:
        args = self.args
        scenario = state.variant.scenario
        for mode in modes:
            for size in args.sizes:
                if time.monotonic() > self.deadline:
                    self.fail(scenario, state.name, mode, size, "time limit reached; skipped")
                    continue
                if state.item.proc.poll() is not None:
                    self.fail(
                        scenario, state.name, mode, size, "proxy is no longer running; skipped"
                    )
                    continue
                say(
                    f"  {state.key} {mode} {state.prefix}/{size}: warm-up {args.warmup} s, "
                    f"measure {args.duration} s"
                    + (f" x {args.repeat}" if args.repeat > 1 else "")
                    + f", {args.connections} connections"
                )
                try:
                    result = self.measure_median(state, mode, size)
                except BenchError as exc:
                    self.fail(scenario, state.name, mode, size, str(exc))
                    continue
                self.results.append(result)
                self.print_result(result)
                if not result.ok:
                    self.failures.append(
                        {
                            "scenario": scenario,
                            "proxy": state.name,
                            "mode": mode,
                            "size": size,
                            "error": result.error,
                        }
                    )

    def stop_named(self, name: str) -> None:
        for item in list(self.pm.items):
            if item.name == name:
                self.pm.stop(item)

    def fail(self, scenario: str, proxy: str, mode: str, size: str, message: str) -> None:
        say(f"  ERROR {scenario} {proxy} {mode} {size}: {message}")
        self.failures.append(
            {"scenario": scenario, "proxy": proxy, "mode": mode, "size": size, "error": message}
        )

    def skip(self, variant: Variant, message: str) -> None:
        say(f"  SKIPPED {variant.scenario}/{variant.name}: {message}")
        self.skipped.append(
            {"scenario": variant.scenario, "proxy": variant.name, "reason": message}
        )

    def print_result(self, r: Result) -> None:
        if r.ok:
            say(
                f"    {r.requests} requests, {r.rps:.0f} req/s, {fmt(r.cpu_us_per_req)} us/req, "
                f"proxy CPU {r.proxy_cpu_pct}%, load side CPU {r.loadgen_cpu_pct}%, "
                f"p50 {fmt_ms(r.p50_ms)}, p99 {fmt_ms(r.p99_ms)}, peak RSS {r.peak_rss_mb} MB, "
                f"{r.processes} process(es)"
            )
        else:
            say(f"    FAILED: {r.error}")
        if r.repeat_cpu_us_per_req:
            say(
                "    us/req of the runs: "
                + ", ".join(f"{v:.1f}" for v in r.repeat_cpu_us_per_req)
                + " (the row is the median run)"
            )
        for note in r.notes:
            say(f"    wrk: {note}")

    def record_log(self, state: ProxyState, lines_before: Sequence[int | None]) -> None:
        files = []
        for path, before in zip(state.access_logs, lines_before, strict=True):
            files.append(
                {
                    "path": str(path),
                    "lines": count_lines(path),
                    "lines_before_stop": before,
                    "bytes": path.stat().st_size if path.exists() else 0,
                }
            )
        self.logs_info[state.key] = {
            "requests_completed_by_wrk": state.requests_sent,
            "access_logs": files,
        }


def count_lines(path: Path | None) -> int | None:
    """Access-log lines (with ``"GET /``) in the file; PIBL's file also holds event lines."""
    if path is None:
        return None
    try:
        with open(path, "rb") as fh:
            return sum(1 for line in fh if b'"GET /' in line)
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


def reference_proxy(proxy: str) -> str:
    """The nginx row a row is compared with: ``*-nolog`` rows with nginx-nolog."""
    return "nginx-nolog" if proxy.endswith("-nolog") else "nginx"


def add_ratios(results: list[Result]) -> None:
    base = {
        (r.scenario, r.proxy, r.mode, r.size): r.cpu_us_per_req
        for r in results
        if r.proxy in ("nginx", "nginx-nolog") and r.ok
    }
    for r in results:
        ref = base.get((r.scenario, reference_proxy(r.proxy), r.mode, r.size))
        if ref is None:
            ref = base.get((r.scenario, "nginx", r.mode, r.size))
        if r.ok and ref and r.cpu_us_per_req is not None:
            r.cpu_ratio_vs_nginx = round(r.cpu_us_per_req / ref, 2)


def _order(values: Sequence[str], value: str) -> int:
    return values.index(value) if value in values else len(values)


def sorted_results(results: list[Result]) -> list[Result]:
    """Grouped by scenario, mode and size, proxies in a fixed order within a group."""
    return sorted(
        results,
        key=lambda r: (
            _order(ALL_SCENARIOS, r.scenario),
            _order(MODES, r.mode),
            _order(tuple(SIZES), r.size),
            _order(ALL_PROXIES, r.proxy),
        ),
    )


def table(results: list[Result]) -> str:
    head = (
        "scenario",
        "proxy",
        "mode",
        "size",
        "req/s",
        "CPU us/req",
        "vs nginx",
        "proxy CPU%",
        "load CPU%",
        "softirq%",
        "others CPU%",
        "p50",
        "p99",
        "peak RSS MB",
        "errors",
    )
    rows: list[tuple[str, ...] | None] = []
    previous = None
    for r in sorted_results(results):
        group = (r.scenario, r.mode, r.size)
        if previous is not None and group != previous:
            rows.append(None)  # a blank line between groups
        previous = group
        errors = r.non2xx + sum(r.socket_errors.values())
        rows.append(
            (
                r.scenario,
                r.proxy,
                r.mode,
                r.size,
                f"{r.rps:.0f}" if r.ok else "FAILED",
                fmt(r.cpu_us_per_req),
                "-" if r.cpu_ratio_vs_nginx is None else f"{r.cpu_ratio_vs_nginx:.2f}x",
                fmt(r.proxy_cpu_pct, 0),
                fmt(r.loadgen_cpu_pct, 0),
                fmt(r.irq_on_proxy_cpu_pct, 0),
                fmt(r.others_on_proxy_cpu_pct, 0),
                fmt_ms(r.p50_ms),
                fmt_ms(r.p99_ms),
                fmt(r.peak_rss_mb),
                str(errors),
            )
        )
    filled = [row for row in rows if row is not None]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *filled, strict=True)]
    lines = []
    for i, row in enumerate([head, *rows]):
        if row is None:
            lines.append("")
            continue
        cells = [
            str(c).ljust(w) if j < 4 else str(c).rjust(w)
            for j, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def logging_costs(results: list[Result]) -> list[str]:
    """CPU per request added by the access log, PIBL and nginx, from the logging scenario."""
    value = {
        (r.proxy, r.mode, r.size): r.cpu_us_per_req
        for r in results
        if r.scenario == "logging" and r.ok and r.cpu_us_per_req is not None
    }
    out = []
    for mode in MODES:
        for size in SIZES:
            parts = []
            for proxy in ("pibl", "nginx"):
                on, off = value.get((proxy, mode, size)), value.get((f"{proxy}-nolog", mode, size))
                if on is not None and off is not None:
                    parts.append(f"{proxy} {on - off:+.1f} us ({100 * (on - off) / off:+.0f}%)")
            if parts:
                out.append(f"access log cost, {mode} /{size}: " + ", ".join(parts))
    return out


CHART_COLORS = {
    "pibl": "#d9534f",
    "pibl-nolog": "#f0a8a6",
    "nginx": "#2e8b57",
    "nginx-nolog": "#9fd3b4",
    "haproxy": "#3a6fb0",
}
CHART_NAMES = {
    "pibl": "PIBL",
    "pibl-nolog": "PIBL, no access log",
    "nginx": "nginx",
    "nginx-nolog": "nginx, no access log",
    "haproxy": "HAProxy",
}


def draw_chart(results: list[Result], path: Path, subtitle: str) -> bool:
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        say("matplotlib is not importable; chart skipped (install it to get one)")
        return False
    ok = [r for r in sorted_results(results) if r.ok and r.cpu_us_per_req is not None]
    if not ok:
        say("no successful rows; chart skipped")
        return False
    groups = list(dict.fromkeys((r.scenario, r.mode, r.size) for r in ok))
    by_group: dict[tuple[str, str, str], list[Result]] = {}
    for r in ok:
        by_group.setdefault((r.scenario, r.mode, r.size), []).append(r)
    # Every bar has the same width; a group is as wide as its bars, plus a gap.
    width, gap = 0.24, 0.4
    centers: list[float] = []
    left = 0.0
    for group in groups:
        span = width * len(by_group[group])
        centers.append(left + span / 2)
        left += span + gap
    top = max(r.cpu_us_per_req or 0 for r in ok)
    fig, ax = plt.subplots(figsize=(max(8.0, 1.05 * left + 1.5), 6.8))
    labelled: set[str] = set()
    for g, group in enumerate(groups):
        rows = by_group[group]
        for i, r in enumerate(rows):
            x = centers[g] + (i - (len(rows) - 1) / 2) * width
            y = r.cpu_us_per_req or 0
            name = CHART_NAMES.get(r.proxy, r.proxy)
            ax.bar(
                x,
                y,
                width * 0.94,
                color=CHART_COLORS.get(r.proxy, "grey"),
                label=None if r.proxy in labelled else name,
                edgecolor="black",
                linewidth=0.4,
            )
            labelled.add(r.proxy)
            text = f"{y:.0f}"
            if r.proxy.startswith("pibl") and r.cpu_ratio_vs_nginx is not None:
                ratio = f"{r.cpu_ratio_vs_nginx:.1f}\u00d7"
                if y > top * 0.12:  # inside the top of the bar, so neighbours never collide
                    ax.text(
                        x,
                        y - top * 0.015,
                        ratio,
                        ha="center",
                        va="top",
                        rotation=90,
                        fontsize=9,
                        fontweight="bold",
                        color="white" if r.proxy == "pibl" else "black",
                    )
                else:
                    text += f"\n{ratio}"
            ax.text(
                x,
                y + top * 0.01,
                text,
                ha="center",
                va="bottom",
                fontsize=8,
                fontweight="bold" if r.proxy.startswith("pibl") else "normal",
            )
    for g in range(1, len(groups)):
        if groups[g][0] != groups[g - 1][0]:
            ax.axvline(
                (centers[g - 1] + centers[g]) / 2, color="grey", linewidth=0.8, linestyle=":"
            )
    ax.set_xticks(centers)
    ax.set_xticklabels(
        [f"{s}\n/{size}\n{'keep-alive' if m == 'keepalive' else 'close'}" for s, m, size in groups],
        fontsize=9,
    )
    ax.set_xlim(-gap / 2 - 0.1, left - gap / 2 + 0.1)
    ax.set_ylim(0, top * 1.18)
    ax.set_ylabel("proxy CPU time per request (µs, lower is better)")
    ax.set_xlabel("scenario / response size / client connections")
    ax.set_title(
        "Proxy CPU time per request: PIBL vs nginx vs HAProxy, one worker each\n"
        "above the bars: µs per request; inside PIBL's bars: the ratio to nginx in the same "
        "group\n(PIBL without access log: ratio to nginx without access log)",
        fontsize=11,
        pad=22,
    )
    ax.grid(axis="y", linewidth=0.4, alpha=0.6)
    ax.set_axisbelow(True)
    handles, names = ax.get_legend_handles_labels()
    order = sorted(range(len(names)), key=lambda i: list(CHART_NAMES.values()).index(names[i]))
    ax.legend(
        [handles[i] for i in order],
        [names[i] for i in order],
        fontsize=8,
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
        ncols=len(order),
        frameon=False,
    )
    fig.text(0.01, 0.01, subtitle, fontsize=7, color="dimgrey", ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return True


def chart_subtitle(stamp: str, info: dict[str, Any], params: dict[str, Any]) -> str:
    haproxy = (info.get("haproxy") or "").split()
    repeat = params.get("repeat") or 1
    median = f" (median of {repeat} runs)" if repeat > 1 else ""
    return (
        f"{stamp} | {info.get('pibl_version')} (commit {str(info.get('git_commit'))[:8]}), "
        f"{(info.get('nginx') or '-').replace('nginx version: ', '')}, "
        f"HAProxy {haproxy[2] if len(haproxy) > 2 else '-'} | "
        f"wrk -t1 -c{params.get('connections')} -d{params.get('duration_s')}s"
        f"{median}"
        "\nproxy alone on "
        f"CPU {params.get('proxy_cpu')}, backends + wrk on CPU {params.get('loadgen_cpu')} | "
        f"{info.get('cpu_model')}"
    )


def replot(source: Path, chart: Path) -> int:
    """Table and chart again from a saved results file, without measuring."""
    try:
        payload = json.loads(source.read_text())
    except (OSError, ValueError) as exc:
        say(f"cannot read {source}: {exc}")
        return 2
    names = {f.name for f in fields(Result)}
    results = []
    for row in payload.get("results", []):
        row = {k: v for k, v in row.items() if k in names}
        row.setdefault("scenario", "proxy")  # files written before scenarios existed
        results.append(Result(**row))
    add_ratios(results)
    say(table(results))
    for line in logging_costs(results):
        say(line)
    subtitle = chart_subtitle(
        payload.get("timestamp", "?"), payload.get("machine", {}), payload.get("parameters", {})
    )
    if draw_chart(results, chart, subtitle):
        say(f"chart: {chart}")
        return 0
    return 1


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


def pibl_differs(commit_a: str, commit_b: str) -> bool:
    """Whether pibl/ differs between two commits (read-only ``git diff``); commits made
    during a run that touch other directories do not matter here."""
    if commit_a == commit_b:
        return False
    try:
        result = subprocess.run(
            ["git", "-C", str(REPO), "diff", "--quiet", commit_a, commit_b, "--", "pibl"],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return True
    return result.returncode != 0


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


def _list(choices: Sequence[str], *, allow_none: bool = False) -> Any:
    def parse(text: str) -> list[str]:
        if allow_none and text.strip() in ("", "none"):
            return []
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {', '.join(choices)}"
                + (" (or none)" if allow_none else "")
            )
        return list(dict.fromkeys(items))

    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    default_python = REPO / ".venv" / "bin" / "python"
    p = argparse.ArgumentParser(
        description="CPU cost per request of PIBL vs nginx vs HAProxy (loopback, pinned CPUs)."
    )
    p.add_argument(
        "--scenarios",
        type=_list(ALL_SCENARIOS),
        default=list(ALL_SCENARIOS),
        help=f"comma-separated subset of {','.join(ALL_SCENARIOS)} (default: all)",
    )
    p.add_argument(
        "--proxies",
        type=_list(ALL_PROXIES),
        default=list(ALL_PROXIES),
        help=f"comma-separated subset of {','.join(ALL_PROXIES)} (default: all); the "
        "-nolog variants exist in the logging scenario only",
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
        default=None,
        help="client connections for every scenario: keep-alive, 'Connection: close' on "
        "every request, or both passes (default: both for the --close-scenarios, keep-alive "
        "for the others)",
    )
    p.add_argument(
        "--close-scenarios",
        type=_list(ALL_SCENARIOS, allow_none=True),
        default=["proxy"],
        help="without --mode: scenarios that get a 'Connection: close' pass after the "
        "keep-alive one (default: proxy; 'none' for none)",
    )
    p.add_argument("--duration", type=int, default=None, help="seconds per measured run (10)")
    p.add_argument("--warmup", type=int, default=None, help="seconds of warm-up per run (2)")
    p.add_argument("--connections", type=int, default=16, help="wrk connections (16)")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="measured runs per row (one warm-up); the row is the run with the median CPU "
        "per request (1)",
    )
    p.add_argument("--quick", action="store_true", help="3 s runs with 1 s warm-up")
    p.add_argument("--loadgen-cpu", type=int, default=0, help="CPU for backends and wrk (0)")
    p.add_argument("--proxy-cpu", type=int, default=1, help="CPU for the proxy under test (1)")
    p.add_argument(
        "--base-port",
        type=int,
        default=18000,
        help="backends listen on BASE+1..3, proxies on BASE+80 upward (18000)",
    )
    p.add_argument(
        "--python",
        default=str(default_python if default_python.exists() else Path(sys.executable)),
        help="interpreter that runs PIBL (default: the project's .venv)",
    )
    p.add_argument(
        "--chart",
        type=Path,
        default=REPO / "docs" / "bench.png",
        help="where to write the PNG chart when matplotlib is available (docs/bench.png)",
    )
    p.add_argument("--no-chart", action="store_true", help="do not draw the chart")
    p.add_argument(
        "--replot",
        type=Path,
        metavar="JSON",
        help="print the table and draw the chart from a saved results file, then exit",
    )
    p.add_argument(
        "--keep-tmp", action="store_true", help="keep the temporary directory with configs and logs"
    )
    args = p.parse_args(argv)
    args.duration = args.duration or (3 if args.quick else 10)
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    args.modes_for = {
        scenario: (
            list(MODES)
            if args.mode == "both" or (args.mode is None and scenario in args.close_scenarios)
            else [args.mode or "keepalive"]
        )
        for scenario in args.scenarios
    }
    args.modes = [m for m in MODES if any(m in ms for ms in args.modes_for.values())]
    if args.duration < 1 or args.warmup < 0 or args.connections < 1 or args.repeat < 1:
        p.error("--duration, --connections, --repeat must be positive, --warmup not negative")
    if not 1024 < args.base_port < 65000:
        p.error("--base-port must be between 1025 and 64999")
    if not build_plan(args):
        p.error(
            f"no proxy of --proxies {','.join(args.proxies)} runs in --scenarios "
            f"{','.join(args.scenarios)} (the -nolog variants exist in the logging scenario only)"
        )
    return args


def _on_signal(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot is not None:
        return replot(args.replot, args.chart.resolve())
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

    plan = build_plan(args)
    unused = [p for p in args.proxies if p not in {v.name for v, _ in plan}]
    if unused and args.proxies != list(ALL_PROXIES):
        say(f"note: {', '.join(unused)} not part of the chosen scenarios; not run")
    needed = ["nginx", "wrk"] + (["haproxy"] if any(v.kind == "haproxy" for v, _ in plan) else [])
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
    say(
        "scenarios: "
        + ", ".join(f"{s} ({'+'.join(args.modes_for[s])})" for s in args.scenarios)
        + f"; sizes: {', '.join(args.sizes)}"
    )
    bench = Bench(args, tools, tmp)
    interrupted = False
    try:
        bench.run()
    except BenchError as exc:
        bench.fail("-", "-", "-", "-", str(exc))
    except KeyboardInterrupt:
        interrupted = True
        say("\ninterrupted; stopping processes")
    finally:
        bench.pm.stop_all()

    add_ratios(bench.results)
    commit_after = tool_version(["git", "-C", str(REPO), "rev-parse", "HEAD"])
    code_changed = (
        pibl_tree_digest() != code_before
        or git_status_pibl() != info["git_status_pibl"]
        or pibl_differs(info["git_commit"], commit_after)
    )
    say()
    say(
        f"wrk -t1 -c{args.connections} -d{args.duration}s --latency, warm-up {args.warmup} s"
        + (f", median of {args.repeat} runs per row" if args.repeat > 1 else "")
        + "; "
        f"proxy on CPU {args.proxy_cpu}, backends + wrk on CPU {args.loadgen_cpu}; "
        "PIBL --workers 1 (worker + master), nginx worker_processes 1 (worker + master), "
        "HAProxy nbthread 1"
    )
    say(
        "CPU us/req = (utime+stime of the proxy process tree) / requests completed; "
        "'vs nginx' = CPU us/req / nginx's in the same scenario, mode and size (-nolog rows: "
        "nginx-nolog's); 'load CPU%' = backends + wrk on the load CPU; "
        "'softirq%' = interrupt time on the proxy CPU (network stack, charged to no "
        "process); 'others CPU%' = time on the proxy CPU used by other processes"
    )
    say(table(bench.results))
    for line in logging_costs(bench.results):
        say(line)
    for r in sorted_results(bench.results):
        if r.non2xx or any(r.socket_errors.values()):
            say(f"errors in {r.label}: wrk reported " + "; ".join(r.notes))
            say(f"--- wrk output ({r.wrk_command}) ---\n{r.wrk_output.rstrip()}")
            if r.proxy_log_tail:
                say(r.proxy_log_tail)
        elif r.notes:
            say(f"notes for {r.label}: " + "; ".join(r.notes))
    disturbed = [r for r in bench.results if r.ok and (r.others_on_proxy_cpu_pct or 0) >= 5]
    if disturbed:
        say(
            f"note: other processes used >= 5% of CPU {args.proxy_cpu} during "
            + ", ".join(r.label for r in disturbed)
            + "; those rows may be disturbed, run again on a quiet machine"
        )
    saturated = [r for r in bench.results if r.ok and (r.loadgen_cpu_pct or 0) >= 90]
    if saturated:
        say(
            "note: the load CPU was >= 90% busy in "
            + ", ".join(r.label for r in saturated)
            + "; req/s there is limited by wrk + backends, not by the proxy"
        )
    had_errors = any(r.non2xx or any(r.socket_errors.values()) for r in bench.results)
    keep = args.keep_tmp or bool(bench.failures) or had_errors
    kept = "" if keep else " (removed at exit; --keep-tmp keeps it)"
    for key, log in bench.logs_info.items():
        for f in log.get("access_logs", []):
            say(
                f"{key} access log {f['path']}: {f['lines']} lines "
                f"({f['lines_before_stop']} before SIGTERM), {f['bytes'] / 1e6:.1f} MB, for "
                f"{log['requests_completed_by_wrk']} requests completed by wrk{kept}"
            )
    for key, log in bench.logs_info.items():
        normal = (0, None, -signal.SIGTERM)
        if log.get("exit_status") not in normal or (log.get("stop_seconds") or 0) > 3:
            say(
                f"{key}: exit status {log.get('exit_status')} "
                f"{log.get('stop_seconds')} s after SIGTERM"
            )
    if code_changed:
        say(
            "warning: the files under pibl/ changed while the benchmark ran; PIBL rows may "
            "come from different versions of the code"
        )
    for item in bench.skipped:
        say(f"SKIPPED {item['scenario']}/{item['proxy']}: {item['reason'].splitlines()[0]}")
    for failure in bench.failures:
        say(
            f"FAILED {failure['scenario']} {failure['proxy']} {failure['mode']} "
            f"{failure['size']}: {failure['error'].splitlines()[0] if failure['error'] else ''}"
        )

    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"{stamp}.json"
    chart = None if args.no_chart else args.chart.resolve()
    payload: dict[str, Any] = {
        "timestamp": stamp,
        "parameters": {
            "scenarios": args.scenarios,
            "proxies": args.proxies,
            "sizes": args.sizes,
            "modes": args.modes,
            "modes_per_scenario": args.modes_for,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "connections": args.connections,
            "repeat": args.repeat,
            "wrk_threads": 1,
            "pibl_workers": 1,
            "loadgen_cpu": args.loadgen_cpu,
            "proxy_cpu": args.proxy_cpu,
            "base_port": args.base_port,
            "chart": str(chart) if chart else None,
        },
        "machine": info,
        "results": [asdict(r) for r in bench.results],
        "failures": bench.failures,
        "skipped": bench.skipped,
        "setups": bench.setups,
        "access_logs": bench.logs_info,
        "pibl_effective_config": bench.pibl_configs,
        "interrupted": interrupted,
        "pibl_code_changed_during_run": code_changed,
    }
    out.write_text(json.dumps(payload, indent=2) + "\n")
    say(f"results: {out}")
    if chart is not None and draw_chart(
        bench.results, chart, chart_subtitle(stamp, info, payload["parameters"])
    ):
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
