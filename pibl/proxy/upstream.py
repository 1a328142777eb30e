"""Connections to backends and the keep-alive pool of each backend.

``UpstreamConnection`` is an ``asyncio.Protocol`` that turns a backend's bytes into parser
events (``pibl.http.parse``) queued for the exchange that owns the connection. Flow
control is explicit in both directions:

* reading: once more than ``READ_HIGH`` bytes of body wait for a slow client the transport
  stops reading from the backend, and resumes when the exchange has taken them;
* writing: ``drain()`` waits while the kernel buffer towards the backend is full, so a fast
  client uploading to a slow backend is slowed down instead of filling memory.

The events go one of two ways. An exchange on the coroutine path awaits ``read()``; a
fast-path exchange (``pibl.proxy.fast``) sets itself as the connection's ``sink`` and gets
them in this protocol's own callbacks, with no queue, Future or Task in between.

``Pool`` keeps idle connections per backend (most recently used first, so idle ones age out
and close), never hands out one whose previous exchange did not end cleanly, and drops
those idle longer than the configured timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol, cast

from pibl.config import BackendConfig, resolve_path
from pibl.errors import ProtocolError, UpstreamError
from pibl.http.message import BodyKind, ResponseHead
from pibl.http.parse import END, Body, End, Event, Head, ResponseParser, Upgrade
from pibl.proxy.flow import Deadline, WriteFlow
from pibl.tls import client_context

READ_HIGH = 256 * 1024


class BackendSink(Protocol):
    """Where a backend's response events go when no coroutine waits for them."""

    def on_backend_events(self, events: list[Event]) -> None: ...

    def on_backend_error(self, error: UpstreamError) -> None: ...

    def on_timeout(self) -> None: ...


class UpstreamConnection(WriteFlow):
    __slots__ = (
        "_buffered",
        "_error",
        "_events",
        "_loop",
        "_parser",
        "_read_paused",
        "_spare",
        "_waiter",
        "backend",
        "close_delimited",
        "closed",
        "got_bytes",
        "idle_since",
        "response_timer",
        "reusable",
        "sink",
        "transport",
        "tunnel_done",
    )

    def __init__(self, backend: BackendConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.backend = backend
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reusable = False
        self.idle_since = 0.0
        self.got_bytes = False
        self.close_delimited = False
        self.tunnel: asyncio.Transport | None = None
        self.tunnel_done: asyncio.Future[None] | None = None
        self.sink: BackendSink | None = None  # a fast-path exchange taking events directly
        # the sink's response timeout: kept with the connection, moved for each exchange
        self.response_timer = Deadline(loop, self._response_timeout)
        self._loop = loop
        self._parser: ResponseParser | None = None  # None while idle
        self._spare: ResponseParser | None = None  # the last one, reused if it ended cleanly
        self._events: deque[Event] = deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: UpstreamError | None = None
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._read_paused = False

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("busy" if self._parser else "idle")
        return f"<UpstreamConnection {self.backend.label} {state}>"

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop transports implement the interface without subclassing asyncio.Transport
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.write(data)
            return
        parser = self._parser
        if parser is None:  # unsolicited bytes on an idle connection: unusable
            self.close()
            return
        self.got_bytes = True
        sink = self.sink
        try:
            events = parser.feed(data)
        except ProtocolError as exc:
            self.close()
            if sink is not None:
                sink.on_backend_error(UpstreamError(502, exc.reason, retryable=False))
            else:
                self._fail(UpstreamError(502, exc.reason, retryable=False))
            return
        if sink is not None:
            if parser.trailing_junk:
                self.close()  # before the sink sees the end: never pooled again
            if events:
                sink.on_backend_events(events)
            return
        for ev in events:
            if isinstance(ev, Body):
                self._buffered += len(ev.data)
            elif isinstance(ev, Head) and ev.head.body is BodyKind.CLOSE:
                self.close_delimited = True
            self._events.append(ev)
        if self._buffered > READ_HIGH and not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()
        self._wake()
        if parser.trailing_junk:
            self.close()  # the response is complete, the connection is not trustworthy

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost reports it

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        self.response_timer.close()
        if self._spare is not None:  # an idle connection the backend closed
            self._spare.close()
            self._spare = None
        if self.tunnel is not None:
            self.tunnel.close()
            if self.tunnel_done is not None and not self.tunnel_done.done():
                self.tunnel_done.set_result(None)
        elif self.sink is not None:
            sink = self.sink
            if self.close_delimited and self._parser is not None:
                try:
                    sink.on_backend_events(self._parser.feed_eof())
                except ProtocolError as error:
                    sink.on_backend_error(UpstreamError(502, error.reason, retryable=False))
            else:
                sink.on_backend_error(UpstreamError(502, "backend closed the connection"))
        elif self._parser is not None:
            if self.close_delimited and self._error is None:
                try:
                    self._events.extend(self._parser.feed_eof())
                except ProtocolError as error:
                    self._fail(UpstreamError(502, error.reason, retryable=False))
            elif not self._events or not isinstance(self._events[-1], End):
                self._fail(UpstreamError(502, "backend closed the connection"))
        self._wake()
        self.release_drain()

    # -- used by the exchange -----------------------------------------------------------

    def start(
        self,
        request_head: bytes,
        *,
        head_request: bool,
        on_interim: Callable[[ResponseHead], None] | None = None,
    ) -> None:
        """Begin an exchange: send the request head, expect one response (and hand any
        interim 1xx responses before it to ``on_interim``)."""
        parser, self._spare = self._spare, None
        if parser is None or not parser.reset(head_request=head_request, on_interim=on_interim):
            parser = ResponseParser(head_request=head_request, on_interim=on_interim)
        self._parser = parser
        self._events.clear()
        self._buffered = 0
        self._error = None
        self.got_bytes = False
        self.close_delimited = False
        self.reusable = False
        assert self.transport is not None
        self.transport.write(request_head)

    def write(self, data: bytes) -> None:
        if self.closed or self.transport is None:
            raise UpstreamError(502, "backend closed the connection")
        self.transport.write(data)

    async def drain(self) -> None:
        if self.closed:
            raise UpstreamError(502, "backend closed the connection")
        if self._write_paused:
            await self.wait_writable(self._loop)
            if self.closed:
                raise UpstreamError(502, "backend closed the connection")

    async def read(self, timeout: float | None = None) -> list[Event]:
        """Wait for at least one event and return all that are queued.

        ``timeout`` bounds the wait (TimeoutError); a plain timer on the waiter costs less
        than an ``asyncio.timeout`` block, and this runs for every response.
        """
        while not self._events:
            if self._error is not None:
                raise self._error
            if self.closed:
                raise UpstreamError(502, "backend closed the connection")
            waiter = self._waiter = self._loop.create_future()
            timer = None
            if timeout is not None:
                timer = self._loop.call_later(timeout, _expire, waiter)
            try:
                await waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
        events = list(self._events)
        self._events.clear()
        self._buffered = 0
        if self._read_paused and not self.closed and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()
        return events

    def pause(self) -> None:
        """Stop reading the backend (a fast-path exchange whose client reads slowly)."""
        if not self._read_paused and not self.closed and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._read_paused and not self.closed and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()

    def finish(self, *, reusable: bool) -> None:
        """The exchange is over; ``reusable`` only if the response ended cleanly."""
        parser, self._parser = self._parser, None
        self.sink = None
        self.response_timer.clear()
        if self._read_paused:
            self.resume()
        self.reusable = reusable and not self.closed and not self._events
        if self.reusable:
            self._spare = parser  # for the next response, if it ended cleanly
        else:
            if parser is not None:  # never used again (see ResponseParser.close)
                parser.close()
            self.close()

    def start_tunnel(self, peer: asyncio.Transport, done: asyncio.Future[None]) -> None:
        self.tunnel = peer
        self.tunnel_done = done
        self._parser = None
        if self._read_paused and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True

    def abort(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.abort()
        self.closed = True

    def _response_timeout(self) -> None:
        if self.sink is not None:
            self.sink.on_timeout()

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None:
            self._error = error

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class Pool:
    """Idle keep-alive connections to one backend."""

    __slots__ = (
        "_connect_timeout",
        "_idle",
        "_idle_max",
        "_idle_timeout",
        "_loop",
        "_ssl",
        "active",
        "backend",
        "dialing",
        "suspect",
    )

    def __init__(
        self,
        backend: BackendConfig,
        *,
        connect_timeout: float,
        idle_timeout: float,
        idle_max: int,
        ssl: ssl.SSLContext | None = None,
    ) -> None:
        self.backend = backend
        self._loop = asyncio.get_running_loop()
        self._idle: deque[UpstreamConnection] = deque()
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout
        self._idle_max = idle_max
        self._ssl = ssl
        self.active = 0
        # a reused connection failed before any answer, or idle ones were found closed, or
        # a dial failed: one request checks with a new connection whether the backend is
        # still there; the others go elsewhere meanwhile (``probing``)
        self.suspect = False
        self.dialing = 0  # connections being opened

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        return self._ssl

    def __repr__(self) -> str:
        return f"<Pool {self.backend.label} idle={len(self._idle)} active={self.active}>"

    @property
    def probing(self) -> bool:
        """A dial is finding out whether a suspect backend is still there: send the
        requests that would need a new connection elsewhere until it knows."""
        return self.suspect and self.dialing > 0 and not self._idle

    def take_idle(self) -> UpstreamConnection | None:
        """The most recently used idle connection still fit for a request, if any."""
        idle = self._idle
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if conn.closed:  # the backend closed it while it idled: maybe it is gone
                self.suspect = True
                continue
            if now - conn.idle_since > self._idle_timeout:
                conn.close()
                continue
            self.active += 1
            return conn
        return None

    async def acquire(
        self, *, fresh: bool = False, connect_timeout: float | None = None
    ) -> tuple[UpstreamConnection, bool]:
        """A connection ready for a request, and whether it was reused from the pool."""
        if not fresh:
            reused = self.take_idle()
            if reused is not None:
                return reused, True
        conn = await self.connect(connect_timeout)
        self.active += 1
        return conn, False

    async def connect(self, timeout: float | None = None) -> UpstreamConnection:
        backend = self.backend
        loop = self._loop
        self.dialing += 1
        try:
            async with asyncio.timeout(timeout or self._connect_timeout):
                _, protocol = await loop.create_connection(
                    lambda: UpstreamConnection(backend, loop),
                    backend.host,
                    backend.port,
                    ssl=self._ssl,
                    server_hostname=(backend.server_name or backend.host) if self._ssl else None,
                )
        except TimeoutError:
            self.suspect = True
            raise UpstreamError(
                504, "timed out connecting to backend", connected=False, unreachable=True
            ) from None
        except ssl.SSLError as exc:
            raise UpstreamError(
                502, f"TLS error with backend: {exc.reason}", connected=False
            ) from None
        except OSError as error:
            # nothing listens there: the idle connections are as good as dead too
            self.drop_idle()
            self.suspect = True
            reason = error.strerror or str(error)
            raise UpstreamError(
                502, f"cannot connect to backend: {reason}", connected=False, unreachable=True
            ) from None
        finally:
            self.dialing -= 1
        self.suspect = False
        return protocol

    def release(self, conn: UpstreamConnection) -> None:
        self.active -= 1
        if conn.reusable and not conn.closed and len(self._idle) < self._idle_max:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()

    def drop_idle(self) -> int:
        """Close every idle connection (the backend died: none of them will answer)."""
        dropped = len(self._idle)
        while self._idle:
            self._idle.pop().close()
        return dropped

    def sweep(self) -> int:
        """Close idle connections past their timeout; returns how many were closed."""
        now = time.monotonic()
        keep: deque[UpstreamConnection] = deque()
        closed = 0
        for conn in self._idle:
            if conn.closed or now - conn.idle_since > self._idle_timeout:
                conn.close()
                closed += 1
            else:
                keep.append(conn)
        self._idle = keep
        return closed

    def close_all(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()


def upstream_tls(backend: BackendConfig) -> ssl.SSLContext | None:
    """The client context for an https:// backend (verification on unless disabled)."""
    if backend.scheme != "https":
        return None
    return client_context(
        ca_file=resolve_path(backend.ca_file) if backend.ca_file else None,
        verify=backend.tls_verify,
        client_cert=resolve_path(backend.client_cert) if backend.client_cert else None,
        client_key=resolve_path(backend.client_key) if backend.client_key else None,
    )


async def probe(backend: BackendConfig, timeout: float) -> str | None:
    """Try a TCP connection; None if reachable, else the reason."""
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(backend.host, backend.port)
    except TimeoutError:
        return "timed out"
    except OSError as exc:
        return exc.strerror or str(exc)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return None


__all__ = ["END", "Body", "End", "Head", "Pool", "Upgrade", "UpstreamConnection", "probe"]
