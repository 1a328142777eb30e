"""Backend health as a small state machine, and the balancer that consults it (pure).

Each backend has one ``BackendState``. Four independent reasons keep it out of rotation:

* **active checks** (``record_check``): ``fall`` consecutive failed probes mark it down,
  ``rise`` consecutive good ones mark it up again (HAProxy's ``rise``/``fall``);
* **passive checks** (``record_failure``): ``max_fails`` failures of real traffic within
  ``window`` seconds eject it for ``cooldown`` seconds, after which it is tried again
  (nginx's ``max_fails``/``fail_timeout``, Envoy's outlier detection). Failures weigh by
  what they say about the server: a refused connection is unambiguous (nothing listens)
  and ejects at once; a reset or malformed answer weighs 1; a timeout weighs 1/2, since a
  single slow URL times out while the server is fine. An ejection for a refused
  connection ends early once active checks see the server accept again (``rise`` good
  probes), instead of waiting out the cool-down;
* **draining**: no new requests, in-flight ones finish;
* **disabled** by an operator;
* **held** by the consistency checks (``pibl.balance.consistency``): verifying a replica
  that came back, or a replica whose answers differ from the others'. Like a passive
  ejection it is ignored in a panic.

A backend that comes back is ramped up over ``slow_start`` seconds: its effective weight
grows linearly from 1/10 of its weight to the full weight, so a cold replica is not
flooded at once.

Passive checks never empty the rotation (Envoy's panic threshold, nginx's "every server
down: try them all"): when the share of backends in service that are available falls
below ``panic_threshold``, the balancer ignores passive ejections and balances over every
backend that active checks do not confirm dead. One URL that breaks connections (a "query
of death") can then eject at most half of the backends, never the service.

Nothing here reads the clock: every method takes ``now``; the I/O side (the prober, the
exchange) feeds results in and logs the state changes returned.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, MutableSequence, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

from pibl.balance.policy import SmoothWeighted
from pibl.balance.shared import SharedBalance


@dataclass(frozen=True, slots=True)
class HealthSettings:
    rise: int = 2
    fall: int = 2
    max_fails: int = 3
    window: float = 10.0
    cooldown: float = 10.0
    slow_start: float = 0.0
    panic_threshold: float = 0.5


# How much one failure of real traffic counts towards max_fails, by what it says about the
# server (see the module's docstring); "refused" ejects at once.
FAILURE_WEIGHTS = {"error": 1.0, "timeout": 0.5}


@dataclass(slots=True)
class BackendState:
    name: str
    weight: int
    settings: HealthSettings = field(default_factory=HealthSettings)
    up: bool = True  # as far as active checks know
    draining: bool = False
    disabled: bool = False
    held: int = 0  # consistency: 1 verifying its return, 2 divergent (0: not held)
    ejected_until: float = 0.0
    ejected_refused: bool = False  # the ejection came from a refused connection
    shared_until: float = 0.0  # the shared ejection deadline last seen (multi-worker)
    recovered_at: float | None = None
    active: int = 0  # requests in flight (least connections)
    requests: int = 0
    failures: int = 0
    ejections: int = 0
    _good: int = 0
    _bad: int = 0
    _recent: deque[tuple[float, float]] = field(default_factory=deque)  # (time, weight)

    # -- queries ----------------------------------------------------------------------

    def available(self, now: float) -> bool:
        return (
            self.up
            and not self.draining
            and not self.disabled
            and not self.held
            and now >= self.ejected_until
        )

    def state(self, now: float) -> str:
        if self.disabled:
            return "disabled"
        if self.draining:
            return "draining"
        if not self.up:
            return "down"
        if now < self.ejected_until:
            return "ejected"
        if self.held:
            return "verifying" if self.held == 1 else "divergent"
        if self.ramping(now):
            return "slow-start"
        return "up"

    def ramping(self, now: float) -> bool:
        slow = self.settings.slow_start
        return slow > 0 and self.recovered_at is not None and now - self.recovered_at < slow

    def effective_weight(self, now: float) -> int:
        """Weight scaled by 1000 (so slow start has resolution), ramping after recovery."""
        full = self.weight * 1000
        if not self.ramping(now):
            return full
        assert self.recovered_at is not None
        fraction = (now - self.recovered_at) / self.settings.slow_start
        return max(full // 10, int(full * fraction))

    # -- events -----------------------------------------------------------------------

    def probing_fast(self, now: float) -> bool:
        """Whether active checks should use their fast interval (HAProxy's ``downinter``
        and ``fastinter``): while down, ejected, or between states."""
        return not self.up or now < self.ejected_until or self._bad > 0

    def record_check(self, ok: bool, now: float) -> str | None:
        """An active probe result; returns "up" or "down" when the state changes."""
        if ok:
            self._good += 1
            self._bad = 0
            if not self.up and self._good >= self.settings.rise:
                self.up = True
                self.recovered_at = now
                self.ejected_until = 0.0
                self.ejected_refused = False
                self._recent.clear()
                return "up"
            if (
                self.ejected_refused
                and now < self.ejected_until
                and self._good >= self.settings.rise
            ):
                # it accepts connections again: the refusal that ejected it is over
                self.ejected_until = 0.0
                self.ejected_refused = False
                self.recovered_at = now
                return "up"
        else:
            self._bad += 1
            self._good = 0
            if self.up and self._bad >= self.settings.fall:
                self.up = False
                return "down"
        return None

    def record_failure(self, now: float, kind: str = "error") -> str | None:
        """A failure of real traffic ("refused", "error" or "timeout"); returns "ejected"
        when it crosses the threshold (at once for "refused")."""
        self.failures += 1
        if now < self.ejected_until:
            return None  # already out (a request that picked it before the ejection)
        recent = self._recent
        recent.append((now, FAILURE_WEIGHTS.get(kind, 1.0)))
        while recent and now - recent[0][0] > self.settings.window:
            recent.popleft()
        if kind == "refused" or sum(w for _, w in recent) >= self.settings.max_fails:
            self.ejected_until = now + self.settings.cooldown
            self.ejected_refused = kind == "refused"
            self.recovered_at = self.ejected_until
            self._good = 0
            self.ejections += 1
            recent.clear()
            return "ejected"
        return None

    def adopt_ejection(self, until: float, refused: bool = False) -> None:
        """Another worker ejected this backend until ``until`` (0: it ended the ejection)."""
        self.shared_until = until
        self.ejected_until = until
        self.ejected_refused = refused and until > 0
        if until > 0:
            self.recovered_at = until
            self._good = 0
        self._recent.clear()

    def record_success(self, now: float) -> None:
        self.requests += 1


class Balancer:
    """Chooses a backend among the available ones with the configured policy."""

    def __init__(
        self,
        states: Sequence[BackendState],
        *,
        policy: str = "round_robin",
        shared: SharedBalance | None = None,
    ) -> None:
        if policy not in ("round_robin", "least_conn"):
            raise ValueError(f"unknown policy {policy!r}")
        self.states = list(states)
        self.policy = policy
        self.panic_threshold = states[0].settings.panic_threshold if states else 0.5
        self.panicking = False  # passive ejections are being ignored
        self.panics = 0  # how often a panic started
        self.on_panic: Callable[[bool, int, int], None] | None = None  # (on, available, total)
        weights = [s.weight * 1000 for s in states]
        self._ejected: MutableSequence[float] | None = None
        self._refused: MutableSequence[int] | None = None
        self._held: MutableSequence[int] | None = None  # consistency holds, when shared
        if shared is not None and len(shared.scores) == len(states):
            self._rotation = SmoothWeighted(weights, state=shared.scores)
            # multiprocessing's Lock enters and exits through Python methods around its C
            # semaphore; the semaphore itself is the same lock as a context manager
            self._lock: AbstractContextManager[object] = getattr(
                shared.lock, "_semlock", shared.lock
            )
            self._ejected = shared.ejected_until
            self._refused = shared.refused
            self._held = shared.hold
        else:
            self._rotation = SmoothWeighted(weights)
            self._lock = contextlib.nullcontext()

    def __repr__(self) -> str:
        return f"<Balancer {self.policy} {[s.name for s in self.states]}>"

    def pick(
        self,
        now: float,
        *,
        exclude: frozenset[int] | set[int] = frozenset(),
        prefer: int | None = None,
    ) -> int | None:
        """Index of the backend for the next request, or None if none is available.

        ``exclude`` are backends already tried for this request (retries); ``prefer`` is a
        sticky session's backend, used when it is available.
        """
        with self._lock:
            ejected = self._ejected
            if ejected is not None and self._refused is not None:
                # ejections made, or ended early, by the other workers
                for i, state in enumerate(self.states):
                    if ejected[i] != state.shared_until:
                        state.adopt_ejection(ejected[i], bool(self._refused[i]))
            held = self._held
            if held is not None:  # replicas the consistency checks hold out, in any worker
                for i, state in enumerate(self.states):
                    state.held = held[i]
            return self._pick(now, exclude, prefer)

    def record_failure(self, index: int, now: float, kind: str = "error") -> str | None:
        """A failure of real traffic on backend ``index``; an ejection reaches every worker."""
        state = self.states[index]
        change = state.record_failure(now, kind)
        if change == "ejected":
            self._share(index, state.ejected_until, state.ejected_refused)
        return change

    def record_check(self, index: int, ok: bool, now: float) -> str | None:
        """An active probe result on backend ``index``; coming back up ends its ejection."""
        state = self.states[index]
        seen = state.shared_until
        change = state.record_check(ok, now)
        # end the shared ejection only if it is still the one this worker saw: another
        # worker may have made a fresh one meanwhile
        if change == "up" and (self._ejected is None or self._ejected[index] in (seen, 0.0)):
            self._share(index, 0.0, False)
        return change

    def probing_fast(self, index: int, now: float) -> bool:
        return self.states[index].probing_fast(now)

    def _share(self, index: int, until: float, refused: bool) -> None:
        self.states[index].shared_until = until
        if self._ejected is not None and self._refused is not None:
            with self._lock:
                self._ejected[index] = until
                self._refused[index] = int(refused)

    def _candidates(self, now: float) -> list[bool]:
        """Backends that may take a request now; in a panic, passive ejections are ignored."""
        states = self.states
        available = [s.available(now) for s in states]
        in_service = sum(1 for s in states if not s.draining and not s.disabled)
        panic = in_service > 0 and sum(available) < self.panic_threshold * in_service
        if panic:
            available = [s.up and not s.draining and not s.disabled for s in states]
        if panic != self.panicking:
            self.panicking = panic
            self.panics += panic
            if self.on_panic is not None:
                self.on_panic(panic, sum(s.available(now) for s in states), in_service)
        return available

    def _pick(
        self, now: float, exclude: frozenset[int] | set[int], prefer: int | None
    ) -> int | None:
        states = self.states
        if not (exclude or self.panicking) and prefer is None and self.policy == "round_robin":
            # The common pick: every backend available at full weight. The rotation's own
            # weights are the configured ones, and nothing can start a panic.
            for s in states:
                if not s.available(now) or s.ramping(now):
                    break
            else:
                return self._rotation.pick()
        available = self._candidates(now)
        if exclude:
            available = [a and i not in exclude for i, a in enumerate(available)]
        if prefer is not None and 0 <= prefer < len(states) and available[prefer]:
            return prefer
        if not any(available):
            return None
        weights = [s.effective_weight(now) for s in states]
        if self.policy == "least_conn":
            best: int | None = None
            best_load = 0.0
            for i, s in enumerate(states):
                if not available[i]:
                    continue
                load = (s.active + 1) / weights[i]
                if best is None or load < best_load:
                    best, best_load = i, load
            # Among equally loaded backends keep rotating rather than always taking the first.
            ties = [
                i
                for i, s in enumerate(states)
                if available[i] and (s.active + 1) / weights[i] == best_load
            ]
            if len(ties) > 1:
                mask = [i in ties for i in range(len(states))]
                return self._rotation.pick(mask, weights=weights)
            return best
        return self._rotation.pick(available, weights=weights)
