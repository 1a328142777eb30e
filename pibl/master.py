"""The master process: every core used, reloads and crashes without lost requests.

The master owns the listening sockets and never serves traffic. It creates one
``SO_REUSEPORT`` socket per worker slot, so the kernel spreads new connections over the
workers, and it keeps every socket open itself. That detail is what makes the rest safe:

* a worker that dies is replaced by a new process that inherits the *same* socket, so the
  connections waiting in its accept queue are picked up instead of being reset (only the
  connections the dead worker had already accepted are lost);
* on SIGHUP the new configuration is validated first; a bad one is logged and ignored. A
  good one starts a new generation of workers on the same sockets (new sockets only if the
  address changed); once they report ready, the old generation gets SIGTERM, stops
  accepting and finishes its in-flight requests. A socket never closes while it has a queue.

Signals: SIGTERM/SIGINT stop gracefully (workers finish in-flight requests up to
``timeouts.shutdown``), SIGHUP reloads, SIGUSR1 reopens log files in every process. The
master waits for signals with ``sigtimedwait`` in a plain loop (no event loop, no thread),
which keeps ``fork`` safe. Workers ask the kernel to kill them if the master dies, so a
``kill -9`` of the master never leaves orphans holding the port.

The master stays small (about 15 MiB): it never imports the proxy, the configuration
schema or the metrics library. Work that needs them runs in a short-lived child forked
for it (:func:`in_child`): reading and validating the configuration (at start, on SIGHUP,
when DNS discovery re-resolves), and dropping a dead worker's live gauges. The child
sends back a :class:`Plan`: the validated configuration as JSON, for the workers, and the
few values the master itself uses. Each worker is forked from the master and imports the
proxy itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pibl.balance.shared import SharedBalance
from pibl.errors import ConfigError
from pibl.observe.accesslog import AccessLog
from pibl.ports import Listen, PortInUse, PortLocks, make_socket
from pibl.procs import MULTIPROC_ENV, alive, die_with_parent, start_time

HANDLED = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD}
RESTART_BACKOFF = 1.0  # a worker that keeps dying is restarted at most once a second


@dataclass(frozen=True)
class Plan:
    """A validated configuration as the master holds it (made by ``pibl.loader``).

    ``config`` is the effective configuration (discovered backends expanded) as JSON, for
    the workers; ``configured`` is the file's own, kept to expand again when DNS answers
    change. The other fields are what the master needs to listen, log and supervise.
    """

    config: str
    configured: str
    host: str
    port: int
    tls_port: int | None
    workers: int
    backlog: int
    addresses: tuple[Listen, ...]
    backends: tuple[str, ...]  # labels, in order
    limited: bool  # a route has a rate limit: the node's buckets are made
    consistency: bool  # [consistency] is on: its shared state is made
    verifies_return: bool  # and a backend a reload adds is checked before traffic
    shutdown: float
    log_file: str | None  # resolved
    log_stdout: bool
    log_format: str
    discovery_interval: float | None  # None: no backend is discovered
    discovered: dict[str, list[str]] = field(default_factory=dict)  # host -> addresses
    messages: tuple[tuple[str, str], ...] = ()  # (level, text) for the master's log

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        fields = dict(data)
        fields["tls_port"] = data.get("tls_port")
        fields["addresses"] = tuple(Listen(*a) for a in data["addresses"])
        fields["backends"] = tuple(data["backends"])
        fields["messages"] = tuple((level, text) for level, text in data.get("messages", ()))
        return cls(**fields)

    @property
    def address(self) -> tuple[str, int, int | None]:
        return self.host, self.port, self.tls_port


def in_child(task: Callable[[], Any]) -> Any:
    """Run ``task`` in a forked child and return its JSON-able result.

    The child imports what the task needs; the master's memory never grows by it. A
    ConfigError in the child is raised again here; any other failure becomes a
    ConfigError carrying the child's traceback, so the caller's refusal path handles it.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no return from here
        try:
            os.close(read_fd)
            die_with_parent()
            try:
                out: dict[str, Any] = {"ok": True, "result": task()}
            except ConfigError as exc:
                out = {"ok": False, "error": str(exc)}
            except BaseException:
                out = {"ok": False, "error": traceback.format_exc().rstrip()}
            with open(write_fd, "wb") as pipe:
                pipe.write(json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with open(read_fd, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        raise ConfigError(f"the configuration loader died (wait status {status})")
    out = json.loads(data)
    if not out["ok"]:
        raise ConfigError(out["error"])
    return out["result"]


def load_plan(path: str, overrides: dict[str, Any], *, announce: bool = False) -> Plan:
    """The file validated (its certificates too) and expanded, in a child; ConfigError."""

    def task() -> dict[str, Any]:
        from pibl.loader import plan

        return plan(path, overrides, announce=announce)

    return Plan.from_json(in_child(task))


def rediscover_plan(current: Plan) -> Plan | None:
    """The plan with the backends DNS gives now; None if the addresses did not change."""

    def task() -> dict[str, Any] | None:
        from pibl.loader import rediscover

        return rediscover(current.configured, current.discovered)

    result = in_child(task)
    return None if result is None else Plan.from_json(result)


def drop_worker_gauges(pids: list[int]) -> None:
    """The metrics library's clean-up for dead workers (their live gauges), in a child."""

    def task() -> None:
        from pibl.observe.metrics import worker_exited

        for pid in pids:
            worker_exited(pid)

    with contextlib.suppress(ConfigError):  # stale files cost a wrong gauge, nothing more
        in_child(task)


@dataclass
class WorkerProc:
    slot: int
    pid: int
    generation: int
    started: float
    ready_fd: int
    ready: bool = False


@dataclass
class Master:
    config_path: str
    overrides: dict[str, Any]
    plan: Plan
    log: AccessLog
    sockets: list[list[socket.socket]] = field(default_factory=list)  # per slot: http[, https]
    workers: dict[int, WorkerProc] = field(default_factory=dict)
    generation: int = 0
    stopping: bool = False
    rotation: SharedBalance | None = None
    limiter: Any = None  # pibl.limits.RateLimiter once a route has a limit
    shadow: Any = None  # consistency checks' node-wide state (kept on reload)
    state_dir: Path | None = None
    last_restart: float = 0.0
    next_discovery: float = 0.0
    locks: PortLocks | None = None  # the addresses this instance holds (see pibl/ports.py)

    # -- sockets and processes ----------------------------------------------------------

    def open_sockets(self, plan: Plan) -> list[list[socket.socket]]:
        slots = []
        for _ in range(plan.workers):
            # bound, not listening: each worker listens once it can serve (see make_socket)
            slot = [make_socket(plan.host, plan.port, backlog=plan.backlog, listen=False)]
            if plan.tls_port is not None:
                slot.append(
                    make_socket(plan.host, plan.tls_port, backlog=plan.backlog, listen=False)
                )
            slots.append(slot)
        return slots

    def spawn(self, slot: int, plan: Plan, sockets: list[list[socket.socket]]) -> WorkerProc:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                os.close(read_fd)
                signal.pthread_sigmask(signal.SIG_SETMASK, set())
                for sig in HANDLED:
                    signal.signal(sig, signal.SIG_DFL)
                die_with_parent()
                if self.locks is not None:
                    self.locks.close_inherited()
                for i, socks in enumerate(sockets):
                    if i != slot:
                        for sock in socks:
                            sock.close()
                if self.sockets is not sockets:
                    # a reload onto new sockets: the old generation's copies would sit in the
                    # SO_REUSEPORT group unserved, and connections routed to them would hang
                    _close_all(self.sockets)
                shared = replace(self.rotation, slot=slot) if self.rotation is not None else None
                from pibl.workers import worker_main  # the proxy: imported by workers only

                code = worker_main(plan.config, sockets[slot], write_fd, shared)
            finally:
                os._exit(code)
        os.close(write_fd)
        proc = WorkerProc(slot, pid, self.generation, time.monotonic(), read_fd)
        self.workers[pid] = proc
        return proc

    def wait_ready(self, procs: list[WorkerProc], timeout: float = 15.0) -> bool:
        deadline = time.monotonic() + timeout
        pending = {p.ready_fd: p for p in procs if not p.ready}
        while pending and time.monotonic() < deadline:
            readable, _, _ = select.select(list(pending), [], [], 0.1)
            for fd in readable:
                data = b""
                with contextlib.suppress(OSError):
                    data = os.read(fd, 1)
                proc = pending.pop(fd)
                proc.ready = data == b"R"
                if not proc.ready:
                    return False
            self.reap()
            if any(p.pid not in self.workers for p in pending.values()):
                return False
        return not pending

    def signal_workers(self, sig: int, generation: int | None = None) -> None:
        for proc in list(self.workers.values()):
            if generation is None or proc.generation == generation:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, sig)

    def reap(self) -> list[tuple[WorkerProc, int]]:
        """Collect exited workers; returns them with their wait status."""
        gone = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            proc = self.workers.pop(pid, None)
            if proc is not None:
                with contextlib.suppress(OSError):
                    os.close(proc.ready_fd)
                gone.append((proc, status))
        if gone and not self.stopping and self.state_dir is not None:
            drop_worker_gauges([proc.pid for proc, _ in gone])
        return gone

    # -- the master loop ----------------------------------------------------------------

    def run(self) -> int:
        # Held from the start (sigtimedwait takes them below): a SIGHUP or SIGTERM sent as
        # soon as the port answers must not find the default action (ending the process).
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        plan = self.plan
        self._log_messages(plan)
        self._schedule_discovery(plan)
        self.sockets = self.open_sockets(plan)
        self.rotation = self._shared(plan)
        self.state_dir = make_state_dir(self.log)
        os.environ[MULTIPROC_ENV] = str(self.state_dir)
        procs = [self.spawn(i, plan, self.sockets) for i in range(plan.workers)]
        if not self.wait_ready(procs):
            self.log.error("workers failed to start")
            self.signal_workers(signal.SIGKILL)
            self._wait_all(5)
            return 1
        serving = ", ".join(
            ("admin " if a.role == "admin" else "")
            + ("https" if a.role == "https" else "http")
            + f"://{a.host}:{a.port}"
            for a in plan.addresses
        )
        self.log.info(
            f"master {os.getpid()}: {len(procs)} worker(s) "
            f"({', '.join(str(p.pid) for p in procs)}) serving {serving}"
        )
        while True:
            info = signal.sigtimedwait(HANDLED, 1.0)
            sig = info.si_signo if info is not None else None
            if sig in (signal.SIGTERM, signal.SIGINT):
                return self.stop()
            if sig == signal.SIGHUP:
                self.reload()
            elif sig == signal.SIGUSR1:
                self.log.reopen()
                self.signal_workers(signal.SIGUSR1)
            self._replace_dead()
            self._rediscover()

    def _log_messages(self, plan: Plan) -> None:
        for level, text in plan.messages:
            {"info": self.log.info, "warning": self.log.warning}.get(level, self.log.error)(text)

    def _schedule_discovery(self, plan: Plan) -> None:
        if plan.discovery_interval is not None:
            self.next_discovery = time.monotonic() + plan.discovery_interval

    def _rediscover(self) -> None:
        plan = self.plan
        if plan.discovery_interval is None or self.stopping:
            return
        if time.monotonic() < self.next_discovery:
            return
        self._schedule_discovery(plan)
        try:
            new = rediscover_plan(plan)
        except ConfigError as exc:
            self.log.error(f"discovery failed: {exc}")
            return
        if new is None:
            return
        self._log_messages(new)
        self.log.info("discovery: the backend set changed; starting a new generation")
        self._start_generation(new)

    def _replace_dead(self) -> None:
        for proc, status in self.reap():
            if self.stopping or proc.generation != self.generation:
                continue
            how = (
                f"signal {os.WTERMSIG(status)}"
                if os.WIFSIGNALED(status)
                else f"exit code {os.WEXITSTATUS(status)}"
            )
            wait = self.last_restart + RESTART_BACKOFF - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            self.last_restart = time.monotonic()
            new = self.spawn(proc.slot, self.plan, self.sockets)
            self.log.warning(
                f"worker {proc.pid} (slot {proc.slot}) died with {how}; replaced by {new.pid}"
            )

    def _shared(self, plan: Plan) -> SharedBalance:
        """Memory the workers share: rotation and ejections (new per generation), and the
        rate-limit buckets (made once, when a route first has a limit, and kept across
        reloads as nginx keeps its zones)."""
        consistency = plan.consistency
        shared = SharedBalance.create(len(plan.backends), plan.workers, holds=consistency)
        if self.limiter is None and (plan.limited or consistency):  # (shadow requests' rate)
            from pibl.limits import RateLimiter

            self.limiter = RateLimiter.shared()
        if consistency:
            from pibl.balance.consistency import VERIFYING, SharedShadow

            if self.shadow is None:
                self.shadow = SharedShadow.create()
            if plan.verifies_return and self.rotation is not None and shared.hold is not None:
                # a reload adds backends: each is verified against the others before traffic
                known = set(self.plan.backends)
                for i, label in enumerate(plan.backends):
                    if label not in known:
                        shared.hold[i] = VERIFYING
        return replace(shared, limiter=self.limiter, consistency=self.shadow)

    def reload(self) -> None:
        """SIGHUP: validate, start a new generation, retire the old one gracefully."""
        try:
            plan = load_plan(self.config_path, self.overrides)
        except ConfigError as exc:
            self.log.error(f"reload refused, keeping the running configuration: {exc}")
            return
        self._log_messages(plan)
        if self._start_generation(plan):
            self._schedule_discovery(plan)

    def _start_generation(self, new: Plan) -> bool:
        """New workers with the ``new`` plan; the old ones finish their requests and exit."""
        old_generation = self.generation
        old_sockets = self.sockets
        same_address = new.address == self.plan.address and new.workers == self.plan.workers
        try:
            if self.locks is not None:
                self.locks.acquire(new.addresses)
            sockets = old_sockets if same_address else self.open_sockets(new)
        except PortInUse as exc:
            self.log.error(f"reload refused: {exc}")
            self._keep_addresses(self.plan)
            return False
        except OSError as exc:
            self.log.error(f"reload refused: cannot listen: {exc}")
            self._keep_addresses(self.plan)
            return False
        self.generation += 1
        old_rotation = self.rotation
        self.rotation = self._shared(new)
        procs = [self.spawn(i, new, sockets) for i in range(new.workers)]
        if not self.wait_ready(procs):
            self.log.error("reload failed: new workers did not start; keeping the old ones")
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
            self.generation = old_generation
            self.rotation = old_rotation
            if sockets is not old_sockets:
                _close_all(sockets)
            self._keep_addresses(self.plan)
            return False
        self.signal_workers(signal.SIGTERM, old_generation)
        if sockets is not old_sockets:
            _close_all(old_sockets)  # the old workers keep their own copy until they exit
        self.plan = new
        self.sockets = sockets
        self._keep_addresses(new)
        self.log.info(
            f"reloaded {self.config_path}: generation {self.generation}, "
            f"{len(new.backends)} backend(s): " + ", ".join(new.backends)
        )
        return True

    def _keep_addresses(self, plan: Plan) -> None:
        if self.locks is not None:
            self.locks.keep_only(plan.addresses)

    def stop(self) -> int:
        self.stopping = True
        self.log.info("stopping: finishing in-flight requests")
        self.signal_workers(signal.SIGTERM)
        # The workers stop accepting at once; the master lets go of the listening sockets
        # too, so the port refuses new connections instead of queueing them unanswered.
        _close_all(self.sockets)
        self._wait_all(self.plan.shutdown + 5)
        self.remove_state()
        self.log.info("stopped")
        return 0

    def remove_state(self) -> None:
        if self.state_dir is not None:
            shutil.rmtree(self.state_dir, ignore_errors=True)
            self.state_dir = None

    def _wait_all(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.workers and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.05)
        if self.workers:
            self.signal_workers(signal.SIGKILL)
            while self.workers:
                self.reap()
                time.sleep(0.05)


def _close_all(slots: list[list[socket.socket]]) -> None:
    for socks in slots:
        for sock in socks:
            sock.close()


STATE_PREFIX = "pibl-state-"


def make_state_dir(log: AccessLog) -> Path:
    """A private directory for the workers' shared state (metrics, status, control).

    Named ``pibl-state-<pid>-<start time>-<random>`` after the master: a master killed
    with -9 cannot remove its own, so every new master removes those whose master is
    gone (a pid alone could have been reused since).
    """
    tmp = Path(tempfile.gettempdir())
    removed = 0
    with contextlib.suppress(OSError):
        for path in tmp.glob(STATE_PREFIX + "*"):
            pid, _, rest = path.name[len(STATE_PREFIX) :].partition("-")
            started, _, _ = rest.partition("-")
            if not pid.isdigit() or not started.isdigit() or alive(int(pid), started):
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    if removed:
        log.info(f"removed {removed} state directory(ies) left by stopped PIBL processes")
    me = os.getpid()
    return Path(tempfile.mkdtemp(prefix=f"{STATE_PREFIX}{me}-{start_time(me) or 0}-"))


def raise_fd_limit(log: AccessLog) -> None:
    """Lift the soft limit on open files to the hard one (the workers inherit it).

    Each client connection is a descriptor (two while proxied): a soft limit of 1,024
    would refuse connections long before a listen backlog of 4,096 fills.
    """
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 1 << 20 if hard == resource.RLIM_INFINITY else min(hard, 1 << 20)
        if soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (OSError, ValueError) as exc:
        log.warning(f"cannot raise the open files limit: {exc}")


def run(config_path: str, overrides: dict[str, Any]) -> int:
    """``pibl run``: validate, take the ports, start the workers, supervise until stopped."""
    plan = load_plan(config_path, overrides, announce=True)  # ConfigError: the CLI says it
    locks = PortLocks()
    try:
        locks.acquire(plan.addresses)
    except PortInUse as exc:
        print(f"pibl: cannot start: {exc}", file=sys.stderr)
        return 1
    # The master writes its few lines synchronously: no thread may exist when it forks.
    log = AccessLog(path=plan.log_file, stdout=plan.log_stdout, fmt=plan.log_format, threaded=False)
    master = Master(config_path, overrides, plan, log, locks=locks)
    try:
        raise_fd_limit(log)
        return master.run()
    except OSError as exc:
        log.error(f"cannot start: {exc}")
        return 1
    finally:
        master.remove_state()  # also when the workers failed to start
        log.close()
        locks.release_all()
