"""One client connection: parsing, keep-alive, pipelining order, timeouts, backpressure.

The protocol object only moves bytes and keeps order; what happens to a request is decided
in ``pibl.proxy.exchange``. State is grouped as:

* connection: transport, peer, parser, timers, write flow control;
* requests: a FIFO of ``Incoming`` requests. Pipelined requests are parsed as they arrive
  and queued, and served head to tail, one at a time, so responses leave in request order.
  Reading pauses when too many requests wait or when a request body outpaces the backend.

Two speeds serve the queue head (``_dispatch``): the fast path (``pibl.proxy.fast``) runs
the common exchange in protocol callbacks and reports back with ``exchange_done``; anything
else, or a fast exchange that leaves its path (``exchange_exit``), is served by one task
running the coroutine path, ``Proxy.handle``, until the queue is empty.

Timers: ``client_header`` runs from the first byte of a request to the end of its head (a
slowloris gets 408), ``client_idle`` between requests on a kept-alive connection (closed
silently, like nginx).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections import deque
from typing import TYPE_CHECKING, Protocol, cast

from pibl.errors import ProtocolError
from pibl.http.message import RequestHead
from pibl.http.parse import Body, End, Head, RequestParser, Upgrade
from pibl.proxy.fast import ResponseSink
from pibl.proxy.flow import Deadline, WriteFlow
from pibl.routes import Route

if TYPE_CHECKING:
    from pibl.observe.record import AccessRecord
    from pibl.proxy.exchange import Proxy
    from pibl.proxy.fast import ClientExchange, Exit

BODY_HIGH = 256 * 1024  # buffered request body bytes before reading pauses


class ClientSide(ResponseSink, Protocol):
    """A client connection, or one HTTP/2 stream (``pibl.proxy.h2.H2Stream``), as the
    coroutine path uses it. Both are passed where this type is named; a protocol says so
    honestly (the compiled build checks a parameter typed ``ClientConnection`` when it
    is called)."""

    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport | None  # None: only ``write`` reaches the client

    async def drain(self) -> None: ...

    def close(self) -> None: ...

    def pause_reading(self, reason: str) -> None: ...

    def resume_reading(self, reason: str) -> None: ...

    def start_tunnel(
        self, peer: asyncio.Transport, pending: bytes, done: asyncio.Future[None]
    ) -> None: ...


class BodyStream:
    """Request body chunks from the parser to the exchange, with flow control."""

    __slots__ = ("_buffered", "_chunks", "_conn", "_done", "_error", "_waiter", "received")

    def __init__(self, conn: ClientSide) -> None:
        self._conn = conn
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._done = False
        self._error: ProtocolError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.received = 0

    @property
    def done(self) -> bool:
        return self._done and not self._chunks

    def push(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        self.received += len(data)
        if self._buffered > BODY_HIGH:
            self._conn.pause_reading("body")
        self._wake()

    def finish(self) -> None:
        self._done = True
        self._wake()

    @property
    def arriving(self) -> bool:
        """Still arriving: not complete, not refused."""
        return not self._done and self._error is None

    def complete(self) -> bytes | None:
        """The whole body if it has all arrived (and was not refused), left in place."""
        if not self._done or self._error is not None:
            return None
        chunks = self._chunks
        return b"".join(chunks) if len(chunks) != 1 else chunks[0]

    def unread(self, data: bytes) -> None:
        """Put back what was read (a body that turned out too large to buffer)."""
        if data:
            self._chunks.appendleft(data)
            self._buffered += len(data)

    def check(self) -> None:
        """Raise the body's error now if the parser already refused it."""
        if self._error is not None:
            raise self._error

    def fail(self, error: ProtocolError) -> None:
        self._error = error
        self._wake()

    async def read(self, timeout: float) -> bytes:
        """Next body bytes (all that are buffered), b"" at the end of the body."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._done:
                return b""
            if self._conn.closed:
                raise ProtocolError(400, "client closed the connection during the body")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(timeout):
                    await self._waiter
            except TimeoutError:
                raise ProtocolError(408, "timed out reading the request body") from None
            finally:
                self._waiter = None
        data = b"".join(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
        self._chunks.clear()
        self._buffered = 0
        self._conn.resume_reading("body")
        return data

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class Incoming:
    """A parsed request waiting for, or in, its exchange (on either path)."""

    __slots__ = ("body", "error", "head", "record", "resume", "route", "sampled", "upgrade_data")

    def __init__(self, head: RequestHead | None, body: BodyStream | None) -> None:
        self.head = head
        self.body = body
        self.upgrade_data: bytes | None = None
        self.error: ProtocolError | None = None  # a request PIBL rejects, answered in order
        self.route: Route | None = None  # the route it matched (pool and policies)
        self.record: AccessRecord | None = None  # once its exchange started
        self.resume: Exit | None = None  # where the fast path left it for the coroutine path
        self.sampled: bool | None = None  # compared against another replica (decided once)


class ClientConnection(WriteFlow):
    # (slots: a connection's attributes are set without a dict, once per connection)
    __slots__ = (
        "_client_eof",
        "_fast",
        "_h2c",
        "_parser",
        "_paused",
        "_proxy_header",
        "_queue",
        "_reading",
        "_stop_reading",
        "_task",
        "_timer",
        "_timer_kind",
        "client_ip",
        "closed",
        "loop",
        "proxy",
        "scheme",
        "transport",
        "tunnel_done",
    )

    def __init__(self, proxy: Proxy, scheme: bytes) -> None:
        # connection
        self.proxy = proxy
        self.scheme = scheme
        self.loop = proxy.loop  # (asyncio.get_running_loop() makes a getpid() call)
        self.transport: asyncio.Transport | None = None
        self.client_ip = ""
        self.closed = False
        self.tunnel: asyncio.Transport | None = None
        self.tunnel_done: asyncio.Future[None] | None = None
        limits = proxy.config.limits
        self._parser = RequestParser(
            max_target_bytes=limits.max_target_bytes,
            max_headers=limits.max_headers,
            max_head_bytes=limits.max_head_bytes,
        )
        self._timer = Deadline(self.loop, self._on_timeout, proxy.sweep)
        self._timer_kind = ""
        self._paused: set[str] = set()
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        # requests
        self._queue: deque[Incoming] = deque()
        self._reading: Incoming | None = None  # request whose body is still arriving
        self._task: asyncio.Task[None] | None = None  # the coroutine path serving the queue
        self._fast: ClientExchange | None = None  # the fast path serving the queue head
        self._stop_reading = False  # after an error or upgrade nothing more is parsed
        self._client_eof = False  # the client half-closed: nothing more will come
        self._proxy_header: bytearray | None = None  # a PROXY protocol line being read
        # the first bytes on a plain listener with h2c on: the HTTP/2 preface, or HTTP/1.1
        self._h2c: bytearray | None = None

    def __repr__(self) -> str:
        return f"<ClientConnection {self.client_ip} queued={len(self._queue)} closed={self.closed}>"

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop transports implement the interface without subclassing asyncio.Transport
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if isinstance(peer, tuple) else "unix"
        if self.proxy.config.server.proxy_protocol and self.scheme == b"http":
            self._proxy_header = bytearray()  # the connection starts with a PROXY line
        self.proxy.connection_opened(self)
        if self.scheme == b"https":
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2":
                self._to_http2(b"")
                return
        elif self.proxy.config.server.h2c:
            self._h2c = bytearray()
        self._arm("header")

    def _to_http2(self, data: bytes) -> None:
        """Hand the connection to an HTTP/2 connection (ALPN h2, or the h2c preface)."""
        from pibl.proxy.h2 import H2Connection

        self._timer.close()
        self._timer_kind = ""
        self._parser.close()
        assert self.transport is not None
        H2Connection(self.proxy, self.scheme, self.client_ip).start(self.transport, data, self)

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.write(data)
            return
        if self._stop_reading:
            return
        if self._proxy_header is not None:
            rest = self._read_proxy_header(data)
            if rest is None:
                return
            data = rest
        if self._h2c is not None:
            from pibl.proxy.h2 import PREFACE

            buf = self._h2c
            buf += data
            if len(buf) < len(PREFACE) and PREFACE.startswith(buf):
                return  # (so far, the HTTP/2 preface)
            self._h2c = None
            if buf.startswith(PREFACE):
                self._to_http2(bytes(buf))
                return
            data = bytes(buf)
        try:
            events = self._parser.feed(data)
        except ProtocolError as exc:
            self._reject(exc)
            return
        queue = self._queue
        for ev in events:
            if isinstance(ev, Body):
                assert self._reading is not None and self._reading.body is not None
                self._reading.body.push(ev.data)
            elif isinstance(ev, Head):
                head = ev.head
                assert isinstance(head, RequestHead)
                incoming = Incoming(head, BodyStream(self))
                queue.append(incoming)
                self._reading = incoming
            elif isinstance(ev, End):
                if self._reading is not None and self._reading.body is not None:
                    self._reading.body.finish()
                self._reading = None
            elif isinstance(ev, Upgrade):
                if queue:
                    queue[-1].upgrade_data = ev.data
                self._stop_reading = True
                self.pause_reading("upgrade")
        if self._parser.error is not None:
            self._reject(self._parser.error)
            return
        self._after_events()

    def _read_proxy_header(self, data: bytes) -> bytes | None:
        """PROXY protocol v1 (HAProxy's, 107 bytes at most): the bytes after it, or None
        until it is complete (or refused). Its address counts only from a trusted proxy."""
        buf = self._proxy_header
        assert buf is not None
        buf += data
        end = buf.find(b"\r\n")
        if end < 0:
            if len(buf) > 107:
                self._proxy_header = None
                self._reject(ProtocolError(400, "invalid PROXY protocol header"))
            return None
        line, rest = bytes(buf[:end]), bytes(buf[end + 2 :])
        self._proxy_header = None
        parts = line.split(b" ")
        source = None
        if len(parts) == 6 and parts[0] == b"PROXY" and parts[1] in (b"TCP4", b"TCP6"):
            try:
                source = str(ipaddress.ip_address(parts[2].decode("ascii")))
                ipaddress.ip_address(parts[3].decode("ascii"))
                if not all(p.isdigit() and int(p) < 65536 for p in parts[4:]):
                    source = None
            except (ValueError, UnicodeDecodeError):
                source = None
        elif parts[:2] == [b"PROXY", b"UNKNOWN"]:
            return rest
        if source is None:
            self._reject(ProtocolError(400, "invalid PROXY protocol header"))
            return None
        if self.proxy.trusted.trusted(self.client_ip):
            self.client_ip = source
        return rest

    def _after_events(self) -> None:
        queue = self._queue
        if self._parser.in_message:
            if self._timer_kind != "header":
                self._arm("header")
        elif self._timer_kind == "idle" or (self._timer_kind == "header" and queue):
            self._disarm()
        if len(queue) > self.proxy.config.limits.max_pipelined:
            self.pause_reading("pipeline")
        if queue and self._task is None and self._fast is None:
            self._dispatch()

    def eof_received(self) -> bool | None:
        # A half-closed client may still wait for its responses (``nc -q``, HTTP/1.0 tools).
        if self._reading is not None and self._reading.body is not None:
            self._reading.body.fail(ProtocolError(400, "client closed during the body"))
        if not self._queue or self.scheme == b"https":
            return None  # (TLS cannot stay half-open: answering is not possible anyway)
        self._stop_reading = True
        self._client_eof = True  # answer what is queued, then close
        if self._task is None and self._fast is None:
            self._dispatch()  # a request waiting for its body is answered now
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._timer.close()
        self._timer_kind = ""
        self._parser.close()
        if self._fast is not None:
            fast, self._fast = self._fast, None
            fast.on_client_lost()
        if self._task is not None and not self._task.done():
            # The client went away (not a half-close): stop its exchange, as nginx does,
            # instead of letting a backend work on an answer nobody will read.
            self._task.cancel()
        for incoming in self._queue:
            # a backend connection the fast path handed over to a task that never ran
            if incoming.resume is not None and incoming.resume.upstream is not None:
                self.proxy.abandon(incoming)
        if self.tunnel is not None:
            self.tunnel.close()
            if self.tunnel_done is not None and not self.tunnel_done.done():
                self.tunnel_done.set_result(None)
        if self._reading is not None and self._reading.body is not None:
            self._reading.body.fail(ProtocolError(400, "client closed the connection"))
        self.release_drain()
        self.proxy.connection_closed(self)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._fast is not None:
            self._fast.on_client_drain()

    # -- used by the exchange -----------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    async def drain(self) -> None:
        if not self.closed:
            await self.wait_writable(self.loop)
        if self.closed:
            raise ConnectionResetError("client closed the connection")

    @property
    def write_paused(self) -> bool:
        return self._write_paused

    def pause_reading(self, reason: str) -> None:
        if not self._paused and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self._paused.add(reason)

    def resume_reading(self, reason: str) -> None:
        if reason in self._paused:
            self._paused.discard(reason)
            if not self._paused and self.transport is not None and not self.closed:
                self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()
        self.closed = True

    @property
    def idle(self) -> bool:
        return not self._queue and not self._parser.in_message

    def start_tunnel(
        self, peer: asyncio.Transport, pending: bytes, done: asyncio.Future[None]
    ) -> None:
        """Switch to raw byte relay (WebSocket and other upgrades)."""
        self._disarm()
        self.tunnel = peer
        self.tunnel_done = done
        if pending:
            peer.write(pending)
        self._paused.clear()
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    # -- internals ----------------------------------------------------------------------

    def _reject(self, exc: ProtocolError) -> None:
        """A request PIBL refuses: answer in order, then close; never forwarded."""
        self._stop_reading = True
        self.pause_reading("error")
        if self._reading is not None and self._reading.body is not None:
            self._reading.body.fail(exc)  # the exchange of that request answers it
            self._reading = None
        else:
            rejected = Incoming(None, None)
            rejected.error = exc
            self._queue.append(rejected)
        if self._task is None and self._fast is None and self._queue:
            self._dispatch()

    def _dispatch(self) -> None:
        """Serve the queue: in callbacks while the fast path takes it, else in a task."""
        queue = self._queue
        if self._timer_kind == "body":
            self._disarm()
        while queue and not self.closed:
            incoming = queue[0]
            if incoming.error is not None:
                break
            if self.proxy.awaits_body(incoming):
                # A small body still arriving is read whole first, as the coroutine path
                # would (before it chooses a backend); the next read dispatches again.
                self._arm("body")
                return
            try:
                fast = self.proxy.start_fast(self, incoming)
            except Exception:  # a bug: as ``_serve`` handles one
                self.proxy.log_exception("error while serving a client connection")
                self.abort()
                return
            if fast is None:
                break
            if not fast.finished:  # the answer comes in later callbacks
                self._fast = fast
                return
            if not self._answered(fast.keep_alive):  # answered at once (a cache hit)
                return
        if self.closed:
            return
        if queue:
            self._task = self.loop.create_task(self._serve())
        else:
            self._served_all()

    def exchange_done(self, keep_alive: bool) -> None:
        """The fast path answered the queue head; serve the next request, if any."""
        self._fast = None
        if self._answered(keep_alive):
            self._dispatch()

    def _answered(self, keep_alive: bool) -> bool:
        """What ``_serve`` does after ``handle``; whether the connection goes on."""
        queue = self._queue
        queue.popleft()
        if not keep_alive:
            self.close()
            return False
        if len(queue) <= self.proxy.config.limits.max_pipelined:
            self.resume_reading("pipeline")
        return True

    def exchange_exit(self) -> None:
        """The fast path handed the queue head to the coroutine path."""
        self._fast = None
        self._task = self.loop.create_task(self._serve())

    async def _serve(self) -> None:
        queue = self._queue
        try:
            while queue and not self.closed:
                incoming = queue[0]
                if incoming.error is not None:
                    await self.proxy.reject(self, incoming.error)
                    self.close()
                    return
                keep_alive = await self.proxy.handle(self, incoming)
                queue.popleft()
                # When stopping, a response already sent as keep-alive leaves the connection
                # open: the client's next request gets "Connection: close" instead of a reset.
                if not keep_alive:
                    self.close()
                    return
                if len(queue) <= self.proxy.config.limits.max_pipelined:
                    self.resume_reading("pipeline")
        except Exception:
            self.proxy.log_exception("error while serving a client connection")
            self.abort()
        finally:
            self._task = None
        if not queue:
            self._served_all()

    def _served_all(self) -> None:
        """The queue is empty: close after a half-close, else wait for the next request."""
        if not self.closed:
            if self._client_eof:
                self.close()
            elif self._parser.in_message:
                self._arm("header")
            else:
                self._arm("idle")

    def _arm(self, kind: str) -> None:
        timeouts = self.proxy.config.timeouts
        if kind == "idle":
            delay = timeouts.client_idle
        elif kind == "header":
            delay = timeouts.client_header
        else:
            delay = timeouts.client_body
        self._timer_kind = kind
        self._timer.set(delay)

    def _disarm(self) -> None:
        self._timer.clear()
        self._timer_kind = ""

    def _on_timeout(self) -> None:
        kind = self._timer_kind
        self._timer_kind = ""
        if self.closed:
            return
        if kind == "header" and self._parser.in_message and not self._queue:
            # Slowloris or a stalled client: answer 408 like nginx does, then close.
            self._reject(ProtocolError(408, "timed out reading the request head"))
        elif kind == "body" and self._queue and self._task is None and self._fast is None:
            # A small body stalled: the coroutine path answers 408, as when it waits itself.
            body = self._queue[0].body
            if body is not None:
                body.fail(ProtocolError(408, "timed out reading the request body"))
            self._task = self.loop.create_task(self._serve())
        elif not self._queue:
            self.close()

    def close_if_idle(self) -> bool:
        """Used by graceful shutdown: close a connection that has no request in flight."""
        if self.idle:
            with contextlib.suppress(Exception):
                self.close()
            return True
        return False
