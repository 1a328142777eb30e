"""The configuration of each peer: the backends, nginx, HAProxy and PIBL."""

from __future__ import annotations

import grp
import json
import os
import pwd
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from comparison.common import CACHE_TTL, CACHED_PREFIX, REPO, BenchError

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


def _nginx_main(prefix: Path) -> str:
    """The main context both nginx configurations share: one worker, in the foreground."""
    return f"""{nginx_user_line()}
worker_processes 1;
daemon off;
master_process on;
pid {prefix / "nginx.pid"};
error_log {prefix / "logs" / "error.log"} warn;
events {{
    worker_connections 4096;
}}"""


def backends_conf(prefix: Path, www: Path, ports: Sequence[int]) -> str:
    listens = "\n".join(f"        listen 127.0.0.1:{p};" for p in ports)
    return f"""# three static backends: one master, one worker, three ports
{_nginx_main(prefix)}
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
{_nginx_main(prefix)}
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


def pibl_env(*, pure: bool = False) -> dict[str, str]:
    """Environment for PIBL: this checkout first on the import path, unbuffered output;
    with ``pure``, its Python source even if a compiled build is there."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if pure:
        env["PIBL_PURE_PYTHON"] = "1"
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
