"""Which PIBL holds which port: one running instance per listening address.

The workers of one instance share their listening sockets through ``SO_REUSEPORT``. The
same option would let a second ``pibl run`` (or a second ``pibl demo``) bind the same port
without an error, and the kernel would then split new connections between the two
instances. nginx refuses to start in that case ("bind() to 0.0.0.0:80 failed (98: Address
already in use)"); PIBL does too, and says which process holds the port.

How it knows:

* **A lock file per address.** Before it binds, an instance takes an ``flock`` on
  ``<runtime dir>/<port>@<host>.lock`` (exclusive) and on ``<port>.lock`` (exclusive for a
  wildcard address such as ``0.0.0.0``, shared for a specific one, which mirrors what the
  kernel lets coexist: two specific addresses on one port do, a wildcard and anything else on
  that port do not). The address's file records the holder's PID. The kernel releases an
  ``flock`` when its process dies, so a ``kill -9`` leaves no stale lock: the file may remain
  with an old PID, but nothing holds it and the next instance simply takes it over. The
  runtime directory is ``$PIBL_RUNTIME_DIR`` or ``/tmp/pibl-<uid>`` (mode 0700), with one
  subdirectory per network namespace (ports are per namespace); other users need no lock,
  because Linux never lets two users share a port through ``SO_REUSEPORT``.
* **A probe bind without SO_REUSEPORT.** A listening socket of any other program on the
  address (even one that also sets ``SO_REUSEPORT``) makes it fail, so a port taken by, say,
  an HAProxy is refused too, with the PID of the holder when ``/proc`` shows it.

Only the master (or ``pibl demo``) holds the locks; forked workers close their copies. An
address the instance already holds is neither locked again nor probed, so a SIGHUP reload,
even one that changes the number of workers, never trips over the instance's own sockets.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pibl.config import Config

__all__ = ["Listen", "PortInUse", "PortLocks", "config_addresses", "runtime_dir"]

WILDCARDS = {"", "0.0.0.0", "::", "*"}


@dataclass(frozen=True, slots=True)
class Listen:
    """One listening address and what it is for (``http``, ``https``, ``admin``)."""

    host: str
    port: int
    role: str

    @property
    def wildcard(self) -> bool:
        return self.host in WILDCARDS

    @property
    def key(self) -> tuple[str, int]:
        return ("*" if self.wildcard else self.host.lower(), self.port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port} ({self.role})"


class PortInUse(OSError):
    """Another process listens on an address this instance needs."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EADDRINUSE, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def make_socket(
    host: str,
    port: int,
    *,
    backlog: int = socket.SOMAXCONN,
    reuse_port: bool = True,
    listen: bool = True,
) -> socket.socket:
    """A TCP socket with SO_REUSEPORT, so several workers can share the port.

    ``loop.create_server(sock=...)`` calls ``listen`` again with its own ``backlog``
    (100 unless given): every listener passes the configured one there too. The master
    binds without listening: the port accepts connections once a worker serves them, and
    keeps accepting (the socket stays listening) while a dead worker is replaced.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port and hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    if listen:
        sock.listen(backlog)
    sock.setblocking(False)
    return sock


def config_addresses(config: Config) -> list[Listen]:
    """Every address a configuration listens on: HTTP, HTTPS and the admin listener."""
    out = [Listen(config.server.host, config.server.port, "http")]
    if config.tls is not None and config.tls.enabled:
        out.append(Listen(config.server.host, config.tls.port, "https"))
    if config.admin is not None and config.admin.enabled:
        out.append(Listen(config.admin.host, config.admin.port, "admin"))
    return out


def network_namespace() -> str:
    """This process's network namespace ("4026531840"), "" if /proc does not say."""
    try:
        link = os.readlink("/proc/self/ns/net")  # "net:[4026531840]"
    except OSError:
        return ""
    return "".join(c for c in link if c.isdigit())


def runtime_dir() -> Path | None:
    """The per-user directory of lock files, created 0700; None if it cannot be trusted.

    Ports belong to a network namespace: two instances in different namespaces (the HA
    pair on one machine, containers sharing /tmp) may both listen on 8080, so each
    namespace has its own subdirectory.
    """
    configured = os.environ.get("PIBL_RUNTIME_DIR")
    base = Path(configured) if configured else Path(f"/tmp/pibl-{os.getuid()}")
    netns = network_namespace()
    path = base / f"net-{netns}" if netns else base
    try:
        base.mkdir(mode=0o700, parents=bool(configured), exist_ok=True)
        st = os.lstat(base)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            return None  # someone else's directory (or a symlink): do not trust its files
        path.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        return None
    return path


def _describe_pid(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return f"PID {pid}"
    words = [w.decode(errors="replace") for w in raw.split(b"\0") if w]
    if len(words) >= 3 and words[1:3] == ["-m", "pibl"]:
        words = ["pibl", *words[3:]]  # python -m pibl ...
    elif len(words) >= 2 and Path(words[1]).name == "pibl":
        words = ["pibl", *words[2:]]  # the console script, run by its interpreter
    elif words and Path(words[0]).name == "pibl":
        words[0] = "pibl"
    command = " ".join(words)
    if len(command) > 120:
        command = command[:117] + "..."
    return f"PID {pid} ({command})" if command else f"PID {pid}"


def listening_pids(port: int) -> list[int]:
    """PIDs with a listening TCP socket on ``port``, as far as /proc shows them."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if (
                len(fields) > 9
                and fields[3] == "0A"
                and int(fields[1].rsplit(":", 1)[1], 16) == port
            ):
                inodes.add(fields[9])
    if not inodes:
        return []
    wanted = {f"socket:[{inode}]" for inode in inodes}
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (entry / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in wanted:
                        pids.append(int(entry.name))
                        break
    return sorted(pids)


class _Lock:
    """An flock on a file that is removed again when released by its last holder."""

    def __init__(self, path: Path, fd: int, exclusive: bool) -> None:
        self.path = path
        self.fd = fd
        self.exclusive = exclusive

    @classmethod
    def take(cls, path: Path, *, exclusive: bool, record: bool) -> _Lock | None:
        """The lock, or None if another process holds it. Writes our PID when ``record``."""
        for _ in range(5):  # the file may be removed by its last holder while we open it
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            if record:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return cls(path, fd, exclusive)
        return None

    def release(self) -> None:
        """Remove the file if nobody else holds it, then let go."""
        with contextlib.suppress(OSError):
            if not self.exclusive:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # others still sharing?
            os.unlink(self.path)
        os.close(self.fd)


def _holder(path: Path) -> int | None:
    """The PID recorded in a lock file that some process holds right now."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # held: the PID in it is alive
        else:
            return None  # nobody holds it: a leftover of a process that is gone
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    finally:
        os.close(fd)
    return int(text) if text.isdigit() else None


class PortLocks:
    """The addresses one instance holds, with their lock files."""

    def __init__(self, directory: Path | None = None) -> None:
        self.dir = directory if directory is not None else runtime_dir()
        self._ports: dict[int, _Lock] = {}  # port-level locks, shared or exclusive
        self._records: dict[tuple[str, int], _Lock] = {}
        self.held: set[tuple[str, int]] = set()

    def acquire(self, addresses: Iterable[Listen]) -> None:
        """Take every address not held yet, or none of them: raise PortInUse naming the holder."""
        new = [a for a in dict.fromkeys(addresses) if a.key not in self.held]
        taken: list[Listen] = []
        try:
            for address in new:
                if address.key in self.held:
                    continue  # listed twice (for example http and admin on one port)
                self._lock(address)
                taken.append(address)
                self.held.add(address.key)
                self._probe(address)
        except BaseException:
            self._drop([a.key for a in taken])
            raise

    def keep_only(self, addresses: Iterable[Listen]) -> None:
        """Release the addresses not in ``addresses`` (after a reload moved a listener)."""
        keep = {a.key for a in addresses}
        self._drop([key for key in self.held if key not in keep])

    def release_all(self) -> None:
        self._drop(list(self.held))

    def close_inherited(self) -> None:
        """In a forked worker: close the copies of the descriptors; the master keeps the locks."""
        for lock in [*self._ports.values(), *self._records.values()]:
            with contextlib.suppress(OSError):
                os.close(lock.fd)
        self._ports.clear()
        self._records.clear()
        self.held.clear()

    # -- inside -------------------------------------------------------------------------

    def _lock(self, address: Listen) -> None:
        if self.dir is None:
            return
        host, port = address.key
        if port not in self._ports:
            level = _Lock.take(self.dir / f"{port}.lock", exclusive=address.wildcard, record=False)
            if level is None:
                raise self._busy(address, self._holders(port))
            self._ports[port] = level
        elif address.wildcard and not self._ports[port].exclusive:
            # a wildcard next to a specific address of ours: nobody else may share the port
            try:
                fcntl.flock(self._ports[port].fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise self._busy(address, self._holders(port)) from None
            self._ports[port].exclusive = True
        record = _Lock.take(self.dir / f"{port}@{host}.lock", exclusive=True, record=True)
        if record is None:
            holder = _holder(self.dir / f"{port}@{host}.lock")
            raise self._busy(address, [holder] if holder else [])
        self._records[address.key] = record

    def _holders(self, port: int) -> list[int]:
        assert self.dir is not None
        pids = set()
        for path in self.dir.glob(f"{port}@*.lock"):
            pid = _holder(path)
            if pid is not None and pid != os.getpid():
                pids.add(pid)
        return sorted(pids)

    def _busy(self, address: Listen, pids: list[int]) -> PortInUse:
        if pids:
            who = ", ".join(_describe_pid(pid) for pid in pids)
            return PortInUse(
                f"port {address.port} is already in use by another PIBL: {who}; cannot listen "
                f"on {address}. Stop that instance or choose another port."
            )
        return PortInUse(f"port {address.port} is already in use by another PIBL ({address})")

    def _probe(self, address: Listen) -> None:
        """Bind without SO_REUSEPORT: fails if anything already listens there."""
        host = "" if address.host == "*" else address.host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((host, address.port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from None
            pids = [p for p in listening_pids(address.port) if p != os.getpid()]
            who = ", ".join(_describe_pid(pid) for pid in pids) or "another program"
            raise PortInUse(
                f"port {address.port} is already in use by {who}; cannot listen on {address}"
            ) from None

    def _drop(self, keys: list[tuple[str, int]]) -> None:
        for key in keys:
            self.held.discard(key)
            record = self._records.pop(key, None)
            if record is not None:
                record.release()
        still = {port for _, port in self.held}
        for port in [p for p in self._ports if p not in still]:
            self._ports.pop(port).release()
