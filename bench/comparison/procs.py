"""Process trees and their CPU and memory from /proc; starting and stopping processes;
the tools (nginx, haproxy, wrk)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from comparison.common import CLK_TCK, START_TIMEOUT, STOP_TIMEOUT, BenchError, log_tail, say

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


def free_port() -> int:
    """A loopback port nothing listens on now (for a server a script is about to start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 15.0) -> None:
    """Until something accepts connections on the loopback ``port``; BenchError after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise BenchError(f"nothing listens on port {port}")
