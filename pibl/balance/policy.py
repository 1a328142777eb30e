"""Balancing policies as pure objects: ``pick(available)`` returns an index.

``SmoothWeighted`` is nginx's smooth weighted round robin (ngx_http_upstream_round_robin.c):
each pick adds every candidate's weight to its running score, takes the highest score and
subtracts the total weight from it. With weights 5,1,1 it yields a a b a c a a rather than
a a a a a b c, so a heavy backend never receives a burst. With equal weights it is exactly
strict rotation b1, b2, b3, b1, ... .

``available`` lets the caller leave out backends that are down or draining; the policy
only keeps its own rotation state and never looks at the clock or the network.
"""

from __future__ import annotations

from collections.abc import MutableSequence, Sequence


class SmoothWeighted:
    """Smooth weighted round robin; strict round robin when all weights are equal."""

    __slots__ = ("_current", "_weights")

    def __init__(
        self, weights: Sequence[int], *, state: MutableSequence[int] | None = None
    ) -> None:
        """``state`` holds the running scores; pass shared memory to rotate across processes."""
        if not weights or any(w <= 0 for w in weights):
            raise ValueError("weights must be positive and non-empty")
        if state is not None and len(state) != len(weights):
            raise ValueError("state must have one slot per backend")
        self._weights = list(weights)
        self._current: MutableSequence[int] = state if state is not None else [0] * len(weights)

    def __repr__(self) -> str:
        return f"<SmoothWeighted weights={self._weights} current={list(self._current)}>"

    def pick(
        self, available: Sequence[bool] | None = None, *, weights: Sequence[int] | None = None
    ) -> int | None:
        """Index of the next backend among the available ones, or None if none is.

        ``weights`` overrides the configured weights for this pick (slow start).
        """
        if weights is None:
            weights = self._weights
        current = self._current  # (shared memory: each score read and written once)
        best = -1
        best_score = 0
        total = 0
        for i, weight in enumerate(weights):
            if available is not None and not available[i]:
                continue
            score = current[i] + weight
            current[i] = score
            total += weight
            if best < 0 or score > best_score:
                best = i
                best_score = score
        if best < 0:
            return None
        current[best] = best_score - total
        return best
