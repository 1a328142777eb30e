"""``Deadline``: a timeout moved by a number, fired once, at the latest deadline set."""

from __future__ import annotations

import asyncio

from pibl.proxy.flow import Deadline


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
