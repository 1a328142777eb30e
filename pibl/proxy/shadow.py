"""The consistency checks' shell: shadow requests, return verification, the version probe.

The decisions are in ``pibl.balance.consistency`` (pure); this module sends requests and
acts on what those functions say:

* ``Shadow.sample`` is the per-request decision (one call, made by whichever path serves
  the request first). A sampled request's primary answer is collected by a ``Tap`` as it
  streams to the client (the backend's bytes, before any compression by PIBL); once the
  client has it all, ``primary_done`` sends the same request, marked ``PIBL-Shadow: 1``
  and with the same ``X-Request-ID``, to one other available replica on a pooled
  connection, in the background. Its answer is read, compared and dropped: it never
  reaches a client or the cache, is not a client request in the log or the metrics, and
  has its own log line (``shadow ...``).
* Shadow load is bounded: at most ``max_concurrent`` at once per worker, at most ``rate``
  per second for the node (a bucket in the shared rate-limit table), never to a replica
  that is out of rotation, draining or at its ``maxconn``.
* A replica the majority vote names as the outlier is reported once per URL (node-wide),
  counted, shown on the status page; with ``on_divergence = "eject"`` it is held out of
  rotation in every worker (``Holds`` in shared memory), never below the pool's panic
  threshold, and verified again every ``recheck`` seconds.
* A replica that comes back (its health checks pass again, or a reload adds it) is held
  until recent requests replayed against it match what the other replicas answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pibl.balance.consistency import (
    DIVERGENT,
    REPLAY_FIELDS,
    SHADOW_HEADER,
    VERIFYING,
    Fingerprint,
    Holds,
    ReplayEntry,
    ReplayRing,
    Report,
    Rules,
    SharedShadow,
    Votes,
    difference,
    fingerprint,
    first_report,
    forget_report,
    may_hold,
    report_key,
    sampled,
    version_verdict,
)
from pibl.errors import UpstreamError
from pibl.http.message import BodyKind, RequestHead, ResponseHead
from pibl.http.parse import Body, End, Event, Head
from pibl.limits import bucket_key

if TYPE_CHECKING:
    from pibl.config import ConsistencyConfig
    from pibl.proxy.exchange import Proxy

_RATE_KEY = bucket_key(-1, "consistency shadow requests")


class Tap:
    """The primary answer of a sampled request, collected as it streams (bounded)."""

    __slots__ = ("body", "headers", "size", "status", "too_large")

    def __init__(self, resp: ResponseHead, headers: list[tuple[bytes, bytes]]) -> None:
        self.status = resp.status
        self.headers = headers
        self.body: list[bytes] = []
        self.size = 0
        self.too_large = False

    def feed(self, events: Iterable[Event], limit: int) -> None:
        if self.too_large:
            return
        for ev in events:
            if isinstance(ev, Body) and ev.data:
                self.size += len(ev.data)
                if self.size > limit:
                    self.too_large = True
                    self.body.clear()
                    return
                self.body.append(ev.data)


@dataclass(frozen=True, slots=True)
class Request:
    """What is needed to ask another replica the same thing."""

    pool: str
    method: bytes
    target: bytes
    host: bytes
    fields: tuple[tuple[bytes, bytes], ...]  # the representation-choosing fields
    rid: bytes
    make: Any  # index -> request bytes (the primary's request, marked as a shadow)

    @property
    def vote_key(self) -> str:
        extra = "".join(f"\0{k.decode('latin-1')}={v.decode('latin-1')}" for k, v in self.fields)
        return (
            f"{self.pool}\0{self.method.decode('latin-1')}\0{self.host.decode('latin-1')}"
            f"{self.target.decode('latin-1')}{extra}"
        )

    @property
    def url(self) -> str:
        return self.target.decode("latin-1")


def representation_fields(head: RequestHead) -> tuple[tuple[bytes, bytes], ...]:
    return tuple((k.lower(), v) for k, v in head.headers if k.lower() in REPLAY_FIELDS)


class Shadow:
    """One worker's consistency checks."""

    def __init__(
        self,
        proxy: Proxy,
        cfg: ConsistencyConfig,
        shared: SharedShadow | None,
        holds: Holds | None,
        lock: AbstractContextManager[object] | None,
        *,
        leader: bool = True,
    ) -> None:
        self.proxy = proxy
        self.cfg = cfg
        self.rules = Rules.from_config(cfg)
        self.shared = shared or SharedShadow.local()
        self.ring = ReplayRing(self.shared.ring)
        n = len(proxy.states)
        self.holds = holds or Holds.local(n)
        self._holds_shared = holds is not None
        self.lock: AbstractContextManager[object] = lock or contextlib.nullcontext()
        self.leader = leader  # runs the version probe (one worker of the node)
        self.votes = Votes(window=cfg.window)
        self.reports: dict[tuple[str, str], Report] = {}
        self.counts: Counter[str] = Counter()
        self.versions: dict[str, str] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._random = random.Random()
        self._index = {s.name: i for i, s in enumerate(proxy.states)}
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<Shadow sample={self.rules.sample:g} in flight={len(self._tasks)}>"

    # -- the request path ------------------------------------------------------------------

    def sample(self, head: RequestHead) -> bool:
        """Whether this request is compared against another replica (decided once)."""
        if head.body is not BodyKind.NONE or head.upgrade is not None:
            return False
        return sampled(self.rules, self._random.random(), head.method, head.target, head.headers)

    def tap(self, resp: ResponseHead, headers: list[tuple[bytes, bytes]]) -> Tap | None:
        if resp.status < 200 or resp.status == 101:
            return None
        if resp.body is BodyKind.LENGTH and resp.content_length > self.rules.max_body:
            self.counts["too large"] += 1
            return None
        return Tap(resp, headers)

    def primary_done(self, index: int, tap: Tap, head: RequestHead, rid: bytes, make: Any) -> None:
        """The primary answer reached the client whole: compare it in the background."""
        if tap.too_large:
            self.counts["too large"] += 1
            return
        group = self.proxy.group_of[index]
        if len(group.backends) < 2:
            return
        request = Request(
            group.name,
            head.method,
            head.target,
            head.host,
            representation_fields(head),
            rid,
            make,
        )
        primary = fingerprint(self.rules, tap.status, tap.headers, b"".join(tap.body))
        if not self._admit():
            return
        self._spawn(self._compare(index, request, primary))

    def _admit(self) -> bool:
        """Room for one more shadow request (per-worker concurrency, node-wide rate)."""
        if len(self._tasks) >= self.cfg.max_concurrent:
            self.counts["skipped"] += 1
            return False
        verdict = self.proxy.limiter.check(
            _RATE_KEY,
            time.monotonic(),
            rate=self.cfg.rate,
            burst=max(1, int(self.cfg.rate)),
            delay=False,
        )
        if not verdict.allowed:
            self.counts["skipped"] += 1
            return False
        return True

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            self.proxy.log.error(f"consistency check failed: {exc!r}")

    def _candidates(self, index: int, exclude: set[int]) -> list[int]:
        """Replicas of the same pool that may take a shadow request now."""
        proxy = self.proxy
        group = proxy.group_of[index]
        now = time.monotonic()
        out = []
        for local, state in enumerate(group.states):
            i = group.first + local
            if i == index or i in exclude or not state.available(now):
                continue
            if group.maxconn and group.load(local) >= group.maxconn:
                continue
            out.append(i)
        return out

    async def _compare(self, index: int, request: Request, primary: Fingerprint) -> None:
        proxy = self.proxy
        now = time.monotonic()
        key = request.vote_key
        names = proxy.states
        seen = self.votes.seen(key, now)
        candidates = self._candidates(index, set())
        if not candidates:
            self.counts["no replica"] += 1
            return
        fresh = [i for i in candidates if names[i].name not in seen]
        other = self._random.choice(fresh or candidates)
        answers: dict[int, Fingerprint] = {index: primary}
        got = await self.fetch(other, request, primary_index=index)
        if got is None:
            return
        answers[other] = got
        outcome = self.votes.record(key, names[index].name, primary, time.monotonic())
        outcome = self.votes.record(key, names[other].name, got, time.monotonic())
        if not primary.same(got) and outcome.undecided:
            # two answers differ: ask the replicas not heard on this URL yet (bounded)
            for third in self._candidates(index, set(answers)):
                if names[third].name in self.votes.seen(key, time.monotonic()):
                    continue
                if not self._admit():
                    break
                fp = await self.fetch(third, request, primary_index=index)
                if fp is not None:
                    answers[third] = fp
                    outcome = self.votes.record(key, names[third].name, fp, time.monotonic())
        if outcome.expected is not None and len(outcome.agreeing) >= 2:
            self._remember(request, outcome.expected, hot=bool(outcome.outliers))
            for name in outcome.agreeing:
                if self._index[name] in answers:  # (an older answer settles nothing)
                    self._resolved(name, request.url)
        for name in outcome.outliers:
            i = self._index[name]
            fp = answers.get(i)
            if fp is None or outcome.expected is None:
                continue
            self.diverged(i, request.url, difference(outcome.expected, fp), where="traffic")
        if outcome.undecided and not primary.same(got):
            pair = f"{names[index].name} {names[other].name}"
            with self.shared.lock:
                first = first_report(self.shared.reported, report_key(pair, request.url))
            if first:
                proxy.log.warning(
                    f"consistency: {names[index].name} and {names[other].name} answer "
                    f"{request.url} differently ({difference(primary, got)}); no majority "
                    "to tell which is right"
                )

    def _remember(self, request: Request, expected: Fingerprint, *, hot: bool) -> None:
        entry = ReplayEntry(
            request.pool,
            request.method.decode("latin-1"),
            request.url,
            request.host.decode("latin-1"),
            tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in request.fields),
            expected,
            hot,
        )
        with self.shared.lock:
            self.ring.add(entry)

    # -- talking to a replica ------------------------------------------------------------------

    async def fetch(
        self,
        index: int,
        request: Request,
        *,
        primary_index: int | None = None,
        kind: str = "shadow",
    ) -> Fingerprint | None:
        """Ask backend ``index``; its fingerprint, or None when it did not answer whole."""
        proxy = self.proxy
        started = time.monotonic()
        result = "error"
        status = 0
        length = 0
        try:
            answer = await self._exchange(index, request.make(index), request.method == b"HEAD")
            if answer is None:
                result = "too large"
                return None
            status, headers, body = answer
            length = len(body)
            fp = fingerprint(self.rules, status, headers, body)
            result = "answered"
            return fp
        except (UpstreamError, TimeoutError, OSError) as exc:
            result = f"error: {getattr(exc, 'reason', None) or exc or type(exc).__name__}"
            return None
        finally:
            self.counts[result if not result.startswith("error") else "error"] += 1
            m = proxy.metrics
            m.batch.inc(
                proxy._labelled(
                    m.shadow_requests, kind, "error" if result.startswith("error") else "ok"
                )
            )
            proxy.log.shadow(
                kind=kind,
                rid=request.rid,
                method=request.method,
                target=request.target,
                backend=proxy.states[index].name,
                primary=proxy.states[primary_index].name if primary_index is not None else "-",
                status=status,
                length=length,
                result=result,
                total=time.monotonic() - started,
            )

    async def _exchange(
        self, index: int, request_bytes: bytes, head_request: bool
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes] | None:
        """One request on a pooled connection; (status, fields, body), None if too large."""
        proxy = self.proxy
        group = proxy.group_of[index]
        pool = proxy.pools[index]
        group.begin(index)
        ok = False
        upstream = None
        try:
            async with asyncio.timeout(self.cfg.timeout):
                upstream, _ = await pool.acquire()
                upstream.start(request_bytes, head_request=head_request)
                resp: ResponseHead | None = None
                parts: list[bytes] = []
                size = 0
                while True:
                    for ev in await upstream.read():
                        if isinstance(ev, Head):
                            assert isinstance(ev.head, ResponseHead)
                            resp = ev.head
                        elif isinstance(ev, Body):
                            size += len(ev.data)
                            if size > self.rules.max_body:
                                return None
                            parts.append(ev.data)
                        elif isinstance(ev, End):
                            assert resp is not None
                            ok = resp.keep_alive
                            return resp.status, list(resp.headers), b"".join(parts)
        finally:
            if upstream is not None:
                upstream.finish(reusable=ok)
                pool.release(upstream)
            if group.maxconn:
                group.end(index)

    def replay_request(self, entry: ReplayEntry, rid: bytes) -> Request:
        """A request rebuilt from a replay entry, for any backend of its pool."""
        proxy = self.proxy
        method = entry.method.encode("latin-1")
        target = entry.target.encode("latin-1")
        host = entry.host.encode("latin-1")
        fields = tuple((k.encode("latin-1"), v.encode("latin-1")) for k, v in entry.fields)

        def make(index: int) -> bytes:
            lines = [b"%s %s HTTP/1.1\r\n" % (method, target)]
            lines.append(b"Host: %s\r\n" % (host or proxy._default_hosts[index]))
            lines += [b"%s: %s\r\n" % f for f in fields]
            lines.append(b"User-Agent: pibl-consistency\r\n")
            lines.append(
                b"%s: 1\r\nX-Request-ID: %s\r\nVia: 1.1 %s\r\n\r\n"
                % (SHADOW_HEADER, rid, proxy.via)
            )
            return b"".join(lines)

        return Request(entry.pool, method, target, host, fields, rid, make)

    # -- verdicts ----------------------------------------------------------------------------

    def diverged(self, index: int, url: str, diff: str, *, where: str) -> None:
        """Backend ``index`` answers ``url`` unlike the other replicas."""
        proxy = self.proxy
        state = proxy.states[index]
        group = proxy.group_of[index]
        wall = time.time()
        key = (state.name, url)
        report = self.reports.get(key)
        if report is None:
            self.reports[key] = Report(state.name, group.name, url, diff, wall, wall)
        else:
            report.count += 1
            report.last_seen = wall
            report.diff = diff
        proxy.metrics.batch.inc(proxy._labelled(proxy.metrics.divergences, state.name))
        with self.shared.lock:
            first = first_report(self.shared.reported, report_key(state.name, url))
        if first:
            proxy.log.warning(
                f"consistency: backend {state.name} differs from the other replicas on {url} "
                f"({where}): {diff}"
            )
        if self.cfg.on_divergence == "eject" and where == "traffic":
            self.hold_out(index, "its answers differ from the other replicas'")

    def hold_out(self, index: int, why: str) -> bool:
        """Take backend ``index`` out of rotation as divergent, unless that would leave
        fewer than the panic threshold's share of its pool in rotation."""
        proxy = self.proxy
        state = proxy.states[index]
        group = proxy.group_of[index]
        now = time.monotonic()
        if self.holds.hold[index] == DIVERGENT:
            return True
        in_service = [s for s in group.states if not s.draining and not s.disabled]
        available = [s.available(now) or s is state for s in in_service]
        position = in_service.index(state) if state in in_service else -1
        if position < 0 or not may_hold(available, position, group.health.panic_threshold):
            with self.shared.lock:
                first = first_report(self.shared.reported, report_key(state.name, "\0kept"))
            if first:
                proxy.log.warning(
                    f"consistency: backend {state.name} kept in rotation although {why}: "
                    "taking it out would leave too few backends (panic_threshold)"
                )
            return False
        with self.lock:
            self.holds.diverged(index, now)
        state.held = DIVERGENT
        proxy.log.warning(f"consistency: backend {state.name} taken out of rotation: {why}")
        return True

    def _resolved(self, name: str, url: str) -> None:
        """``name`` answers ``url`` as the majority again: its report there is over."""
        if self.reports.pop((name, url), None) is not None:
            with self.shared.lock:
                forget_report(self.shared.reported, report_key(name, url))
            self.proxy.log.info(f"consistency: backend {name} agrees again on {url}")

    # -- a backend coming back -----------------------------------------------------------------

    def adopt(self) -> None:
        """Every backend's hold as the node knows it (another worker may have set it)."""
        for i, state in enumerate(self.proxy.states):
            state.held = self.holds.hold[i]

    def on_return(self, index: int) -> None:
        """Health checks pass again: hold it and replay recent requests before traffic."""
        self.proxy.states[index].held = self.holds.hold[index]  # another worker's verdict
        if not self.cfg.verifies_return:
            return
        group = self.proxy.group_of[index]
        if len(group.backends) < 2:
            return
        now = time.monotonic()
        grace = max(5.0, 3 * group.health.interval)
        with self.lock:
            mine = self.holds.begin(index, now, grace=grace)
        if mine:
            self.proxy.states[index].held = VERIFYING
            self.proxy.log.info(
                f"consistency: backend {self.proxy.states[index].name} is back: "
                "replaying recent requests before it gets traffic"
            )
            self._spawn(self.verify(index))

    async def verify(self, index: int) -> None:
        """Replay recent requests (and the URLs it was found different on) against it."""
        proxy = self.proxy
        state = proxy.states[index]
        group = proxy.group_of[index]
        with self.shared.lock:
            entries = self.ring.to_replay(group.name, self.cfg.replay)
        mismatches: list[tuple[ReplayEntry, Fingerprint]] = []
        answered = 0
        rid = b"verify-%x" % self._random.getrandbits(48)
        for entry in entries:
            request = self.replay_request(entry, rid)
            fp = await self.fetch(index, request, kind="replay")
            if fp is None:
                continue
            answered += 1
            self.votes.record(request.vote_key, state.name, fp, time.monotonic())
            if not entry.expected.same(fp):
                mismatches.append((entry, fp))
        version_problem = await self._version_mismatch(index)
        now = time.monotonic()
        if mismatches or version_problem is not None:
            with self.lock:
                self.holds.diverged(index, now)
            state.held = DIVERGENT
            for entry, fp in mismatches:
                self.diverged(index, entry.url, difference(entry.expected, fp), where="replay")
            if version_problem is not None:
                path, diff = version_problem
                self.diverged(index, path, diff, where="version")
            proxy.log.warning(
                f"consistency: backend {state.name} stays out of rotation: "
                f"{len(mismatches) + (version_problem is not None)} of "
                f"{answered + (version_problem is not None)} replayed answers differ"
            )
            return
        if entries and not answered:
            with self.lock:
                self.holds.unclaim(index)  # it did not answer: try again later
            return
        with self.lock:
            self.holds.release(index, now)
        state.held = 0
        for entry in entries:
            self._resolved(state.name, entry.url)
        proxy.log.info(
            f"consistency: backend {state.name} back in rotation: "
            + (
                f"{answered} replayed answers match the other replicas'"
                if entries
                else "no recent requests to compare with"
            )
        )

    async def _version_mismatch(self, index: int) -> tuple[str, str] | None:
        """With ``version_path``: (path, diff) when its version differs from the others'."""
        path = self.cfg.version_path
        if path is None:
            return None
        group = self.proxy.group_of[index]
        others = [
            group.first + i
            for i, s in enumerate(group.states)
            if group.first + i != index and s.up and not s.held
        ]
        values = await self._versions([index, *others])
        mine = values.get(self.proxy.states[index].name)
        theirs = {v for k, v in values.items() if k != self.proxy.states[index].name}
        if mine is None or len(theirs) != 1:
            return None
        (expected,) = theirs
        if mine != expected:
            return path, f"version {expected!r} vs {mine!r}"
        return None

    # -- the version probe and the holds, once a second ------------------------------------

    async def _versions(self, indices: list[int]) -> dict[str, str]:
        path = self.cfg.version_path
        assert path is not None
        proxy = self.proxy
        entry = ReplayEntry("", "GET", path, "", (), Fingerprint(0, 0, ""))
        request = self.replay_request(entry, b"version")
        results = await asyncio.gather(
            *(self._exchange(i, request.make(i), False) for i in indices),
            return_exceptions=True,
        )
        values = {}
        for i, answer in zip(indices, results, strict=True):
            if isinstance(answer, BaseException) or answer is None or answer[0] != 200:
                continue
            values[proxy.states[i].name] = answer[2].strip()[:200].decode("utf-8", "replace")
        return values

    async def probe_versions(self) -> None:
        """Read ``version_path`` from every replica that is up; report the odd one out."""
        proxy = self.proxy
        path = self.cfg.version_path
        assert path is not None
        for group in proxy.groups.values():
            if len(group.backends) < 2:
                continue
            indices = [group.first + i for i, s in enumerate(group.states) if s.up]
            values = await self._versions(indices)
            self.versions.update(values)
            outcome = version_verdict(values)
            for name in outcome.agreeing if len(outcome.agreeing) >= 2 else ():
                self._resolved(name, path)
            for name in outcome.outliers:
                assert outcome.expected is not None
                expected = outcome.expected.digest
                self.diverged(
                    self._index[name],
                    path,
                    f"version {expected!r} vs {values[name]!r}",
                    where="version",
                )
                if self.cfg.on_divergence == "eject":
                    self.hold_out(self._index[name], "its version differs from the others'")
            if outcome.undecided:
                text = ", ".join(f"{k}={v!r}" for k, v in sorted(values.items()))
                with self.shared.lock:
                    first = first_report(self.shared.reported, report_key("\0version", text))
                if first:
                    proxy.log.warning(f"consistency: replicas report different versions: {text}")

    async def run(self) -> None:
        """Forever: verify held backends that are due, probe versions at [health] interval."""
        proxy = self.proxy
        interval = proxy.default_group.health.interval
        next_probe = 0.0
        stale = self.cfg.timeout * (self.cfg.replay + 4)
        while True:
            now = time.monotonic()
            for i, state in enumerate(proxy.states):
                hold = self.holds.hold[i]
                if not self._holds_shared or state.held != hold:
                    state.held = hold
                if not hold or not state.up:
                    continue
                with self.lock:
                    mine = self.holds.claim(i, now, recheck=self.cfg.recheck, stale=stale)
                if mine:
                    self._spawn(self.verify(i))
            if self.leader and self.cfg.version_path is not None and now >= next_probe:
                next_probe = now + interval
                try:
                    await self.probe_versions()
                except Exception:  # never let one bad probe end the loop
                    proxy.log_exception("version probe failed")
            await asyncio.sleep(min(1.0, interval))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for task in list(self._tasks):
            task.cancel()

    # -- status ----------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            "sample": self.cfg.sample,
            "on_divergence": self.cfg.on_divergence,
            "shadow": dict(self.counts),
            "versions": dict(self.versions),
            "divergences": [r.to_json() for r in self.reports.values()],
        }
