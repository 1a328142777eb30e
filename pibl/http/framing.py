"""Message body framing (RFC 9112 section 6) for what PIBL writes.

llhttp decodes the chunked coding on input, so bodies travel through PIBL as plain byte
chunks and are framed again on output: kept with ``Content-Length`` when the length is
known, re-chunked for HTTP/1.1 peers otherwise, and delimited by closing the connection
for an HTTP/1.0 client that cannot read chunked.
"""

from __future__ import annotations

import time
from email.utils import formatdate

from pibl.http.message import BodyKind

LAST_CHUNK = b"0\r\n\r\n"


def encode_chunk(data: bytes) -> bytes:
    """One chunk of the chunked coding; empty data would end the body, so it yields nothing."""
    if not data:
        return b""
    return b"%x\r\n%b\r\n" % (len(data), data)


def client_framing(body: BodyKind, client_version: bytes) -> BodyKind:
    """How a response body of upstream kind ``body`` is framed towards the client."""
    if body is BodyKind.CHUNKED or body is BodyKind.CLOSE:
        return BodyKind.CHUNKED if client_version == b"1.1" else BodyKind.CLOSE
    return body


class _DateCache:
    """The ``Date`` value, formatted at most once a second (uvicorn does the same)."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def get(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = formatdate(now, usegmt=True).encode()
        return self._value


http_date = _DateCache().get
