"""HTTP/2 request fields to an HTTP/1.1 request head, and back for responses (RFC 9113 §8).

Pure functions: the HTTP/2 connection (``pibl.proxy.h2``) hands over the decoded field
list of a request's HEADERS and gets a ``RequestHead`` the exchanges serve like any other,
or ``ProtocolError``, which it answers with RST_STREAM PROTOCOL_ERROR (a header list larger
than SETTINGS_MAX_HEADER_LIST_SIZE: a 431 response on the stream): the request never
reaches a backend. Every rule is here, in one place:

* pseudo-header fields (``:method``, ``:scheme``, ``:path``, ``:authority``): each at most
  once, before every regular field, none unknown; ``:method``, ``:scheme`` and ``:path``
  present (``CONNECT`` is refused: a reverse proxy does not tunnel);
* field names: lower case, a token (no CR, LF, NUL, whitespace, colon), never empty;
* field values: no CR, LF or NUL, no leading or trailing space or tab;
* connection-specific fields (``Connection``, ``Keep-Alive``, ``Proxy-Connection``,
  ``Transfer-Encoding``, ``Upgrade``) are malformed; ``TE`` only as ``trailers``;
* ``Content-Length``: digits, one value; the connection checks it against DATA received;
* ``Host`` is ``:authority`` (a ``Host`` field naming another authority is malformed);
  cookies split across fields are joined with ``"; "`` (§8.2.3).

The head keeps ``version = b"1.1"``, so a body of unknown length goes upstream chunked.
"""

from __future__ import annotations

import re

from pibl.errors import ProtocolError
from pibl.http.message import BodyKind, HeaderList, RequestHead
from pibl.http.parse import _HOST_RE

_PSEUDO = frozenset((b":method", b":scheme", b":path", b":authority"))
CONNECTION_SPECIFIC = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade")
)
_NAME_RE = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9a-z]+$")
_BAD_VALUE = re.compile(rb"[\r\n\x00]")
_METHOD_RE = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_PATH_RE = re.compile(rb"^[\x21-\x7e\x80-\xff]+$")

# Response fields HTTP/2 cannot carry (RFC 9113 §8.2.2), besides those the Connection
# field names.
RESPONSE_DROP = CONNECTION_SPECIFIC | {b"te", b"trailer"}


def _malformed(reason: str) -> ProtocolError:
    return ProtocolError(400, f"malformed HTTP/2 request: {reason}")


def check_field(name: bytes, value: bytes) -> None:
    """Raise for a field name or value HTTP/2 does not allow (§8.2.1)."""
    if not name:
        raise _malformed("empty field name")
    if name[0] != 0x3A and not _NAME_RE.match(name):  # (pseudo-fields are checked by name)
        raise _malformed(f"invalid field name {name[:40]!r}")
    if _BAD_VALUE.search(value):
        raise _malformed(f"CR, LF or NUL in the value of {name[:40]!r}")
    if value and (value[0] in b" \t" or value[-1] in b" \t"):
        raise _malformed(f"whitespace around the value of {name[:40]!r}")


def request_head(
    fields: HeaderList, end_stream: bool, max_size: int = 2**31, max_fields: int = 2**31
) -> RequestHead:
    """The HTTP/1.1 request head of an HTTP/2 request's fields, or ``ProtocolError``.

    ``end_stream``: the HEADERS frame ended the stream (the request has no body).
    ``max_size``: SETTINGS_MAX_HEADER_LIST_SIZE; a larger list (names and values plus 32
    bytes a field, RFC 9113 §6.5.2) is ``ProtocolError(431)``, answered on its stream.
    ``max_fields``: ``[limits] max_headers``, as for an HTTP/1.1 head: more regular fields
    are ``ProtocolError(431)`` too (cookie crumbs count as the one field they become).
    """
    size = 32 * len(fields)
    pseudo: dict[bytes, bytes] = {}
    headers: HeaderList = []
    cookies: list[bytes] = []
    host: bytes | None = None
    content_length: bytes | None = None
    regular = False
    for name, value in fields:
        size += len(name) + len(value)
        check_field(name, value)
        if name[0] == 0x3A:  # b":"
            if regular:
                raise _malformed(f"pseudo-header {name!r} after a regular field")
            if name not in _PSEUDO:
                raise _malformed(f"unknown pseudo-header {name[:40]!r}")
            if name in pseudo:
                raise _malformed(f"duplicated pseudo-header {name!r}")
            pseudo[name] = value
            continue
        regular = True
        if name in CONNECTION_SPECIFIC:
            raise _malformed(f"connection-specific field {name!r}")
        if name == b"te":
            if value != b"trailers":
                raise _malformed("TE other than trailers")
            continue  # (a hop-by-hop field: not forwarded)
        if name == b"cookie":
            cookies.append(value)
            continue
        if name == b"host":
            if host is not None:
                raise _malformed("duplicated Host field")
            host = value
        elif name == b"content-length":
            if content_length is not None and content_length != value:
                raise _malformed("conflicting content-length")
            if not value.isdigit() or len(value) > 18:
                raise _malformed("invalid content-length")
            if content_length is not None:
                continue  # the same value twice: forwarded once
            content_length = value
        headers.append((name, value))
    if size > max_size:
        raise ProtocolError(
            431, f"request header fields too large ({size} bytes, limit {max_size})"
        )
    if len(headers) + (1 if cookies else 0) > max_fields:
        raise ProtocolError(431, "too many header fields")
    method = pseudo.get(b":method")
    scheme = pseudo.get(b":scheme")
    path = pseudo.get(b":path")
    authority = pseudo.get(b":authority")
    if method is None:
        raise _malformed("missing :method")
    if method == b"CONNECT":
        raise _malformed("CONNECT is not supported by a reverse proxy")
    if not _METHOD_RE.match(method):
        raise _malformed("invalid :method")
    if scheme is None or path is None:
        raise _malformed("missing :scheme or :path")
    if scheme not in (b"http", b"https"):
        raise _malformed("unsupported :scheme")
    if not _PATH_RE.match(path) or not (path[0] == 0x2F or (path == b"*" and method == b"OPTIONS")):
        raise _malformed("invalid :path")
    if authority is not None:
        if not authority or b"@" in authority or not _HOST_RE.match(authority):
            raise _malformed("invalid :authority")
        if host is not None and host.lower() != authority.lower():
            raise _malformed("Host differs from :authority")
        if host is None:
            headers.insert(0, (b"host", authority))
        host = authority
    elif host is None or not host or not _HOST_RE.match(host):
        raise _malformed("no :authority and no valid Host")
    if cookies:
        headers.append((b"cookie", b"; ".join(cookies)))
    if end_stream:
        body, length = BodyKind.NONE, 0
        if content_length is not None and int(content_length) != 0:
            raise _malformed("content-length without DATA")
    elif content_length is not None:
        length = int(content_length)
        body = BodyKind.LENGTH if length else BodyKind.NONE
    else:
        body, length = BodyKind.CHUNKED, 0  # a body of unknown length: chunked upstream
    expect = next((v for n, v in headers if n == b"expect"), None)
    if expect is not None and expect.lower() != b"100-continue":
        raise ProtocolError(417, "unsupported expectation")
    return RequestHead(
        method=method,
        target=path,
        version=b"1.1",
        headers=headers,
        host=host,
        body=body,
        content_length=length,
        keep_alive=True,
        expect_continue=expect is not None and body is not BodyKind.NONE,
        upgrade=None,
        connection=frozenset(),
        http2=True,
    )


def response_fields(status: int, headers: HeaderList) -> HeaderList:
    """An HTTP/1.1 response head's fields as HTTP/2 HEADERS (hop-by-hop removed)."""
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named.update(t.strip().lower() for t in value.split(b","))
    out: HeaderList = [(b":status", str(status).encode())]
    for name, value in headers:
        lname = name.lower()
        if lname in RESPONSE_DROP or lname in named:
            continue
        out.append((lname, value))
    return out
