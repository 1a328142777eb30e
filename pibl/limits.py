"""Request rate limits: nginx's ``limit_req`` leaky bucket, shared by a node's workers.

Each key (a client address, a header's value, or the route as a whole) has a bucket that
leaks ``rate`` requests per second. A request adds one; a request that would make the
bucket hold more than ``burst`` is refused (``429`` with ``Retry-After``) and changes
nothing. So ``burst + 1`` requests pass at once, then one per ``1/rate`` seconds, exactly as
nginx counts them (its ``excess``). With ``delay`` a request inside the burst waits until
the bucket would have leaked down to it, instead of passing at once (nginx without
``nodelay``).

The buckets live in a fixed table in memory shared by the worker processes (made by the
master before it forks, as the round-robin state is), so the limit holds for the node, not
per worker. The table is open addressing over hashed keys with a short probe; when every
probed slot is taken, the one idle longest is reused (a forgotten key starts with an empty
bucket, which only ever errs towards letting a request through). All times are
``time.monotonic()``, the same clock in every process.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import MutableSequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

SLOTS = 1 << 16  # buckets per node (about 1.5 MiB of shared memory)
PROBE = 8


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    delay: float = 0.0  # seconds to wait before forwarding (delay mode)
    retry_after: float = 0.0  # when refused: seconds until one more request fits


def bucket_key(route: int, key: str) -> int:
    """A non-zero 63-bit key for the table (stable across processes, unlike hash())."""
    digest = hashlib.blake2b(f"{route}\0{key}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> 1) or 1


def leak(
    excess: float, last: float, now: float, *, rate: float, burst: int, fresh: bool
) -> tuple[bool, float]:
    """One request against a bucket: (allowed, the bucket's new excess).

    ``fresh`` is a bucket seen for the first time (nginx creates it empty, and the first
    request passes without counting against it).
    """
    if fresh:
        return True, 0.0
    new = max(0.0, excess - rate * max(0.0, now - last) + 1.0)
    if new > burst:
        return False, excess
    return True, new


class RateLimiter:
    """Buckets for every limited route of a worker, in shared memory when given."""

    def __init__(
        self,
        keys: MutableSequence[int] | None = None,
        values: MutableSequence[float] | None = None,
        lock: AbstractContextManager[object] | None = None,
        slots: int = SLOTS,
    ) -> None:
        self.slots = len(keys) if keys is not None else slots
        self._keys: MutableSequence[int] = keys if keys is not None else [0] * self.slots
        self._values: MutableSequence[float] = (
            values if values is not None else [0.0] * (2 * self.slots)
        )
        self._lock: AbstractContextManager[object] = lock or contextlib.nullcontext()

    @classmethod
    def shared(cls, slots: int = SLOTS) -> RateLimiter:
        """Made by the master before it forks: every worker sees the same buckets."""
        import multiprocessing

        ctx = multiprocessing.get_context("fork")
        return cls(ctx.RawArray("q", slots), ctx.RawArray("d", 2 * slots), ctx.Lock())

    def check(self, key: int, now: float, *, rate: float, burst: int, delay: bool) -> Verdict:
        lock = self._lock
        acquire = getattr(lock, "acquire", None)
        if acquire is not None and not acquire(timeout=0.05):
            # a worker killed while it held the lock: let requests through, never hang
            return Verdict(True)
        try:
            return self._check(key, now, rate=rate, burst=burst, delay=delay)
        finally:
            if acquire is not None:
                lock.release()  # type: ignore[attr-defined]

    def _check(self, key: int, now: float, *, rate: float, burst: int, delay: bool) -> Verdict:
        slot, fresh = self._slot(key, now)
        values = self._values
        excess, last = values[2 * slot], values[2 * slot + 1]
        allowed, new = leak(excess, last, now, rate=rate, burst=burst, fresh=fresh)
        if not allowed:
            # one more fits once the bucket has leaked to burst - 1 + 1
            wait = (excess - rate * max(0.0, now - last) + 1.0 - burst) / rate
            return Verdict(False, retry_after=max(wait, 1.0 / rate))
        self._keys[slot] = key
        values[2 * slot] = new
        values[2 * slot + 1] = now
        return Verdict(True, delay=new / rate if delay else 0.0)

    def _slot(self, key: int, now: float) -> tuple[int, bool]:
        """The slot of ``key`` (True when it is new there), taking over an idle one."""
        keys, values = self._keys, self._values
        start = key % self.slots
        oldest, oldest_time = start, float("inf")
        for i in range(PROBE):
            slot = (start + i) % self.slots
            k = keys[slot]
            if k == key:
                return slot, False
            if k == 0:
                return slot, True
            if values[2 * slot + 1] < oldest_time:
                oldest, oldest_time = slot, values[2 * slot + 1]
        return oldest, True
