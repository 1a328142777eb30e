"""Write-side flow control shared by client and backend connections.

asyncio calls ``pause_writing`` when a transport's send buffer passes its high-water mark
and ``resume_writing`` when it drains. Both connection classes react the same way: an
exchange waiting in ``wait_writable`` is released, and in a tunnel (WebSocket) the peer's
reading is paused and resumed, so a slow side slows the other down instead of letting
bytes pile up in memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class WriteFlow(asyncio.Protocol):
    __slots__ = ("_drain_waiter", "_write_paused", "tunnel")

    def __init__(self) -> None:
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self.tunnel: asyncio.Transport | None = None  # the peer's transport in a tunnel

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.tunnel is not None:  # this side reads slowly: stop reading the other one
            self.tunnel.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.tunnel is not None and not self.tunnel.is_closing():
            self.tunnel.resume_reading()
        self.release_drain()

    def release_drain(self) -> None:
        """Wake an exchange waiting for the buffer to drain (also when the peer is gone)."""
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait_writable(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._write_paused:
            self._drain_waiter = loop.create_future()
            await self._drain_waiter


def _nothing() -> None:
    pass


GRACE = 0.05  # seconds a swept deadline waits for a timer of its own (see Sweep)


class Sweep:
    """Timers for deadlines set for the first time, made in one pass ``GRACE`` seconds later.

    A client connection arms its header timer as it opens. Under ``Connection: close``
    load most connections are gone a few milliseconds later, so a loop timer made and
    cancelled for each of them (a ``call_at`` and a ``cancel``, about 3 µs) bought
    nothing. A deadline given a sweep instead joins a list; one loop timer per ``GRACE``
    seconds goes through it, and only deadlines still set get a timer of their own, for
    the moment they were set for. One that falls due within ``GRACE`` fires when the
    sweep runs: late by ``GRACE`` at most, and only for delays shorter than that.
    """

    __slots__ = ("_handle", "_loop", "_pending")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._pending: list[Deadline] = []
        self._handle: asyncio.TimerHandle | None = None

    def add(self, deadline: Deadline) -> None:
        self._pending.append(deadline)
        if self._handle is None:
            self._handle = self._loop.call_at(self._loop.time() + GRACE, self._run)

    def _run(self) -> None:
        self._handle = None
        pending, self._pending = self._pending, []
        now = self._loop.time()
        for deadline in pending:
            try:
                deadline.adopt(now)
            except Exception as exc:  # (a callback's bug must not drop the others' timers)
                self._loop.call_exception_handler(
                    {"message": "error in a deadline's callback", "exception": exc}
                )

    def close(self) -> None:
        """The loop is stopping: no more passes (pending deadlines never fire)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._pending.clear()


class Deadline:
    """A timeout moved by changing a number, not by a new timer per request.

    Keep-alive connections re-arm their timers for every request: the client's idle and
    header timers, a backend's response timer. ``set`` only moves the deadline when a
    timer due no later than it is already scheduled; that timer, when it fires, schedules
    itself again for the deadline or, if the deadline passed, calls ``callback``. So a
    busy connection schedules about one timer per timeout period instead of one per
    request, and ``clear`` costs nothing. With a ``sweep``, a deadline without a timer
    gets one only if it is still set when the sweep passes (see ``Sweep``).
    """

    __slots__ = ("_callback", "_due", "_handle", "_loop", "_queued", "_sweep", "_when")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        callback: Callable[[], None],
        sweep: Sweep | None = None,
    ) -> None:
        self._loop = loop
        self._callback = callback
        self._sweep = sweep
        self._queued = False  # in the sweep's list
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0  # when the scheduled timer fires (``_handle.when()``)
        self._when: float | None = None

    @property
    def armed(self) -> bool:
        return self._when is not None

    def set(self, delay: float) -> None:
        """Call back ``delay`` seconds from now, unless set again or cleared before."""
        loop = self._loop
        when = self._when = loop.time() + delay
        handle = self._handle
        if handle is None:
            sweep = self._sweep
            if sweep is not None:
                if not self._queued:
                    self._queued = True
                    sweep.add(self)
                return
            self._handle = loop.call_at(when, self._fire)
            self._due = when
        elif self._due > when:  # due later than this deadline: schedule it earlier
            handle.cancel()
            self._handle = loop.call_at(when, self._fire)
            self._due = when

    def adopt(self, now: float) -> None:
        """The sweep's pass: a timer of its own if still set, the callback if already due."""
        self._queued = False
        if self._handle is None:
            self._fire_or_wait(now)

    def clear(self) -> None:
        self._when = None

    def cancel(self) -> None:
        """Clear, and drop the scheduled timer too (the connection is closing)."""
        self._when = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def close(self) -> None:
        """Cancel for good: the owner is closing. The callback is let go of too, since it
        refers back to the owner: refcounting then frees both at once, instead of the
        cyclic garbage collector much later (a closed connection left this way for every
        ``Connection: close`` request made the collector run every few dozen of them)."""
        self.cancel()
        self._callback = _nothing

    def _fire(self) -> None:
        self._handle = None
        self._fire_or_wait(self._loop.time())

    def _fire_or_wait(self, now: float) -> None:
        """No timer is scheduled: call back if the deadline passed, else schedule one."""
        when = self._when
        if when is None:
            return
        if now < when:
            self._handle = self._loop.call_at(when, self._fire)
            self._due = when
            return
        self._when = None
        self._callback()
