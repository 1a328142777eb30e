"""Master and worker processes: every core used, reloads and crashes without lost requests.

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
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import os
import resource
import select
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pibl.balance.consistency import VERIFYING
from pibl.balance.health import SharedBalance
from pibl.config import Config, load_config, resolve_path
from pibl.discovery import Watcher, expanded_config, make_resolver, needs_discovery
from pibl.errors import ConfigError
from pibl.limits import RateLimiter
from pibl.observe.accesslog import AccessLog
from pibl.observe.metrics import prepare_multiprocess, worker_exited
from pibl.ports import PortInUse, PortLocks, config_addresses
from pibl.procs import alive, start_time
from pibl.proxy.server import announce_backends, make_socket, run_worker, validate_runtime
from pibl.proxy.shadow import SharedShadow
from pibl.routes import route_warnings

HANDLED = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD}
PR_SET_PDEATHSIG = 1
RESTART_BACKOFF = 1.0  # a worker that keeps dying is restarted at most once a second


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
    config: Config
    log: AccessLog
    make_log: Callable[[Config], AccessLog]
    sockets: list[list[socket.socket]] = field(default_factory=list)  # per slot: http[, https]
    workers: dict[int, WorkerProc] = field(default_factory=dict)
    generation: int = 0
    stopping: bool = False
    rotation: SharedBalance | None = None
    limiter: RateLimiter | None = None
    shadow: SharedShadow | None = None  # consistency checks' node-wide state (kept on reload)
    configured: Config | None = None  # as written in the file (before discovery)
    watcher: Watcher | None = None
    state_dir: Path | None = None
    last_restart: float = 0.0
    locks: PortLocks | None = None  # the addresses this instance holds (see pibl/ports.py)

    # -- sockets and processes ----------------------------------------------------------

    def _address(self, config: Config) -> tuple[str, int, int | None]:
        tls = config.tls if config.tls is not None and config.tls.enabled else None
        return config.server.host, config.server.port, tls.port if tls else None

    def open_sockets(self, config: Config) -> list[list[socket.socket]]:
        host, port, tls_port = self._address(config)
        slots = []
        for _ in range(config.server.workers):
            backlog = config.server.listen_backlog
            slot = [make_socket(host, port, backlog=backlog)]
            if tls_port is not None:
                slot.append(make_socket(host, tls_port, backlog=backlog))
            slots.append(slot)
        return slots

    def spawn(self, slot: int, config: Config, sockets: list[list[socket.socket]]) -> WorkerProc:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                os.close(read_fd)
                signal.pthread_sigmask(signal.SIG_SETMASK, set())
                for sig in HANDLED:
                    signal.signal(sig, signal.SIG_DFL)
                _die_with_parent()
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
                shared = (
                    dataclasses.replace(self.rotation, slot=slot)
                    if self.rotation is not None
                    else None
                )
                code = _worker_main(config, sockets[slot], write_fd, self.make_log, shared)
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
            worker_exited(pid)
            if proc is not None:
                with contextlib.suppress(OSError):
                    os.close(proc.ready_fd)
                gone.append((proc, status))
        return gone

    # -- the master loop ----------------------------------------------------------------

    def _effective(self, configured: Config, *, force: bool) -> Config | None:
        """The configuration with discovered backends expanded; None if nothing changed."""
        if not any(needs_discovery(b) for b in configured.backends):
            return configured if force else None
        if self.watcher is None or force:
            d = configured.discovery
            self.watcher = Watcher(make_resolver(d.nameservers, d.timeout).resolve, d.interval)
        expansion = self.watcher.check(configured.backends, force=force)
        if expansion is None:
            return None
        self.log.info(f"discovery: {expansion.summary()}")
        return expanded_config(configured, expansion)

    def _rediscover(self) -> None:
        if self.watcher is None or not self.watcher.due() or self.stopping:
            return
        effective = self._effective(self.configured or self.config, force=False)
        if effective is not None:
            self.log.info("discovery: the backend set changed; starting a new generation")
            self._start_generation(effective)

    def run(self) -> int:
        # Held from the start (sigtimedwait takes them below): a SIGHUP or SIGTERM sent as
        # soon as the port answers must not find the default action (ending the process).
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        self.configured = self.config
        effective = self._effective(self.config, force=True)
        if effective is not None:
            self.config = effective
        config = self.config
        asyncio.run(announce_backends(config, self.log))
        for warning in route_warnings(config):
            self.log.warning(warning)
        self.sockets = self.open_sockets(config)
        self.rotation = self._shared(config)
        self.state_dir = make_state_dir(self.log)
        prepare_multiprocess(self.state_dir)
        procs = [self.spawn(i, config, self.sockets) for i in range(config.server.workers)]
        if not self.wait_ready(procs):
            self.log.error("workers failed to start")
            self.signal_workers(signal.SIGKILL)
            self._wait_all(5)
            return 1
        serving = ", ".join(
            ("admin " if a.role == "admin" else "")
            + ("https" if a.role == "https" else "http")
            + f"://{a.host}:{a.port}"
            for a in config_addresses(config)
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
            new = self.spawn(proc.slot, self.config, self.sockets)
            self.log.warning(
                f"worker {proc.pid} (slot {proc.slot}) died with {how}; replaced by {new.pid}"
            )

    def _shared(self, config: Config) -> SharedBalance:
        """Memory the workers share: rotation and ejections (new per generation), and the
        rate-limit buckets (made once, when a route first has a limit, and kept across
        reloads as nginx keeps its zones)."""
        consistency = config.consistency.enabled
        shared = SharedBalance.create(
            len(config.all_backends), config.server.workers, holds=consistency
        )
        limited = any(r.limit is not None for r in config.routes)
        if self.limiter is None and (limited or consistency):  # (shadow requests' rate too)
            self.limiter = RateLimiter.shared()
        if self.shadow is None and consistency:
            self.shadow = SharedShadow.create()
        shared = dataclasses.replace(shared, limiter=self.limiter, consistency=self.shadow)
        if consistency and config.consistency.verifies_return and self.rotation is not None:
            # a reload adds backends: each is verified against the others before traffic
            known = {b.label for b in self.config.all_backends}
            for i, backend in enumerate(config.all_backends):
                if backend.label not in known and shared.hold is not None:
                    shared.hold[i] = VERIFYING
        return shared

    def reload(self) -> None:
        """SIGHUP: validate, start a new generation, retire the old one gracefully."""
        try:
            configured = load_config(self.config_path, self.overrides)
            validate_runtime(configured, self.config_path)
        except ConfigError as exc:
            self.log.error(f"reload refused, keeping the running configuration: {exc}")
            return
        new_config = self._effective(configured, force=True) or configured
        if self._start_generation(new_config):
            self.configured = configured

    def _start_generation(self, new_config: Config) -> bool:
        """New workers with ``new_config``; the old ones finish their requests and exit."""
        old_generation = self.generation
        old_sockets = self.sockets
        same_address = self._address(new_config) == self._address(self.config) and (
            new_config.server.workers == self.config.server.workers
        )
        try:
            if self.locks is not None:
                self.locks.acquire(config_addresses(new_config))
            sockets = old_sockets if same_address else self.open_sockets(new_config)
        except PortInUse as exc:
            self.log.error(f"reload refused: {exc}")
            self._keep_addresses(self.config)
            return False
        except OSError as exc:
            self.log.error(f"reload refused: cannot listen: {exc}")
            self._keep_addresses(self.config)
            return False
        self.generation += 1
        old_rotation = self.rotation
        self.rotation = self._shared(new_config)
        procs = [self.spawn(i, new_config, sockets) for i in range(new_config.server.workers)]
        if not self.wait_ready(procs):
            self.log.error("reload failed: new workers did not start; keeping the old ones")
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
            self.generation = old_generation
            self.rotation = old_rotation
            if sockets is not old_sockets:
                _close_all(sockets)
            self._keep_addresses(self.config)
            return False
        self.signal_workers(signal.SIGTERM, old_generation)
        if sockets is not old_sockets:
            _close_all(old_sockets)  # the old workers keep their own copy until they exit
        self.config = new_config
        self.sockets = sockets
        self._keep_addresses(new_config)
        self.log.info(
            f"reloaded {self.config_path}: generation {self.generation}, "
            f"{len(new_config.all_backends)} backend(s): "
            + ", ".join(b.label for b in new_config.all_backends)
        )
        return True

    def _keep_addresses(self, config: Config) -> None:
        if self.locks is not None:
            self.locks.keep_only(config_addresses(config))

    def stop(self) -> int:
        self.stopping = True
        self.log.info("stopping: finishing in-flight requests")
        self.signal_workers(signal.SIGTERM)
        # The workers stop accepting at once; the master lets go of the listening sockets
        # too, so the port refuses new connections instead of queueing them unanswered.
        _close_all(self.sockets)
        self._wait_all(self.config.timeouts.shutdown + 5)
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


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def event_loop_factory(choice: str) -> tuple[Callable[[], asyncio.AbstractEventLoop], str]:
    """The loop constructor for ``[server] event_loop``, and a warning to log ("" if none).

    "auto" takes uvloop when it is installed (the default install has it), else asyncio's.
    """
    if choice == "asyncio":
        return asyncio.new_event_loop, ""
    try:
        import uvloop
    except ImportError:
        warning = "event_loop = uvloop but uvloop is not installed; using asyncio"
        return asyncio.new_event_loop, warning if choice == "uvloop" else ""
    return uvloop.new_event_loop, ""


def _worker_main(
    config: Config,
    sock: list[socket.socket],
    ready_fd: int,
    make_log: Callable[[Config], AccessLog],
    rotation: SharedBalance | None,
) -> int:
    log = make_log(config)
    log.label = f"worker {os.getpid()}"  # each worker listens and checks health on its own

    def ready(_: object) -> None:
        os.write(ready_fd, b"R")
        os.close(ready_fd)

    new_loop, warning = event_loop_factory(config.server.event_loop)
    if warning:
        log.warning(warning)
    try:
        with asyncio.Runner(loop_factory=new_loop) as runner:
            runner.run(
                run_worker(config, log, sock=sock, on_ready=ready, announce=False, shared=rotation)
            )
    except Exception:
        log.exception("worker failed")
        log.close()
        return 1
    log.close()
    return 0


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


def run_master(
    config_path: str, overrides: dict[str, Any], config: Config, locks: PortLocks | None = None
) -> int:
    def make_log(cfg: Config, *, threaded: bool = True) -> AccessLog:
        path = str(resolve_path(cfg.log.file)) if cfg.log.file else None
        return AccessLog(path=path, stdout=cfg.log.stdout, fmt=cfg.log.format, threaded=threaded)

    # The master writes its few lines synchronously: no thread may exist when it forks.
    master_log = make_log(config, threaded=False)
    raise_fd_limit(master_log)
    master = Master(config_path, overrides, config, master_log, make_log, locks=locks)
    try:
        return master.run()
    except OSError as exc:
        master_log.error(f"cannot start: {exc}")
        return 1
    finally:
        master.remove_state()  # also when the workers failed to start
        master_log.close()
