"""One HTTP/2 client connection: streams served as the exchanges HTTP/1.1 requests get.

A TLS connection whose ALPN chose ``h2``, or a plain one that starts with the HTTP/2
preface when ``[server] h2c`` is on, is handed by ``ClientConnection`` to an
``H2Connection`` (the ``h2`` library does the framing and HPACK). Each request stream
becomes an ``Incoming`` with a ``RequestHead`` built by ``pibl.http.h2rules`` (a malformed
request gets RST_STREAM PROTOCOL_ERROR and never reaches a backend) and is served by the
same fast path or coroutine path as an HTTP/1.1 request, talking to an ``H2Stream``: a
per-stream sink with what those paths use of a client connection.

The exchange writes an HTTP/1.1 response to the stream; ``H2Stream`` parses it back with
``ResponseParser`` (one place for every response rule) and sends HEADERS and DATA:

* flow control, response side: DATA leaves within the stream's and the connection's
  windows and while the socket takes it; what does not fit waits in the stream's buffer,
  and above ``[http2] stream_buffer`` the stream reports ``write_paused``, so its exchange
  stops reading its backend. Other streams keep flowing.
* flow control, request side: DATA goes into the stream's ``BodyStream``; the window is
  given back (WINDOW_UPDATE) as the exchange consumes the body, so a slow backend bounds
  what a client can send to ``stream_window`` per stream.
* abuse: limits on streams, header list and HPACK table sizes (SETTINGS). A stream opened
  beyond ``max_concurrent_streams`` gets RST_STREAM REFUSED_STREAM and a header list beyond
  ``max_header_list_size`` a 431 answer, both on the stream alone, the connection and its
  other streams go on; a header block beyond 4 x ``max_header_list_size`` (encoded or
  decoded) or 32 CONTINUATION frames ends the connection (GOAWAY ENHANCE_YOUR_CALM). More than
  ``max_resets`` client resets per ``reset_interval`` ends the connection with GOAWAY
  ENHANCE_YOUR_CALM (rapid reset); an idle connection gets GOAWAY, a silent one a PING.
* graceful stop: GOAWAY, in-flight streams finish, then the connection closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import TYPE_CHECKING, Any, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.frame_buffer
import h2.settings
import h2.stream
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame

from pibl.errors import ProtocolError
from pibl.http import h2rules
from pibl.http.forward import simple_response
from pibl.http.message import BodyKind, HeaderList, ResponseHead
from pibl.http.parse import Body, End, Head, ResponseParser
from pibl.observe.record import AccessRecord
from pibl.proxy.client import BodyStream, Incoming
from pibl.proxy.flow import Deadline

if TYPE_CHECKING:
    from pibl.config import Http2Config
    from pibl.proxy.client import ClientConnection
    from pibl.proxy.exchange import Proxy
    from pibl.proxy.fast import ClientExchange

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# CONTINUATION frames a header block may take (the h2 library stops at 64; PIBL
# enforces it too, with a cap on the block's bytes)
MAX_CONTINUATION = 32
# The HPACK decoder's own bound on a decoded header list, as a multiple of
# ``max_header_list_size``: a list between the two is decoded and answered 431 on its
# stream; one beyond this (or an encoded block beyond it) ends the connection
HARD_HEADER_FACTOR = 4


class _Stream(h2.stream.H2Stream):
    """PIBL checks Content-Length against DATA itself: a mismatch is a stream error
    (RFC 9113 §8.1.1), where the library would end the whole connection."""

    def _initialize_content_length(self, headers: Any) -> None:
        self._expected_content_length = None

    def _track_content_length(self, length: int, end_stream: bool) -> None:
        return None


class StreamRefused(h2.events.Event):
    """A request stream opened beyond the advertised SETTINGS_MAX_CONCURRENT_STREAMS: its
    header block was decoded (the HPACK state stays in step, RFC 9113 §4.3) and the stream
    reset with REFUSED_STREAM, so the client may retry it (§5.1.2, §8.7)."""

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class _HeaderBlockBuffer(h2.frame_buffer.FrameBuffer):
    """The library's frame buffer, with PIBL's bounds on a header block being gathered
    (HEADERS and its CONTINUATION frames, until END_HEADERS): at most ``max_bytes`` of
    block fragments and ``MAX_CONTINUATION`` frames, else GOAWAY ENHANCE_YOUR_CALM. A flood
    of CONTINUATION frames (CVE-2024-27316) holds no more than that."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(server=True)
        self.max_bytes = max_bytes
        self._block = 0  # bytes of the block gathered so far

    def _update_header_buffer(self, f: Any) -> Any:
        out = super()._update_header_buffer(f)
        gathered = self._headers_buffer
        if not gathered:
            self._block = 0
            return out
        self._block += len(f.data)
        if self._block > self.max_bytes or len(gathered) > MAX_CONTINUATION:
            raise h2.exceptions.DenialOfServiceError(
                f"header block beyond {self.max_bytes} bytes or {MAX_CONTINUATION} frames"
            )
        return out


class _Conn(h2.connection.H2Connection):
    # SETTINGS_MAX_CONCURRENT_STREAMS as advertised and enforced by PIBL (the library's own
    # check, a connection error, is off: the setting is not in its local_settings)
    stream_limit = 2**31

    def _begin_new_stream(self, stream_id: int, allowed_ids: Any) -> h2.stream.H2Stream:
        stream = super()._begin_new_stream(stream_id, allowed_ids)
        stream.__class__ = _Stream
        return stream

    def _receive_headers_frame(self, frame: Any) -> tuple[list[Any], list[Any]]:
        """A HEADERS frame, in arrival order: one that opens a stream beyond the limit is
        a stream error, REFUSED_STREAM, as nginx and HAProxy answer it (§5.1.2)."""
        sid = frame.stream_id
        limit = self.stream_limit
        # (len(self.streams), closed streams included, bounds the open ones: counting
        # those, a pass over the streams, only when it may matter)
        if sid in self.streams or len(self.streams) < limit or self.open_inbound_streams < limit:
            return super()._receive_headers_frame(frame)
        frames, events = super()._receive_headers_frame(frame)
        self.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
        kept = [ev for ev in events if getattr(ev, "stream_id", None) != sid]
        return frames, [*kept, StreamRefused(sid)]


class H2Stream:
    """One request stream, as the exchanges see a client connection."""

    def __init__(self, conn: H2Connection, sid: int, incoming: Incoming, head_request: bool):
        self.h2 = conn
        self.sid = sid
        self.incoming = incoming
        self.client_ip = conn.client_ip
        self.scheme = conn.scheme
        self.loop = conn.loop
        self.transport: asyncio.Transport | None = None  # bytes go through the connection
        self.closed = False
        self.tunnel = None
        self._head_request = head_request
        # Responses come as HTTP/1.1 bytes, parsed back (created on the first write), or,
        # on the fast path, as the fields of the head (``head_fields``) then body bytes.
        self._parser: ResponseParser | None = None
        self._framed = False  # the head came as fields: what is written is body
        self._head: HeaderList | None = None  # the response head's fields, not yet sent
        self._pending = bytearray()  # response body bytes beyond the windows
        self._ended = False  # the response is complete (END_STREAM once _pending is sent)
        self._finished = False  # END_STREAM sent or the stream reset
        self._waiter: asyncio.Future[None] | None = None
        self._unacked = 0  # request body bytes received and not yet given back
        self.fast: ClientExchange | None = None
        self.task: asyncio.Task[None] | None = None
        self.served = False  # the exchange is over
        self.stop_request = False  # answered early: RST_STREAM NO_ERROR once it is sent

    # -- what the exchanges use -------------------------------------------------------------

    def head_fields(self, fields: HeaderList) -> None:
        """The response head as HTTP/2 fields (the fast path); the bytes written from now
        on are the body, unframed. Sent with the first body bytes or the end, so a whole
        response read at once leaves as HEADERS + DATA (END_STREAM), or HEADERS alone."""
        if self._finished or self._ended:
            return
        self._framed = True
        self._head = fields
        self._ready()

    def write(self, data: bytes) -> None:
        if self._finished or self._ended:
            return
        if self._framed:
            self._pending += data
            self._ready()
            return
        parser = self._parser
        if parser is None:
            parser = self._parser = ResponseParser(
                head_request=self._head_request, on_interim=self._interim
            )
        try:
            events = parser.feed(data)
        except ProtocolError:
            self.abort()
            return
        self._events(events)

    def _events(self, events: list[Any]) -> None:
        for ev in events:
            if isinstance(ev, Head):
                resp = ev.head
                assert isinstance(resp, ResponseHead)
                self._head = h2rules.response_fields(resp.status, resp.headers)
            elif isinstance(ev, Body):
                self._pending += ev.data
            elif isinstance(ev, End):
                self._ended = True
        self._ready()

    def _ready(self) -> None:
        """Frames to send: they are made once this loop iteration is done with the stream
        (``H2Connection._write_out``), so one read from a backend makes one write."""
        conn = self.h2
        conn.ready[self.sid] = self
        conn._flush_out()

    def _interim(self, resp: ResponseHead) -> None:
        if not self._finished:
            self.h2.send_headers(self.sid, h2rules.response_fields(resp.status, resp.headers))

    @property
    def write_paused(self) -> bool:
        return len(self._pending) > self.h2.settings.stream_buffer

    async def drain(self) -> None:
        while not self.closed and self.write_paused:
            self._waiter = self.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self.closed:
            raise ConnectionResetError("client closed the stream")

    def abort(self) -> None:
        """The response was cut short: reset the stream (the client sees an error)."""
        if not self._finished:
            self._finished = True
            self.h2.reset(self.sid, ErrorCodes.INTERNAL_ERROR)
            self.h2.stream_finished(self)
        self.closed = True

    def close(self) -> None:
        """The exchange is over: a response delimited by its end is complete now."""
        if self._ended or self._finished:
            return
        if self._framed:
            self._ended = True
            self._ready()
            return
        events: list[Any] = []
        if self._parser is not None:
            with contextlib.suppress(ProtocolError):
                events = self._parser.feed_eof()
        self._events(events)
        if not self._ended:
            self.abort()

    def exchange_done(self, keep_alive: bool) -> None:
        self.fast = None
        self._served()

    def exchange_exit(self) -> None:
        self.fast = None
        self.task = self.loop.create_task(self.h2.serve(self))

    def pause_reading(self, reason: str) -> None:
        return None  # the stream's window bounds what the client sends

    def resume_reading(self, reason: str) -> None:
        """The exchange consumed the body buffered so far: give the window back."""
        if self._unacked:
            n, self._unacked = self._unacked, 0
            self.h2.acknowledge(self.sid, n)

    @property
    def idle(self) -> bool:
        return False

    def start_tunnel(self, *args: Any) -> None:
        raise ConnectionResetError("no upgrade on HTTP/2")

    # -- from the connection ---------------------------------------------------------------

    def _served(self) -> None:
        self.served = True
        if not self._ended and not self._finished:
            self.close()
        self.h2.maybe_done(self)

    def send_some(self, budget: int) -> int:
        """Send the head, and DATA within the windows, at most ``budget`` bytes; returns
        bytes sent (the head counts as one)."""
        if self._finished:
            return 0
        conn = self.h2
        sent = 0
        pending = self._pending
        headed = 0
        if self._head is not None:
            fields, self._head = self._head, None
            last = self._ended and not pending
            conn.send_headers(self.sid, fields, end_stream=last)
            if last:
                self._finished = True
                conn.stream_finished(self)
                return 1
            headed = 1
        while pending and sent < budget:
            window = conn.window(self.sid)
            if window <= 0:
                break
            n = min(len(pending), window, conn.frame_size, budget - sent)
            last = self._ended and n == len(pending)
            conn.send_data(self.sid, bytes(pending[:n]), end_stream=last)
            del pending[:n]
            sent += n
            if not pending and self._ended:
                self._finished = True
                conn.stream_finished(self)
                break
        if not pending and self._ended and not self._finished:
            self._finished = True
            conn.send_data(self.sid, b"", end_stream=True)
            conn.stream_finished(self)
        if not self.write_paused:
            self._wake()
        return sent + headed

    @property
    def has_pending(self) -> bool:
        return not self._finished and (self._head is not None or bool(self._pending) or self._ended)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        if self.fast is not None:
            self.fast.on_client_drain()

    def lost(self) -> None:
        """The client reset the stream or the connection is gone."""
        self.closed = True
        self._finished = True
        body = self.incoming.body
        if body is not None:
            body.fail(ProtocolError(400, "client reset the stream"))
        if self.fast is not None:
            fast, self.fast = self.fast, None
            fast.on_client_lost()
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self._wake()


class H2Connection(asyncio.Protocol):
    """An HTTP/2 connection with a client; takes over the transport ``ClientConnection`` had."""

    def __init__(self, proxy: Proxy, scheme: bytes, client_ip: str) -> None:
        self.proxy = proxy
        self.scheme = scheme
        self.client_ip = client_ip
        self.loop = asyncio.get_running_loop()
        self.settings: Http2Config = proxy.config.http2
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.streams: dict[int, H2Stream] = {}
        self.ready: dict[int, H2Stream] = {}  # streams with response bytes or an end to send
        self._write_paused = False
        self._goaway = False
        self._resets: deque[float] = deque()
        self._idle = Deadline(self.loop, self._on_idle)
        self._ping = Deadline(self.loop, self._on_ping)
        self._ping_sent = False
        self._draining = False  # after an error GOAWAY: input is dropped until the close
        self._write_soon = False  # a write of the framed bytes is scheduled
        self._sending = False  # ready streams are being framed (_send_ready)
        config = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_inbound_headers=False,  # h2rules checks every field, per stream
            normalize_inbound_headers=False,
            validate_outbound_headers=False,
            # response fields come lower-case and without connection-specific fields
            # (forward.client_response_fields, h2rules.response_fields)
            normalize_outbound_headers=False,
        )
        self.conn = _Conn(config=config)
        s = self.settings
        self.conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: s.max_concurrent_streams,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: s.stream_window,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: s.max_frame_size,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: s.max_header_list_size,
                h2.settings.SettingCodes.HEADER_TABLE_SIZE: s.header_table_size,
            },
        )
        # Given as initial values, the library announces them but applies only its defaults
        # on the peer's acknowledgement (it applies changes): apply them here.
        self.conn.max_inbound_frame_size = s.max_frame_size
        self.conn.decoder.max_allowed_table_size = s.header_table_size
        # The advertised header list limit is PIBL's (h2rules answers 431 on the stream);
        # the decoder stops only far beyond it, where decoding would cost too much.
        hard = HARD_HEADER_FACTOR * s.max_header_list_size
        self.conn.decoder.max_header_list_size = hard
        self.conn.incoming_buffer = _HeaderBlockBuffer(hard)
        self.conn.stream_limit = s.max_concurrent_streams

    # -- asyncio.Protocol ---------------------------------------------------------------

    def start(self, transport: asyncio.Transport, data: bytes, old: ClientConnection) -> None:
        """Take the transport over from ``old`` (after ALPN h2 or the h2c preface)."""
        self.proxy.connections.discard(old)
        self.proxy.connections.add(cast("ClientConnection", self))
        self.proxy.metrics.h2_connections.inc()
        transport.set_protocol(self)
        self.transport = transport
        self.conn.initiate_connection()
        # advertised, now PIBL's to enforce (see _Conn._receive_headers_frame)
        del self.conn.local_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS]
        extra = self.settings.connection_window - 65535
        if extra > 0:
            self.conn.increment_flow_control_window(extra)
        self._idle.set(self.settings.idle_timeout)
        self._flush_out()
        if data:
            self.data_received(data)

    def data_received(self, data: bytes) -> None:
        if self.closed or self._draining:
            return
        self._ping.set(self.settings.ping_interval)
        self._ping_sent = False
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            dos = isinstance(exc, h2.exceptions.DenialOfServiceError)
            self._goaway_reason("header_block" if dos else "protocol_error")
            self.proxy.log.info(f"HTTP/2 connection error from {self.client_ip}: {exc}")
            self._flush_out()
            self._close_soon()
            return
        for ev in events:
            if isinstance(ev, h2.events.RequestReceived):
                self._request(ev.stream_id, ev.headers or [], ev.stream_ended is not None)
            elif isinstance(ev, h2.events.DataReceived):
                self._data(ev.stream_id, ev.data or b"", ev.flow_controlled_length or 0)
            elif isinstance(ev, h2.events.StreamEnded):
                self._ended(ev.stream_id)
            elif isinstance(ev, h2.events.StreamReset):
                self._reset_by_client(ev.stream_id)
            elif isinstance(ev, StreamRefused):
                self.proxy.metrics.h2_refused.labels("concurrency").inc()
                self._count_reset()
            elif isinstance(ev, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                self.flush()
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self._goaway = True
                if not self.streams:
                    self._close()
            if self.closed or self._draining:
                return
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._idle.close()
        self._ping.close()
        for stream in list(self.streams.values()):
            stream.lost()
        self.streams.clear()
        self.ready.clear()
        self.proxy.connections.discard(cast("ClientConnection", self))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self.flush()

    def eof_received(self) -> bool | None:
        return None

    # -- streams ---------------------------------------------------------------------------

    def _request(self, sid: int, fields: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        self._idle.clear()
        self.proxy.metrics.h2_streams.inc()
        if self._goaway:
            self.reset(sid, ErrorCodes.REFUSED_STREAM)
            return
        try:
            head = h2rules.request_head(
                fields,
                end_stream,
                self.settings.max_header_list_size,
                self.proxy.config.limits.max_headers,
            )
        except ProtocolError as exc:
            if exc.status == 431:
                self._too_large(sid, exc, end_stream)
                return
            self.proxy.metrics.h2_refused.labels("malformed").inc()
            self._log_refused(exc.reason)
            self.reset(sid, ErrorCodes.PROTOCOL_ERROR)
            self._count_reset()
            return
        incoming = Incoming(head, None)
        stream = H2Stream(self, sid, incoming, head.method == b"HEAD")
        incoming.body = BodyStream(stream)
        if end_stream:
            incoming.body.finish()
        self.streams[sid] = stream
        try:
            fast = self.proxy.start_fast(stream, incoming)
        except Exception:
            self.proxy.log_exception("error while serving an HTTP/2 stream")
            stream.abort()
            return
        if fast is None:
            stream.task = self.loop.create_task(self.serve(stream))
        elif fast.finished:
            stream._served()
        else:
            stream.fast = fast

    async def serve(self, stream: H2Stream) -> None:
        """The coroutine path of one stream."""
        try:
            await self.proxy.handle(stream, stream.incoming)
        except Exception:
            self.proxy.log_exception("error while serving an HTTP/2 stream")
            stream.abort()
        finally:
            stream.task = None
        stream._served()

    def _data(self, sid: int, data: bytes, flow: int) -> None:
        stream = self.streams.get(sid)
        if stream is None or stream.incoming.body is None:
            self.acknowledge(sid, flow)
            return
        body = stream.incoming.body
        head = stream.incoming.head
        assert head is not None
        stream._unacked += flow
        if (head.content_length and body.received + len(data) > head.content_length) or (
            head.body is BodyKind.NONE and data
        ):
            self._refuse_length(stream)
            return
        if data:
            body.push(data)
        elif flow:
            stream.resume_reading("body")

    def _ended(self, sid: int) -> None:
        stream = self.streams.get(sid)
        if stream is None or stream.incoming.body is None:
            return
        head = stream.incoming.head
        assert head is not None
        body = stream.incoming.body
        if head.body is BodyKind.LENGTH and body.received != head.content_length:
            self._refuse_length(stream)
            return
        body.finish()
        # the body is complete: its bytes count no more against the connection's window
        if stream._unacked:
            n, stream._unacked = stream._unacked, 0
            with contextlib.suppress(h2.exceptions.H2Error):
                self.conn.acknowledge_received_data(n, sid)  # (closed stream: connection)

    def _too_large(self, sid: int, exc: ProtocolError, end_stream: bool) -> None:
        """A header list beyond SETTINGS_MAX_HEADER_LIST_SIZE: answered 431 on its stream
        (RFC 9113 §10.5.1, and what PIBL answers an HTTP/1.1 head that is too large); if
        the client has a body to send, RST_STREAM NO_ERROR follows the answer (§8.1)."""
        self.proxy.metrics.h2_refused.labels("header_list").inc()
        self._log_refused(exc.reason, exc.status)
        stream = H2Stream(self, sid, Incoming(None, None), head_request=False)
        stream.stop_request = not end_stream
        self.streams[sid] = stream
        stream.write(simple_response(exc.status, exc.reason))
        stream._served()

    def _log_refused(self, reason: str, status: int = 400) -> None:
        """One access line for a stream refused before its exchange (as HTTP/1.1 requests
        refused while parsing get one): the status (400 if malformed), the reason as
        detail."""
        record = AccessRecord(
            client=self.client_ip, request_line="-", host="-", status=status, detail=reason
        )
        record.total = time.monotonic() - record.started
        self.proxy.log.access(record)
        self.proxy.observe(record)

    def _refuse_length(self, stream: H2Stream) -> None:
        self.proxy.metrics.h2_refused.labels("content_length").inc()
        if stream.incoming.record is None:  # (else its exchange logs it, with the error)
            self._log_refused("malformed HTTP/2 request: content-length differs from DATA")
        if stream.incoming.body is not None:
            stream.incoming.body.fail(ProtocolError(400, "content-length differs from DATA"))
        stream._finished = True  # (its exchange fails on the body and logs a 400)
        self.reset(stream.sid, ErrorCodes.PROTOCOL_ERROR)
        self.streams.pop(stream.sid, None)
        self._count_reset()

    def _reset_by_client(self, sid: int) -> None:
        stream = self.streams.pop(sid, None)
        if stream is not None:
            stream.lost()
        self._count_reset()
        self._maybe_idle()

    def _count_reset(self) -> None:
        """One more stream reset that the client caused: by RST_STREAM, or by PIBL for its
        error (a malformed request, a stream beyond the concurrency limit). Both count
        toward ``max_resets``: a client that provokes resets instead of sending them (the
        "MadeYouReset" variant of rapid reset, CVE-2025-8671) is stopped the same way."""
        now = time.monotonic()
        resets = self._resets
        resets.append(now)
        while resets and resets[0] < now - self.settings.reset_interval:
            resets.popleft()
        if len(resets) > self.settings.max_resets and not self._draining:
            self.proxy.log.warning(
                f"HTTP/2 client {self.client_ip} reset {len(resets)} streams in "
                f"{self.settings.reset_interval:g} s: GOAWAY ENHANCE_YOUR_CALM"
            )
            self._goaway_reason("rapid_reset")
            self.conn.close_connection(ErrorCodes.ENHANCE_YOUR_CALM)
            self._flush_out()
            self._close_soon()

    # -- used by the streams -----------------------------------------------------------------

    def send_headers(
        self, sid: int, fields: list[tuple[bytes, bytes]], end_stream: bool = False
    ) -> None:
        try:
            self.conn.send_headers(sid, fields, end_stream=end_stream)
        except h2.exceptions.H2Error:
            return
        self._flush_out()  # (scheduled: leaves with what else this iteration frames)

    def send_data(self, sid: int, data: bytes, end_stream: bool) -> None:
        with contextlib.suppress(h2.exceptions.H2Error):
            self.conn.send_data(sid, data, end_stream=end_stream)

    def window(self, sid: int) -> int:
        try:
            return self.conn.local_flow_control_window(sid)
        except h2.exceptions.H2Error:
            return 0

    @property
    def frame_size(self) -> int:
        return self.conn.max_outbound_frame_size

    def reset(self, sid: int, code: ErrorCodes) -> None:
        with contextlib.suppress(h2.exceptions.H2Error):
            self.conn.reset_stream(sid, code)
        self._flush_out()

    def acknowledge(self, sid: int, n: int) -> None:
        with contextlib.suppress(h2.exceptions.H2Error):
            self.conn.acknowledge_received_data(n, sid)
        self._flush_out()

    def stream_finished(self, stream: H2Stream) -> None:
        if stream.stop_request:  # (a complete answer to a request still being sent)
            self.reset(stream.sid, ErrorCodes.NO_ERROR)
        self.maybe_done(stream)

    def maybe_done(self, stream: H2Stream) -> None:
        """Forget a stream once its exchange is over and its response sent."""
        if stream.served and (stream._finished or stream.closed):
            if self.streams.get(stream.sid) is stream:
                del self.streams[stream.sid]
            self._maybe_idle()

    def flush(self) -> None:
        """Send what the windows allow, and what the library framed (at the end of this
        loop iteration)."""
        self._flush_out()

    def _send_ready(self) -> None:
        """Frame what the windows allow, stream by stream, a frame at a time each."""
        if self.closed or self._sending:
            return
        self._sending = True
        try:
            self._send_rounds()
        finally:
            self._sending = False

    def _send_rounds(self) -> None:
        budget = self.frame_size
        ready = self.ready
        for _ in range(10000):  # bounded: each round sends a frame per ready stream or stops
            if self._write_paused or not ready:
                break
            progress = False
            for sid, stream in list(ready.items()):
                if not stream.has_pending:
                    del ready[sid]
                elif stream.send_some(budget):
                    progress = True
                    if not stream.has_pending:
                        del ready[sid]
            if not progress or self.conn.outbound_flow_control_window <= 0:
                break

    def _flush_out(self) -> None:
        """Frame and write at the end of this loop iteration: what the streams made ready
        and what the library framed (a response's HEADERS and DATA, other streams' frames)
        leave in one write, as one segment."""
        if not self._write_soon and not self.closed:
            self._write_soon = True
            self.loop.call_soon(self._write_out)

    def _write_out(self) -> None:
        self._write_soon = False
        if self.ready:
            self._send_ready()
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.closed:
            self.transport.write(data)

    # -- timers and stopping ---------------------------------------------------------------

    def _maybe_idle(self) -> None:
        if self.streams:
            return
        if self._goaway:
            self._flush_out()
            self._close()
        elif not self.closed:
            self._idle.set(self.settings.idle_timeout)

    def _on_idle(self) -> None:
        if not self.streams and not self.closed:
            self._goaway_reason("idle")
            self.conn.close_connection(ErrorCodes.NO_ERROR)
            self._flush_out()
            self._close()

    def _on_ping(self) -> None:
        if self.closed or not self.streams:
            return
        if self._ping_sent:  # no answer (nor anything else) in ping_timeout
            self._goaway_reason("ping_timeout")
            self.abort()
            return
        self._ping_sent = True
        with contextlib.suppress(h2.exceptions.H2Error):
            self.conn.ping(b"piblping")
        self._flush_out()
        self._ping.set(self.settings.ping_timeout)

    def _goaway_reason(self, reason: str) -> None:
        self.proxy.metrics.h2_goaways.labels(reason).inc()

    @property
    def idle(self) -> bool:
        return not self.streams

    def close_if_idle(self) -> bool:
        """Graceful stop: GOAWAY once; the connection closes when its streams are done."""
        if not self._goaway and not self.closed and self.transport is not None:
            # Written by hand: the library's close_connection would refuse to send the
            # rest of the streams in flight, which a graceful GOAWAY lets finish.
            self._goaway = True
            self._goaway_reason("shutdown")
            self._write_out()
            frame = GoAwayFrame(0)
            frame.last_stream_id = self.conn.highest_inbound_stream_id
            frame.error_code = ErrorCodes.NO_ERROR
            self.transport.write(frame.serialize())
        if not self.streams:
            self._close()
            return True
        return False

    def _close_soon(self) -> None:
        """After a GOAWAY for an error: stop serving, read and drop what the client still
        sends for a moment (closing with unread bytes would reset the connection and could
        destroy the GOAWAY before the client reads it), then close."""
        for stream in list(self.streams.values()):
            stream.lost()
        self.streams.clear()
        self._draining = True
        self.loop.call_later(1.0, self.abort)

    def _close(self) -> None:
        if self.transport is not None and not self.closed:
            self._write_out()
            self.transport.close()
        self.closed = True

    def close(self) -> None:
        self._close()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()
        self.closed = True
