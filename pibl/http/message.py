"""Message heads as plain values.

Headers are kept as an ordered list of ``(name, value)`` byte pairs exactly as received:
a dict would lose repeated headers (``Set-Cookie``, ``Via``) and their order, which a proxy
must keep (RFC 9110 section 5.3). Look-ups are case-insensitive and done on demand; the
hot path iterates the list once.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

HeaderList = list[tuple[bytes, bytes]]


class BodyKind(enum.Enum):
    NONE = "none"  # no body at all
    LENGTH = "length"  # Content-Length bytes follow
    CHUNKED = "chunked"  # chunked transfer coding
    CLOSE = "close"  # responses only: body runs until the connection closes


def get_header(headers: HeaderList, name: bytes) -> bytes | None:
    """First value of ``name`` (lower-case) or None."""
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


NO_FIELDS: HeaderList = []  # (never changed: read by rules given a request's fields)


def fields_with(head: RequestHead, first: bytes, second: bytes = b"") -> HeaderList:
    """The request's fields for a rule that reads only ``first`` (and ``second``): none at
    all when the parser noted that the request has neither, so the rule does not walk
    them to find nothing."""
    names = head.names
    if names is None or first in names or (second and second in names):
        return head.headers
    return NO_FIELDS


def get_all(headers: HeaderList, name: bytes) -> list[bytes]:
    return [value for key, value in headers if key.lower() == name]


def header_tokens(headers: HeaderList, name: bytes) -> list[bytes]:
    """Comma-separated list header as lower-case tokens (``Connection: close, Upgrade``)."""
    out: list[bytes] = []
    for key, value in headers:
        if key.lower() == name:
            out.extend(tok.strip().lower() for tok in value.split(b",") if tok.strip())
    return out


# ``init=False`` with an ``__init__`` of their own: the compiled build makes that a native
# constructor (the one ``dataclass`` writes runs as interpreted code), and one of each is
# made for every exchange. ``dataclass`` still gives them ``__eq__`` and ``__repr__``.
@dataclass(slots=True, init=False)
class RequestHead:
    method: bytes
    target: bytes
    version: bytes  # b"1.1" or b"1.0"
    headers: HeaderList
    host: bytes
    body: BodyKind
    content_length: int
    keep_alive: bool
    expect_continue: bool
    upgrade: bytes | None  # the Upgrade header value when the client asks to switch
    # the tokens of every Connection field (lower case), when the parser collected them
    # (derived from ``headers``: not compared)
    connection: frozenset[bytes] | None = field(compare=False)
    # the request came on an HTTP/2 stream (served as HTTP/1.1, logged as HTTP/2.0)
    http2: bool = field(compare=False)
    # the lower-case names of its fields, when the parser noted them (derived from
    # ``headers``: not compared): a rule that reads a field the request lacks is skipped
    # (``fields_with``)
    names: set[bytes] | None = field(compare=False)

    def __init__(
        self,
        method: bytes,
        target: bytes,
        version: bytes,
        headers: HeaderList,
        host: bytes = b"",
        body: BodyKind = BodyKind.NONE,
        content_length: int = 0,
        keep_alive: bool = True,
        expect_continue: bool = False,
        upgrade: bytes | None = None,
        connection: frozenset[bytes] | None = None,
        http2: bool = False,
        names: set[bytes] | None = None,
    ) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.host = host
        self.body = body
        self.content_length = content_length
        self.keep_alive = keep_alive
        self.expect_continue = expect_continue
        self.upgrade = upgrade
        self.connection = connection
        self.http2 = http2
        self.names = names

    @property
    def request_line(self) -> str:
        method = self.method.decode("latin-1")
        version = "2.0" if self.http2 else self.version.decode()
        return f"{method} {self.target.decode('latin-1')} HTTP/{version}"


@dataclass(slots=True, init=False)
class ResponseHead:
    status: int
    reason: bytes
    version: bytes
    headers: HeaderList
    body: BodyKind
    content_length: int
    keep_alive: bool
    # transfer codings besides chunked (gzip, deflate), in the order applied: the parser
    # removes them, so bodies past it are the representation's bytes
    codings: tuple[bytes, ...]
    connection: frozenset[bytes] | None = field(compare=False)  # as in RequestHead

    def __init__(
        self,
        status: int,
        reason: bytes,
        version: bytes,
        headers: HeaderList | None = None,
        body: BodyKind = BodyKind.NONE,
        content_length: int = 0,
        keep_alive: bool = True,
        codings: tuple[bytes, ...] = (),
        connection: frozenset[bytes] | None = None,
    ) -> None:
        self.status = status
        self.reason = reason
        self.version = version
        self.headers = [] if headers is None else headers
        self.body = body
        self.content_length = content_length
        self.keep_alive = keep_alive
        self.codings = codings
        self.connection = connection
