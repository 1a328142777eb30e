"""SmoothWeighted: nginx's smooth weighted round robin as a pure object."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pibl.balance.policy import SmoothWeighted

weight_lists = st.lists(st.integers(min_value=1, max_value=20), min_size=1, max_size=8)


def picks(policy: SmoothWeighted, n: int, available: list[bool] | None = None) -> list[int | None]:
    return [policy.pick(available) for _ in range(n)]


def test_equal_weights_rotate_strictly() -> None:
    assert picks(SmoothWeighted([1, 1, 1]), 9) == [0, 1, 2, 0, 1, 2, 0, 1, 2]


def test_equal_weights_other_than_one_rotate_strictly() -> None:
    assert picks(SmoothWeighted([7, 7]), 6) == [0, 1, 0, 1, 0, 1]


def test_single_backend_always_picked() -> None:
    assert picks(SmoothWeighted([3]), 5) == [0, 0, 0, 0, 0]


def test_nginx_sequence_for_5_1_1() -> None:
    # a a b a c a a: the heavy backend never gets a burst of five.
    assert picks(SmoothWeighted([5, 1, 1]), 7) == [0, 0, 1, 0, 2, 0, 0]


def test_nginx_sequence_repeats_every_total_weight() -> None:
    policy = SmoothWeighted([5, 1, 1])
    assert picks(policy, 14) == [0, 0, 1, 0, 2, 0, 0] * 2


def test_weights_2_1_interleave() -> None:
    assert picks(SmoothWeighted([2, 1]), 6) == [0, 1, 0, 0, 1, 0]


@settings(max_examples=200, deadline=None)
@given(weights=weight_lists, rounds=st.integers(min_value=1, max_value=3))
def test_distribution_is_exactly_proportional(weights: list[int], rounds: int) -> None:
    policy = SmoothWeighted(weights)
    counts = Counter(picks(policy, sum(weights) * rounds))
    assert counts == Counter({i: w * rounds for i, w in enumerate(weights)})


def test_skips_unavailable_backends() -> None:
    policy = SmoothWeighted([1, 1, 1])
    assert picks(policy, 4, [True, False, True]) == [0, 2, 0, 2]


def test_unavailable_heavy_backend_leaves_rotation_of_the_rest() -> None:
    policy = SmoothWeighted([5, 1, 1])
    assert picks(policy, 4, [False, True, True]) == [1, 2, 1, 2]


def test_none_when_nothing_is_available() -> None:
    policy = SmoothWeighted([1, 2])
    assert policy.pick([False, False]) is None
    # And the state is not disturbed: rotation resumes normally afterwards.
    assert picks(policy, 3) == [1, 0, 1]


def test_available_none_means_all_available() -> None:
    a = SmoothWeighted([3, 2, 1])
    b = SmoothWeighted([3, 2, 1])
    assert picks(a, 12) == picks(b, 12, [True, True, True])


@settings(max_examples=100, deadline=None)
@given(
    weights=weight_lists,
    data=st.data(),
)
def test_never_picks_an_unavailable_backend(weights: list[int], data: st.DataObject) -> None:
    policy = SmoothWeighted(weights)
    for _ in range(20):
        available = data.draw(st.lists(st.booleans(), min_size=len(weights), max_size=len(weights)))
        choice = policy.pick(available)
        if any(available):
            assert choice is not None
            assert available[choice]
        else:
            assert choice is None


@settings(max_examples=100, deadline=None)
@given(weights=weight_lists, data=st.data())
def test_subset_distribution_is_proportional(weights: list[int], data: st.DataObject) -> None:
    available = data.draw(st.lists(st.booleans(), min_size=len(weights), max_size=len(weights)))
    if not any(available):
        available[0] = True
    policy = SmoothWeighted(weights)
    total = sum(w for w, ok in zip(weights, available, strict=True) if ok)
    counts = Counter(picks(policy, total, available))
    expected = {i: w for i, (w, ok) in enumerate(zip(weights, available, strict=True)) if ok}
    assert counts == Counter(expected)


@pytest.mark.parametrize("weights", [[], [0], [1, 0], [-1], [2, -3, 1]])
def test_invalid_weights_raise(weights: list[int]) -> None:
    with pytest.raises(ValueError):
        SmoothWeighted(weights)


def test_repr_shows_weights() -> None:
    assert "weights=[2, 1]" in repr(SmoothWeighted([2, 1]))
