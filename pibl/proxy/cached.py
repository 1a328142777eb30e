"""The cache in front of an exchange: lookup -> serve, revalidate, or fetch and store.

Read top to bottom, ``CacheLayer.handle`` is:

1. requests the cache never answers (unsafe methods, ``Range``, ``no-store``) are forwarded;
   a successful unsafe request invalidates its URI and its ``Location``/``Content-Location``;
2. look the request up (primary key, then the Vary variant);
3. a usable entry is served from memory or disk (``sendfile`` for large bodies), as a 304
   when the client's own validators match it; a stale-while-revalidate entry is served and
   refreshed in the background;
4. an entry that must be revalidated is asked for with its validators: a 304 refreshes it,
   a new response replaces it, and a failed origin (5xx, refused, timed out, no backend)
   is covered by the stale copy when staleness allows;
5. a miss waits (bounded) if another request is already fetching the same URI, so a cold
   resource reaches the backend once; otherwise it is forwarded and, when storable, teed
   into the store while it streams to the client.

Every answer on this path carries ``Cache-Status`` (RFC 9211) and hits carry ``Age``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pibl.cache import policy
from pibl.cache.key import primary_key
from pibl.cache.store import DiskStore, Entry
from pibl.config import DEFAULT_POOL, CacheConfig
from pibl.errors import UpstreamError
from pibl.http.forward import REASONS, body_length, simple_response, stored_headers
from pibl.http.framing import http_date
from pibl.http.message import (
    BodyKind,
    HeaderList,
    RequestHead,
    ResponseHead,
    fields_with,
    get_header,
)
from pibl.observe.record import AccessRecord
from pibl.proxy.exchange import ResponseHook
from pibl.proxy.filebody import FileSender, plain_socket

if TYPE_CHECKING:
    from pibl.cache.redis_tier import RedisTier
    from pibl.proxy.client import ClientSide, Incoming
    from pibl.proxy.exchange import Proxy
    from pibl.proxy.fast import ResponseSink
    from pibl.routes import Route

CONDITIONALS = frozenset(
    {b"if-none-match", b"if-modified-since", b"if-match", b"if-unmodified-since"}
)
SENDFILE_MIN = 1024 * 1024  # larger bodies go out with sendfile (checked once per process)
# After a response that may not be stored, requests for that URI are not collapsed behind one
# another for this long (Varnish's "hit-for-miss"): a private API is not serialised.
PASS_TTL = 120.0
# Reasons that come from the response itself; a HEAD, an Authorization header or a 304 to
# the client's own conditional say nothing about the next GET.
PASS_REASONS = frozenset(
    {"no-store", "private", "set-cookie", "vary *", "no freshness information", "too large"}
)
PASS_MAX = 10_000  # URIs remembered at most


def _verify_own_fd(store: DiskStore, entry: Entry, fd: int) -> bool:
    try:
        return store.verify_body(entry, fd)
    finally:
        os.close(fd)


def key_host(host: bytes, route: Route | None) -> bytes:
    """The host part of a cache key: with [pools], the pool too (as nginx's default
    proxy_cache_key has $proxy_host), so two routes of one URL to different pools never
    share entries; the default pool keeps plain keys."""
    if route is None or route.pool in (None, DEFAULT_POOL):
        return host
    return b"%s#%s" % (route.pool.encode(), host)  # "#" never appears in a Host


def _route_ttl(incoming: Incoming) -> float | None:
    """The launch-time TTL a request's route gives instead of [cache] ttl (None: that)."""
    return incoming.route.cache_ttl if incoming.route is not None else None


class _StoreHook(ResponseHook):
    """Decides, on the response head, whether to store it and how to label it."""

    def __init__(
        self,
        layer: CacheLayer,
        primary: bytes,
        head: RequestHead,
        fwd: str,
        *,
        stale: tuple[Entry, float, float] | None = None,
        ttl: float | None = None,
    ) -> None:
        self.layer = layer
        self.ttl = layer.config.ttl if ttl is None else ttl  # a route's cache_ttl, if set
        self.primary = primary
        self.head = head
        self.fwd = fwd
        self.stale = stale  # (entry, age, allowed staleness) when revalidating
        self.request_time = layer.clock()
        self.response: ResponseHead | None = None
        self.intercepted = False
        self.commit: asyncio.Future[Entry | None] | None = None
        self.event: asyncio.Event | None = None  # the followers' event, when leading

    def on_head(self, resp: ResponseHead) -> bool:
        layer = self.layer
        self.response = resp
        response_time = layer.clock()
        if self.stale is not None:
            entry, age, allowed = self.stale
            if resp.status == 304:
                self.intercepted = True
                return True
            if resp.status >= 500 and age - entry.lifetime <= allowed:
                self.intercepted = True
                return True
        cfg = layer.config
        targeted = cfg.targeted_fields
        ok, why = layer.storable(self.primary, self.head, resp, self.ttl)
        label = f"pibl; fwd={self.fwd}; fwd-status={resp.status}"
        if not ok and self.event is not None:
            layer._wake(self.primary, self.event)  # nothing to wait for: followers go now
        if ok:
            lifetime = policy.freshness_lifetime(
                resp.status, resp.headers, default_ttl=self.ttl, targeted=targeted
            )
            initial = policy.initial_age(resp.headers, self.request_time, response_time)
            self.tee = layer.store.begin(
                self.primary,
                policy.vary_names(resp.headers),
                self.head.headers,
                status=resp.status,
                reason=resp.reason or REASONS.get(resp.status, b""),
                headers=stored_headers(resp.headers),
                request_time=self.request_time,
                response_time=response_time,
                initial_age=initial,
                lifetime=lifetime,
                limit=cfg.max_entry_size,
            )
            if self.tee is not None:
                label += f"; stored; ttl={int(lifetime - initial)}"
        else:
            label += f"; detail={why.replace(' ', '-')}"
        self.extra = [(b"Cache-Status", label.encode())]
        return False

    def finish(self, complete: bool) -> None:
        tee = self.tee
        if tee is None:
            return
        if not complete:
            tee.abort()
            return
        loop = asyncio.get_running_loop()
        self.commit = loop.run_in_executor(None, tee.commit)


class CacheLayer:
    def __init__(
        self,
        proxy: Proxy,
        config: CacheConfig,
        store: DiskStore,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.proxy = proxy
        self.config = config
        self.store = store
        self.clock = clock
        self._inflight: dict[bytes, asyncio.Event] = {}
        self._refreshing: set[bytes] = set()
        self._pass: dict[bytes, float] = {}  # URI -> until when its requests are not collapsed
        self._tasks: set[asyncio.Task[None]] = set()
        self.remote: RedisTier | None = None

    async def handle(
        self,
        conn: ClientSide,
        incoming: Incoming,
        head: RequestHead,
        rid: bytes,
        record: AccessRecord,
        *,
        collapsed: bool = False,
    ) -> bool:
        host = head.host or b"-"
        primary = primary_key(conn.scheme, key_host(host, incoming.route), head.target)
        bypass = policy.bypass_reason(head.method, fields_with(head, b"cache-control"))
        if bypass is not None:
            why = b"pibl; fwd=method" if bypass == "method" else b"pibl; fwd=bypass"
            return await self._forward_uncached(conn, incoming, head, rid, record, why)
        ranged = get_header(head.headers, b"range")
        left = incoming.resume
        if left is not None and left.upstream is not None:
            # a fetch the fast path started and left at the response head to compress it:
            # the same fetch as below, from where it stands
            return await self._fetch(
                conn, incoming, head, rid, record, primary, "miss", asyncio.Event()
            )

        entry, found = self.store.lookup(primary, head.headers)
        remote = self.remote
        if entry is None and remote is not None and await remote.fetch(primary, head.headers):
            entry, found = self.store.lookup(primary, head.headers)  # hydrated from Redis
        if entry is not None and not policy.may_serve_with_authorization(
            fields_with(head, b"authorization"), entry.headers, self.config.targeted_fields
        ):
            entry, found = None, "miss"
        if entry is not None:
            age, decision = self._judge(head, entry)
            if decision.action == "fresh":
                record.cache = "HIT"
                label = self.hit_label(entry, age)
                if collapsed:
                    label += "; collapsed"
                served = await self.serve(conn, head, entry, age, rid, record, label)
                if served is not None:
                    return served
            elif decision.action == "stale":
                record.cache = "STALE"
                detail = "stale-while-revalidate" if decision.background else "max-stale"
                label = f"pibl; hit; ttl={int(entry.lifetime - age)}; detail={detail}"
                if decision.background:
                    self._refresh_in_background(conn, incoming, head, primary, entry)
                served = await self.serve(conn, head, entry, age, rid, record, label)
                if served is not None:
                    return served
            elif ranged is not None and not policy.only_if_cached(head.headers):
                # a part of a stale entry: the backend answers the range (not stored)
                return await self._forward_uncached(
                    conn, incoming, head, rid, record, b"pibl; fwd=stale; detail=range"
                )
            elif policy.only_if_cached(head.headers):
                return self._only_if_cached(conn, head, rid, record)
            else:
                return await self._revalidate(
                    conn, incoming, head, rid, record, primary, entry, age, decision
                )
        if ranged is not None and not policy.only_if_cached(head.headers):
            # A miss with Range is passed on as it is (not stored, not collapsed); the next
            # full request fills the cache, and later ranges are answered from it.
            return await self._forward_uncached(
                conn, incoming, head, rid, record, b"pibl; fwd=miss; detail=range"
            )
        if self._passing(primary) and not policy.only_if_cached(head.headers):
            # Its last response could not be stored: fetch without queueing behind others
            # (and store this one if it can be stored now).
            return await self._fetch(
                conn, incoming, head, rid, record, primary, "miss", asyncio.Event()
            )
        waiting = None if collapsed else self._inflight.get(primary)
        if waiting is not None:
            # Another request is fetching this URI: wait for it rather than stampede, then
            # decide again with what it stored.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.lock_timeout):
                    await waiting.wait()
            return await self.handle(conn, incoming, head, rid, record, collapsed=True)
        if policy.only_if_cached(head.headers):
            return self._only_if_cached(conn, head, rid, record)
        # From here this request leads for this worker: later ones wait on its event.
        event = asyncio.Event()
        self._inflight.setdefault(primary, event)  # (after a collapsed wait, one may exist)
        locked = False
        if remote is not None and not collapsed:
            # Across the fleet too: one node fetches, the others wait for it in Redis.
            try:
                got = await remote.lock(primary, int(self.config.lock_timeout * 1000))
                hydrated = got is False and await remote.wait_for(
                    primary, head.headers, self.config.lock_timeout
                )
            except BaseException:
                self._wake(primary, event)
                raise
            if hydrated:
                self._wake(primary, event)
                return await self.handle(conn, incoming, head, rid, record, collapsed=True)
            locked = got is True
        fwd = "vary-miss" if found == "vary-miss" else "miss"
        return await self._fetch(conn, incoming, head, rid, record, primary, fwd, event, locked)

    async def _forward_uncached(
        self,
        conn: ClientSide,
        incoming: Incoming,
        head: RequestHead,
        rid: bytes,
        record: AccessRecord,
        label: bytes,
    ) -> bool:
        """Forward without the cache (an unsafe method may still invalidate entries)."""
        record.cache = "BYPASS"
        hook = ResponseHook()
        hook.extra = [(b"Cache-Status", label)]
        response: list[ResponseHead] = []
        tracker = _Tracker(hook, response)
        keep = await self.proxy.forward(conn, incoming, head, rid, record, hook=tracker)
        if response and policy.invalidates(head.method, response[0].status):
            host = head.host or b"-"
            self.invalidate(
                conn.scheme, host, head.target, response[0].headers, route=incoming.route
            )
        return keep

    def fast_lookup(
        self, conn: ResponseSink, head: RequestHead, route: Route | None
    ) -> tuple[bytes, Entry | None, str] | None:
        """The start of ``handle`` for the fast path: (primary key, stored entry, how it was
        found), or None for a request that bypasses the cache. One store lookup serves both
        ``fresh_hit`` and ``fast_fetch``."""
        if policy.bypass_reason(head.method, fields_with(head, b"cache-control")) is not None:
            return None
        primary = primary_key(conn.scheme, key_host(head.host or b"-", route), head.target)
        entry, found = self.store.lookup(primary, head.headers)
        return primary, entry, found

    def fresh_hit(self, head: RequestHead, entry: Entry | None) -> float | None:
        """The entry's age when ``handle`` would serve it fresh, else None.

        Without waiting for anything: for the fast path, which serves such a hit in the
        callback the request arrived in. Bodies large enough for ``sendfile`` are left to
        ``handle``.
        """
        if entry is None or entry.body_length >= SENDFILE_MIN:
            return None
        if not policy.may_serve_with_authorization(
            fields_with(head, b"authorization"), entry.headers, self.config.targeted_fields
        ):
            return None
        age, decision = self._judge(head, entry)
        return age if decision.action == "fresh" else None

    def _judge(self, head: RequestHead, entry: Entry) -> tuple[float, policy.Decision]:
        """The entry's age now, and whether it may answer this request (RFC 9111)."""
        age = policy.current_age(entry.initial_age, entry.response_time, self.clock())
        memo = entry.directives  # parsed once per entry in memory, not at every hit
        if memo is None or memo[0] is not entry.headers:
            targeted = self.config.targeted_fields
            parsed = policy.response_cache_control(entry.headers, targeted)[0]
            memo = entry.directives = (entry.headers, parsed)
        decision = policy.usable(
            fields_with(head, b"cache-control", b"pragma"),
            entry.headers,
            lifetime=entry.lifetime,
            age=age,
            max_stale_on_error=self.config.max_stale_on_error,
            targeted=self.config.targeted_fields,
            stored=memo[1],
        )
        return age, decision

    @staticmethod
    def hit_label(entry: Entry, age: float) -> str:
        return f"pibl; hit; ttl={int(entry.lifetime - age)}"

    # -- misses -------------------------------------------------------------------------

    async def _fetch(
        self,
        conn: ClientSide,
        incoming: Incoming,
        head: RequestHead,
        rid: bytes,
        record: AccessRecord,
        primary: bytes,
        fwd: str,
        event: asyncio.Event,
        locked: bool = False,
    ) -> bool:
        """Forward a miss as the leader for ``primary`` (``event`` wakes the followers)."""
        record.cache = "MISS"
        hook = _StoreHook(self, primary, head, fwd, ttl=_route_ttl(incoming))
        hook.event = event
        try:
            return await self.proxy.forward(conn, incoming, head, rid, record, hook=hook)
        finally:
            self._release(primary, event, hook, locked)

    def storable(
        self, primary: bytes, head: RequestHead, resp: ResponseHead, ttl: float
    ) -> tuple[bool, str]:
        """Whether a fetched response may be stored, and why not; the URI's pass noted."""
        cfg = self.config
        ok, why = policy.storable(
            head.method,
            head.headers,
            resp.status,
            resp.headers,
            default_ttl=ttl,
            targeted=cfg.targeted_fields,
        )
        if ok and resp.body is BodyKind.LENGTH and resp.content_length > cfg.max_entry_size:
            ok, why = False, "too large"
        if ok or (why in PASS_REASONS and head.method == b"GET"):
            self.remember_pass(primary, not ok)  # (only what the response decided)
        return ok, why

    def fast_fetch(
        self, head: RequestHead, route: Route | None, looked: tuple[bytes, Entry | None, str]
    ) -> _StoreHook | None:
        """The store hook of a miss that ``handle`` would fetch at once, else None.

        For the fast path, which then drives the hook as ``_fetch`` does (Cache-Status at
        the head, the body teed to the store, the entry committed and the waiters woken at
        the end). That is a request with nothing stored for it, no Range and no
        ``only-if-cached``, and either a URI whose latest response could not be stored
        (Varnish's hit-for-miss: fetched without queueing) or one nobody else is fetching
        (this request leads: later ones wait for it in ``handle``). With a Redis tier a
        miss takes ``handle``, which asks the fleet first. ``looked`` is ``fast_lookup``'s.
        """
        if self.remote is not None:
            return None
        if get_header(head.headers, b"range") is not None or policy.only_if_cached(head.headers):
            return None
        primary, entry, found = looked
        if entry is not None:
            return None  # stale, or not for this request: handle() decides
        event = asyncio.Event()
        fwd = "miss"
        if not self._passing(primary):
            if primary in self._inflight:
                return None  # another request fetches it: handle() waits for that one
            self._inflight[primary] = event
            fwd = "vary-miss" if found == "vary-miss" else "miss"
        hook = _StoreHook(self, primary, head, fwd, ttl=route.cache_ttl if route else None)
        hook.event = event
        return hook

    def fetched(self, hook: _StoreHook, *, complete: bool) -> None:
        """The end of a fetch the fast path drove (``fast_fetch``), whole or not."""
        hook.finish(complete)
        assert hook.event is not None
        self._release(hook.primary, hook.event, hook)

    def remember_pass(self, primary: bytes, uncacheable: bool) -> None:
        """Note whether the URI's latest response could not be stored."""
        if not uncacheable:
            self._pass.pop(primary, None)
            return
        if len(self._pass) >= PASS_MAX:
            now = self.clock()
            self._pass = {k: v for k, v in self._pass.items() if v > now}
            while len(self._pass) >= PASS_MAX:
                del self._pass[next(iter(self._pass))]
        self._pass[primary] = self.clock() + PASS_TTL

    def _passing(self, primary: bytes) -> bool:
        until = self._pass.get(primary)
        if until is None:
            return False
        if until > self.clock():
            return True
        del self._pass[primary]
        return False

    def _wake(self, primary: bytes, event: asyncio.Event) -> None:
        if self._inflight.get(primary) is event:
            del self._inflight[primary]
        event.set()

    def _release(
        self, primary: bytes, event: asyncio.Event, hook: _StoreHook, locked: bool = False
    ) -> None:
        """Wake the waiters once the entry is visible (or there is none).

        With a Redis tier the entry is then published, and only after that the fleet-wide
        lock is released, so nodes waiting on it find the entry in Redis.
        """

        def done(fut: asyncio.Future[Entry | None] | None = None) -> None:
            self._wake(primary, event)
            if self.remote is not None:
                entry = None
                if fut is not None and not fut.cancelled() and fut.exception() is None:
                    entry = fut.result()
                self.remote.spawn(self._publish(primary, entry, locked))

        if hook.commit is not None:
            hook.commit.add_done_callback(done)
        else:
            done()

    # -- revalidation -------------------------------------------------------------------

    async def _revalidate(
        self,
        conn: ClientSide,
        incoming: Incoming,
        head: RequestHead,
        rid: bytes,
        record: AccessRecord,
        primary: bytes,
        entry: Entry,
        age: float,
        decision: policy.Decision,
    ) -> bool:
        validators = policy.validators(entry.headers)
        hook = _StoreHook(
            self,
            primary,
            head,
            "stale",
            stale=(entry, age, decision.stale_if_error),
            ttl=_route_ttl(incoming),
        )
        record.cache = "EXPIRED"
        try:
            keep = await self.proxy.forward(
                conn,
                incoming,
                head,
                rid,
                record,
                hook=hook,
                # The client's own conditionals never go along: a 304 must answer PIBL's
                # validators (with none, the request is unconditional and a 200 refreshes).
                drop=CONDITIONALS,
                extra=validators,
            )
        except UpstreamError as exc:
            if record.response_started or age - entry.lifetime > decision.stale_if_error:
                raise
            return await self._serve_stale_on_error(conn, head, entry, age, rid, record, exc.status)
        if not hook.intercepted or hook.response is None:
            return keep
        resp = hook.response
        if resp.status == 304:
            refreshed = self._refresh(entry, resp, hook.request_time, hook.ttl)
            record.cache = "REVALIDATED"
            now_age = policy.current_age(
                refreshed.initial_age, refreshed.response_time, self.clock()
            )
            label = f"pibl; fwd=stale; fwd-status=304; ttl={int(refreshed.lifetime - now_age)}"
            served = await self.serve(conn, head, refreshed, now_age, rid, record, label)
            if served is not None:
                return served and keep
            event = asyncio.Event()
            self._inflight.setdefault(primary, event)
            return await self._fetch(conn, incoming, head, rid, record, primary, "miss", event)
        return await self._serve_stale_on_error(conn, head, entry, age, rid, record, resp.status)

    def _refresh(self, entry: Entry, resp: ResponseHead, request_time: float, ttl: float) -> Entry:
        """Apply a 304 to a stored entry (RFC 9111 section 4.3.4) and persist it."""
        response_time = self.clock()
        entry.headers = policy.merge_304(entry.headers, stored_headers(resp.headers))
        entry.request_time = request_time
        entry.response_time = response_time
        entry.initial_age = policy.initial_age(resp.headers, request_time, response_time)
        entry.lifetime = policy.freshness_lifetime(
            entry.status,
            entry.headers,
            default_ttl=ttl,
            targeted=self.config.targeted_fields,
        )
        with contextlib.suppress(OSError):
            self.store.update(entry)
        return entry

    async def _serve_stale_on_error(
        self,
        conn: ClientSide,
        head: RequestHead,
        entry: Entry,
        age: float,
        rid: bytes,
        record: AccessRecord,
        status: int,
    ) -> bool:
        record.cache = "STALE"
        record.detail = f"origin answered {status}; served stale"
        ttl = int(entry.lifetime - age)
        label = f"pibl; fwd=stale; fwd-status={status}; ttl={ttl}; detail=stale-if-error"
        served = await self.serve(conn, head, entry, age, rid, record, label)
        if served is None:
            raise UpstreamError(
                status if status in (502, 503, 504) else 502, "stale entry unreadable"
            )
        return served

    def _refresh_in_background(
        self,
        conn: ClientSide,
        incoming: Incoming,
        head: RequestHead,
        primary: bytes,
        entry: Entry,
    ) -> None:
        if primary in self._refreshing:
            return
        self._refreshing.add(primary)
        task = asyncio.get_running_loop().create_task(
            self._background(conn, incoming.route, head, primary, entry)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _background(
        self,
        conn: ClientSide,
        route: Route | None,
        head: RequestHead,
        primary: bytes,
        entry: Entry,
    ) -> None:
        from pibl.proxy.client import BodyStream, ClientConnection, Incoming

        sink = ClientConnection(self.proxy, conn.scheme)  # never connected: writes go nowhere
        sink.client_ip = conn.client_ip
        bg_head = RequestHead(
            method=b"GET",
            target=head.target,
            version=b"1.1",
            headers=[(k, v) for k, v in head.headers if k.lower() not in CONDITIONALS],
            host=head.host,
        )
        body = BodyStream(sink)
        body.finish()
        record = AccessRecord(
            client=conn.client_ip,
            request_line=bg_head.request_line,
            host=head.host.decode("latin-1"),
        )
        record.cache = "UPDATING"
        age = policy.current_age(entry.initial_age, entry.response_time, self.clock())
        decision = policy.Decision("revalidate", age, entry.lifetime, stale_if_error=float("inf"))
        incoming = Incoming(bg_head, body)
        incoming.route = route  # the same pool and policies as the request that saw it stale
        try:
            await self._revalidate(
                sink, incoming, bg_head, b"-", record, primary, entry, age, decision
            )
        except Exception as exc:
            record.detail = f"background revalidation failed: {exc}"
        finally:
            self._refreshing.discard(primary)
            record.total = time.monotonic() - record.started
            self.proxy.log.access(record)

    # -- answering from the store -------------------------------------------------------

    def _only_if_cached(
        self, conn: ClientSide, head: RequestHead, rid: bytes, record: AccessRecord
    ) -> bool:
        from pibl.http.forward import body_length, simple_response

        record.cache = "MISS"
        record.status = 504
        response = simple_response(
            504,
            "not in cache (only-if-cached)",
            keep_alive=head.keep_alive,
            rid=rid,
            extra=[(b"Cache-Status", b"pibl; fwd=miss; detail=only-if-cached")],
        )
        conn.write(response)
        record.bytes_out = body_length(response)
        return head.keep_alive

    def hit_response(
        self,
        conn: ResponseSink,
        head: RequestHead,
        entry: Entry,
        age: float,
        rid: bytes,
        record: AccessRecord,
        label: str,
    ) -> tuple[list[bytes], bool, bool, bytes | None, int, int] | None:
        """The head of a hit (a list of lines), keep-alive, whether a body follows, the
        body itself unless it goes out with ``sendfile``, and the part of the stored body
        it is (first byte, length: a 206 sends a range); None if it is unreadable."""
        store = self.store
        keep_alive = head.keep_alive and not self.proxy.stopping
        # RFC 9110 section 13.2.1: preconditions apply to 2xx answers only (a stored 404
        # is sent as it is, whatever If-None-Match says).
        # a Range of a stored complete 200 (RFC 9110 section 14): one part, or 416
        part = None  # (Range is defined for GET only: a HEAD gets the whole head)
        if (
            entry.status == 200
            and head.method == b"GET"
            and policy.if_range_matches(fields_with(head, b"if-range"), entry.headers)
        ):
            part = policy.byte_range(
                get_header(fields_with(head, b"range"), b"range"), entry.body_length
            )
        first, length = 0, entry.body_length
        conditionals = fields_with(head, b"if-none-match", b"if-modified-since")
        if 200 <= entry.status < 300 and policy.not_modified(conditionals, entry.headers):
            status, reason = 304, b"Not Modified"
            headers = policy.not_modified_headers(entry.headers)
            send_body = False
            body: bytes | None = b""
        elif part == policy.UNSATISFIABLE:
            answer = self._unsatisfiable(head, entry, keep_alive, rid, record, label)
            return [answer], keep_alive, False, None, 0, 0
        else:
            status, reason = entry.status, entry.reason or REASONS.get(entry.status, b"OK")
            headers = entry.headers
            if part is not None:
                status, reason = 206, b"Partial Content"
                first, length = part[0], part[1] - part[0] + 1
            send_body = head.method != b"HEAD" and entry.status not in (204, 304)
            body = None
            if send_body and entry.body_length < SENDFILE_MIN:
                body = store.read_body(entry)
                if body is None:
                    return None
                body = body[first : first + length] if part is not None else body
        if status == entry.status:  # the whole stored response: its head is made once
            memo = entry.head
            if memo is None or memo[0] is not entry.headers:
                memo = entry.head = (entry.headers, *_stored_head(entry, status, reason, length))
            out = [memo[1]]
            if not memo[2]:
                out.append(b"Date: %s\r\n" % http_date())
        else:
            fixed, has_date = _stored_head(entry, status, reason, length, headers, first)
            out = [fixed]
            if not has_date:
                out.append(b"Date: %s\r\n" % http_date())
        out.append(b"Age: %d\r\n" % max(0, int(age)))
        out.append(b"Cache-Status: %s\r\n" % label.encode())
        for name, value in self.proxy.security_headers(conn):
            out.append(b"%s: %s\r\n" % (name, value))
        out.append(b"Via: 1.1 %s\r\nX-Request-ID: %s\r\n" % (self.proxy.via, rid))
        if not keep_alive:
            out.append(b"Connection: close\r\n")
        elif head.version == b"1.0":
            out.append(b"Connection: keep-alive\r\n")
        out.append(b"\r\n")
        record.status = status
        record.response_started = True
        if self.proxy.verbose:
            record.response_head = b"".join(out).decode("latin-1")
        store.stats.hits += 1
        return out, keep_alive, send_body, body, first, length

    async def serve(
        self,
        conn: ClientSide,
        head: RequestHead,
        entry: Entry,
        age: float,
        rid: bytes,
        record: AccessRecord,
        label: str,
    ) -> bool | None:
        """Answer from a stored entry; None if its body turned out unreadable (a miss)."""
        hit = self.hit_response(conn, head, entry, age, rid, record, label)
        if hit is None:
            return None
        out, keep_alive, send_body, body, first, length = hit
        store = self.store
        if not send_body:
            conn.write(b"".join(out))
            return keep_alive
        if body is not None:
            out.append(body)
            conn.write(b"".join(out))
            record.bytes_out = len(body)
            if conn.write_paused:
                await conn.drain()
            return keep_alive
        # A large body: opened before the head is written (a replaced or removed entry is
        # then sent whole from the open file, or is a miss), checked once per process, then
        # copied by the kernel (see filebody).
        fd = store.open_body(entry)
        if fd is None:
            record.response_started = False
            return None
        try:
            # the thread checks its own descriptor: if the client leaves meanwhile, this one
            # is closed below while the thread may still be reading
            if not store.verified(entry) and not await asyncio.get_running_loop().run_in_executor(
                None, _verify_own_fd, store, entry, os.dup(fd)
            ):
                record.response_started = False
                return None
            # Cork the socket so the head leaves in the same segment as the first body bytes
            # (nginx's tcp_nopush); a lone small head segment can wait for a delayed ACK.
            # (An HTTP/2 stream has no transport of its own: its bytes are framed.)
            sock = plain_socket(conn.transport) if conn.transport is not None else None
            corked = _cork(sock, True)
            sender = FileSender(conn, fd, length, first)
            try:
                conn.write(b"".join(out))
                await sender.run()
            finally:
                record.bytes_out = sender.sent
                if corked:
                    _cork(sock, False)
        finally:
            os.close(fd)
        if conn.write_paused:
            await conn.drain()
        return keep_alive

    def _unsatisfiable(
        self,
        head: RequestHead,
        entry: Entry,
        keep_alive: bool,
        rid: bytes,
        record: AccessRecord,
        label: str,
    ) -> bytes:
        """416 for a range that starts past the stored body (section 15.5.17)."""
        record.status = 416
        record.response_started = True
        extra = [
            (b"Content-Range", b"bytes */%d" % entry.body_length),
            (b"Cache-Status", label.encode()),
        ]
        etag = get_header(entry.headers, b"etag")
        if etag is not None:
            extra.append((b"ETag", etag))
        head_only = head.method == b"HEAD"
        answer = simple_response(
            416,
            f"bytes 0-{entry.body_length - 1} exist",
            keep_alive=keep_alive,
            rid=rid,
            head_only=head_only,
            extra=extra,
        )
        record.bytes_out = 0 if head_only else body_length(answer)
        return answer

    # -- invalidation -------------------------------------------------------------------

    async def _publish(self, primary: bytes, entry: Entry | None, locked: bool) -> None:
        assert self.remote is not None
        try:
            if entry is not None:
                await self.remote.push(primary, entry)
        finally:
            if locked:
                await self.remote.unlock(primary)

    def invalidate(
        self,
        scheme: bytes,
        host: bytes,
        target: bytes,
        response_headers: list[tuple[bytes, bytes]],
        *,
        route: Route | None = None,
    ) -> None:
        stored = key_host(host, route)
        keys = [primary_key(scheme, stored, target)]
        keys += [
            primary_key(scheme, stored, p)
            for p in policy.invalidated_targets(host, response_headers)
        ]
        for key in keys:
            self.store.invalidate(key)
            if self.remote is not None:  # every node drops its copy too
                self.remote.spawn(self.remote.purge(key))

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()


def _cork(sock: Any, on: bool) -> bool:
    """Set TCP_CORK on the transport's TCP socket; False where it does not apply."""
    if sock is None or not hasattr(socket, "TCP_CORK") or not hasattr(sock, "setsockopt"):
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1 if on else 0)
    except OSError:
        return False
    return True


class _Tracker(ResponseHook):
    """Remembers the response head of a bypassed request (for invalidation)."""

    def __init__(self, inner: ResponseHook, sink: list[ResponseHead]) -> None:
        self.extra = inner.extra
        self._sink = sink

    def on_head(self, resp: ResponseHead) -> bool:
        self._sink.append(resp)
        return False


def _stored_head(
    entry: Entry,
    status: int,
    reason: bytes,
    length: int,
    headers: HeaderList | None = None,
    first: int = 0,
) -> tuple[bytes, bool]:
    """The part of a hit's head that depends on the entry only (status line, the stored
    fields, framing), and whether it has a Date; ``headers`` replaces the stored fields
    (a 304 sends a subset), ``first`` starts a 206's range."""
    if headers is None:
        headers = entry.headers
    out = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
    has_date = False
    for name, value in headers:
        if name.lower() == b"date":
            has_date = True
        out.append(b"%s: %s\r\n" % (name, value))
    if status != 304 and entry.status not in (204, 304):
        out.append(b"Content-Length: %d\r\n" % length)
    if status == 206:
        out.append(
            b"Content-Range: bytes %d-%d/%d\r\n" % (first, first + length - 1, entry.body_length)
        )
    if entry.status == 200 and get_header(headers, b"accept-ranges") is None:
        out.append(b"Accept-Ranges: bytes\r\n")
    return b"".join(out), has_date
