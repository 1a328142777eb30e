"""wrk runs and the benchmark itself: each scenario, proxy, mode and size in turn."""

from __future__ import annotations

import argparse
import http.client
import re
import resource
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from comparison.common import (
    BACKEND_OFFSETS,
    CACHED_PREFIX,
    PROXY_PORT_OFFSET,
    SCENARIO_TEXT,
    SCENARIOS,
    SIZES,
    BenchError,
    Variant,
    fmt,
    fmt_ms,
    log_tail,
    say,
)
from comparison.peers import (
    TLSFiles,
    backends_conf,
    haproxy_conf,
    nginx_proxy_conf,
    pibl_conf,
    pibl_effective_config,
    pibl_env,
)
from comparison.procs import (
    Managed,
    MemorySampler,
    ProcessManager,
    cpu_stat,
    cpu_stat_pct,
    nginx_supports_e,
    port_is_free,
    process_tree,
    tool_version,
    tree_cpu_seconds,
    wait_listening,
)

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
            env = pibl_env(pure=v.pure)
            item = self.pm.start(key, argv, d / "stdout.log", cwd=d, env=env)
            # which build runs: "pibl 0.1.0 (compiled with mypyc)" or "(pure Python ...)"
            setup["build"] = tool_version([self.args.python, "-m", "pibl", "--version"], env=env)
            say(f"  {key}: {setup['build']}")
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

    @staticmethod
    def median_of(runs: list[Result]) -> Result:
        """The run with the median CPU per request, carrying what the others saw."""
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
        # A scenario's proxies all run at once, each on its own port (the idle ones cost
        # nothing measurable), and take turns: repeat 1 of every proxy, then repeat 2... so
        # that a drift of the machine's speed during the run (on a virtual machine nginx's
        # own cost moves by a quarter within minutes) weighs on every proxy of a row alike.
        scenarios: dict[str, list[tuple[Variant, Sequence[str]]]] = {}
        for variant, modes in plan:
            scenarios.setdefault(variant.scenario, []).append((variant, modes))
        for scenario, entries in scenarios.items():
            say()
            say(f"== {scenario}: {SCENARIO_TEXT[scenario]}")
            states: list[tuple[ProxyState, Sequence[str]]] = []
            try:
                for variant, wanted in entries:
                    key = f"{variant.scenario}/{variant.name}"
                    if time.monotonic() > self.deadline:
                        self.fail(scenario, variant.name, "-", "-", "time limit reached; skipped")
                        continue
                    try:
                        states.append((self.start_proxy(variant), wanted))
                    except SkipVariant as exc:
                        self.skip(variant, str(exc))
                        self.stop_named(key)
                    except BenchError as exc:
                        self.fail(scenario, variant.name, "-", "-", f"failed to start: {exc}")
                        self.stop_named(key)
                self.measure_in_turns(states)
            finally:
                for state, _ in states:
                    lines_before = [count_lines(p) for p in state.access_logs]
                    stopping = time.monotonic()
                    rc = self.pm.stop(state.item)
                    stop_s = time.monotonic() - stopping
                    if rc not in (0, None, -signal.SIGTERM):
                        say(f"  {state.key} exit status after SIGTERM: {rc}")
                    self.record_log(state, lines_before)
                    self.logs_info[state.key].update(exit_status=rc, stop_seconds=round(stop_s, 2))

    def measure_in_turns(self, states: Sequence[tuple[ProxyState, Sequence[str]]]) -> None:
        """Every (mode, size) row of the scenario: the proxies measured in turn, ``--repeat``
        rounds (the first run of each with its warm-up), then each one's median run."""
        args = self.args
        modes = list(dict.fromkeys(m for _, ms in states for m in ms))
        for mode in modes:
            for size in args.sizes:
                taking = [state for state, ms in states if mode in ms]
                if not taking:
                    continue
                say(
                    f"  {mode} /{size}: {', '.join(s.key for s in taking)} in turn, "
                    f"warm-up {args.warmup} s, measure {args.duration} s"
                    + (f" x {args.repeat}" if args.repeat > 1 else "")
                    + f", {args.connections} connections"
                )
                runs: dict[str, list[Result]] = {state.key: [] for state in taking}
                broken: set[str] = set()
                for i in range(args.repeat):
                    for state in taking:
                        key, scenario = state.key, state.variant.scenario
                        if key in broken:
                            continue
                        if time.monotonic() > self.deadline:
                            if not runs[key]:  # (a row begun keeps the runs it has)
                                self.fail(
                                    scenario, state.name, mode, size, "time limit reached; skipped"
                                )
                            broken.add(key)
                            continue
                        if state.item.proc.poll() is not None:
                            if not runs[key]:
                                self.fail(
                                    scenario,
                                    state.name,
                                    mode,
                                    size,
                                    "proxy is no longer running; skipped",
                                )
                            broken.add(key)
                            continue
                        try:
                            result = self.measure(state, mode, size, warmup=i == 0)
                        except BenchError as exc:
                            self.fail(scenario, state.name, mode, size, str(exc))
                            broken.add(key)
                            continue
                        runs[key].append(result)
                        if not result.ok:
                            broken.add(key)
                for state in taking:
                    done = runs[state.key]
                    if not done:
                        continue
                    result = done[-1] if not done[-1].ok else self.median_of(done)
                    say(f"  {state.key} {mode} {state.prefix}/{size}:")
                    self.results.append(result)
                    self.print_result(result)
                    if not result.ok:
                        self.failures.append(
                            {
                                "scenario": state.variant.scenario,
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
