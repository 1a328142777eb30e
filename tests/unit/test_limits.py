"""Rate limits (pibl.limits): nginx's limit_req arithmetic, shared buckets, idle eviction."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pibl.limits import RateLimiter, bucket_key, leak


def run(
    limiter: RateLimiter, times: list[float], rate: float, burst: int, key: int = 7
) -> list[bool]:
    return [limiter.check(key, t, rate=rate, burst=burst, delay=False).allowed for t in times]


def test_burst_plus_one_pass_at_once_then_the_rate() -> None:
    limiter = RateLimiter(slots=64)
    assert run(limiter, [0.0] * 6, rate=10, burst=3) == [True, True, True, True, False, False]
    # 0.1 s later one more fits (10 per second), not two
    assert run(limiter, [0.1, 0.1], rate=10, burst=3) == [True, False]


def test_burst_zero_is_one_request_per_interval() -> None:
    limiter = RateLimiter(slots=64)
    assert run(limiter, [0.0, 0.05, 0.1, 0.15, 0.2], rate=10, burst=0) == [
        True,
        False,
        True,
        False,
        True,
    ]


def test_a_refusal_says_when_to_come_back() -> None:
    limiter = RateLimiter(slots=64)
    run(limiter, [0.0, 0.0, 0.0], rate=2, burst=1)
    verdict = limiter.check(7, 0.0, rate=2, burst=1, delay=False)
    assert not verdict.allowed
    assert verdict.retry_after == pytest.approx(0.5)
    assert limiter.check(7, 0.5, rate=2, burst=1, delay=False).allowed


def test_delay_mode_spaces_requests_within_the_burst() -> None:
    limiter = RateLimiter(slots=64)
    delays = [limiter.check(1, 0.0, rate=4, burst=3, delay=True) for _ in range(5)]
    assert [v.allowed for v in delays] == [True, True, True, True, False]
    assert [v.delay for v in delays[:4]] == [0.0, 0.25, 0.5, 0.75]


def test_keys_are_independent() -> None:
    limiter = RateLimiter(slots=64)
    assert run(limiter, [0.0, 0.0], rate=1, burst=0, key=1) == [True, False]
    assert run(limiter, [0.0], rate=1, burst=0, key=2) == [True]


def test_a_full_probe_reuses_the_longest_idle_bucket() -> None:
    limiter = RateLimiter(slots=8)
    for k in range(1, 9):
        limiter.check(k * 8, float(k), rate=1, burst=0, delay=False)  # all in one probe run
    assert limiter.check(99 * 8, 10.0, rate=1, burst=0, delay=False).allowed
    # the oldest (key 8, at t=1) was forgotten: it starts again with an empty bucket
    assert limiter.check(8, 10.0, rate=1, burst=0, delay=False).allowed


def test_buckets_are_shared_by_forked_workers() -> None:
    limiter = RateLimiter.shared(slots=64)
    allowed = 0
    pids = []
    for _ in range(2):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # a worker: five requests at once from one client
            os.close(r)
            n = sum(run(limiter, [100.0] * 5, rate=1, burst=4))
            os.write(w, bytes([n]))
            os._exit(0)
        os.close(w)
        pids.append((pid, r))
    for pid, r in pids:
        os.waitpid(pid, 0)
        allowed += os.read(r, 1)[0]
        os.close(r)
    assert allowed == 5  # burst + 1 for the node, not per worker


def test_bucket_keys_are_stable_and_distinct() -> None:
    assert bucket_key(0, "10.0.0.1") == bucket_key(0, "10.0.0.1")
    assert bucket_key(0, "10.0.0.1") != bucket_key(1, "10.0.0.1")
    assert bucket_key(0, "10.0.0.1") > 0


@given(
    st.lists(st.floats(min_value=0, max_value=5, allow_nan=False), min_size=1, max_size=60),
    st.floats(min_value=0.5, max_value=50),
    st.integers(min_value=0, max_value=10),
)
def test_never_more_than_burst_plus_rate_times_elapsed(
    gaps: list[float], rate: float, burst: int
) -> None:
    limiter = RateLimiter(slots=16)
    now = 0.0
    times = []
    for gap in gaps:
        now += gap
        times.append(now)
    allowed = sum(run(limiter, times, rate=rate, burst=burst))
    assert allowed <= burst + 1 + rate * (times[-1] - times[0]) + 1e-6


def test_leak_of_a_fresh_bucket_passes() -> None:
    assert leak(0.0, 0.0, 5.0, rate=1, burst=0, fresh=True) == (True, 0.0)
