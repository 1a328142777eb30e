"""Header rewriting between client and backend (RFC 9110 section 7.6), as pure functions.

Both directions follow the same order:

1. drop hop-by-hop fields and every field named in ``Connection`` (they describe the
   connection they arrived on, not the message);
2. drop the fields PIBL owns on this hop (framing, ``X-Forwarded-*``, ``X-Request-ID``);
3. keep everything else, repeated fields and their order included;
4. append PIBL's own fields: ``Via`` after any received ones, ``X-Forwarded-For`` extended
   like nginx's ``$proxy_add_x_forwarded_for``, framing, ``Connection``.

Each function returns the complete head as one ``bytes`` so the shell writes it with one
call.
"""

from __future__ import annotations

import itertools
import os
import re
import uuid

from pibl.http.framing import http_date
from pibl.http.message import BodyKind, RequestHead, ResponseHead

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Fields PIBL sets itself on the request it sends to a backend.
_REQUEST_OWNED = frozenset(
    {b"content-length", b"expect", b"x-forwarded-proto", b"x-forwarded-host", b"x-request-id"}
)
_RESPONSE_OWNED = frozenset({b"content-length", b"x-request-id"})
# what a request or response head sent on never carries as it came (one set test a field)
_NOT_FORWARDED = HOP_BY_HOP | _REQUEST_OWNED
_NOT_RETURNED = HOP_BY_HOP | _RESPONSE_OWNED

_SANE_REASON = re.compile(rb"^[\t \x21-\x7e]{1,64}$")
_SANE_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:@+=/-]{1,128}$")

REASONS: dict[int, bytes] = {
    100: b"Continue",
    101: b"Switching Protocols",
    200: b"OK",
    201: b"Created",
    202: b"Accepted",
    204: b"No Content",
    206: b"Partial Content",
    301: b"Moved Permanently",
    302: b"Found",
    303: b"See Other",
    304: b"Not Modified",
    307: b"Temporary Redirect",
    308: b"Permanent Redirect",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    411: b"Length Required",
    412: b"Precondition Failed",
    413: b"Content Too Large",
    414: b"URI Too Long",
    416: b"Range Not Satisfiable",
    417: b"Expectation Failed",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}


class _RequestIds:
    """Unique ids without a random draw per request: a random per-process prefix + a counter.

    The prefix is drawn again after a fork, so worker processes never share ids.
    """

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._prefix = uuid.uuid4().hex[:16].encode()
        self._counter = itertools.count(1)

    def next(self) -> bytes:
        return b"%s%016x" % (self._prefix, next(self._counter))


_new_id = _RequestIds().next


def request_id(headers_value: bytes | None) -> bytes:
    """Keep a sane client-supplied id, otherwise make a new one (32 hex digits)."""
    if headers_value is not None and _SANE_REQUEST_ID.match(headers_value):
        return headers_value
    return _new_id()


def _connection_named(headers: list[tuple[bytes, bytes]]) -> frozenset[bytes]:
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named.update(t.strip().lower() for t in value.split(b","))
    return frozenset(named)


def upstream_request(
    head: RequestHead,
    *,
    client_ip: str,
    scheme: bytes,
    rid: bytes,
    via: bytes,
    default_host: bytes,
    body: BodyKind,
    content_length: int = 0,
    drop: frozenset[bytes] = frozenset(),
    extra: list[tuple[bytes, bytes]] | None = None,
) -> bytes:
    """The request head PIBL sends to a backend (always HTTP/1.1, keep-alive).

    ``drop`` removes more fields (the cache drops the client's conditionals when it
    revalidates with its own) and ``extra`` appends fields (those validators).
    """
    named = head.connection if head.connection is not None else _connection_named(head.headers)
    if drop:
        named = named | drop
    host = head.host or default_host
    out = [head.method, b" ", head.target, b" HTTP/1.1\r\n"]
    append = out.append
    extend = out.extend
    xff: bytes | None = None
    host_written = False
    for name, value in head.headers:
        lname = name.lower()
        if lname in _NOT_FORWARDED or lname in named:
            continue
        if lname == b"x-forwarded-for":
            xff = value if xff is None else xff + b", " + value
            continue
        if lname == b"host":
            if host_written:
                continue
            host_written = True
            value = host
        extend((name, b": ", value, b"\r\n"))
    if not host_written:
        append(b"Host: %s\r\n" % host)
    client = client_ip.encode()
    append(b"X-Forwarded-For: %s\r\n" % (xff + b", " + client if xff else client))
    append(b"X-Forwarded-Proto: %s\r\n" % scheme)
    append(b"X-Forwarded-Host: %s\r\n" % host)
    append(b"X-Request-ID: %s\r\n" % rid)
    append(b"Via: %s %s\r\n" % (head.version, via))
    for name, value in extra or ():
        append(b"%s: %s\r\n" % (name, value))
    if head.upgrade is not None:
        append(b"Connection: upgrade\r\nUpgrade: %s\r\n" % head.upgrade)
    if body is BodyKind.LENGTH:
        append(b"Content-Length: %d\r\n" % content_length)
    elif body is BodyKind.CHUNKED:
        append(b"Transfer-Encoding: chunked\r\n")
    append(b"\r\n")
    return b"".join(out)


def interim_response(resp: ResponseHead) -> bytes:
    """An interim (1xx) response as forwarded to an HTTP/1.1 client, hop-by-hop fields
    removed (103 Early Hints carries its Link fields through)."""
    named = _connection_named(resp.headers)
    out = [status_line(resp.status, resp.reason)]
    for name, value in resp.headers:
        lname = name.lower()
        if lname not in HOP_BY_HOP and lname not in named and lname != b"content-length":
            out.append(b"%s: %s\r\n" % (name, value))
    out.append(b"\r\n")
    return b"".join(out)


_status_lines: dict[tuple[int, bytes], bytes] = {}


def status_line(status: int, reason: bytes) -> bytes:
    """``HTTP/1.1 <status> <reason>``: the backend's reason phrase when it is sane, else
    the standard one; made once per status and phrase (a few hundred are kept)."""
    key = (status, reason)
    line = _status_lines.get(key)
    if line is None:
        sane = reason if _SANE_REASON.match(reason) else b""
        line = b"HTTP/1.1 %d %s\r\n" % (status, sane or REASONS.get(status, b"Unknown"))
        if len(_status_lines) >= 512:
            _status_lines.clear()
        _status_lines[key] = line
    return line


def client_response(
    resp: ResponseHead,
    *,
    framing: BodyKind,
    keep_alive: bool,
    client_version: bytes,
    rid: bytes,
    via: bytes,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> bytes:
    """The response head PIBL sends to the client for a backend's response ``resp``."""
    named = resp.connection if resp.connection is not None else _connection_named(resp.headers)
    status = resp.status
    out = [status_line(status, resp.reason)]
    extend = out.extend
    has_date = False
    for name, value in resp.headers:
        lname = name.lower()
        if lname in _NOT_RETURNED or lname in named:
            # Content-Length passes through unless PIBL re-frames the body.
            if lname == b"content-length" and (
                framing is BodyKind.LENGTH
                or (framing is BodyKind.NONE and resp.body is BodyKind.NONE)
            ):
                extend((name, b": ", value, b"\r\n"))
            continue
        if lname == b"date":
            has_date = True
        extend((name, b": ", value, b"\r\n"))
    append = out.append
    if not has_date:
        append(b"Date: %s\r\n" % http_date())
    if extra:
        for name, value in extra:
            append(b"%s: %s\r\n" % (name, value))
    append(b"Via: %s %s\r\n" % (resp.version, via))
    append(b"X-Request-ID: %s\r\n" % rid)
    if status == 101:
        append(b"Connection: upgrade\r\n")
        for name, value in resp.headers:
            if name.lower() == b"upgrade":
                append(b"Upgrade: %s\r\n" % value)
    elif framing is BodyKind.CHUNKED:
        append(b"Transfer-Encoding: chunked\r\n")
    if status != 101:
        if not keep_alive:
            append(b"Connection: close\r\n")
        elif client_version == b"1.0":
            append(b"Connection: keep-alive\r\n")
    append(b"\r\n")
    return b"".join(out)


def client_response_fields(
    resp: ResponseHead,
    *,
    framing: BodyKind,
    rid: bytes,
    via: bytes,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> list[tuple[bytes, bytes]]:
    """The same response head as ``client_response``, for an HTTP/2 client: the fields of
    its HEADERS frame (``:status`` first, lower-case names, no connection-specific field,
    RFC 9113 §8.2.2), built in one pass instead of written as HTTP/1.1 and read back."""
    named = resp.connection if resp.connection is not None else _connection_named(resp.headers)
    keep_length = framing is BodyKind.LENGTH or (
        framing is BodyKind.NONE and resp.body is BodyKind.NONE
    )
    out = [(b":status", b"%d" % resp.status)]
    append = out.append
    has_date = False
    for name, value in resp.headers:
        lname = name.lower()
        if lname in _NOT_RETURNED or lname in named:
            if lname == b"content-length" and keep_length:
                append((lname, value))
            continue
        if lname == b"date":
            has_date = True
        append((lname, value))
    if not has_date:
        append((b"date", http_date()))
    if extra:  # (PIBL's own: cache status, sticky cookie, HSTS; never connection-specific)
        for name, value in extra:
            append((name.lower(), value))
    append((b"via", b"%s %s" % (resp.version, via)))
    append((b"x-request-id", rid))
    return out


def stored_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """End-to-end fields of a response, as a cache keeps them (framing and Age dropped)."""
    named = _connection_named(headers)
    return [
        (k, v)
        for k, v in headers
        if (lk := k.lower()) not in HOP_BY_HOP
        and lk not in named
        and lk not in (b"content-length", b"age", b"x-request-id")
    ]


def body_length(response: bytes) -> int:
    """The body bytes of a whole response (what the access log counts, like a backend's)."""
    return len(response) - response.index(b"\r\n\r\n") - 4


def simple_response(
    status: int,
    message: str,
    *,
    keep_alive: bool = False,
    rid: bytes | None = None,
    head_only: bool = False,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> bytes:
    """A short plain-text response PIBL makes itself (errors, 100-continue aside)."""
    body = f"{status} {REASONS.get(status, b'Error').decode()}: {message}\n".encode()
    out = [
        b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b"Error")),
        b"Date: %s\r\n" % http_date(),
        b"Content-Type: text/plain; charset=utf-8\r\n",
        b"Content-Length: %d\r\n" % len(body),
        b"Cache-Control: no-store\r\n",
    ]
    if rid is not None:
        out.append(b"X-Request-ID: %s\r\n" % rid)
    for name, value in extra or ():
        out.append(b"%s: %s\r\n" % (name, value))
    out.append(b"Connection: keep-alive\r\n\r\n" if keep_alive else b"Connection: close\r\n\r\n")
    if not head_only:
        out.append(body)
    return b"".join(out)
