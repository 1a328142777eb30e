"""``Deadline``: a timeout moved by a number, fired once, at the latest deadline set."""

from __future__ import annotations

import asyncio
from typing import Any

from pibl.proxy.flow import GRACE, Deadline, Sweep


def _run(steps: list[tuple[float, str, float]], until: float) -> list[float]:
    """At each (time, action, delay): ``set(delay)`` or ``clear()``; the times it fired."""

    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        fired: list[float] = []
        deadline = Deadline(loop, lambda: fired.append(loop.time() - start))
        for at, action, delay in steps:
            await asyncio.sleep(max(0.0, start + at - loop.time()))
            if action == "set":
                deadline.set(delay)
            else:
                deadline.clear()
        await asyncio.sleep(max(0.0, start + until - loop.time()))
        deadline.cancel()
        return fired

    return asyncio.run(main())


def test_it_fires_once_at_the_deadline() -> None:
    fired = _run([(0.0, "set", 0.05)], 0.6)
    assert len(fired) == 1 and 0.045 <= fired[0] < 0.55  # (late only on a busy machine)


def test_a_later_deadline_moves_it_later_and_an_earlier_one_earlier() -> None:
    later = _run([(0.0, "set", 0.05), (0.03, "set", 0.1)], 0.6)
    assert len(later) == 1 and 0.125 <= later[0] < 0.55
    earlier = _run([(0.0, "set", 0.5), (0.01, "set", 0.03)], 0.45)
    assert len(earlier) == 1 and 0.035 <= earlier[0] < 0.45


def test_a_cleared_deadline_never_fires() -> None:
    assert _run([(0.0, "set", 0.05), (0.01, "clear", 0.0)], 0.15) == []


# -- with a sweep: a timer only for deadlines still set GRACE seconds later ------------------


def _swept(delays: list[float], close_after: float | None, until: float) -> tuple[list, int]:
    """Deadlines set with ``delays`` on one sweep (closed ``close_after`` seconds later, if
    given): the (index, time) each fired at, and how many loop timers were made."""

    async def main() -> tuple[list[tuple[int, float]], int]:
        loop = asyncio.get_running_loop()
        made = 0
        real_call_at = loop.call_at

        def counting(when: float, callback: Any, *args: Any, **kw: Any) -> asyncio.TimerHandle:
            nonlocal made
            if isinstance(getattr(callback, "__self__", None), (Sweep, Deadline)):
                made += 1  # (not asyncio.sleep's own)
            return real_call_at(when, callback, *args, **kw)

        loop.call_at = counting  # type: ignore[method-assign]
        sweep = Sweep(loop)
        start = loop.time()
        fired: list[tuple[int, float]] = []
        deadlines = []
        for i, delay in enumerate(delays):
            deadline = Deadline(loop, lambda i=i: fired.append((i, loop.time() - start)), sweep)
            deadline.set(delay)
            deadlines.append(deadline)
        if close_after is not None:
            await asyncio.sleep(close_after)
            for deadline in deadlines:
                deadline.close()
        await asyncio.sleep(max(0.0, start + until - loop.time()))
        sweep.close()
        return fired, made

    return asyncio.run(main())


def test_deadlines_closed_before_the_sweep_make_one_timer_between_them() -> None:
    fired, made = _swept([10.0] * 100, close_after=0.0, until=GRACE * 3)
    assert fired == []
    assert made == 1  # the sweep's own pass, not one per deadline


def test_a_deadline_still_set_at_the_sweep_fires_at_its_own_time() -> None:
    fired, made = _swept([GRACE * 4], close_after=None, until=GRACE * 8)
    assert [i for i, _ in fired] == [0]
    assert GRACE * 4 - 0.005 <= fired[0][1] < GRACE * 4 + 0.5  # (late only on a busy machine)
    assert made == 2  # the pass, then the deadline's own timer


def test_a_deadline_due_before_the_sweep_fires_at_the_sweep() -> None:
    fired, _ = _swept([0.0, GRACE / 10], close_after=None, until=GRACE * 4)
    assert sorted(i for i, _ in fired) == [0, 1]
    assert all(GRACE - 0.005 <= at < GRACE + 0.5 for _, at in fired)


def test_a_failing_callback_does_not_keep_the_others_from_firing() -> None:
    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        errors: list[str] = []
        loop.set_exception_handler(lambda _, context: errors.append(context["message"]))
        sweep = Sweep(loop)
        fired: list[str] = []

        def boom() -> None:
            raise RuntimeError("a bug")

        first = Deadline(loop, boom, sweep)
        second = Deadline(loop, lambda: fired.append("second"), sweep)
        first.set(0.0)
        second.set(0.0)
        await asyncio.sleep(GRACE * 3)
        return fired + errors

    assert asyncio.run(main()) == ["second", "error in a deadline's callback"]
