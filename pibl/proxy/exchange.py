"""One request's journey, top to bottom: pick a backend -> forward -> stream back -> log.

``Proxy`` holds what one worker shares between connections (the frozen config, the
balancing policy, one pool per backend, the access log) and ``Proxy.handle`` is the whole
path of a request. It returns whether the client connection may be kept alive.

Failure rules (what an nginx user expects):

* no backend available -> 503 with ``Retry-After``;
* connect refused, reset or malformed response before the response started -> 502;
* connect or response timeout -> 504;
* once response bytes went to the client nothing can be un-sent: the client connection is
  aborted so it can tell the body was cut (no final chunk, short Content-Length);
* a reused idle connection that the backend closed under us is retried once on a fresh one
  when the request has no body (the race every keep-alive pool has; nginx does the same).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import hashlib
import math
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pibl import compress
from pibl.balance.consistency import SHADOW_HEADER, Holds
from pibl.balance.shared import SharedBalance
from pibl.cache.store import BodyWriter
from pibl.compress import CompressionSettings, Compressor
from pibl.config import Config, LimitConfig
from pibl.errors import ProtocolError, UpstreamError
from pibl.http.forward import (
    REASONS,
    body_length,
    client_response,
    client_response_fields,
    interim_response,
    request_id,
    simple_response,
    upstream_request,
)
from pibl.http.framing import LAST_CHUNK, client_framing, encode_chunk, http_date
from pibl.http.message import (
    BodyKind,
    HeaderList,
    RequestHead,
    ResponseHead,
    fields_with,
    get_header,
)
from pibl.http.parse import END, Body, End, Head, Upgrade
from pibl.limits import RateLimiter, Verdict, bucket_key
from pibl.observe.accesslog import AccessLog
from pibl.observe.metrics import Metrics, multiprocess_dir
from pibl.observe.record import AccessRecord
from pibl.observe.status import StatusTracker
from pibl.proxy import fast
from pibl.proxy.flow import Sweep
from pibl.proxy.groups import PoolGroup, build_groups
from pibl.proxy.shadow import Shadow, Tap
from pibl.proxy.upstream import Pool, UpstreamConnection, upstream_tls
from pibl.routes import NO_EDITS, Route, Router, TrustedProxies, compile_routes

if TYPE_CHECKING:
    from pibl.proxy.cached import CacheLayer
    from pibl.proxy.client import ClientConnection, ClientSide, Incoming
    from pibl.proxy.fast import ClientExchange, ResponseSink

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
_STATUS_CLASSES = ("aborted", "1xx", "2xx", "3xx", "4xx", "5xx")
_ERROR_TEXT = {
    502: "the backend failed",
    503: "no backend available",
    504: "the backend timed out",
}


def head_text(head: RequestHead) -> str:
    """A request head as received, for the verbose log."""
    lines = [head.request_line]
    lines += [f"{k.decode('latin-1')}: {v.decode('latin-1')}" for k, v in head.headers]
    return "\r\n".join(lines)


def compression_settings(config: Config) -> CompressionSettings | None:
    c = config.compression
    if not c.enabled:
        return None
    settings = CompressionSettings(
        encodings=c.encodings,
        min_size=c.min_size,
        gzip_level=c.gzip_level,
        brotli_quality=c.brotli_quality,
        zstd_level=c.zstd_level,
    )
    if c.types is not None:
        settings = dataclasses.replace(settings, types=c.types)
    return settings


class ResponseHook:
    """What the cache layer plugs into an exchange (``None`` when the cache is off).

    ``on_head`` sees the backend's response head first and returns whether PIBL takes the
    response for itself (a 304 refreshing a stored entry, a 5xx replaced by a stale copy)
    instead of streaming it; ``extra`` are headers added to the client's response, ``tee``
    receives the body as it streams, ``finish`` is told whether the body ended cleanly.
    """

    extra: list[tuple[bytes, bytes]] | None = None
    tee: BodyWriter | None = None

    def on_head(self, resp: ResponseHead) -> bool:
        return False

    def finish(self, complete: bool) -> None:
        pass


class Tally:
    """Finished exchanges with the same labels, since the last flush."""

    __slots__ = ("bytes_in", "bytes_out", "count", "retries", "totals", "upstreams")

    def __init__(self) -> None:
        self.count = 0
        self.totals: list[float] = []  # seconds, one per exchange
        self.upstreams: list[float] = []  # seconds to the response head, where one came
        self.bytes_out = 0
        self.bytes_in = 0
        self.retries = 0


def _plain(resume: fast.Exit | None) -> bool:
    """No attempt under way: a new pick, or the fast path's "needs a connection"."""
    return resume is None or (resume.error is None and resume.upstream is None and not resume.fresh)


def _framing(head: RequestHead, resp: ResponseHead) -> BodyKind:
    """How the body of ``resp`` is framed for this client (a HEAD answer keeps its length)."""
    if head.method == b"HEAD":
        return BodyKind.NONE if resp.body is not BodyKind.LENGTH else BodyKind.LENGTH
    return client_framing(resp.body, head.version)


class Proxy:
    """Per-worker state shared by all client connections."""

    def __init__(
        self,
        config: Config,
        log: AccessLog,
        shared: SharedBalance | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.config = config
        self.log = log
        self.via = config.server.via.encode()
        # every backend of every pool, numbered once (the default pool first)
        self.backends = config.all_backends
        if shared is not None:
            shared.clear_row()  # a worker replacing a killed one in its slot starts at zero
        self.groups, self.states = build_groups(config, shared, self._panic_handler)
        self.group_of = [g for g in self.groups.values() for _ in g.backends]
        self._group_by_label = {s.name: g for g, s in zip(self.group_of, self.states, strict=True)}
        self.default_group = next(iter(self.groups.values()))
        self.balancer = self.default_group.balancer  # (the only one without [pools])
        self.router = Router(compile_routes(config))
        self.trusted = TrustedProxies(config.server.trusted_proxies)
        self._mirrors: set[asyncio.Task[None]] = set()
        self.mirror_counts: collections.Counter[str] = collections.Counter()
        self._random = random.Random()
        shared_limiter = shared.limiter if shared is not None else None
        self.limiter: RateLimiter = limiter or shared_limiter or RateLimiter(slots=4096)
        self._sticky_id = [
            hashlib.sha256(b.label.encode()).hexdigest()[:12].encode() for b in self.backends
        ]
        self._sticky_ids = {v: i for i, v in enumerate(self._sticky_id)}
        self._default_hosts = [
            f"{b.server_name or b.host}:{b.port}".encode() for b in self.backends
        ]
        self.pools = [
            Pool(
                b,
                connect_timeout=group.connect_timeout,
                idle_timeout=config.timeouts.upstream_idle,
                idle_max=group.upstream.pool_idle_max,
                ssl=upstream_tls(b),
            )
            for b, group in zip(self.backends, self.group_of, strict=True)
        ]
        for b in self.backends:
            if b.scheme == "https" and not b.tls_verify:
                log.warning(
                    f"backend {b.label}: TLS certificate verification is DISABLED "
                    "(tls_verify = false); traffic to it can be intercepted"
                )
        tls = config.tls if config.tls is not None and config.tls.enabled else None
        self.hsts = b"max-age=%d" % tls.hsts if tls is not None and tls.hsts else None
        self.redirect_port = tls.port if tls is not None and tls.redirect_http else None
        self.connections: set[ClientConnection] = set()
        self.in_flight = 0
        self.stopping = False
        self.cache: CacheLayer | None = None
        self.compression = compression_settings(config)
        self.metrics = Metrics()
        self.metrics.batch.track(self.metrics.connections, lambda: len(self.connections))
        self._metric_children: dict[tuple[Any, ...], Any] = {}
        # finished exchanges added up by what they are labelled with, until the next flush
        self._tallies: dict[tuple[int, str, str, str, str], Tally] = {}
        self.metrics.batch.before_flush = self.flush_tallies
        for state in self.states:  # exported from the start, at 0
            self.metrics.connect_refused.labels(state.name)
        self.verbose = config.log.verbose
        self.status = StatusTracker(self, multiprocess_dir())
        self.loop = asyncio.get_running_loop()
        # first timers of client connections, made only for those still open (flow.Sweep)
        self.sweep = Sweep(self.loop)
        # The fast path (pibl.proxy.fast): exchanges it served, and why others left it.
        self.fast_path = config.upstream.fast_path and self.redirect_port is None
        self.fast_served = 0
        self.fast_exits: collections.Counter[str] = collections.Counter()
        # [consistency]: None when off (the request path's only cost is checking that)
        self.shadow = self._make_shadow(config, shared)

    def _make_shadow(self, config: Config, shared: SharedBalance | None) -> Shadow | None:
        cfg = config.consistency
        if not cfg.enabled:
            return None
        if shared is None or shared.hold is None:
            return Shadow(self, cfg, None, None, None)
        assert shared.hold_since is not None and shared.hold_claimed is not None
        holds = Holds(shared.hold, shared.hold_since, shared.hold_claimed)
        return Shadow(self, cfg, shared.consistency, holds, shared.lock, leader=shared.slot == 0)

    # -- connection bookkeeping ---------------------------------------------------------

    def _panic_handler(self, group: PoolGroup) -> Callable[[bool, int, int], None]:
        def panic(on: bool, available: int, total: int) -> None:
            """A pool's balancer started or stopped ignoring passive ejections (logged once
            each)."""
            self.metrics.panic.set(1 if self.panicking else 0)
            where = "" if len(self.groups) == 1 else f" in pool {group.name}"
            if on:
                self.metrics.panics.inc()
                self.log.warning(
                    f"balancer panic{where}: {available} of {total} backends available, below "
                    f"panic_threshold {group.health.panic_threshold:g}; passive ejections "
                    "are ignored until more come back"
                )
            else:
                self.log.info(
                    f"balancer panic over{where}: {available} of {total} backends available"
                )

        return panic

    @property
    def panicking(self) -> bool:
        return any(g.balancer.panicking for g in self.groups.values())

    def body_limit(self, incoming: Incoming) -> int:
        """The largest request body accepted (a route's max_body_bytes, else [limits]'s)."""
        route = incoming.route
        if route is not None and route.max_body_bytes is not None:
            return route.max_body_bytes
        return self.config.limits.max_body_bytes

    # -- request mirroring (nginx's mirror, Envoy's shadowing) --------------------------

    MIRRORS_MAX = 64  # mirrored requests in flight per worker; more are skipped, not queued

    def _maybe_mirror(
        self,
        conn: ClientSide,
        head: RequestHead,
        rid: bytes,
        route: Route,
        body: bytes | None,
    ) -> None:
        """Send a copy of a share of the route's requests to its mirror pool, in the
        background: the answer is read and dropped, and nothing waits for it. Requests whose
        body streams (larger than [limits] request_buffer) are not mirrored."""
        assert route.mirror is not None
        pool_name, share = route.mirror
        if head.upgrade is not None or (head.body is not BodyKind.NONE and body is None):
            return  # never an upgrade (a mirror would hold the tunnel), never a streamed body
        if share < 1.0 and self._random.random() >= share:
            return
        if len(self._mirrors) >= self.MIRRORS_MAX:
            self.mirror_counts["skipped"] += 1
            return
        group = self.groups[pool_name]
        index = group.pick(time.monotonic(), frozenset(), None)
        if index is None:
            self.mirror_counts["no backend"] += 1
            return
        request = self.request_bytes(conn, route.upstream_head(head), rid, index, body)
        task = asyncio.get_running_loop().create_task(
            self._mirror(index, request, head.method == b"HEAD")
        )
        self._mirrors.add(task)
        task.add_done_callback(self._mirrors.discard)

    async def _mirror(self, index: int, request: bytes, head_request: bool) -> None:
        group = self.group_of[index]
        pool = self.pools[index]
        ok = False
        try:
            upstream, _ = await pool.acquire()
        except UpstreamError:
            self.mirror_counts["failed"] += 1
            return
        try:
            upstream.start(request, head_request=head_request)
            async with asyncio.timeout(group.response_timeout):
                while not ok:
                    ok = any(isinstance(e, End) for e in await upstream.read())
            self.mirror_counts["sent"] += 1
        except (UpstreamError, TimeoutError, OSError):
            self.mirror_counts["failed"] += 1
        finally:
            upstream.finish(reusable=ok)
            pool.release(upstream)

    # -- backend state, by global index ---------------------------------------------------

    def record_failure(self, index: int, now: float, kind: str = "error") -> str | None:
        group = self.group_of[index]
        return group.balancer.record_failure(index - group.first, now, kind)

    def record_check(self, index: int, ok: bool, now: float) -> str | None:
        group = self.group_of[index]
        change = group.balancer.record_check(index - group.first, ok, now)
        if change == "up" and self.shadow is not None:
            self.shadow.on_return(index)  # held until its answers match the others'
        return change

    def probing_fast(self, index: int, now: float) -> bool:
        return self.states[index].probing_fast(now)

    def connection_opened(self, conn: ClientConnection) -> None:
        self.connections.add(conn)
        if conn.scheme == b"https":
            self.metrics.batch.inc(self.metrics.tls_handshakes)

    def connection_closed(self, conn: ClientConnection) -> None:
        self.connections.discard(conn)

    def log_exception(self, message: str) -> None:
        self.log.exception(message)

    # -- the request path ---------------------------------------------------------------

    async def reject(self, conn: ClientSide, error: ProtocolError) -> None:
        """Answer a request PIBL refused while parsing; it never reaches a backend."""
        response = simple_response(error.status, error.reason)
        conn.write(response)
        record = AccessRecord(
            client=conn.client_ip,
            request_line="-",
            host="-",
            status=error.status,
            detail=error.reason,
        )
        record.bytes_out = body_length(response)
        record.total = time.monotonic() - record.started
        self.log.access(record)
        self.observe(record)

    def new_record(self, conn: ResponseSink, head: RequestHead) -> AccessRecord:
        """The access record of a request, with its request id (kept or made)."""
        agent = client_id = None
        # the first of each, in one pass (none when the request has neither)
        for name, value in fields_with(head, b"user-agent", b"x-request-id"):
            lname = name.lower()
            if lname == b"user-agent":
                agent = value if agent is None else agent
            elif lname == b"x-request-id":
                client_id = value if client_id is None else client_id
        record = AccessRecord(
            client=(
                self.trusted.client(conn.client_ip, head.headers)
                if self.trusted
                else conn.client_ip
            ),
            request_line=head.request_line,
            host=head.host.decode("latin-1"),
            user_agent=(agent or b"-").decode("latin-1"),
        )
        record.request_id = request_id(client_id)
        if self.verbose:
            record.request_head = head_text(head)
        return record

    def abandon(self, incoming: Incoming) -> None:
        """A request the fast path left to a coroutine that never ran (the client went
        away first): its backend connection is closed and released, the request logged."""
        exit = incoming.resume
        assert exit is not None and exit.upstream is not None
        upstream, exit.upstream = exit.upstream, None
        upstream.finish(reusable=False)
        self.pools[exit.index].release(upstream)
        record = incoming.record
        if record is not None and incoming.body is not None:
            record.detail = "client closed the connection"
            if not record.response_started:
                record.status = 499
            self.in_flight += 1  # (finish_record counts it down)
            self.finish_record(incoming, record)

    def finish_record(self, incoming: Incoming, record: AccessRecord) -> None:
        """One log line and the metrics of a finished exchange, whichever path served it."""
        self.in_flight -= 1
        assert incoming.body is not None
        record.bytes_in = incoming.body.received
        record.total = time.monotonic() - record.started
        self.log.access(record)
        self.observe(record)

    def awaits_body(self, incoming: Incoming) -> bool:
        """Whether the client connection waits for this request's body before serving it."""
        return fast.awaits_body(self, incoming)

    def start_fast(self, conn: ResponseSink, incoming: Incoming) -> ClientExchange | None:
        """The fast path's exchange for ``incoming``, or None: ``handle`` serves it."""
        return fast.start_fast(self, conn, incoming)

    async def handle(self, conn: ClientSide, incoming: Incoming) -> bool:
        """The coroutine path of a request, from its head or from where the fast path left."""
        head = incoming.head
        assert head is not None and incoming.body is not None
        self.in_flight += 1
        record = incoming.record  # set when the fast path started this request
        if record is None:
            record = incoming.record = self.new_record(conn, head)
        rid = record.request_id
        try:
            route = incoming.route = self.router.match(
                head.host, head.target, head.method, head.headers
            )
            record.route = route.name if route is not None else "-"
            record.pool = (route.pool or "-") if route is not None else "-"
            client = record.client  # behind trusted proxies, the one they name (realip)
            if self.redirect_port is not None and conn.scheme == b"http":
                keep_alive = self._redirect_to_https(conn, head, rid, record)
            elif route is None:
                keep_alive = self._answer(conn, head, rid, record, 404, "no route matches")
            elif not route.allowed(client):
                keep_alive = self._answer(conn, head, rid, record, 403, "not allowed from here")
            elif route.limit is not None and not await self._within_limit(
                conn, client, head, rid, record, route
            ):
                keep_alive = head.keep_alive and not self.stopping and head.body is BodyKind.NONE
            elif route.redirect is not None or route.respond is not None:
                keep_alive = self._route_answer(conn, head, rid, record, route)
            elif self.cache is not None and route.cache is not False:
                keep_alive = await self.cache.handle(conn, incoming, head, rid, record)
            else:
                keep_alive = await self.forward(conn, incoming, head, rid, record)
        except ProtocolError as exc:  # the client's body was bad, too large or too slow
            record.status = exc.status
            record.detail = exc.reason
            if not record.response_started:
                response = simple_response(exc.status, exc.reason, rid=rid)
                conn.write(response)
                record.bytes_out = body_length(response)
            else:
                conn.abort()
            keep_alive = False
        except UpstreamError as failure:
            record.detail = failure.reason
            if not record.response_started:
                record.status = failure.status
                self.log.error(f"{record.backend or '-'}: {failure.reason} ({head.request_line})")
                response = simple_response(
                    failure.status,
                    _ERROR_TEXT.get(failure.status, failure.reason),
                    rid=rid,
                    head_only=head.method == b"HEAD",
                    extra=[(b"Retry-After", b"1")] if failure.status == 503 else None,
                )
                conn.write(response)
                record.bytes_out = body_length(response)
            else:
                conn.abort()
            keep_alive = False
        except (ConnectionError, asyncio.CancelledError):
            record.detail = "client closed the connection"
            if not record.response_started:
                record.status = 499  # nginx's code for a client that left before its answer
            conn.abort()
            keep_alive = False
        finally:
            self.finish_record(incoming, record)
        return keep_alive

    # -- what a route answers itself ------------------------------------------------------

    def _answer(
        self,
        conn: ClientSide,
        head: RequestHead,
        rid: bytes,
        record: AccessRecord,
        status: int,
        message: str,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> bool:
        """One of PIBL's own short answers (403, 404, 429); the connection closes after it
        when the request has a body PIBL did not read."""
        keep_alive = head.keep_alive and not self.stopping and head.body is BodyKind.NONE
        response = simple_response(
            status,
            message,
            keep_alive=keep_alive,
            rid=rid,
            head_only=head.method == b"HEAD",
            extra=extra,
        )
        conn.write(response)
        record.status = status
        record.detail = message
        record.response_started = True
        record.bytes_out = body_length(response)
        return keep_alive

    async def _within_limit(
        self,
        conn: ClientSide,
        client: str,
        head: RequestHead,
        rid: bytes,
        record: AccessRecord,
        route: Route,
    ) -> bool:
        """The route's rate limit: True to go on (after any delay), False when answered 429."""
        limit = route.limit
        assert limit is not None
        if limit.key == "client":
            key = client
        elif limit.key == "route":
            key = ""
        else:
            value = get_header(head.headers, limit.key.partition(":")[2].lower().encode())
            if not value:
                return True  # as nginx: requests without the key are not counted
            key = value.decode("latin-1")
        verdict = await self.limit_check(route, key, limit)
        if not verdict.allowed:
            wait = max(1, math.ceil(verdict.retry_after))
            self._answer(
                conn,
                head,
                rid,
                record,
                429,
                "rate limit exceeded",
                extra=[(b"Retry-After", b"%d" % wait)],
            )
            return False
        if verdict.delay > 0:
            await asyncio.sleep(verdict.delay)
        return True

    async def limit_check(self, route: Route, key: str, limit: LimitConfig) -> Verdict:
        """One request against a route's bucket (the node's; the fleet's through Redis)."""
        bucket = bucket_key(route.index, key)
        remote = self.cache.remote if self.cache is not None else None
        if limit.shared == "fleet" and remote is not None:
            verdict = await remote.rate_limit(bucket, limit.rate, limit.burst, limit.delay)
            if verdict is not None:
                return verdict
            # Redis is down: the node's own buckets still hold the line
        return self.limiter.check(
            bucket, time.monotonic(), rate=limit.rate, burst=limit.burst, delay=limit.delay
        )

    def _route_answer(
        self,
        conn: ClientSide,
        head: RequestHead,
        rid: bytes,
        record: AccessRecord,
        route: Route,
    ) -> bool:
        """A route's redirect or fixed response (closing when a request body was left)."""
        keep_alive = head.keep_alive and not self.stopping and head.body is BodyKind.NONE
        if route.redirect is not None:
            status = route.redirect[0]
            body = b""
            fields = [(b"Location", route.redirect_location(head.target))]
            content_type = b"text/plain; charset=utf-8"
        else:
            assert route.respond is not None
            status, body, content_type = route.respond
            fields = []
        out = [b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b"Unknown"))]
        out.append(b"Date: %s\r\n" % http_date())
        out.extend(b"%s: %s\r\n" % f for f in fields)
        out.append(b"Content-Type: %s\r\nContent-Length: %d\r\n" % (content_type, len(body)))
        out.extend(b"%s: %s\r\n" % f for f in route.response_edits.apply([]))
        out.append(b"X-Request-ID: %s\r\n" % rid)
        out.append(
            b"Connection: keep-alive\r\n\r\n" if keep_alive else b"Connection: close\r\n\r\n"
        )
        if head.method != b"HEAD":
            out.append(body)
        conn.write(b"".join(out))
        record.status = status
        record.response_started = True
        record.bytes_out = len(body) if head.method != b"HEAD" else 0
        return keep_alive

    def observe(self, record: AccessRecord) -> None:
        """Metrics and live status for one finished exchange: added to its tally here, and
        to the metrics and the status once a second (``flush_tallies``)."""
        key = (record.status, record.backend, record.cache, record.route, record.pool)
        tally = self._tallies.get(key)
        if tally is None:
            tally = self._tallies[key] = Tally()
        tally.count += 1
        tally.totals.append(record.total)
        if record.upstream >= 0 and record.backend:
            tally.upstreams.append(record.upstream)
        tally.bytes_out += record.bytes_out
        tally.bytes_in += record.bytes_in
        tally.retries += record.retries

    def flush_tallies(self) -> None:
        """The tallied exchanges into the metrics batch and the live status (run by every
        ``Batch.flush``, and before the status is read)."""
        tallies, self._tallies = self._tallies, {}
        m = self.metrics
        batch = m.batch
        labelled = self._labelled
        for (status, backend, cache, route, pool), tally in tallies.items():
            klass = _STATUS_CLASSES[status // 100] if 0 < status < 600 else "aborted"
            count = tally.count
            batch.inc(labelled(m.requests, klass, backend), count)
            batch.observe_all(m.latency, tally.totals)
            if tally.bytes_out:
                batch.inc(m.bytes_out, tally.bytes_out)
            if tally.bytes_in:
                batch.inc(m.bytes_in, tally.bytes_in)
            if cache != "-":
                batch.inc(labelled(m.cache, cache), count)
            if tally.retries:
                batch.inc(m.retries, tally.retries)
            if tally.upstreams:
                batch.observe_all(labelled(m.upstream_latency, backend), tally.upstreams)
            self.status.record(status, backend, cache, route, tally.totals, tally.upstreams)
            if route != "-":
                batch.inc(labelled(m.route_requests, route, pool, klass), count)

    def _labelled(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once (the library's lookup costs per call)."""
        key = (metric, *labels)
        child = self._metric_children.get(key)
        if child is None:
            child = self._metric_children[key] = metric.labels(*labels)
        return child

    async def forward(
        self,
        conn: ClientSide,
        incoming: Incoming,
        head: RequestHead,
        rid: bytes,
        record: AccessRecord,
        *,
        hook: ResponseHook | None = None,
        drop: frozenset[bytes] = frozenset(),
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> bool:
        """Send the request to a backend and stream the answer; returns client keep-alive.

        A failed attempt is retried on another backend while nothing has reached the
        client, the failure is worth retrying (refused, reset, connect timeout; not a
        response timeout or a malformed response), and replaying is safe: the connection
        was never established, or the method is idempotent and the request has no body.
        """
        limit = self.body_limit(incoming)
        if limit and head.body is BodyKind.LENGTH and head.content_length > limit:
            raise ProtocolError(413, "request body too large")
        # A body already known to be malformed (it arrived with the head) is refused before
        # anything reaches a backend. Later bad chunks abort the upstream request instead.
        assert incoming.body is not None
        incoming.body.check()
        body = None
        if head.body is not BodyKind.NONE and head.upgrade is None:
            body = await self._buffer_body(conn, incoming, head, record)
        route = incoming.route
        group = self.groups[route.pool] if route is not None and route.pool else self.default_group
        if route is not None and route.mirror is not None:
            self._maybe_mirror(conn, head, rid, route, body)
        sampled = incoming.sampled
        if sampled is None:
            sampled = incoming.sampled = self.shadow is not None and self.shadow.sample(head)
        prefer = self.sticky_backend(head, group) if group.balance.sticky else None
        tried: set[int] = set()
        last_error: UpstreamError | None = None
        deadline = time.monotonic() + group.retries.budget
        never_connected = True
        # Where the fast path left this request, if it did: the backend it picked, and the
        # failure of its attempt, which is handled below as any attempt's failure is.
        resume, incoming.resume = incoming.resume, None
        while True:
            now = time.monotonic()
            index: int | None = resume.index if resume is not None else None
            if index is None:
                index = group.pick(now, tried, prefer)
            if index is not None and self.pools[index].probing and _plain(resume):
                # another request is dialling this backend to see whether it is still
                # there: this one goes elsewhere meanwhile, if there is an elsewhere
                other = group.pick(now, {*tried, index}, prefer)
                if other is not None:
                    index, resume = other, None
            if index is None and group.full(now, tried):
                await group.admit()  # every backend is at maxconn: wait in the pool's queue
                continue
            if index is None:
                if last_error is not None and not never_connected:
                    raise last_error
                raise UpstreamError(503, "no backend available", connected=False)
            state = self.states[index]
            state.active += 1
            group.begin(index)
            try:
                left, resume = resume, None
                if left is not None and left.error is not None:
                    raise left.error
                return await self._attempt(
                    conn,
                    incoming,
                    head,
                    rid,
                    record,
                    index,
                    body=body,
                    hook=hook,
                    drop=drop,
                    extra=extra,
                    left=left,
                    sampled=sampled,
                )
            except UpstreamError as exc:
                last_error = exc
                now = time.monotonic()
                # Like nginx, a failure counts against the backend only before its response
                # started: a body cut short is one URL's problem, not the server's health.
                change = None
                if not record.response_started and exc.counts:
                    change = self.record_failure(index, now, exc.failure_kind)
                self.metrics.backend_errors.labels(state.name).inc()
                if exc.failure_kind == "refused":
                    self.metrics.connect_refused.labels(state.name).inc()
                if change == "ejected":
                    self.metrics.ejections.labels(state.name).inc()
                    why = (
                        "its connection was refused"
                        if state.ejected_refused
                        else f"{state.settings.max_fails} failures"
                    )
                    self.log.warning(
                        f"backend {state.name} ejected for {state.settings.cooldown:g} s "
                        f"after {why} ({exc.reason})"
                    )
                never_connected = never_connected and exc.unreachable
                safe = not exc.connected or (
                    head.method in IDEMPOTENT and (head.body is BodyKind.NONE or body is not None)
                )
                if record.response_started or not exc.retryable or not safe:
                    raise
                tried.add(index)
                others = any(
                    group.candidate(s, now)
                    for i, s in enumerate(group.states, group.first)
                    if i not in tried
                )
                if not others and never_connected:
                    # Every candidate refused the connection: the service is unavailable.
                    raise UpstreamError(
                        503, "no backend could be reached", connected=False
                    ) from exc
                if not others or len(tried) >= group.retries.tries or now >= deadline:
                    raise
                record.retries += 1
                self.log.info(f"retrying {head.request_line} after {state.name}: {exc.reason}")
            finally:
                state.active -= 1
                if group.maxconn:
                    group.end(index)

    async def _buffer_body(
        self, conn: ClientSide, incoming: Incoming, head: RequestHead, record: AccessRecord
    ) -> bytes | None:
        """The whole request body when it fits ``limits.request_buffer``, else None.

        Like nginx's request buffering: a body that is malformed, too large or too slow is
        refused before anything reaches a backend, a slow client never holds a backend
        connection, and the request can be replayed on another backend. A body that turns
        out larger than the buffer is put back and streams.
        """
        cap = self.config.limits.request_buffer
        if not cap or (head.body is BodyKind.LENGTH and head.content_length > cap):
            return None
        assert incoming.body is not None
        if head.expect_continue and not record.continued:
            record.continued = True
            conn.write(CONTINUE)
        timeout = self.config.timeouts.client_body
        limit = self.body_limit(incoming)
        parts: list[bytes] = []
        size = 0
        while data := await incoming.body.read(timeout):
            parts.append(data)
            size += len(data)
            if limit and size > limit:
                raise ProtocolError(413, "request body too large")
            if size > cap:
                incoming.body.unread(b"".join(parts))
                return None
        return b"".join(parts)

    def _redirect_to_https(
        self, conn: ClientSide, head: RequestHead, rid: bytes, record: AccessRecord
    ) -> bool:
        """Plain HTTP answered with 308 to the same URL on the HTTPS listener."""
        assert self.redirect_port is not None
        host = head.host.rsplit(b":", 1)[0] if b"]" not in head.host[-1:] else head.host
        if not host:
            host = b"localhost"
        port = b"" if self.redirect_port == 443 else b":%d" % self.redirect_port
        location = b"https://%s%s%s" % (host, port, head.target)
        record.status = 308
        response = simple_response(
            308,
            "this site is served over HTTPS",
            keep_alive=False,
            rid=rid,
            head_only=head.method == b"HEAD",
            extra=[(b"Location", location)],
        )
        conn.write(response)
        record.bytes_out = body_length(response)
        return False

    def security_headers(self, conn: ResponseSink) -> list[tuple[bytes, bytes]]:
        if self.hsts is not None and conn.scheme == b"https":
            return [(b"Strict-Transport-Security", self.hsts)]
        return []

    def compressible(self, head: RequestHead, resp: ResponseHead) -> bool:
        """Whether the response is one PIBL compresses for a client that accepts a coding."""
        settings = self.compression
        if settings is None:
            return False
        if resp.body is BodyKind.NONE and head.method != b"HEAD":
            return False  # nothing to compress (Content-Length: 0, 204, 304)
        length = resp.content_length if resp.body is BodyKind.LENGTH else None
        return compress.compressible(resp.status, resp.headers, settings, content_length=length)

    @staticmethod
    def uncompressed(resp: ResponseHead) -> ResponseHead:
        """A compressible response sent as it is: the answer depends on Accept-Encoding."""
        resp.headers = compress.add_vary_accept_encoding(resp.headers)
        return resp

    def plan_compression(
        self, head: RequestHead, resp: ResponseHead
    ) -> tuple[ResponseHead, Compressor | None, bool]:
        """The response as the client will see it, and the compressor to get there."""
        if not self.compressible(head, resp):
            return resp, None, False
        settings = self.compression
        assert settings is not None
        encoding = compress.request_coding(
            head.method, fields_with(head, b"accept-encoding"), settings
        )
        if encoding is None:  # the answer still depends on Accept-Encoding
            return self.uncompressed(resp), None, False
        transformed = ResponseHead(
            status=resp.status,
            reason=resp.reason,
            version=resp.version,
            headers=compress.rewrite_headers(resp.headers, encoding),
            body=BodyKind.CHUNKED,
            content_length=0,
            keep_alive=resp.keep_alive,
        )
        return (
            transformed,
            compress.make_compressor(encoding, settings),
            compress.expensive(encoding, settings),
        )

    def sticky_backend(self, head: RequestHead, group: PoolGroup | None = None) -> int | None:
        name = (group or self.default_group).balance.sticky_cookie.encode()
        for key, value in head.headers:
            if key.lower() != b"cookie":
                continue
            for part in value.split(b";"):
                k, _, v = part.strip().partition(b"=")
                if k == name:
                    return self._sticky_ids.get(v)
        return None

    # -- rules both paths share (the fast path is pibl.proxy.fast) -----------------------

    def request_bytes(
        self,
        conn: ResponseSink,
        head: RequestHead,
        rid: bytes,
        index: int,
        body: bytes | None,
        drop: frozenset[bytes] = frozenset(),
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> bytes:
        """The request as backend ``index`` gets it, with the body when it was buffered."""
        request_bytes = upstream_request(
            head,
            client_ip=conn.client_ip,
            scheme=conn.scheme,
            rid=rid,
            via=self.via,
            default_host=self._default_hosts[index],
            body=head.body if body is None else BodyKind.LENGTH,
            content_length=head.content_length if body is None else len(body),
            drop=drop,
            extra=extra,
        )
        return request_bytes + body if body else request_bytes

    @staticmethod
    def replayable(head: RequestHead, body: bytes | None) -> bool:
        """Whether the request may be sent again: no body streamed, and idempotent if any."""
        has_body = head.body is not BodyKind.NONE and body is None  # a body that streams
        return not has_body and (body is None or head.method in IDEMPOTENT)

    def retry_reused(self, exc: UpstreamError, upstream: UpstreamConnection) -> bool:
        """A reused idle connection closed by the backend as it was used: try a fresh one.

        Only for a request that can be replayed, and only once; the caller checks both.
        """
        group = self._group_by_label.get(upstream.backend.label, self.default_group)
        return exc.retryable and not upstream.got_bytes and group.upstream.retry_reused

    def _suspect_pool(self, index: int, exc: UpstreamError | None = None) -> None:
        """A reused connection to backend ``index`` failed before any answer.

        Either the backend closed it while it idled (a race), or the backend is gone and
        so are its other idle connections: drop them all, and let this request try a new
        connection only while the backend is still in rotation and no other request is
        already finding out (a refused connection ejects it at once, so the other requests
        caught out by the same death go to another backend instead of dialling this one
        again). Raises to send the request elsewhere.
        """
        pool = self.pools[index]
        pool.drop_idle()
        now = time.monotonic()
        group = self.group_of[index]
        elsewhere = any(
            s.available(now) for i, s in enumerate(group.states, group.first) if i != index
        )
        if elsewhere and (pool.suspect or not self.states[index].available(now)):
            # another backend takes it; a keep-alive race is no sign of bad health
            raise UpstreamError(
                502, exc.reason if exc else "backend closed the connection", counts=False
            )
        pool.suspect = True  # (cleared by the next connection that succeeds)

    def backend_answered(
        self, index: int, head: RequestHead, resp: ResponseHead, record: AccessRecord
    ) -> None:
        """A response head arrived: the backend's health, the status to log, a bad 101."""
        record.status = resp.status
        state = self.states[index]
        if resp.status in self.group_of[index].health.fail_statuses:
            if self.record_failure(index, time.monotonic()) == "ejected":
                self.log.warning(f"backend {state.name} ejected after {resp.status} answers")
        else:
            state.record_success(time.monotonic())
        if resp.status == 101 and head.upgrade is None:
            raise UpstreamError(502, "backend switched protocols unasked", retryable=False)

    def client_extra(
        self, conn: ResponseSink, index: int, hook: ResponseHook | None = None
    ) -> list[tuple[bytes, bytes]]:
        """Headers PIBL adds to the client's response: the cache's, sticky cookie, HSTS."""
        extra = list(hook.extra or ()) if hook is not None else []
        balance = self.group_of[index].balance
        if balance.sticky:
            cookie = balance.sticky_cookie.encode()
            extra.append(
                (b"Set-Cookie", b"%s=%s; Path=/; HttpOnly" % (cookie, self._sticky_id[index]))
            )
        extra.extend(self.security_headers(conn))
        return extra

    def response_head(
        self,
        head: RequestHead,
        resp: ResponseHead,
        rid: bytes,
        record: AccessRecord,
        extra: list[tuple[bytes, bytes]],
    ) -> tuple[BodyKind, bool, bytes]:
        """How the client gets ``resp``: (body framing, keep-alive, the head's bytes)."""
        framing = _framing(head, resp)
        keep_alive = (
            head.keep_alive
            and framing is not BodyKind.CLOSE
            and head.upgrade is None
            and not self.stopping
        )
        out = client_response(
            resp,
            framing=framing,
            keep_alive=keep_alive,
            client_version=head.version,
            rid=rid,
            via=self.via,
            extra=extra,
        )
        record.response_started = True
        if self.verbose:
            record.response_head = out.decode("latin-1")
        return framing, keep_alive, out

    def response_fields(
        self,
        head: RequestHead,
        resp: ResponseHead,
        rid: bytes,
        record: AccessRecord,
        extra: list[tuple[bytes, bytes]],
    ) -> HeaderList:
        """``response_head`` for an HTTP/2 stream: the fields of its HEADERS frame."""
        framing = _framing(head, resp)
        fields = client_response_fields(resp, framing=framing, rid=rid, via=self.via, extra=extra)
        record.response_started = True
        return fields

    async def _attempt(
        self,
        conn: ClientSide,
        incoming: Incoming,
        head: RequestHead,
        rid: bytes,
        record: AccessRecord,
        index: int,
        *,
        body: bytes | None,
        hook: ResponseHook | None,
        drop: frozenset[bytes],
        extra: list[tuple[bytes, bytes]] | None,
        left: fast.Exit | None = None,
        sampled: bool = False,
    ) -> bool:
        """One try on one backend; ``body`` is the request body when it was buffered.

        ``left``: the fast path's attempt continued here, on a fresh connection (its reused
        one was closed under it) or from the response head it received.
        """
        group = self.group_of[index]
        route = incoming.route
        pool = self.pools[index]
        record.backend = self.states[index].name  # the backend's label, computed once
        up_head = route.upstream_head(head) if route is not None else head
        request_bytes = self.request_bytes(conn, up_head, rid, index, body, drop, extra)
        head_request = head.method == b"HEAD"
        has_body = head.body is not BodyKind.NONE and body is None  # a body that streams
        replayable = self.replayable(head, body)
        timeouts = route.timeouts if route is not None else None
        connect_timeout = (timeouts.upstream_connect if timeouts else None) or group.connect_timeout
        response_timeout = (
            timeouts.upstream_response if timeouts else None
        ) or group.response_timeout
        events: list[Head | Body | End | Upgrade] | None = None
        if left is not None and left.upstream is not None:
            upstream, reused, events = left.upstream, True, left.events
            upstream_started = left.started
            left.upstream = None  # taken over: released below, whatever happens
        else:
            if left is not None and left.fresh:
                # the fast path's reused connection was closed under it: as below
                self._suspect_pool(index)
            upstream, reused = await pool.acquire(
                fresh=left is not None and left.fresh, connect_timeout=connect_timeout
            )
            upstream_started = time.monotonic()
        ok = False
        released: UpstreamConnection | None = None
        pump: asyncio.Task[None] | None = None
        # 1xx answers (103 Early Hints) go on to HTTP/1.1 clients, never to HTTP/1.0 ones
        interim = functools.partial(self._interim, conn) if head.version == b"1.1" else None
        try:
            if events is None:
                upstream.start(request_bytes, head_request=head_request, on_interim=interim)
            if has_body:
                if head.expect_continue and not record.continued:
                    record.continued = True
                    conn.write(CONTINUE)
                pump = asyncio.get_running_loop().create_task(
                    self._pump_body(incoming, head, upstream)
                )
            try:
                if events is None:
                    events = await self._read(upstream, pump, response_timeout)
            except UpstreamError as exc:
                if not (reused and replayable and self.retry_reused(exc, upstream)):
                    raise
                # The idle connection was closed by the backend as we reused it: a new one,
                # unless the backend looks gone (see _suspect_pool).
                upstream.abort()
                pool.release(upstream)
                released = upstream  # (not released twice if no new one comes)
                self._suspect_pool(index, exc)
                upstream, _ = await pool.acquire(fresh=True, connect_timeout=connect_timeout)
                upstream.start(request_bytes, head_request=head_request, on_interim=interim)
                events = await self._read(upstream, pump, response_timeout)
            first = events[0]
            if not isinstance(first, Head):
                raise UpstreamError(502, "invalid response from backend", retryable=False)
            resp = first.head
            assert isinstance(resp, ResponseHead)
            record.upstream = time.monotonic() - upstream_started
            tap: Tap | None = None
            if sampled and self.shadow is not None:  # the backend's answer, as it sent it
                tap = self.shadow.tap(resp, list(resp.headers))
            if route is not None and route.response_edits is not NO_EDITS:
                resp.headers = route.response_edits.apply(resp.headers)
            self.backend_answered(index, head, resp, record)
            if resp.status == 101:
                ok = await self._tunnel(conn, incoming, upstream, resp, events, rid)
                return False
            comp: Compressor | None = None
            comp_slow = False
            if self.compression is not None and (route is None or route.compression is not False):
                resp, comp, comp_slow = self.plan_compression(head, resp)
            if hook is not None and hook.on_head(resp):
                ok = await self._discard(upstream, events, response_timeout)
                return head.keep_alive and not self.stopping and (pump is None or pump.done())
            if tap is not None:
                tap.feed(events[1:], self.shadow.rules.max_body if self.shadow else 0)
            client_extra = self.client_extra(conn, index, hook)
            try:
                keep_alive, ok = await self._respond(
                    conn,
                    head,
                    resp,
                    events,
                    upstream,
                    rid,
                    record,
                    hook,
                    client_extra,
                    comp,
                    comp_slow,
                    response_timeout,
                    tap,
                )
            except BaseException:
                if hook is not None:
                    hook.finish(False)
                raise
            if hook is not None:
                hook.finish(True)  # _respond returns only once the body ended
            if tap is not None and self.shadow is not None:
                # the client has the whole answer: ask another replica the same
                self.shadow.primary_done(
                    index,
                    tap,
                    head,
                    rid,
                    functools.partial(
                        self.request_bytes,
                        conn,
                        up_head,
                        rid,
                        body=None,
                        drop=drop,
                        extra=[*(extra or ()), (SHADOW_HEADER, b"1")],
                    ),
                )
            if pump is not None and not pump.done():
                # The backend answered before reading the whole body: stop sending it, and
                # close the client connection since the rest of its body was never read.
                pump.cancel()
                ok = False
                keep_alive = False
            elif pump is not None:
                pump.result()
            return keep_alive
        finally:
            if pump is not None and not pump.done():
                pump.cancel()
                with contextlib.suppress(BaseException):
                    await pump
            elif pump is not None and not pump.cancelled():
                pump.exception()  # seen: the error reported is the response's, if any
            if upstream is not released:
                upstream.finish(reusable=ok)
                pool.release(upstream)

    def interim_writer(self, conn: ResponseSink) -> Callable[[ResponseHead], None]:
        return functools.partial(self._interim, conn)

    @staticmethod
    def _interim(conn: ResponseSink, resp: ResponseHead) -> None:
        """A backend's interim response, forwarded as it arrives (before the final one).

        100 Continue is PIBL's own business with its client (it answers Expect itself).
        """
        if resp.status != 100:
            conn.write(interim_response(resp))

    async def _read(
        self,
        upstream: UpstreamConnection,
        pump: asyncio.Task[None] | None,
        timeout: float | None = None,
    ) -> list[Head | Body | End | Upgrade]:
        """Next response events, bounded by the upstream response timeout."""
        if timeout is None:
            timeout = self.config.timeouts.upstream_response
        try:
            if pump is None:
                return await upstream.read(timeout)
            async with asyncio.timeout(timeout):
                reader = asyncio.ensure_future(upstream.read())
                try:
                    await asyncio.wait((reader, pump), return_when=asyncio.FIRST_COMPLETED)
                    if not reader.done():
                        if pump.exception() is not None:  # the client's body failed first
                            pump.result()
                        return await reader
                    return reader.result()
                finally:
                    if not reader.done():  # timed out, or the body failed: stop reading
                        reader.cancel()
        except TimeoutError:
            raise UpstreamError(504, "backend timed out", retryable=False) from None

    async def _pump_body(
        self, incoming: Incoming, head: RequestHead, upstream: UpstreamConnection
    ) -> None:
        """Stream the request body to the backend, framed as the client framed it."""
        assert incoming.body is not None
        timeouts = self.config.timeouts
        limit = self.body_limit(incoming)
        chunked = head.body is BodyKind.CHUNKED
        sent = 0
        while True:
            data = await incoming.body.read(timeouts.client_body)
            if not data:
                break
            sent += len(data)
            if limit and sent > limit:
                raise ProtocolError(413, "request body too large")
            upstream.write(encode_chunk(data) if chunked else data)
            await upstream.drain()
        if chunked:
            upstream.write(LAST_CHUNK)

    async def _discard(
        self,
        upstream: UpstreamConnection,
        events: list[Head | Body | End | Upgrade],
        timeout: float,
    ) -> bool:
        """Read and drop a response PIBL took for itself; True if it ended cleanly."""
        budget = 1024 * 1024
        pending = events[1:]
        while True:
            for ev in pending:
                if isinstance(ev, End):
                    return True
                if isinstance(ev, Body):
                    budget -= len(ev.data)
            if budget < 0:
                return False
            try:
                async with asyncio.timeout(timeout):
                    pending = await upstream.read()
            except (TimeoutError, UpstreamError):
                return False

    async def _respond(
        self,
        conn: ClientSide,
        head: RequestHead,
        resp: ResponseHead,
        events: list[Head | Body | End | Upgrade],
        upstream: UpstreamConnection,
        rid: bytes,
        record: AccessRecord,
        hook: ResponseHook | None,
        extra_headers: list[tuple[bytes, bytes]],
        comp: Compressor | None = None,
        comp_slow: bool = False,
        timeout: float | None = None,
        tap: Tap | None = None,
    ) -> tuple[bool, bool]:
        """Stream the response to the client; returns (client keep-alive, upstream clean).

        With ``comp`` the body is compressed on the way (and the compressed bytes are what
        the cache keeps); what a batch of backend reads produced is flushed before PIBL
        waits for more, so slow streams (server-sent events) are not held back.
        """
        framing, keep_alive, out = self.response_head(head, resp, rid, record, extra_headers)
        tee = hook.tee if hook is not None else None
        send_body = head.method != b"HEAD"
        chunked = framing is BodyKind.CHUNKED and send_body
        if timeout is None:
            timeout = self.config.timeouts.upstream_response
        sent = 0
        pending = events[1:]
        loop = asyncio.get_running_loop()
        while True:
            ended = False
            parts = [out] if out else []
            out = b""
            if comp is not None:
                pending = await self._compress(loop, comp, pending, comp_slow)
            for ev in pending:
                if isinstance(ev, Body):
                    data = ev.data
                    if not data:
                        continue
                    if send_body:
                        parts.append(encode_chunk(data) if chunked else data)
                        sent += len(data)
                    if tee is not None:
                        tee.write(data)
                elif isinstance(ev, End):
                    ended = True
                    if chunked:
                        parts.append(LAST_CHUNK)
            if parts:
                conn.write(parts[0] if len(parts) == 1 else b"".join(parts))
                record.bytes_out = sent  # kept current: a response cut short logs what went
                if conn.write_paused:
                    await conn.drain()
            if ended:
                break
            try:
                pending = await upstream.read(timeout)
            except TimeoutError:
                raise UpstreamError(504, "backend timed out during the body") from None
            if tap is not None:  # a sampled request: the backend's bytes, before compression
                tap.feed(pending, self.shadow.rules.max_body if self.shadow else 0)
        record.bytes_out = sent
        if conn.closed:
            raise ConnectionResetError("client closed the connection")
        return keep_alive, resp.keep_alive

    @staticmethod
    async def _compress(
        loop: asyncio.AbstractEventLoop,
        comp: Compressor,
        events: list[Head | Body | End | Upgrade],
        slow: bool,
    ) -> list[Head | Body | End | Upgrade]:
        """The same events with the body compressed: one Body (flushed) per batch."""
        data = b"".join(ev.data for ev in events if isinstance(ev, Body))
        ended = any(isinstance(ev, End) for ev in events)

        def run() -> bytes:
            out = comp.compress(data) if data else b""
            return out + (comp.finish() if ended else comp.flush())

        out = await loop.run_in_executor(None, run) if slow else run()
        result: list[Head | Body | End | Upgrade] = [Body(out)] if out else []
        if ended:
            result.append(END)
        return result

    async def _tunnel(
        self,
        conn: ClientSide,
        incoming: Incoming,
        upstream: UpstreamConnection,
        resp: ResponseHead,
        events: list[Head | Body | End | Upgrade],
        rid: bytes,
    ) -> bool:
        """Relay an upgraded connection (WebSocket) both ways until either side closes."""
        assert conn.transport is not None and upstream.transport is not None
        conn.write(
            client_response(
                resp,
                framing=BodyKind.NONE,
                keep_alive=True,
                client_version=b"1.1",
                rid=rid,
                via=self.via,
            )
        )
        for ev in events[1:]:
            if isinstance(ev, Upgrade) and ev.data:
                conn.write(ev.data)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        upstream.start_tunnel(conn.transport, done)
        conn.start_tunnel(upstream.transport, incoming.upgrade_data or b"", done)
        if conn.closed or upstream.closed:
            done.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await done
        conn.close()
        upstream.close()
        return False

    # -- lifecycle ----------------------------------------------------------------------

    def sweep_pools(self) -> None:
        for pool in self.pools:
            pool.sweep()

    def close(self) -> None:
        self.sweep.close()
        for pool in self.pools:
            pool.close_all()
        self.metrics.batch.flush()  # the last second's traffic counts too
