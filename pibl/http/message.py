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


def get_all(headers: HeaderList, name: bytes) -> list[bytes]:
    return [value for key, value in headers if key.lower() == name]


def header_tokens(headers: HeaderList, name: bytes) -> list[bytes]:
    """Comma-separated list header as lower-case tokens (``Connection: close, Upgrade``)."""
    out: list[bytes] = []
    for key, value in headers:
        if key.lower() == name:
            out.extend(tok.strip().lower() for tok in value.split(b",") if tok.strip())
    return out


@dataclass(slots=True)
class RequestHead:
    method: bytes
    target: bytes
    version: bytes  # b"1.1" or b"1.0"
    headers: HeaderList
    host: bytes = b""
    body: BodyKind = BodyKind.NONE
    content_length: int = 0
    keep_alive: bool = True
    expect_continue: bool = False
    upgrade: bytes | None = None  # the Upgrade header value when the client asks to switch
    # the tokens of every Connection field (lower case), when the parser collected them
    # (derived from ``headers``: not compared)
    connection: frozenset[bytes] | None = field(default=None, compare=False)
    # the request came on an HTTP/2 stream (served as HTTP/1.1, logged as HTTP/2.0)
    http2: bool = field(default=False, compare=False)

    @property
    def request_line(self) -> str:
        method = self.method.decode("latin-1")
        version = "2.0" if self.http2 else self.version.decode()
        return f"{method} {self.target.decode('latin-1')} HTTP/{version}"


@dataclass(slots=True)
class ResponseHead:
    status: int
    reason: bytes
    version: bytes
    headers: HeaderList = field(default_factory=list)
    body: BodyKind = BodyKind.NONE
    content_length: int = 0
    keep_alive: bool = True
    # transfer codings besides chunked (gzip, deflate), in the order applied: the parser
    # removes them, so bodies past it are the representation's bytes
    codings: tuple[bytes, ...] = ()
    connection: frozenset[bytes] | None = field(default=None, compare=False)  # as in RequestHead
