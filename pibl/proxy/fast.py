"""The fast path: the common exchange, run in protocol callbacks from head to log line.

Most requests a reverse proxy sees need no coroutine: the head arrives in the client's
``data_received``, an idle keep-alive connection to the chosen backend is in the pool, and
the response arrives in that connection's ``data_received``. Waking a coroutine through a
Future at each step costs more than the work itself, so this module serves such an exchange
with callbacks only: no Task and no Future per request.

Which requests (``start_fast``; every rule it applies lives in ``Proxy`` and is shared with
the coroutine path, so nothing is decided twice):

* the fast path is on (``[upstream] fast_path``) and the listener does not redirect to
  HTTPS;
* no upgrade, no ``Expect: 100-continue``, no body or a small one that has fully arrived
  (the client connection waits for a small one still arriving: ``awaits_body``);
* the balancer's pick has an idle pooled connection;
* with the response cache on: a fresh hit whose body is in memory or small
  (``serve_hit``, answered at once), or a miss the cache would fetch at once
  (``CacheLayer.fast_fetch``: nothing stored, no Range, and the URI either in hit-for-miss
  or fetched by nobody else), forwarded with the cache's own store hook, which labels the
  response, tees its body to the store and commits it at the end. Misses that must wait for
  another request's fetch or ask a Redis tier, stale entries and large bodies leave
  (``cache miss``) for ``CacheLayer.handle``.

A response PIBL compresses (the client accepts a coding it offers, the response is
compressible) leaves at its head: the coroutine path takes the connection over and streams
the rest through the compressor.

An exchange goes through these states, one method per event, in the order they happen:

    AWAITING_HEAD --on_backend_head--> STREAMING --on_backend_end--> DONE
          |                                |
          +------ on_error / on_timeout ---+--> left to the coroutine path
          +------ on_client_lost ----------+--> DONE (logged 499 or cut short)

``on_client_drain`` resumes reading the backend after a slow client's buffer drained
(the backend is paused while the client's transport is).

Leaving the fast path is ``_leave(reason, ...)``: the request's ``Incoming`` keeps its access
record and gets an ``Exit`` naming the backend already picked and, for a failure, the
error; ``Proxy.forward`` starts from there on the coroutine path, which retries, answers
502/503/504 or aborts a response cut short exactly as it does for its own attempts. The
reasons are counted by name in ``Proxy.fast_exits``: before the exchange starts ``needs a
connection``, ``body to stream``, ``upgrade``, ``no backend``, ``cache miss``,
``consistency sample`` (compared against another replica, ``[consistency] sample``); after,
``compression`` (at the response head), ``retry`` (the reused connection was closed by the
backend as it was used: one fresh connection, as on the coroutine path) and ``failure``.

The exchange talks to its client through ``ResponseSink``, not to a transport, so another
kind of client stream (an HTTP/2 stream, say) can be served by the same object.
"""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING, Protocol, cast

from pibl import compress
from pibl.errors import UpstreamError
from pibl.http.framing import LAST_CHUNK, encode_chunk
from pibl.http.message import BodyKind, RequestHead, ResponseHead, fields_with
from pibl.http.parse import Body, End, Event, Head

if TYPE_CHECKING:
    from pibl.cache.store import Entry
    from pibl.observe.record import AccessRecord
    from pibl.proxy.cached import _StoreHook
    from pibl.proxy.client import Incoming
    from pibl.proxy.exchange import Proxy
    from pibl.proxy.h2 import H2Stream
    from pibl.proxy.upstream import Pool, UpstreamConnection


_NONE_TRIED: frozenset[int] = frozenset()  # no backend tried yet


class ResponseSink(Protocol):
    """The client side of an exchange, as the fast path uses it."""

    client_ip: str
    scheme: bytes

    @property
    def closed(self) -> bool: ...

    @property
    def write_paused(self) -> bool: ...

    def write(self, data: bytes) -> None: ...

    def abort(self) -> None: ...

    def exchange_done(self, keep_alive: bool) -> None: ...

    def exchange_exit(self) -> None: ...


class ClientExchange(Protocol):
    """A fast-path exchange as the client connection sees it."""

    finished: bool  # answered already, in the call that started it (a cache hit)
    keep_alive: bool  # (once finished) whether the client connection goes on

    def on_client_drain(self) -> None: ...

    def on_client_lost(self) -> None: ...


class Exit:
    """Where a request left the fast path: what the coroutine path starts from."""

    __slots__ = ("error", "events", "fresh", "index", "reason", "started", "upstream")

    def __init__(
        self,
        reason: str,
        index: int,
        error: UpstreamError | None = None,
        *,
        fresh: bool = False,
        upstream: UpstreamConnection | None = None,
        events: list[Event] | None = None,
        started: float = 0.0,
    ) -> None:
        self.reason = reason
        self.index = index  # the backend already picked (the pick is not made twice)
        self.error = error  # the attempt's failure, handled as the coroutine path's own
        self.fresh = fresh  # try again on a new connection to the same backend
        # Left at the response head: the connection it came on, the events from the head
        # on, and when the request was sent. The coroutine path takes the attempt over.
        self.upstream = upstream
        self.events = events
        self.started = started

    def __repr__(self) -> str:
        return f"<Exit {self.reason} backend={self.index} error={self.error}>"


class State(enum.Enum):
    AWAITING_HEAD = "awaiting response head"
    STREAMING = "streaming body"
    DONE = "done"


def awaits_body(proxy: Proxy, incoming: Incoming) -> bool:
    """A small body declared by Content-Length, still arriving: wait for it, then start.

    The coroutine path reads such a body whole before it picks a backend (up to
    ``limits.request_buffer``), so waiting for it in the client connection changes nothing
    but where the wait happens; a body that stalls for ``timeouts.client_body`` gets the
    coroutine path's 408. Not with 100-continue (the client waits for PIBL), nor for a
    length over ``max_body_bytes`` (413 at once), nor when the cache is on (a hit does not
    read the body).
    """
    head = incoming.head
    body = incoming.body
    if head is None or body is None or head.body is not BodyKind.LENGTH:
        return False
    if not proxy.fast_path or proxy.cache is not None or head.expect_continue:
        return False
    limits = proxy.config.limits
    if head.content_length > limits.request_buffer:
        return False
    if limits.max_body_bytes and head.content_length > limits.max_body_bytes:
        return False
    return body.arriving


def start_fast(proxy: Proxy, sink: ResponseSink, incoming: Incoming) -> ClientExchange | None:
    """Serve ``incoming`` on the fast path, or return None for the coroutine path."""
    head = incoming.head
    assert head is not None and incoming.body is not None
    if not proxy.fast_path:
        return None  # decided by the configuration: every request takes the coroutine path
    exits = proxy.fast_exits
    if head.upgrade is not None:
        exits["upgrade"] += 1
        return None
    # The route decides the pool; a route with a policy of its own (access rules, limits,
    # redirects, rewrites, mirroring, ...) is served by the coroutine path, which applies it.
    route = incoming.route = proxy.router.match(head.host, head.target, head.method, head.headers)
    if route is None or not route.plain:
        exits["route policy"] += 1
        return None
    group = proxy.groups[route.pool] if route.pool else proxy.default_group
    if group.maxconn:
        exits["route policy"] += 1  # admission queues live on the coroutine path
        return None
    fetch: _StoreHook | None = None
    looked = None  # (primary key, stored entry, how found): one store lookup for both uses
    cache = proxy.cache if route.cache is not False else None
    if cache is not None:
        if head.body is not BodyKind.NONE:
            exits["body to stream"] += 1
            return None
        looked = cache.fast_lookup(sink, head, route)
        if looked is None:  # (a method or no-store that bypasses the cache)
            exits["cache miss"] += 1
            return None
        hit = serve_hit(proxy, sink, incoming, head, looked[1])
        if hit is not None:
            return hit  # (a hit asks no backend: nothing to compare)
    shadow = proxy.shadow
    if shadow is not None:
        # [consistency] sample: a sampled request (1 in 100, say) is compared against
        # another replica; the coroutine path collects its answer for that
        sampled = incoming.sampled = shadow.sample(head)
        if sampled:
            exits["consistency sample"] += 1
            return None
    if cache is not None and looked is not None:
        fetch = cache.fast_fetch(head, route, looked)
        if fetch is None:
            exits["cache miss"] += 1
            return None
    body: bytes | None = None
    if head.body is not BodyKind.NONE:
        limit = proxy.config.limits.max_body_bytes
        if head.expect_continue or (body := incoming.body.complete()) is None:
            exits["body to stream"] += 1
            return None
        if len(body) > proxy.config.limits.request_buffer or (limit and len(body) > limit):
            exits["body to stream"] += 1
            return None
    # A client that accepts a coding PIBL offers leaves at the response head if that is
    # compressible; the others get every response as it is.
    settings = proxy.compression
    coding = None
    if settings is not None:
        coding = compress.request_coding(
            head.method, fields_with(head, b"accept-encoding"), settings
        )
    prefer = proxy.sticky_backend(head, group) if group.balance.sticky else None
    index = group.pick(time.monotonic(), _NONE_TRIED, prefer)
    pool = proxy.pools[index] if index is not None else None
    upstream = pool.take_idle() if pool is not None else None
    if index is None or pool is None or upstream is None:
        if fetch is not None:  # handle() fetches it, from the start
            assert proxy.cache is not None
            proxy.cache.fetched(fetch, complete=False)
        if index is None:
            exits["no backend"] += 1
        else:
            exits["needs a connection"] += 1
            incoming.resume = Exit("needs a connection", index)
        return None
    record = incoming.record = proxy.new_record(sink, head)
    record.route, record.pool = route.name, group.name
    exchange = FastExchange(proxy, sink, incoming, head, record, index, pool, upstream, coding)
    if fetch is not None:
        exchange.fetch = fetch
        record.cache = "MISS"
    exchange.start(proxy.request_bytes(sink, head, record.request_id, index, body), body)
    return exchange


def serve_hit(
    proxy: Proxy, sink: ResponseSink, incoming: Incoming, head: RequestHead, entry: Entry | None
) -> HitExchange | None:
    """Answer a fresh cache hit at once (body in memory or small), or None for ``handle``.

    The decisions are the cache layer's (``fresh_hit``, ``hit_response``); what is left
    here is writing the answer, and waiting for a slow client to drain it before the next
    request, as ``CacheLayer.serve`` does.
    """
    cache = proxy.cache
    assert cache is not None
    age = cache.fresh_hit(head, entry)
    if age is None or entry is None:
        return None
    record = incoming.record = proxy.new_record(sink, head)
    if incoming.route is not None:
        record.route, record.pool = incoming.route.name, incoming.route.pool or "-"
    record.cache = "HIT"
    label = cache.hit_label(entry, age)
    response = cache.hit_response(sink, head, entry, age, record.request_id, record, label)
    if response is None:  # the stored body is unreadable: handle() answers as for a miss
        return None
    proxy.in_flight += 1
    out, keep_alive, send_body, body, _, _ = response
    if send_body:
        assert body is not None
        out.append(body)
        record.bytes_out = len(body)
    sink.write(b"".join(out))
    exchange = HitExchange(proxy, sink, incoming, record, keep_alive)
    if not (send_body and sink.write_paused):
        exchange.finish()
    return exchange


class HitExchange:
    """A cache hit answered on the fast path; it waits only for a slow client to drain."""

    __slots__ = ("finished", "incoming", "keep_alive", "proxy", "record", "sink")

    def __init__(
        self,
        proxy: Proxy,
        sink: ResponseSink,
        incoming: Incoming,
        record: AccessRecord,
        keep_alive: bool,
    ) -> None:
        self.proxy = proxy
        self.sink = sink
        self.incoming = incoming
        self.record = record
        self.keep_alive = keep_alive
        self.finished = False

    def finish(self) -> None:
        self.finished = True
        self.proxy.fast_served += 1
        self.proxy.finish_record(self.incoming, self.record)

    def on_client_drain(self) -> None:
        """The answer left PIBL's buffer: the next request may be served."""
        if not self.finished:
            self.finish()
            self.sink.exchange_done(self.keep_alive)

    def on_client_lost(self) -> None:
        if not self.finished:
            self.finished = True
            self.record.detail = "client closed the connection"
            self.proxy.finish_record(self.incoming, self.record)


class FastExchange:
    """One request on the fast path: its state and one method per event."""

    __slots__ = (
        "_chunked",
        "_coding",
        "_paused",
        "_sent",
        "_started",
        "_timeout",
        "fetch",
        "finished",
        "head",
        "incoming",
        "index",
        "keep_alive",
        "pool",
        "proxy",
        "record",
        "replayable",
        "resp",
        "send_body",
        "sink",
        "state",
        "upstream",
    )

    def __init__(
        self,
        proxy: Proxy,
        sink: ResponseSink,
        incoming: Incoming,
        head: RequestHead,
        record: AccessRecord,
        index: int,
        pool: Pool,
        upstream: UpstreamConnection,
        coding: str | None,
    ) -> None:
        self.proxy = proxy
        self.sink = sink
        self.incoming = incoming
        self.head = head
        self.record = record
        self.index = index
        self.pool = pool
        self.upstream = upstream
        self.state = State.AWAITING_HEAD
        self.resp: ResponseHead | None = None
        self.send_body = head.method != b"HEAD"
        self.replayable = True
        self._coding = coding  # the content coding the client would get, if any
        self._chunked = False
        self.finished = False  # answered in later callbacks (exchange_done)
        self.keep_alive = False
        self._sent = 0
        self._paused = False
        self._started = 0.0
        self._timeout = proxy.group_of[index].response_timeout
        self.fetch: _StoreHook | None = None  # a cache miss: the cache's store hook

    def __repr__(self) -> str:
        return f"<FastExchange {self.head.request_line!r} {self.state.value}>"

    # -- the events, in the order they happen --------------------------------------------

    def start(self, request: bytes, body: bytes | None) -> None:
        """Send the request on the pooled connection; the response comes to ``on_backend_*``."""
        proxy = self.proxy
        proxy.in_flight += 1
        proxy.states[self.index].active += 1
        self.record.backend = proxy.states[self.index].name
        self.replayable = proxy.replayable(self.head, body)
        upstream = self.upstream
        upstream.sink = self
        # 1xx answers (103 Early Hints) go on to HTTP/1.1 clients, never to HTTP/1.0 ones
        interim = proxy.interim_writer(self.sink) if self.head.version == b"1.1" else None
        upstream.start(request, head_request=not self.send_body, on_interim=interim)
        self._started = time.monotonic()
        upstream.response_timer.set(self._timeout)

    def on_backend_events(self, events: list[Event]) -> None:
        """What one read from the backend produced (``UpstreamConnection.data_received``)."""
        if self.state is State.DONE:
            return
        parts: list[bytes] = []
        try:
            for i, ev in enumerate(events):
                if self.state is State.AWAITING_HEAD:
                    if not isinstance(ev, Head):
                        raise UpstreamError(502, "invalid response from backend", retryable=False)
                    assert isinstance(ev.head, ResponseHead)
                    if ev.head.body is BodyKind.CLOSE:
                        self.upstream.close_delimited = True
                    compressible = self.proxy.compressible(self.head, ev.head)
                    if compressible and self._coding:
                        self._leave_at_head(events[i:])
                        return
                    out = self.on_backend_head(ev.head, compressible)
                    if out:
                        parts.append(out)
                elif isinstance(ev, Body):
                    self.on_backend_body(ev.data, parts)
                elif isinstance(ev, End):
                    self.on_backend_end(parts)
                    return
        except UpstreamError as exc:  # raised before anything was written (parts is empty)
            self.on_error(exc)
            return
        except Exception:  # a bug: handled like the coroutine path's, never a hang
            self.proxy.log_exception("error in a fast-path exchange")
            self.sink.abort()
            self.on_error(UpstreamError(502, "internal error", retryable=False))
            return
        if parts:
            self._write(parts)
        if not self._paused:
            self.upstream.response_timer.set(self._timeout)  # between two reads, as nginx

    def on_backend_head(self, resp: ResponseHead, compressible: bool) -> bytes:
        """The response head: health, status, the head the client gets (returned, as bytes
        for HTTP/1.1; an HTTP/2 stream is handed its fields and b"" is returned)."""
        proxy = self.proxy
        record = self.record
        record.upstream = time.monotonic() - self._started
        proxy.backend_answered(self.index, self.head, resp, record)
        if compressible:  # for a client that accepts no coding PIBL offers
            resp = proxy.uncompressed(resp)
        fetch = self.fetch
        if fetch is not None:
            fetch.on_head(resp)  # stored or not, and the Cache-Status that says so
        extra = proxy.client_extra(self.sink, self.index, fetch)
        self.resp = resp
        self.state = State.STREAMING
        if self.head.http2 and not proxy.verbose:
            # an HTTP/2 stream takes the head as fields and the body unframed (the verbose
            # log, which keeps the head as sent, gets it through the HTTP/1.1 bytes)
            fields = proxy.response_fields(self.head, resp, record.request_id, record, extra)
            cast("H2Stream", self.sink).head_fields(fields)
            self.keep_alive = True
            return b""
        framing, self.keep_alive, out = proxy.response_head(
            self.head, resp, record.request_id, record, extra
        )
        self._chunked = framing is BodyKind.CHUNKED and self.send_body
        return out

    def on_backend_body(self, data: bytes, parts: list[bytes]) -> None:
        if data and self.send_body:
            parts.append(encode_chunk(data) if self._chunked else data)
            self._sent += len(data)
            if self.fetch is not None and self.fetch.tee is not None:
                self.fetch.tee.write(data)

    def on_backend_end(self, parts: list[bytes]) -> None:
        """The response ended cleanly: the client has it all, the connection goes back."""
        self.state = State.DONE
        if self._chunked:
            parts.append(LAST_CHUNK)
        if parts:
            self._write(parts)
        assert self.resp is not None
        self._end_fetch(complete=True)
        self._finish(reusable=self.resp.keep_alive)
        self.proxy.fast_served += 1
        self.sink.exchange_done(self.keep_alive)

    def on_client_drain(self) -> None:
        """The slow client's buffer drained: read the backend again."""
        if self._paused and self.state is not State.DONE:
            self._paused = False
            self.upstream.response_timer.set(self._timeout)
            self.upstream.resume()

    def on_timeout(self) -> None:
        """The backend was silent for ``upstream_response`` seconds (not while paused)."""
        if self.state is State.DONE:
            return
        if self.state is State.AWAITING_HEAD:
            self.on_error(UpstreamError(504, "backend timed out", retryable=False))
        else:
            self.on_error(UpstreamError(504, "backend timed out during the body"))

    def on_backend_error(self, error: UpstreamError) -> None:
        """The backend closed, reset or sent something malformed."""
        if self.state is not State.DONE:
            self.on_error(error)

    def on_error(self, error: UpstreamError) -> None:
        """A failed attempt leaves for the coroutine path, which handles failures."""
        if (
            self.state is State.AWAITING_HEAD
            and self.replayable
            and self.proxy.retry_reused(error, self.upstream)
        ):
            self.upstream.abort()
            self._leave("retry", error=None, fresh=True)
        else:
            self._leave("failure", error=error)

    def on_client_lost(self) -> None:
        """The client went away (not a half-close): stop, as the coroutine path does."""
        if self.state is State.DONE:
            return
        record = self.record
        record.detail = "client closed the connection"
        if not record.response_started:
            record.status = 499  # nginx's code for a client that left before its answer
        self._end_fetch(complete=False)
        self._finish(reusable=False)

    # -- internals ------------------------------------------------------------------------

    def _write(self, parts: list[bytes]) -> None:
        sink = self.sink
        sink.write(parts[0] if len(parts) == 1 else b"".join(parts))
        self.record.bytes_out = self._sent  # kept current: a response cut short logs what went
        if sink.write_paused and not self._paused and self.state is not State.DONE:
            self._paused = True  # the client reads slowly: so does PIBL from the backend
            self.upstream.response_timer.clear()
            self.upstream.pause()

    def _release(self, *, reusable: bool) -> None:
        self.state = State.DONE
        upstream = self.upstream
        upstream.finish(reusable=reusable)
        self.pool.release(upstream)
        self.proxy.states[self.index].active -= 1

    def _finish(self, *, reusable: bool) -> None:
        self._release(reusable=reusable)
        self.proxy.finish_record(self.incoming, self.record)

    def _leave(self, reason: str, *, error: UpstreamError | None, fresh: bool = False) -> None:
        """Leave after a failed attempt: the coroutine path handles it as its own."""
        self._release(reusable=False)
        self._hand_over(Exit(reason, self.index, error, fresh=fresh))

    def _leave_at_head(self, events: list[Event]) -> None:
        """Leave with the response head received: the coroutine path streams the rest."""
        self.state = State.DONE
        upstream = self.upstream
        upstream.response_timer.clear()
        upstream.sink = None  # later reads queue up for ``UpstreamConnection.read``
        self.proxy.states[self.index].active -= 1
        exit = Exit(
            "compression", self.index, upstream=upstream, events=events, started=self._started
        )
        self._hand_over(exit)

    def _end_fetch(self, *, complete: bool) -> None:
        """A cache miss's entry committed (or dropped) and its waiters woken."""
        fetch, self.fetch = self.fetch, None
        if fetch is not None:
            assert self.proxy.cache is not None
            self.proxy.cache.fetched(fetch, complete=complete)

    def _hand_over(self, exit: Exit) -> None:
        self._end_fetch(complete=False)  # the coroutine path fetches it again, as its own
        self.proxy.in_flight -= 1  # counted again by Proxy.handle
        self.proxy.fast_exits[exit.reason] += 1
        self.incoming.resume = exit
        self.sink.exchange_exit()
