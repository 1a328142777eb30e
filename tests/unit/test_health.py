"""Backend health state machine and the balancer (pibl.balance.health), with an injected clock."""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pibl.balance.health import BackendState, Balancer, HealthSettings
from pibl.balance.shared import SharedBalance


def backend(name: str = "b", weight: int = 1, **health: Any) -> BackendState:
    return BackendState(name, weight, HealthSettings(**health))


def backends(*weights: int, **health: Any) -> list[BackendState]:
    return [backend(f"b{i}", w, **health) for i, w in enumerate(weights)]


def take_down(state: BackendState, now: float) -> None:
    """Fail active checks until the backend is marked down (all at ``now``)."""
    for _ in range(state.settings.fall):
        state.record_check(False, now)
    assert not state.up


def bring_up(state: BackendState, now: float) -> None:
    """Pass active checks until the backend is marked up, the last one at ``now``."""
    changes = [state.record_check(True, now) for _ in range(state.settings.rise)]
    assert changes[-1] == "up"


def picks(
    balancer: Balancer,
    now: float,
    n: int,
    *,
    exclude: set[int] | frozenset[int] = frozenset(),
    prefer: int | None = None,
) -> list[int | None]:
    return [balancer.pick(now, exclude=exclude, prefer=prefer) for _ in range(n)]


# -- defaults -------------------------------------------------------------------------------


def test_default_settings() -> None:
    s = HealthSettings()
    assert (s.rise, s.fall, s.max_fails, s.window, s.cooldown, s.slow_start) == (
        2,
        2,
        3,
        10.0,
        10.0,
        0.0,
    )
    assert s.panic_threshold == 0.5


def test_new_backend_starts_up_and_available() -> None:
    b = backend()
    assert b.up
    assert b.available(0.0)
    assert b.state(0.0) == "up"
    assert b.recovered_at is None
    assert b.effective_weight(0.0) == 1000
    assert (b.active, b.requests, b.failures, b.ejections) == (0, 0, 0, 0)


def test_new_backend_with_slow_start_is_not_ramping() -> None:
    # Slow start applies to a backend that comes back, not to one present from the start.
    b = backend(weight=3, slow_start=10.0)
    assert not b.ramping(0.0)
    assert b.state(0.0) == "up"
    assert b.effective_weight(0.0) == 3000


# -- active checks ---------------------------------------------------------------------------


@pytest.mark.parametrize("fall", [1, 2, 3, 5])
def test_fall_consecutive_failures_mark_down_exactly_once(fall: int) -> None:
    b = backend(fall=fall)
    changes = [b.record_check(False, float(t)) for t in range(fall + 4)]
    assert changes == [None] * (fall - 1) + ["down"] + [None] * 4
    assert not b.up
    assert not b.available(100.0)
    assert b.state(100.0) == "down"


def test_fewer_than_fall_failures_keep_it_up() -> None:
    b = backend(fall=3)
    assert b.record_check(False, 0.0) is None
    assert b.record_check(False, 1.0) is None
    assert b.up
    assert b.available(1.0)
    assert b.state(1.0) == "up"


def test_interleaved_success_resets_the_failure_count() -> None:
    b = backend(fall=3)
    results = [False, False, True, False, False, True, False, False]
    changes = [b.record_check(ok, float(t)) for t, ok in enumerate(results)]
    assert changes == [None] * len(results)
    assert b.up
    # The next failure is the third consecutive one.
    assert b.record_check(False, 10.0) == "down"


@pytest.mark.parametrize("rise", [1, 2, 4])
def test_rise_consecutive_successes_mark_up_exactly_once(rise: int) -> None:
    b = backend(fall=1, rise=rise)
    assert b.record_check(False, 0.0) == "down"
    changes = [b.record_check(True, 10.0 + t) for t in range(rise + 3)]
    assert changes == [None] * (rise - 1) + ["up"] + [None] * 3
    assert b.up
    assert b.recovered_at == 10.0 + rise - 1
    assert b.available(20.0)


def test_interleaved_failure_resets_the_success_count() -> None:
    b = backend(fall=1, rise=3)
    b.record_check(False, 0.0)
    results = [True, True, False, True, True]
    changes = [b.record_check(ok, 1.0 + t) for t, ok in enumerate(results)]
    assert changes == [None] * len(results)
    assert not b.up
    assert b.recovered_at is None
    assert b.record_check(True, 7.0) == "up"
    assert b.recovered_at == 7.0


def test_successes_while_up_report_nothing_and_do_not_set_recovered_at() -> None:
    b = backend(rise=1)
    assert [b.record_check(True, float(t)) for t in range(5)] == [None] * 5
    assert b.recovered_at is None


def test_down_up_down_up_cycle_reports_each_transition() -> None:
    b = backend(rise=2, fall=2)
    seq = [False, False, False, True, True, True, False, False, True, True]
    changes = [b.record_check(ok, float(t)) for t, ok in enumerate(seq)]
    assert [c for c in changes if c is not None] == ["down", "up", "down", "up"]
    assert changes[1] == "down"
    assert changes[4] == "up"
    assert changes[7] == "down"
    assert changes[9] == "up"
    assert b.recovered_at == 9.0


def test_recovery_by_active_checks_clears_a_passive_ejection() -> None:
    b = backend(fall=1, rise=1, max_fails=1, cooldown=100.0)
    assert b.record_failure(0.0) == "ejected"
    b.record_check(False, 1.0)
    assert b.record_check(True, 2.0) == "up"
    assert b.ejected_until == 0.0
    assert b.available(2.0)


# -- state strings ---------------------------------------------------------------------------


def test_state_strings() -> None:
    now = 50.0
    assert backend().state(now) == "up"

    down = backend()
    take_down(down, now)
    assert down.state(now) == "down"

    ejected = backend(max_fails=1, cooldown=10.0)
    ejected.record_failure(now)
    assert ejected.state(now) == "ejected"

    draining = backend()
    draining.draining = True
    assert draining.state(now) == "draining"

    disabled = backend()
    disabled.disabled = True
    assert disabled.state(now) == "disabled"

    ramping = backend(slow_start=10.0)
    take_down(ramping, now - 1)
    bring_up(ramping, now)
    assert ramping.state(now) == "slow-start"
    assert ramping.state(now + 9.9) == "slow-start"
    assert ramping.state(now + 10.0) == "up"


def test_state_precedence() -> None:
    b = backend(max_fails=1, cooldown=10.0, slow_start=10.0)
    b.record_failure(0.0)  # ejected until 10
    take_down(b, 0.0)
    b.draining = True
    b.disabled = True
    assert b.state(1.0) == "disabled"
    b.disabled = False
    assert b.state(1.0) == "draining"
    b.draining = False
    assert b.state(1.0) == "down"
    b.up = True
    assert b.state(1.0) == "ejected"
    assert b.state(10.0) == "slow-start"
    assert b.state(20.0) == "up"


@pytest.mark.parametrize(
    ("setup", "available"),
    [
        ("up", True),
        ("down", False),
        ("ejected", False),
        ("draining", False),
        ("disabled", False),
        ("slow-start", True),
    ],
)
def test_available_matches_state(setup: str, available: bool) -> None:
    b = backend(max_fails=1, cooldown=10.0, slow_start=10.0)
    now = 5.0
    if setup == "down":
        take_down(b, now)
    elif setup == "ejected":
        b.record_failure(now)
    elif setup == "draining":
        b.draining = True
    elif setup == "disabled":
        b.disabled = True
    elif setup == "slow-start":
        take_down(b, now - 1)
        bring_up(b, now)
    assert b.state(now) == setup
    assert b.available(now) is available


# -- passive checks --------------------------------------------------------------------------


def test_max_fails_within_window_ejects_for_the_cooldown() -> None:
    b = backend(max_fails=3, window=10.0, cooldown=30.0)
    assert b.record_failure(100.0) is None
    assert b.record_failure(104.0) is None
    assert b.available(104.0)
    assert b.record_failure(108.0) == "ejected"
    assert b.ejected_until == 138.0
    assert b.ejections == 1
    assert b.failures == 3
    assert not b.available(108.0)
    assert not b.available(137.999)
    assert b.state(137.999) == "ejected"
    assert b.available(138.0)
    assert b.state(138.0) == "up"
    assert b.available(1000.0)


def test_failures_exactly_window_apart_still_count() -> None:
    b = backend(max_fails=2, window=10.0, cooldown=5.0)
    assert b.record_failure(0.0) is None
    assert b.record_failure(10.0) == "ejected"


def test_failures_spread_wider_than_the_window_do_not_eject() -> None:
    b = backend(max_fails=3, window=10.0, cooldown=30.0)
    # Any three consecutive failures span 10.2 s > window.
    changes = [b.record_failure(t * 5.1) for t in range(20)]
    assert changes == [None] * 20
    assert b.failures == 20
    assert b.ejections == 0
    assert b.available(20 * 5.1)


def test_old_failures_slide_out_of_the_window() -> None:
    b = backend(max_fails=3, window=10.0, cooldown=30.0)
    b.record_failure(0.0)
    b.record_failure(1.0)
    # 0.0 and 1.0 are both more than 10 s old here: only one failure counts.
    assert b.record_failure(11.5) is None
    assert b.record_failure(12.0) is None
    assert b.record_failure(13.0) == "ejected"


def test_successes_are_counted_and_do_not_eject() -> None:
    b = backend(max_fails=1)
    for t in range(5):
        b.record_success(float(t))
    assert b.requests == 5
    assert b.failures == 0
    assert b.available(5.0)


def test_failures_during_ejection_do_not_extend_or_recount_it() -> None:
    b = backend(max_fails=2, window=10.0, cooldown=20.0)
    b.record_failure(0.0)
    assert b.record_failure(1.0) == "ejected"
    assert b.ejected_until == 21.0
    assert [b.record_failure(t) for t in (2.0, 3.0, 4.0)] == [None, None, None]
    assert b.ejected_until == 21.0
    assert b.ejections == 1
    assert b.failures == 5


def test_ejection_starts_a_fresh_failure_count() -> None:
    b = backend(max_fails=3, window=100.0, cooldown=5.0)
    for t in (0.0, 1.0, 2.0):
        b.record_failure(t)
    assert b.ejected_until == 7.0
    # The failures that caused the ejection are forgotten: one more after the cooldown
    # (still inside the window) is not enough to eject again.
    assert b.record_failure(8.0) is None
    assert b.record_failure(9.0) is None
    assert b.available(9.0)
    assert b.record_failure(10.0) == "ejected"
    assert b.ejections == 2


def test_ejection_counter_counts_each_ejection() -> None:
    b = backend(max_fails=2, window=10.0, cooldown=5.0)
    now = 0.0
    for n in range(1, 4):
        assert b.record_failure(now) is None
        assert b.record_failure(now + 1) == "ejected"
        assert b.ejections == n
        now = b.ejected_until + 100.0  # well past cooldown and window
        assert b.available(now)
    assert b.failures == 6


def test_ejection_without_slow_start_returns_at_full_weight() -> None:
    b = backend(weight=4, max_fails=1, cooldown=10.0)
    b.record_failure(0.0)
    assert b.state(10.0) == "up"
    assert b.effective_weight(10.0) == 4000


def test_after_cooldown_the_backend_is_ramped_by_slow_start() -> None:
    b = backend(weight=2, max_fails=1, cooldown=10.0, slow_start=20.0)
    assert b.record_failure(0.0) == "ejected"
    assert not b.available(9.0)
    assert b.available(10.0)
    assert b.state(10.0) == "slow-start"
    assert b.effective_weight(10.0) == 200  # 1/10 of full
    assert b.effective_weight(20.0) == 1000  # halfway
    assert b.effective_weight(29.0) == 1900
    assert b.state(30.0) == "up"
    assert b.effective_weight(30.0) == 2000


def test_ejected_backend_is_not_picked_until_cooldown() -> None:
    states = backends(1, 1, max_fails=1, cooldown=10.0)
    bal = Balancer(states)
    states[0].record_failure(0.0)
    assert set(picks(bal, 5.0, 6)) == {1}
    assert Counter(picks(bal, 10.0, 6)) == Counter({0: 3, 1: 3})


# -- draining and disabled -------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["draining", "disabled"])
@pytest.mark.parametrize("policy", ["round_robin", "least_conn"])
def test_draining_and_disabled_are_not_picked(flag: str, policy: str) -> None:
    states = backends(1, 1, 1)
    setattr(states[1], flag, True)
    assert not states[1].available(0.0)
    bal = Balancer(states, policy=policy)
    chosen = picks(bal, 0.0, 30)
    assert 1 not in chosen
    assert Counter(chosen) == Counter({0: 15, 2: 15})


@pytest.mark.parametrize("flag", ["draining", "disabled"])
def test_sticky_prefer_to_draining_or_disabled_is_not_honoured(flag: str) -> None:
    states = backends(1, 1)
    setattr(states[0], flag, True)
    bal = Balancer(states)
    assert picks(bal, 0.0, 5, prefer=0) == [1] * 5


def test_draining_backend_rejoins_rotation_when_undrained() -> None:
    states = backends(1, 1, 1)
    bal = Balancer(states)
    assert picks(bal, 0.0, 3) == [0, 1, 2]
    states[1].draining = True
    assert picks(bal, 0.0, 4) == [0, 2, 0, 2]
    states[1].draining = False
    assert Counter(picks(bal, 0.0, 30)) == Counter({0: 10, 1: 10, 2: 10})


# -- balancer: round robin -------------------------------------------------------------------


def test_unknown_policy_is_rejected() -> None:
    with pytest.raises(ValueError):
        Balancer(backends(1), policy="random")


def test_default_policy_is_round_robin() -> None:
    assert Balancer(backends(1)).policy == "round_robin"


def test_equal_weights_rotate_strictly() -> None:
    bal = Balancer(backends(1, 1, 1))
    assert picks(bal, 0.0, 9) == [0, 1, 2] * 3


def test_equal_weights_other_than_one_rotate_strictly() -> None:
    bal = Balancer(backends(4, 4, 4, 4))
    assert picks(bal, 0.0, 8) == [0, 1, 2, 3] * 2


def test_weights_5_1_1_give_the_smooth_sequence() -> None:
    bal = Balancer(backends(5, 1, 1))
    assert picks(bal, 0.0, 14) == [0, 0, 1, 0, 2, 0, 0] * 2


def test_single_backend() -> None:
    bal = Balancer(backends(3))
    assert picks(bal, 0.0, 3) == [0, 0, 0]


weight_lists = st.lists(st.integers(min_value=1, max_value=10), min_size=1, max_size=6)


@settings(max_examples=100, deadline=None)
@given(weights=weight_lists, rounds=st.integers(min_value=1, max_value=3))
def test_counts_are_proportional_to_weights(weights: list[int], rounds: int) -> None:
    bal = Balancer(backends(*weights))
    counts = Counter(picks(bal, 0.0, sum(weights) * rounds))
    assert counts == Counter({i: w * rounds for i, w in enumerate(weights)})


@settings(max_examples=100, deadline=None)
@given(data=st.data(), weights=st.lists(st.integers(1, 10), min_size=2, max_size=6))
def test_counts_among_available_are_proportional(weights: list[int], data: st.DataObject) -> None:
    down = data.draw(
        st.sets(st.integers(0, len(weights) - 1), max_size=len(weights) - 1), label="down"
    )
    states = backends(*weights)
    for i in down:
        states[i].disabled = True
    bal = Balancer(states)
    live = {i: w for i, w in enumerate(weights) if i not in down}
    counts = Counter(picks(bal, 0.0, sum(live.values()) * 2))
    assert counts == Counter({i: w * 2 for i, w in live.items()})


def test_unavailable_backend_skipped_and_rotation_continues_fairly() -> None:
    states = backends(1, 1, 1, 1)
    bal = Balancer(states)
    assert picks(bal, 0.0, 2) == [0, 1]
    take_down(states[2], 0.0)
    chosen = picks(bal, 0.0, 300)
    assert 2 not in chosen
    counts = Counter(chosen)
    assert set(counts) == {0, 1, 3}
    # The rotation state carried over from before the change may shift one pick, no more.
    assert all(99 <= counts[i] <= 101 for i in (0, 1, 3))
    # Once settled, the three remaining backends take strict turns.
    tail = chosen[-30:]
    assert all(a != b for a, b in itertools.pairwise(tail))
    assert Counter(tail) == Counter({0: 10, 1: 10, 3: 10})


def test_none_when_all_unavailable() -> None:
    states = backends(1, 1, 1, 1, max_fails=1, panic_threshold=0.0)
    take_down(states[0], 0.0)
    states[1].draining = True
    states[2].disabled = True
    states[3].record_failure(0.0)
    for policy in ("round_robin", "least_conn"):
        bal = Balancer(states, policy=policy)
        assert bal.pick(1.0) is None
        assert bal.pick(1.0, prefer=0) is None


def test_in_a_panic_only_backends_active_checks_confirm_dead_are_left_out() -> None:
    states = backends(1, 1, 1, 1, max_fails=1)
    take_down(states[0], 0.0)
    states[1].draining = True
    states[2].disabled = True
    states[3].record_failure(0.0)  # passively ejected: used anyway in a panic
    bal = Balancer(states)
    assert picks(bal, 1.0, 3) == [3, 3, 3]
    assert bal.panicking and bal.panics == 1
    take_down(states[3], 1.0)
    assert bal.pick(2.0) is None  # dead by active checks: the fast 503


# -- panic threshold, failure weights, refused connections ------------------------------


def test_one_backend_is_never_ejected_by_passive_checks_alone() -> None:
    states = backends(1, max_fails=3)
    bal = Balancer(states)
    seen: list[tuple[bool, int, int]] = []
    bal.on_panic = lambda on, available, total: seen.append((on, available, total))
    for t in range(3):
        bal.record_failure(0, float(t))
    assert states[0].state(3.0) == "ejected"
    assert picks(bal, 3.0, 3) == [0, 0, 0]
    assert seen == [(True, 0, 1)]  # logged once, not per request
    assert picks(bal, 20.0, 1) == [0]  # the cool-down is over
    assert seen == [(True, 0, 1), (False, 1, 1)]


def test_a_query_of_death_never_empties_the_rotation() -> None:
    states = backends(1, 1, 1, max_fails=1)
    bal = Balancer(states)
    for now in range(20):  # every backend the bad URL reaches fails once
        index = bal.pick(float(now) / 100)
        assert index is not None
        bal.record_failure(index, float(now) / 100)
    assert bal.panicking  # from the second ejection on
    assert bal.panics == 1
    assert sorted(set(picks(bal, 0.3, 6))) == [0, 1, 2]


def test_the_panic_threshold_is_a_share_of_the_backends_in_service() -> None:
    states = backends(1, 1, 1, 1, max_fails=1, panic_threshold=0.5)
    bal = Balancer(states)
    bal.record_failure(0, 0.0)
    bal.record_failure(1, 0.0)
    assert set(picks(bal, 0.1, 4)) == {2, 3}  # 2 of 4 available: not below one half
    assert not bal.panicking
    bal.record_failure(2, 0.0)
    assert set(picks(bal, 0.1, 8)) == {0, 1, 2, 3}
    assert bal.panicking


def test_timeouts_weigh_half_and_refusals_eject_at_once() -> None:
    state = backend(max_fails=2)
    assert state.record_failure(0.0, "timeout") is None
    assert state.record_failure(0.1, "timeout") is None
    assert state.record_failure(0.2, "timeout") is None
    assert state.record_failure(0.3, "timeout") == "ejected"
    other = backend(max_fails=5)
    assert other.record_failure(0.0, "refused") == "ejected"
    assert other.ejected_refused


def test_a_refusal_ejection_ends_when_probes_pass_again() -> None:
    state = backend(rise=2, cooldown=60)
    state.record_failure(0.0, "refused")
    assert state.probing_fast(0.1)
    assert state.record_check(True, 0.5) is None
    assert state.record_check(True, 1.0) == "up"
    assert state.available(1.0)
    # an ejection for failing answers is not ended by probes (the server does accept)
    state.record_failure(2.0, "error")
    state.record_failure(2.1, "error")
    state.record_failure(2.2, "error")
    for t in (2.5, 3.0, 3.5):
        assert state.record_check(True, t) is None
    assert not state.available(4.0)


def test_probes_are_fast_only_while_something_is_wrong() -> None:
    state = backend()
    assert not state.probing_fast(0.0)
    state.record_check(False, 0.0)
    assert state.probing_fast(0.0)  # between states
    state.record_check(False, 0.5)
    assert state.probing_fast(0.5)  # down
    bring_up(state, 1.0)
    assert not state.probing_fast(1.0)


def test_an_ejection_ended_by_one_worker_ends_in_every_worker() -> None:
    shared = SharedBalance.create(2)
    a = Balancer(backends(1, 1, rise=1), shared=shared)
    b = Balancer(backends(1, 1, rise=1), shared=shared)
    a.record_failure(0, 0.0, "refused")
    assert set(picks(b, 0.1, 4)) == {1}  # b adopted the ejection
    b.record_check(0, True, 0.5)  # b's probe sees it accept again
    assert set(picks(a, 0.6, 4)) == {0, 1}
    assert set(picks(b, 0.6, 4)) == {0, 1}


def test_exclude_skips_backends_already_tried() -> None:
    bal = Balancer(backends(1, 1, 1))
    assert set(picks(bal, 0.0, 6, exclude={0})) == {1, 2}
    assert set(picks(bal, 0.0, 6, exclude=frozenset({0, 2}))) == {1}
    assert bal.pick(0.0, exclude={0, 1, 2}) is None


def test_retry_sequence_tries_every_backend_once() -> None:
    bal = Balancer(backends(3, 1, 1))
    for _ in range(10):
        tried: set[int] = set()
        while (i := bal.pick(0.0, exclude=tried)) is not None:
            assert i not in tried
            tried.add(i)
        assert tried == {0, 1, 2}


# -- slow start ------------------------------------------------------------------------------


def test_effective_weight_ramps_linearly_and_has_a_floor() -> None:
    b = backend(weight=5, slow_start=10.0)
    take_down(b, -1.0)
    bring_up(b, 0.0)
    assert b.effective_weight(0.0) == 500
    assert b.effective_weight(0.5) == 500
    assert b.effective_weight(2.0) == 1000
    assert b.effective_weight(5.0) == 2500
    assert b.effective_weight(9.0) == 4500
    assert b.effective_weight(10.0) == 5000
    assert b.effective_weight(1e6) == 5000


@settings(max_examples=100, deadline=None)
@given(
    weight=st.integers(1, 50),
    slow=st.floats(0.1, 100.0),
    times=st.lists(st.floats(0.0, 200.0), min_size=2, max_size=10),
)
def test_effective_weight_is_bounded_and_monotonic(
    weight: int, slow: float, times: list[float]
) -> None:
    b = backend(weight=weight, slow_start=slow)
    take_down(b, -1.0)
    bring_up(b, 0.0)
    full = weight * 1000
    values = [b.effective_weight(t) for t in sorted(times)]
    assert all(full // 10 <= v <= full for v in values)
    assert values == sorted(values)


def test_slow_start_share_grows_and_reaches_full_share() -> None:
    states = backends(1, 1, 1, slow_start=10.0)
    bal = Balancer(states)
    take_down(states[0], -5.0)
    bring_up(states[0], 0.0)
    assert states[0].recovered_at == 0.0
    n = 3000
    shares = {}
    for t in (1.0, 5.0, 9.0, 11.0):
        shares[t] = Counter(picks(bal, t, n))[0] / n
    assert shares[1.0] < shares[5.0] < shares[9.0] < shares[11.0]
    # Expected shares from the effective weights (100, 500, 900, 1000 against 2 x 1000).
    assert shares[1.0] == pytest.approx(100 / 2100, abs=0.005)
    assert shares[5.0] == pytest.approx(500 / 2500, abs=0.005)
    assert shares[9.0] == pytest.approx(900 / 2900, abs=0.005)
    assert shares[11.0] == pytest.approx(1 / 3, abs=0.005)
    assert states[0].state(11.0) == "up"


def test_slow_start_backend_is_never_starved() -> None:
    states = backends(10, 10, 1, slow_start=10.0)
    bal = Balancer(states)
    take_down(states[2], -5.0)
    bring_up(states[2], 0.0)
    # Weight 100 against 20000: still picked about once per 201 picks.
    assert 2 in picks(bal, 0.0, 250)


def test_slow_start_also_ramps_least_conn() -> None:
    states = backends(1, 1, slow_start=10.0)
    take_down(states[0], -5.0)
    bring_up(states[0], 0.0)
    bal = Balancer(states, policy="least_conn")
    for _ in range(22):
        i = bal.pick(0.0)
        assert i is not None
        states[i].active += 1
    # Effective weights 100 and 1000: loads (a+1)/100 vs (b+1)/1000 stay level.
    assert states[0].active == 2
    assert states[1].active == 20


# -- least connections -----------------------------------------------------------------------


def test_least_conn_picks_fewest_active() -> None:
    states = backends(1, 1, 1)
    states[0].active = 5
    states[1].active = 2
    states[2].active = 7
    bal = Balancer(states, policy="least_conn")
    assert picks(bal, 0.0, 5) == [1] * 5
    states[2].active = 0
    assert bal.pick(0.0) == 2


def test_least_conn_respects_weights() -> None:
    states = backends(3, 1)
    bal = Balancer(states, policy="least_conn")
    # loads (active + 1) / weight: 5/3 < 2/1, so the heavier one wins despite more active.
    states[0].active = 4
    states[1].active = 1
    assert bal.pick(0.0) == 0
    # 7/3 > 2/1
    states[0].active = 6
    assert bal.pick(0.0) == 1


def test_least_conn_distributes_in_proportion_to_weights() -> None:
    states = backends(3, 1, 2)
    bal = Balancer(states, policy="least_conn")
    for _ in range(60):
        i = bal.pick(0.0)
        assert i is not None
        states[i].active += 1
    assert [s.active for s in states] == [30, 10, 20]


def test_least_conn_ties_rotate() -> None:
    bal = Balancer(backends(1, 1, 1), policy="least_conn")
    assert picks(bal, 0.0, 6) == [0, 1, 2, 0, 1, 2]


def test_least_conn_ties_rotate_among_the_tied_only() -> None:
    states = backends(1, 1, 1)
    states[0].active = 3
    bal = Balancer(states, policy="least_conn")
    assert Counter(picks(bal, 0.0, 10)) == Counter({1: 5, 2: 5})


def test_least_conn_weighted_tie_is_broken_by_rotation() -> None:
    states = backends(2, 1)
    # (1 + 1) / 2 == (0 + 1) / 1
    states[0].active = 1
    bal = Balancer(states, policy="least_conn")
    chosen = picks(bal, 0.0, 30)
    assert set(chosen) == {0, 1}


def test_least_conn_skips_unavailable_even_if_idle() -> None:
    states = backends(1, 1, 1)
    states[0].draining = True
    states[1].active = 4
    states[2].active = 9
    bal = Balancer(states, policy="least_conn")
    assert bal.pick(0.0) == 1
    assert bal.pick(0.0, exclude={1}) == 2


# -- prefer (sticky sessions) ----------------------------------------------------------------


@pytest.mark.parametrize("policy", ["round_robin", "least_conn"])
def test_prefer_is_honoured_when_available(policy: str) -> None:
    states = backends(5, 1, 1)
    states[2].active = 100
    bal = Balancer(states, policy=policy)
    assert picks(bal, 0.0, 5, prefer=2) == [2] * 5


def test_prefer_does_not_disturb_rotation() -> None:
    bal = Balancer(backends(1, 1, 1))
    assert bal.pick(0.0) == 0
    assert bal.pick(0.0, prefer=0) == 0
    assert picks(bal, 0.0, 2) == [1, 2]


def test_prefer_honoured_during_slow_start() -> None:
    states = backends(1, 1, slow_start=10.0)
    take_down(states[1], -1.0)
    bring_up(states[1], 0.0)
    bal = Balancer(states)
    assert bal.pick(1.0, prefer=1) == 1


@pytest.mark.parametrize("reason", ["down", "ejected", "excluded"])
def test_prefer_ignored_when_not_available(reason: str) -> None:
    states = backends(1, 1, max_fails=1, cooldown=10.0)
    exclude: set[int] = set()
    if reason == "down":
        take_down(states[0], 0.0)
    elif reason == "ejected":
        states[0].record_failure(0.0)
    else:
        exclude = {0}
    bal = Balancer(states)
    assert picks(bal, 1.0, 4, prefer=0, exclude=exclude) == [1] * 4


@pytest.mark.parametrize("prefer", [-1, 3, 100])
def test_prefer_out_of_range_is_ignored(prefer: int) -> None:
    bal = Balancer(backends(1, 1, 1))
    assert picks(bal, 0.0, 3, prefer=prefer) == [0, 1, 2]


# -- shared between worker processes ------------------------------------------------------


def test_an_ejection_by_one_worker_takes_the_backend_out_in_every_worker() -> None:
    shared = SharedBalance.create(2)
    workers = [Balancer(backends(1, 1, max_fails=2, cooldown=10.0), shared=shared) for _ in "ab"]
    a, b = workers
    assert a.record_failure(1, 0.0) is None
    assert a.record_failure(1, 0.5) == "ejected"
    assert b.states[1].ejected_until == 0.0  # b has seen no failure itself
    assert [b.pick(1.0 + t) for t in range(4)] == [0, 0, 0, 0]
    assert b.states[1].state(1.0) == "ejected"
    assert b.states[1].ejections == 0  # counted once, by the worker that ejected
    picks = {b.pick(10.5 + t / 10) for t in range(4)}  # after the cooldown: back for both
    assert picks == {0, 1}


def test_recovery_seen_by_active_checks_ends_the_shared_ejection() -> None:
    shared = SharedBalance.create(2)
    a, b = (
        Balancer(backends(1, 1, max_fails=1, cooldown=100.0, fall=1, rise=1), shared=shared)
        for _ in "ab"
    )
    assert a.record_failure(1, 0.0) == "ejected"
    assert a.record_check(1, False, 1.0) == "down"
    assert a.record_check(1, True, 2.0) == "up"
    assert {a.pick(3.0 + t) for t in range(4)} == {0, 1}
    assert b.pick(3.0) is not None and b.states[1].ejected_until == 0.0  # nothing left to adopt


def test_without_shared_memory_ejections_stay_local() -> None:
    a, b = (Balancer(backends(1, 1, max_fails=1, cooldown=10.0)) for _ in "ab")
    assert a.record_failure(1, 0.0) == "ejected"
    assert {b.pick(1.0 + t) for t in range(4)} == {0, 1}
