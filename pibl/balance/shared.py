"""Balancing state the worker processes share (made by the master before it forks).

A module of its own, apart from the balancer: the master imports it, and nothing else of
the request path (which a compiled build compiles; see pibl/_build.py).
"""

from __future__ import annotations

from collections.abc import MutableSequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, cast


@dataclass(frozen=True)
class SharedBalance:
    """Balancing state in memory shared by the worker processes, and its lock.

    Made by the master before it forks (nginx's ``zone`` directive does the same for
    upstreams): the round-robin scores, so that b1, b2, b3 rotate across all workers as
    they would in one process, and each backend's passive ejection deadline (monotonic
    clock, the same in every process), so that a backend one worker ejected is out of
    rotation in all of them.
    """

    scores: MutableSequence[int]
    ejected_until: MutableSequence[float]
    lock: AbstractContextManager[object]
    refused: MutableSequence[int]  # 1 when that ejection came from a refused connection
    limiter: Any = None  # the node's rate-limit buckets (pibl.limits.RateLimiter), if any
    # requests in flight per backend, one row per worker slot (a replaced worker clears
    # its row, so a killed one never leaves its counts behind); for pools with maxconn
    inflight: MutableSequence[int] | None = None
    slot: int = 0  # this worker's row
    width: int = 0  # backends per row
    rows: int = 1  # worker slots (the generation's [server] workers)
    # consistency checks ([consistency] on): per backend, held out of rotation or not
    # (pibl.balance.consistency.Holds), and the node's shared shadow state
    hold: MutableSequence[int] | None = None
    hold_since: MutableSequence[float] | None = None
    hold_claimed: MutableSequence[float] | None = None
    consistency: Any = None  # pibl.balance.consistency.SharedShadow, kept across reloads

    @classmethod
    def create(cls, n: int, workers: int = 1, *, holds: bool = False) -> SharedBalance:
        import multiprocessing

        ctx = multiprocessing.get_context("fork")
        return cls(
            ctx.RawArray("q", n),
            ctx.RawArray("d", n),
            ctx.Lock(),
            ctx.RawArray("b", n),
            inflight=ctx.RawArray("i", workers * n),
            width=n,
            rows=workers,
            hold=ctx.RawArray("b", n) if holds else None,
            hold_since=ctx.RawArray("d", n) if holds else None,
            hold_claimed=ctx.RawArray("d", n) if holds else None,
        )

    def in_flight(self, index: int) -> int:
        """Requests in flight to backend ``index`` from every worker of the node."""
        assert self.inflight is not None
        width = self.width
        return sum(self.inflight[row * width + index] for row in range(self.rows))

    def add_in_flight(self, index: int, delta: int) -> None:
        assert self.inflight is not None
        with self.lock:
            self.inflight[self.slot * self.width + index] += delta

    def clear_row(self) -> None:
        """A worker starting in its slot: what a predecessor there counted is gone."""
        if self.inflight is not None:
            start = self.slot * self.width
            for i in range(start, start + self.width):
                self.inflight[i] = 0

    def view(self, first: int, n: int) -> SharedBalance | None:
        """The part for backends ``first`` .. ``first + n - 1`` (one pool), in the same memory;
        None when this state was made for another backend list."""
        if first + n > len(self.scores):
            return None

        def part(seq: MutableSequence[Any], code: str) -> MutableSequence[Any]:
            view: Any = memoryview(seq).cast("B").cast(code)  # type: ignore[arg-type, call-overload]
            return cast(MutableSequence[Any], view[first : first + n])

        return SharedBalance(
            part(self.scores, "q"),
            part(self.ejected_until, "d"),
            self.lock,
            part(self.refused, "b"),
            self.limiter,
            hold=part(self.hold, "b") if self.hold is not None else None,
        )
