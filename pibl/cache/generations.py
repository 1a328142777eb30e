"""Change counters shared by every process that uses one cache directory.

A worker keeps hot entries and ``Vary`` indexes in memory, while another worker, ``pibl
cache purge`` or the admin API may replace or remove them on disk. Instead of a ``stat``
per hit to notice, each metadata file hashes to one of ``SLOTS`` 64-bit counters in a small
file that every process maps (nginx keeps its cache keys in shared memory for the same
reason). Whoever replaces or removes a metadata file counts its slot up afterwards; a copy
in memory is served without a ``stat`` while its slot still reads what it read when the copy
was last checked against the disk.

The counters are a hint, never the truth: a changed slot (shared by one file in
``SLOTS``) costs the ``stat`` it saves otherwise, and the store still checks every copy
against the disk now and then, for files changed by hand.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path

SLOTS = 4096
_SIZE = SLOTS * 8
_MASK = (1 << 64) - 1


def slot_of(meta_key: str) -> int:
    """The slot of a metadata file ``<dir>/<xx>/<sha-256 hex>.meta``: from its digest, so
    every process agrees (``hash()`` of a string differs from one process to another)."""
    try:
        return int(meta_key[-13:-5], 16) % SLOTS
    except ValueError:
        return 0


class Generations:
    """The counters of one cache directory, mapped from ``<dir>/generations``."""

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            size = os.fstat(fd).st_size
            if size not in (0, _SIZE):
                # another layout: resizing it under the processes that map it would kill
                # them (SIGBUS), so this process goes without
                raise ValueError(f"{path}: {size} bytes, not {_SIZE}")
            # blocks allocated now, not at a first write into a hole (SIGBUS on a full disk)
            os.posix_fallocate(fd, 0, _SIZE)
            fcntl.lockf(fd, fcntl.LOCK_EX, 8, 0, os.SEEK_SET)  # (record locks work here)
            fcntl.lockf(fd, fcntl.LOCK_UN, 8, 0, os.SEEK_SET)
            self._map = mmap.mmap(fd, _SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._closed = weakref.finalize(self, os.close, fd)  # (the map closes itself)
        self.counts = memoryview(self._map).cast("Q")
        self._lock = threading.Lock()  # (record locks do not exclude this process's threads)

    @classmethod
    def open(cls, directory: Path) -> Generations | None:
        """The directory's counters, or None where they cannot be mapped (then every
        memory-tier hit is checked with a ``stat``)."""
        try:
            return cls(directory / "generations")
        except (OSError, ValueError):
            return None

    def bump(self, slot: int) -> None:
        """Count a change of a file in ``slot``; other processes' increments are not lost."""
        with self._held(slot * 8, 8):
            self.counts[slot] = (self.counts[slot] + 1) & _MASK

    def bump_all(self) -> None:
        """Count a change of every file (a purge of everything)."""
        counts = self.counts
        with self._held(0, 0):  # (0 bytes: to the end of the file)
            for slot in range(SLOTS):
                counts[slot] = (counts[slot] + 1) & _MASK

    @contextlib.contextmanager
    def _held(self, start: int, length: int) -> Iterator[None]:
        """The counters from ``start`` locked against this process's other threads and other
        processes. Should the record lock fail now (it worked when the file was opened),
        the counting goes on without it: a lost increment only delays a ``stat`` by the
        store's ``recheck``."""
        with self._lock:
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_EX, length, start, os.SEEK_SET)
            except OSError:
                yield
                return
            try:
                yield
            finally:
                with contextlib.suppress(OSError):
                    fcntl.lockf(self._fd, fcntl.LOCK_UN, length, start, os.SEEK_SET)

    def close(self) -> None:
        self.counts.release()
        self._map.close()
        self._closed()


__all__ = ["SLOTS", "Generations", "slot_of"]
