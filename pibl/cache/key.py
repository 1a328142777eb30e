"""Cache keys.

The primary key is the request's effective URI (scheme, lower-cased host, target). A
response with ``Vary`` is stored under a secondary key too: the request's values of the
listed fields, normalised (whitespace around commas collapsed, case kept: RFC 9111 section
4.1 leaves normalisation to the cache and a wrong merge would serve the wrong variant).
Files are named by the SHA-256 of the key, so no request text ever reaches a path.
"""

from __future__ import annotations

import hashlib
import re

from pibl.http.message import HeaderList

_SPACES = re.compile(rb"\s*,\s*")


def primary_key(scheme: bytes, host: bytes, target: bytes) -> bytes:
    return b"%s://%s%s" % (scheme.lower(), host.lower(), target)


def secondary_key(names: list[str], request_headers: HeaderList) -> bytes:
    """The request's values of the Vary fields, in the order Vary lists them."""
    parts = []
    for name in names:
        lname = name.encode("latin-1")
        values = [v.strip() for k, v in request_headers if k.lower() == lname]
        joined = _SPACES.sub(b",", b",".join(values))
        parts.append(lname + b"=" + joined)
    return b"\n".join(parts)


def digest(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()


def variant_digest(primary: bytes, secondary: bytes) -> str:
    return hashlib.sha256(primary + b"\x00" + secondary).hexdigest()
