"""Backend pools as a worker sees them: per pool its balancer, policies and admission queue.

A configuration has one pool per ``[pools.NAME]`` plus ``default`` for the top-level
``[[backends]]``. Backends are numbered once across all pools (the flat lists
``Proxy.states`` and ``Proxy.pools`` are indexed by that number, as the status page, the
metrics and the health checks see them); each ``PoolGroup`` balances over its own slice
and translates between its local indices and the global ones.

Admission (HAProxy's ``maxconn``/``maxqueue``): with ``maxconn`` set, a backend takes at
most that many requests at once from the whole node (the counts are in memory the workers
share, one row per worker slot, so a replaced worker starts from zero); a request that
finds every available backend full waits in its worker's queue for the pool (at most
``maxqueue`` requests, 0 meaning no bound as in HAProxy, each for at most
``queue_timeout`` seconds) and otherwise gets a quick 503 instead of piling up.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from pibl.balance.health import BackendState, Balancer, HealthSettings
from pibl.balance.shared import SharedBalance
from pibl.config import (
    DEFAULT_POOL,
    BackendConfig,
    BalanceConfig,
    Config,
    HealthConfig,
    PoolConfig,
    RetriesConfig,
    UpstreamConfig,
)
from pibl.errors import UpstreamError

POLL = 0.01  # seconds between looks at the node's counts while requests are queued


@dataclass(eq=False)
class PoolGroup:
    name: str
    first: int  # global index of its first backend
    backends: tuple[BackendConfig, ...]
    states: list[BackendState]
    balancer: Balancer
    balance: BalanceConfig
    health: HealthConfig
    retries: RetriesConfig
    upstream: UpstreamConfig
    connect_timeout: float
    response_timeout: float
    maxconn: int = 0
    maxqueue: int = 0
    queue_timeout: float = 5.0
    queued: int = 0
    rejected: int = 0  # requests refused with 503 because the queue was full or too slow
    shared: SharedBalance | None = None  # the node's in-flight table (maxconn per node)
    _waiters: deque[asyncio.Future[None]] = field(default_factory=deque)

    def __repr__(self) -> str:
        return f"<PoolGroup {self.name} {len(self.backends)} backends>"

    def owns(self, index: int) -> bool:
        return self.first <= index < self.first + len(self.backends)

    def load(self, local: int) -> int:
        """Requests in flight to one of its backends: the node's when workers share memory."""
        if self.shared is not None and self.shared.inflight is not None:
            return self.shared.in_flight(self.first + local)
        return self.states[local].active

    def begin(self, index: int) -> None:
        """A request goes to backend ``index`` (counted for maxconn)."""
        if self.maxconn and self.shared is not None and self.shared.inflight is not None:
            self.shared.add_in_flight(index, 1)

    def end(self, index: int) -> None:
        if self.maxconn and self.shared is not None and self.shared.inflight is not None:
            self.shared.add_in_flight(index, -1)
        self.release()

    def pick(self, now: float, exclude: AbstractSet[int], prefer: int | None) -> int | None:
        """A global backend index by the pool's policy, skipping full backends."""
        first = self.first
        local_exclude: set[int] | frozenset[int] = (
            {i - first for i in exclude if self.owns(i)} if exclude else frozenset()
        )
        if self.maxconn:
            local_exclude |= {i for i in range(len(self.states)) if self.load(i) >= self.maxconn}
        local_prefer = prefer - first if prefer is not None and self.owns(prefer) else None
        index = self.balancer.pick(now, exclude=local_exclude, prefer=local_prefer)
        return None if index is None else index + first

    def candidate(self, state: BackendState, now: float) -> bool:
        """Whether the balancer may pick it now (in a panic, passive ejections are ignored)."""
        if state.available(now):
            return True
        return self.balancer.panicking and state.up and not state.draining and not state.disabled

    def full(self, now: float, exclude: AbstractSet[int]) -> bool:
        """Whether a backend could take it but all that could are at maxconn."""
        if not self.maxconn:
            return False
        candidates = [
            i
            for i, s in enumerate(self.states)
            if self.candidate(s, now) and i + self.first not in exclude
        ]
        return bool(candidates) and all(self.load(i) >= self.maxconn for i in candidates)

    async def admit(self) -> None:
        """Wait for a free slot (FIFO), or raise a quick 503 when the queue is full/slow."""
        if self.maxqueue and self.queued >= self.maxqueue:
            self.rejected += 1
            raise UpstreamError(503, "every backend of the pool is busy", connected=False)
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        self.queued += 1
        # This worker's own releases wake the queue at once; another worker's are seen by
        # looking again every POLL seconds (the counts are in shared memory).
        poll = loop.call_later(POLL, self._poll) if self.shared is not None else None
        try:
            async with asyncio.timeout(self.queue_timeout):
                await waiter
        except TimeoutError:
            self.rejected += 1
            raise UpstreamError(
                503, "queued too long for a busy backend", connected=False
            ) from None
        finally:
            if poll is not None:
                poll.cancel()
            self.queued -= 1
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _poll(self) -> None:
        if not self._waiters:
            return
        if any(self.load(i) < self.maxconn for i in range(len(self.states))):
            self.release()
        asyncio.get_running_loop().call_later(POLL, self._poll)

    def release(self) -> None:
        """A request on one of the pool's backends ended: wake the first queued one."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


def build_groups(
    config: Config,
    shared: SharedBalance | None,
    on_panic: Callable[[PoolGroup], Callable[[bool, int, int], None]],
) -> tuple[dict[str, PoolGroup], list[BackendState]]:
    """The pools of a configuration, and every backend's state in global order."""
    groups: dict[str, PoolGroup] = {}
    states: list[BackendState] = []
    entries: list[tuple[str, tuple[BackendConfig, ...], PoolConfig | None]] = []
    if config.backends:
        entries.append((DEFAULT_POOL, config.backends, None))
    for pool_name, pool_config in config.pools.items():
        entries.append((pool_name, pool_config.backends, pool_config))
    for name, backends, pool in entries:
        balance = getattr(pool, "balance", None) or config.balance
        health = getattr(pool, "health", None) or config.health
        retries = getattr(pool, "retries", None) or config.retries
        upstream = getattr(pool, "upstream", None) or config.upstream
        timeouts = getattr(pool, "timeouts", None)
        settings = HealthSettings(
            rise=health.rise,
            fall=health.fall,
            max_fails=health.max_fails,
            window=health.window,
            cooldown=health.cooldown,
            slow_start=balance.slow_start,
            panic_threshold=health.panic_threshold,
        )
        own = [BackendState(b.label, b.weight, settings) for b in backends]
        first = len(states)
        states.extend(own)
        view = shared.view(first, len(own)) if shared is not None else None
        balancer = Balancer(own, policy=balance.policy, shared=view)
        group = PoolGroup(
            name=name,
            first=first,
            backends=backends,
            states=own,
            balancer=balancer,
            balance=balance,
            health=health,
            retries=retries,
            upstream=upstream,
            connect_timeout=(
                timeouts.upstream_connect
                if timeouts is not None and timeouts.upstream_connect
                else config.timeouts.upstream_connect
            ),
            response_timeout=(
                timeouts.upstream_response
                if timeouts is not None and timeouts.upstream_response
                else config.timeouts.upstream_response
            ),
            maxconn=getattr(pool, "maxconn", 0),
            maxqueue=getattr(pool, "maxqueue", 0),
            queue_timeout=getattr(pool, "queue_timeout", 5.0),
        )
        balancer.on_panic = on_panic(group)
        group.shared = shared
        groups[name] = group
    return groups, states
