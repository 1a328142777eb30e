"""Is a process that left files behind still running? (for cleaning up after crashes).

A process is named by its pid and its start time (field 22 of ``/proc/PID/stat``, in clock
ticks since boot): a pid alone can be reused by an unrelated process after a crash. A
zombie nobody reaps (a killed worker under a container's init) counts as gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # the workers' metric files (set by the master)


def start_time(pid: int) -> str | None:
    """The process's start time as ``/proc`` gives it; None if it is gone or a zombie.

    Without ``/proc`` the answer is ``""`` for a process that exists (nothing better is
    known) and None for one that does not.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[-1].split()
    except FileNotFoundError:
        return None
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return ""
        return ""
    if not fields or fields[0] in (b"Z", b"X") or len(fields) < 20:
        return None
    return fields[19].decode()


def alive(pid: int, started: str | None = None) -> bool:
    """Whether ``pid`` runs (and, with ``started``, is the process that started then)."""
    now = start_time(pid)
    if now is None:
        return False
    return started is None or now == "" or now == started


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent exits (Linux)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, sig)
