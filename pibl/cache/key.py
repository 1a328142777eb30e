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
from collections.abc import Callable

from pibl.http.message import HeaderList

_SPACES = re.compile(rb"\s*,\s*")


def primary_key(scheme: bytes, host: bytes, target: bytes) -> bytes:
    return b"%s://%s%s" % (scheme.lower(), host.lower(), target)


Normalizer = Callable[[str, list[bytes]], bytes | None]


def secondary_key(
    names: list[str], request_headers: HeaderList, normalize: Normalizer | None = None
) -> bytes:
    """The request's values of the Vary fields, in the order Vary lists them.

    A field the request lacks is written without ``=``, so "absent" and "empty" differ
    (for ``Accept-Encoding`` they mean different things). ``normalize`` may map a field's
    values to a canonical form (the cache maps ``Accept-Encoding`` to what PIBL would
    negotiate, so equivalent browsers share one variant).
    """
    parts = []
    for name in names:
        lname = name.encode("latin-1", "replace")
        values = [v.strip() for k, v in request_headers if k.lower() == lname]
        canonical = normalize(name, values) if normalize is not None else None
        if canonical is not None:
            parts.append(lname + b":" + canonical)
        elif not values:
            parts.append(lname)
        else:
            parts.append(lname + b"=" + _SPACES.sub(b",", b",".join(values)))
    return b"\n".join(parts)


def digest(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()


def variant_name(primary: bytes, secondary: bytes) -> bytes:
    """What a variant's digest hashes: ``variant_digest(p, s) == digest(variant_name(p, s))``."""
    return primary + b"\x00" + secondary


def variant_digest(primary: bytes, secondary: bytes) -> str:
    return digest(variant_name(primary, secondary))
