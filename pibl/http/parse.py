"""The llhttp parser (through httptools) adapted to PIBL: bytes in, events out.

``RequestParser.feed(data)`` returns a list of events and raises ``ProtocolError`` with the
status to answer for anything PIBL refuses. llhttp in strict mode already rejects most
smuggling vectors (Content-Length with Transfer-Encoding, differing duplicate
Content-Length, a Transfer-Encoding whose last coding is not ``chunked``, obs-fold, bad
header names and control characters); on top of it this module checks what llhttp leaves
to the application: the Host rules of RFC 9112 section 3.2, the HTTP version, the request
target form, ``Expect``, and the size limits that bound memory:

* ``max_target_bytes`` -> 414 (nginx uses 8 KiB for the request line);
* ``max_headers`` and ``max_head_bytes`` -> 431. httptools buffers an unfinished header line
  internally, so a single endless line is also cut by counting the raw bytes fed while the
  head is incomplete (twice the head limit, to leave room for a pipelined neighbour's bytes
  in the same read).

``ResponseParser`` does the same for a backend's response; every problem there is a
``ProtocolError(502)`` because the client must never see a malformed response.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import httptools

from pibl.errors import ProtocolError
from pibl.http.message import BodyKind, HeaderList, RequestHead, ResponseHead


# Events are made for every message (``init=False`` and an ``__init__`` of their own: see
# ``pibl.http.message``); nothing changes them once made.
@dataclass(slots=True, init=False)
class Head:
    head: RequestHead | ResponseHead

    def __init__(self, head: RequestHead | ResponseHead) -> None:
        self.head = head


@dataclass(slots=True, init=False)
class Body:
    data: bytes

    def __init__(self, data: bytes) -> None:
        self.data = data


@dataclass(slots=True, init=False)
class End:
    def __init__(self) -> None:
        pass


@dataclass(slots=True, init=False)
class Upgrade:
    """The message asked to switch protocols; ``data`` are the bytes that followed its head."""

    data: bytes

    def __init__(self, data: bytes) -> None:
        self.data = data


Event = Head | Body | End | Upgrade
END = End()
_NO_TOKENS: frozenset[bytes] = frozenset()  # (most heads: no Connection field)
# the fields that frame a message or direct the connection, which the heads' builders read
_REQUEST_FRAMING = frozenset(
    {b"host", b"transfer-encoding", b"content-length", b"expect", b"connection", b"upgrade"}
)
_RESPONSE_FRAMING = frozenset({b"transfer-encoding", b"content-length", b"connection"})

# RFC 3986 host (reg-name, IPv4, or IP-literal) with an optional port.
_HOST_RE = re.compile(rb"^(?:[A-Za-z0-9\-._~!$&'()*+,;=%]*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{0,5})?$")
_ABSOLUTE_RE = re.compile(rb"^(https?)://([^/?#]+)([^#]*)$", re.IGNORECASE)


class _Collector:
    """Shared callback state of both parsers."""

    __slots__ = ("error", "events", "head_bytes", "headers")

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.headers: HeaderList = []
        self.head_bytes = 0
        self.error: ProtocolError | None = None


class RequestParser:
    """Incremental request parser for one client connection (handles pipelining)."""

    __slots__ = (
        "_c",
        "_error",
        "_in_head",
        "_max_head",
        "_max_headers",
        "_max_target",
        "_parser",
        "_raw_in_head",
        "_upgraded",
        "_url",
    )

    def __init__(
        self, *, max_target_bytes: int = 8192, max_headers: int = 100, max_head_bytes: int = 32768
    ) -> None:
        self._c = _Collector()
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._in_head = False
        self._raw_in_head = 0
        self._max_target = max_target_bytes
        self._max_headers = max_headers
        self._max_head = max_head_bytes
        self._upgraded = False
        self._error: ProtocolError | None = None

    # -- public API ---------------------------------------------------------------------

    def feed(self, data: bytes) -> list[Event]:
        """Parse ``data``; return the events it completes.

        Raises ``ProtocolError`` when the input is refused. Events completed before the
        bad bytes (a valid request pipelined ahead of a malformed one) are not lost: they
        are returned first and the error is raised by the next call to ``feed``.
        """
        if self._error is not None:
            raise self._error
        if self._upgraded:
            return [Body(data)] if data else []
        c = self._c
        events = c.events = []
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
            self._upgraded = True
            events.append(Upgrade(data[offset:]))
            return events
        except httptools.HttpParserCallbackError:
            self._error = c.error or ProtocolError(400, "bad request")
        except httptools.HttpParserInvalidMethodError:
            self._error = ProtocolError(400, "invalid method")
        except httptools.HttpParserInvalidURLError:
            self._error = ProtocolError(400, "invalid request target")
        except httptools.HttpParserError as exc:
            self._error = ProtocolError(400, _llhttp_reason(exc))
        if self._error is None and self._in_head:
            self._raw_in_head += len(data)
            if self._raw_in_head > 2 * self._max_head:
                self._error = ProtocolError(431, "request header fields too large")
        if self._error is not None and not events:
            raise self._error
        return events

    def close(self) -> None:
        """The connection is closed: nothing more will be fed. llhttp's parser and this
        one refer to each other; dropping the link lets refcounting free both at once."""
        self._parser = _CLOSED_REQUEST_PARSER

    @property
    def error(self) -> ProtocolError | None:
        """A refusal waiting to be raised by the next ``feed``."""
        return self._error

    @property
    def in_message(self) -> bool:
        """True between the first byte of a request and its end."""
        return self._in_head

    # -- httptools callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        self._raw_in_head = 0
        self._url = b""
        c = self._c
        c.headers = []
        c.head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._max_target:
            self._fail(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        c = self._c
        c.headers.append((name, value))
        c.head_bytes += len(name) + len(value) + 4
        if len(c.headers) > self._max_headers:
            self._fail(431, "too many header fields")
        if c.head_bytes + len(self._url) > self._max_head:
            self._fail(431, "request header fields too large")

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self._parser
        version = parser.get_http_version().encode()
        method: bytes = parser.get_method()
        try:
            head = build_request_head(
                method, self._url, version, self._c.headers, parser.should_keep_alive()
            )
        except ProtocolError as exc:
            self._c.error = exc
            raise
        # Trailer fields of a chunked body would land in this list: give them a fresh one
        # (PIBL does not forward request trailers).
        self._c.headers = []
        self._c.events.append(Head(head))

    def on_body(self, data: bytes) -> None:
        self._c.events.append(Body(data))

    def on_message_complete(self) -> None:
        self._c.events.append(END)

    def _fail(self, status: int, reason: str) -> None:
        self._c.error = ProtocolError(status, reason)
        raise self._c.error


def _llhttp_reason(exc: Exception) -> str:
    text = str(exc.args[0]) if exc.args else "malformed request"
    return text if text.isprintable() and len(text) < 100 else "malformed request"


def build_request_head(
    method: bytes, target: bytes, version: bytes, headers: HeaderList, keep_alive: bool
) -> RequestHead:
    """Validate what llhttp leaves to the application and classify the body."""
    if version not in (b"1.1", b"1.0"):
        if version.startswith(b"1.") or version == b"0.9":
            raise ProtocolError(400, "unsupported HTTP version")
        raise ProtocolError(505, "HTTP version not supported")
    if method == b"CONNECT":
        raise ProtocolError(405, "CONNECT is not supported by a reverse proxy")
    hosts: list[bytes] = []
    te: list[bytes] = []
    content_length: bytes | None = None
    expect: bytes | None = None
    connection: list[bytes] = []
    upgrade: bytes | None = None
    names: set[bytes] = set()
    add_name = names.add
    for name, value in headers:
        lname = name.lower()
        add_name(lname)
        if lname not in _REQUEST_FRAMING:
            continue  # (most fields: one set test instead of six comparisons)
        if lname == b"host":
            hosts.append(value)
        elif lname == b"transfer-encoding":
            te.extend(t.strip().lower() for t in value.split(b","))
        elif lname == b"content-length":
            if content_length is not None and content_length != value:
                raise ProtocolError(400, "conflicting Content-Length")
            content_length = value
        elif lname == b"expect":
            expect = value.strip().lower()
        elif lname == b"connection":
            connection.extend(t.strip().lower() for t in value.split(b","))
        elif lname == b"upgrade":
            upgrade = value
    if len(hosts) > 1:
        raise ProtocolError(400, "duplicate Host header")
    host = hosts[0].strip() if hosts else b""
    if version == b"1.1" and not hosts:
        raise ProtocolError(400, "missing Host header")
    if host and not _HOST_RE.match(host):
        raise ProtocolError(400, "invalid Host header")
    # Request target: origin-form, absolute-form (whose authority replaces Host), asterisk.
    if target.startswith(b"/"):
        # RFC 9110 section 4.2.1: an http(s) URI has a non-empty authority, so an HTTP/1.1
        # request naming none cannot be routed (an empty Host is for URIs without one)
        if version == b"1.1" and not host:
            raise ProtocolError(400, "empty Host header")
    elif target == b"*":
        if method != b"OPTIONS":
            raise ProtocolError(400, "asterisk-form is only valid for OPTIONS")
    else:
        m = _ABSOLUTE_RE.match(target)
        if m is None:
            raise ProtocolError(400, "invalid request target")
        host = m.group(2)
        if not _HOST_RE.match(host) or b"@" in host:
            raise ProtocolError(400, "invalid authority in request target")
        target = m.group(3) or b"/"
        if not target.startswith(b"/"):
            target = b"/" + target
    body = BodyKind.NONE
    length = 0
    if te:
        if version == b"1.0":
            raise ProtocolError(400, "Transfer-Encoding in an HTTP/1.0 request")
        if te != [b"chunked"]:
            raise ProtocolError(400, "unsupported Transfer-Encoding")
        if content_length is not None:
            raise ProtocolError(400, "Content-Length with Transfer-Encoding")
        body = BodyKind.CHUNKED
    elif content_length is not None:
        content_length = content_length.strip()
        if not content_length.isdigit() or len(content_length) > 18:
            raise ProtocolError(400, "invalid Content-Length")
        length = int(content_length)
        body = BodyKind.LENGTH if length else BodyKind.NONE
    expect_continue = False
    if expect is not None:
        if expect != b"100-continue":
            raise ProtocolError(417, "unsupported expectation")
        expect_continue = version == b"1.1"
    if upgrade is not None and b"upgrade" not in connection:
        upgrade = None
    if upgrade is not None and body is not BodyKind.NONE:
        raise ProtocolError(400, "a protocol upgrade request must not have a body")
    return RequestHead(
        method=method,
        target=target,
        version=version,
        headers=headers,
        host=host,
        body=body,
        content_length=length,
        keep_alive=keep_alive,
        expect_continue=expect_continue,
        upgrade=upgrade,
        connection=frozenset(connection) if connection else _NO_TOKENS,
        names=names,
    )


class ResponseParser:
    """Parser for one backend response at a time (PIBL does not pipeline upstream).

    ``head_request`` must be set for a response to HEAD: llhttp cannot be told that such a
    response has no body, so the adapter ends the message itself after the head.
    """

    __slots__ = (
        "_c",
        "_decoders",
        "_done",
        "_head_request",
        "_in_head",
        "_max_head",
        "_may_be_large",
        "_on_interim",
        "_parser",
        "_raw_in_head",
        "_reason",
        "_upgraded",
        "trailing_junk",
    )

    def __init__(
        self,
        *,
        head_request: bool = False,
        max_head_bytes: int = 64 * 1024,
        on_interim: Callable[[ResponseHead], None] | None = None,
    ) -> None:
        self._c = _Collector()
        self._on_interim = on_interim  # called with each 1xx response but 101
        self._parser = httptools.HttpResponseParser(self)
        self._reason = b""
        self._head_request = head_request
        self._done = False
        self._upgraded = False
        self._max_head = max_head_bytes
        self._in_head = False
        self._raw_in_head = 0
        self._may_be_large = True
        self._decoders: list[_TransferDecoder] = []  # last applied coding first
        self.trailing_junk = False

    def reset(
        self, *, head_request: bool, on_interim: Callable[[ResponseHead], None] | None
    ) -> bool:
        """Ready for the next response on the same keep-alive connection; False if this
        parser cannot be used again (llhttp was stopped early, or the last response did
        not end cleanly): then the connection needs a new one."""
        if (
            not self._done
            or self._head_request  # stopped after the head, on purpose
            or self._upgraded
            or self.trailing_junk
            or self._c.error is not None
        ):
            return False
        self._head_request = head_request
        self._on_interim = on_interim
        self._done = False
        self._decoders = []
        return True

    def close(self) -> None:
        """The connection is closed: nothing more will be fed. llhttp's parser and this
        one refer to each other (and ``on_interim`` to the client's side); dropping the
        links lets refcounting free them at once."""
        self._parser = _CLOSED_RESPONSE_PARSER
        self._on_interim = None

    def feed_eof(self) -> list[Event]:
        """The backend closed the connection: the end of a body delimited by close.

        Returns the last decoded bytes and the end of the message; raises ProtocolError
        when a transfer coding was cut short (the body is incomplete).
        """
        if self._done:
            return []
        self._done = True
        events: list[Event] = []
        if self._decoders:
            tail = self._finish_decoders()
            if tail:
                events.append(Body(tail))
        events.append(END)
        return events

    def _finish_decoders(self) -> bytes:
        data = b""
        for decoder in self._decoders:
            data = decoder.decode(data) + decoder.finish() if data else decoder.finish()
        return data

    def feed(self, data: bytes) -> list[Event]:
        if self._upgraded:
            return [Body(data)] if data else []
        if self._done:
            raise ProtocolError(502, "backend sent data after the response")
        try:
            return self._feed(data)
        except ProtocolError:
            if self._done and self._c.events and self._c.events[-1] is END:
                # A complete response followed by junk in the same read (a 204 with a body,
                # say): the response stands, the connection must not be used again.
                self.trailing_junk = True
                return self._c.events
            raise

    def _feed(self, data: bytes) -> list[Event]:
        c = self._c
        events = c.events = []
        # an upper bound of any head completed in this read: what earlier reads gave the
        # head under way, and all of this one (when it is below the limit, so is the head)
        self._may_be_large = self._raw_in_head + len(data) > self._max_head
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
            self._upgraded = True
            events.append(Upgrade(data[offset:]))
        except httptools.HttpParserCallbackError:
            if c.error is None:
                raise ProtocolError(502, "invalid response from backend") from None
            if c.error.status != 0:  # status 0 marks the deliberate stop after a HEAD response
                raise c.error from None
        except httptools.HttpParserError as exc:
            raise ProtocolError(
                502, f"invalid response from backend: {_llhttp_reason(exc)}"
            ) from None
        if self._in_head:  # an endless status or header line is buffered by httptools
            self._raw_in_head += len(data)
            if self._raw_in_head > 2 * self._max_head:
                raise ProtocolError(502, "response head too large")
        return events

    # -- httptools callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._done:  # a second response in the same read: PIBL never asked for it
            self._c.error = ProtocolError(502, "backend sent data after the response")
            raise self._c.error
        self._in_head = True
        self._raw_in_head = 0
        self._c.headers = []
        self._reason = b""

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        # (the head's size is checked once it is complete; one read holds at most what the
        # loop reads at once, and a head spread over reads is bounded in ``_feed``)
        self._c.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        headers = self._c.headers
        if self._may_be_large and sum(len(n) + len(v) + 4 for n, v in headers) > self._max_head:
            self._c.error = ProtocolError(502, "response head too large")
            raise self._c.error
        parser = self._parser
        status: int = parser.get_status_code()
        if not 100 <= status <= 599:  # RFC 9112 section 4: three digits, 1xx to 5xx
            self._c.error = ProtocolError(502, "backend sent an invalid status code")
            raise self._c.error
        if 100 <= status < 200 and status != 101:
            # an interim response (103 Early Hints, 102): handed over, never an event of
            # its own; the final response follows
            if self._on_interim is not None:
                self._on_interim(
                    ResponseHead(
                        status=status,
                        reason=self._reason,
                        version=parser.get_http_version().encode(),
                        headers=self._c.headers,
                    )
                )
            self._c.headers = []
            return
        head = build_response_head(
            status,
            self._reason,
            parser.get_http_version().encode(),
            self._c.headers,
            parser.should_keep_alive(),
            self._head_request,
        )
        self._c.headers = []  # trailers must not alter the head already returned
        self._decoders = [_TransferDecoder(c) for c in reversed(head.codings)]
        self._c.events.append(Head(head))
        if self._head_request and status != 101:
            self._c.events.append(END)
            self._done = True
            self._c.error = ProtocolError(0, "stop")
            raise self._c.error

    def on_body(self, data: bytes) -> None:
        if self._decoders:
            try:
                for decoder in self._decoders:
                    data = decoder.decode(data)
            except ProtocolError as exc:
                self._c.error = exc
                raise
            if not data:
                return
        self._c.events.append(Body(data))

    def on_message_complete(self) -> None:
        if 100 <= self._parser.get_status_code() < 200:
            return
        if self._decoders:
            try:
                tail = self._finish_decoders()
            except ProtocolError as exc:
                self._c.error = exc
                raise
            if tail:
                self._c.events.append(Body(tail))
        self._done = True
        self._c.events.append(END)


# decoded bytes one read of a transfer-coded body may produce (a zip bomb guard)
MAX_EXPANSION = 64 * 1024 * 1024


class _TransferDecoder:
    """Removes one gzip or deflate transfer coding from a streamed body."""

    __slots__ = ("_coding", "_started", "_z")

    def __init__(self, coding: bytes) -> None:
        self._coding = coding
        # gzip (one or more members); deflate is the zlib format of RFC 9110 section
        # 8.4.1.2, raw deflate accepted too (as browsers do)
        self._z = zlib.decompressobj(wbits=15 if coding == b"deflate" else 31)
        self._started = False

    def decode(self, data: bytes) -> bytes:
        out: list[bytes] = []
        produced = 0
        while data:
            try:
                out.append(self._z.decompress(data))
            except zlib.error:
                if self._coding == b"deflate" and not self._started:
                    self._z = zlib.decompressobj(wbits=-15)
                    self._started = True
                    continue
                raise ProtocolError(502, "backend sent a corrupt transfer-coded body") from None
            self._started = True
            produced += len(out[-1])
            if produced > MAX_EXPANSION:
                raise ProtocolError(502, "backend sent a transfer-coded body that expands too much")
            data = self._z.unused_data
            if data:
                if self._coding != b"deflate" and self._z.eof:  # another gzip member
                    self._z = zlib.decompressobj(wbits=31)
                    continue
                raise ProtocolError(502, "backend sent data after a transfer-coded body")
        return b"".join(out)

    def finish(self) -> bytes:
        """The end of the body: the coded stream must be complete."""
        if not self._z.eof:
            raise ProtocolError(502, "backend cut a transfer-coded body short")
        return self._z.flush()


TRANSFER_DECODERS = frozenset({b"gzip", b"x-gzip", b"deflate"})


def build_response_head(
    status: int,
    reason: bytes,
    version: bytes,
    headers: HeaderList,
    keep_alive: bool,
    head_request: bool,
) -> ResponseHead:
    codings: tuple[bytes, ...] = ()
    te: list[bytes] = []
    content_length: bytes | None = None
    connection: list[bytes] = []
    for name, value in headers:
        lname = name.lower()
        if lname not in _RESPONSE_FRAMING:
            continue
        if lname == b"transfer-encoding":
            te.extend(t.strip().lower() for t in value.split(b","))
        elif lname == b"content-length":
            if content_length is not None and content_length != value:
                raise ProtocolError(502, "backend sent conflicting Content-Length")
            content_length = value
        elif lname == b"connection":
            connection.extend(t.strip().lower() for t in value.split(b","))
    if head_request or status in (204, 304) or status < 200:
        body = BodyKind.NONE
        length = 0
        if content_length is not None and content_length.isdigit():
            length = int(content_length)
    elif te:
        # RFC 9112 section 6.3: chunked last means chunked framing; any other final coding
        # means the body runs until the backend closes. The other codings (gzip, deflate)
        # are removed by the parser, since PIBL frames the body again for the client; a
        # coding it cannot remove would reach the client as undeclared bytes: 502.
        te = [t for t in te if t]
        chunked = bool(te) and te[-1] == b"chunked"
        codings = tuple(te[:-1] if chunked else te)
        if any(c not in TRANSFER_DECODERS for c in codings):
            raise ProtocolError(502, "backend sent an unsupported Transfer-Encoding")
        body = BodyKind.CHUNKED if chunked else BodyKind.CLOSE
        if not chunked:
            keep_alive = False
        length = 0
    elif content_length is not None:
        content_length = content_length.strip()
        if not content_length.isdigit():
            raise ProtocolError(502, "backend sent an invalid Content-Length")
        length = int(content_length)
        body = BodyKind.LENGTH if length else BodyKind.NONE
    else:
        body = BodyKind.CLOSE
        length = 0
        keep_alive = False
    return ResponseHead(
        status=status,
        reason=reason,
        version=version,
        headers=headers,
        codings=codings,
        body=body,
        content_length=length,
        keep_alive=keep_alive,
        connection=frozenset(connection) if connection else _NO_TOKENS,
    )


# what a closed parser holds instead of its own llhttp parser (it is never fed again)
_CLOSED_REQUEST_PARSER = httptools.HttpRequestParser(_Collector())
_CLOSED_RESPONSE_PARSER = httptools.HttpResponseParser(_Collector())
