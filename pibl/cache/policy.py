"""Shared-cache decisions of RFC 9111 (and RFC 5861), as pure functions.

Nothing here touches the disk or the clock: callers pass header lists and ``now``. The
module answers five questions:

* ``storable``: may a shared cache store this response to this request? (section 3)
* ``freshness_lifetime`` and ``current_age``: how long is it fresh, how old is it? (4.2)
* ``usable``: may a stored response answer this request, fresh or stale? (4, 4.2.4,
  request directives of 5.2.1, stale-while-revalidate / stale-if-error of RFC 5861)
* ``not_modified``: does a client's conditional request match a stored response? (RFC 9110
  section 13.1)
* ``invalidates``: which URIs does an unsafe request invalidate? (4.4)

Where the RFC leaves a choice the conservative one is taken and said so: a response with
``Set-Cookie`` is not stored (nginx and Varnish do the same by default: a cookie is per user),
qualified ``no-cache="field"`` and ``private="field"`` are treated as unqualified, and a
request with ``Range`` bypasses the cache.

The launch-time TTL (``--cache-ttl``) is the lifetime given to a storable response that
carries no explicit freshness (no ``s-maxage``, ``max-age`` or ``Expires``). With TTL 0
PIBL falls back to strict RFC behaviour: heuristic freshness (10% of the time since
``Last-Modified``, at most a day) only for the status codes the RFC calls heuristically
cacheable, or when the response says ``public``.
"""

from __future__ import annotations

import datetime
import email.utils
import re
from dataclasses import dataclass

from pibl.http.message import HeaderList, get_all, get_header

# RFC 9110 section 15.1: status codes heuristically cacheable by default.
HEURISTIC_STATUSES = frozenset({200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501})
# Status codes this cache understands well enough to store (section 3: "the response status
# code is final and ... understood"). 206 is excluded: PIBL does not combine partial content.
STORABLE_STATUSES = frozenset(
    {200, 203, 204, 300, 301, 302, 303, 307, 308, 404, 405, 410, 414, 501}
)
SAFE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE"})
HEURISTIC_FRACTION = 0.1
HEURISTIC_MAX = 86400.0


@dataclass(frozen=True, slots=True)
class CacheControl:
    """Parsed Cache-Control directives (names lower-case; value None when absent)."""

    directives: dict[str, str | None]

    def has(self, name: str) -> bool:
        return name in self.directives

    def seconds(self, name: str) -> int | None:
        """A delta-seconds argument; invalid values count as absent (None)."""
        if name not in self.directives:
            return None
        value = self.directives[name]
        if value is None:
            return None
        value = value.strip().strip('"')
        if not (value.isascii() and value.isdigit()):
            return None
        return min(int(value), 2**31)


def parse_cache_control(headers: HeaderList) -> CacheControl:
    out: dict[str, str | None] = {}
    for name, raw in headers:
        if name.lower() != b"cache-control":
            continue
        for part in _split_directives(raw.decode("latin-1")):
            key, sep, value = part.partition("=")
            key = key.strip().lower()
            if not key:
                continue
            if key not in out:  # first occurrence wins for a repeated directive
                out[key] = value.strip() if sep else None
    return CacheControl(out)


def _split_directives(text: str) -> list[str]:
    """Split on commas outside quoted strings (``no-cache="a, b"`` is one directive)."""
    if '"' not in text:  # the usual case, without walking every character
        return [p.strip() for p in text.split(",") if p.strip()]
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


_ASCTIME = re.compile(rb"^[A-Za-z]{3} [A-Za-z]{3} [ 0-9][0-9] [0-9:]{8} [0-9]{4}$")


def parse_http_date(value: bytes | None) -> float | None:
    """An HTTP-date (RFC 9110 section 5.6.7) as a timestamp; None if invalid.

    Only the three HTTP formats are accepted: IMF-fixdate and RFC 850 dates must say GMT,
    asctime dates carry no zone and are UTC. Local time never enters the computation.
    """
    if value is None:
        return None
    value = value.strip()
    if not (value.upper().endswith(b" GMT") or _ASCTIME.match(value)):
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value.decode("latin-1"))
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed is None:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.UTC)
    try:
        return parsed.timestamp()
    except (OverflowError, OSError, ValueError):
        return None


def vary_names(headers: HeaderList) -> list[str]:
    """Lower-case field names listed in Vary; ``["*"]`` for Vary: *."""
    names: list[str] = []
    for value in get_all(headers, b"vary"):
        for token in value.decode("latin-1").split(","):
            token = token.strip().lower()
            if token and token not in names:
                names.append(token)
    return ["*"] if "*" in names else names


# -- storing ----------------------------------------------------------------------------


def storable(
    method: bytes,
    request_headers: HeaderList,
    status: int,
    response_headers: HeaderList,
    *,
    default_ttl: float,
) -> tuple[bool, str]:
    """Whether a shared cache may store this response, and the reason if not."""
    if method != b"GET":
        return False, "method"
    if status not in STORABLE_STATUSES:
        return False, "status"
    req_cc = parse_cache_control(request_headers)
    if req_cc.has("no-store"):
        return False, "request no-store"
    if get_header(request_headers, b"range") is not None:
        return False, "range request"
    cc = parse_cache_control(response_headers)
    if cc.has("no-store"):
        return False, "no-store"
    if cc.has("private"):
        return False, "private"
    if get_header(request_headers, b"authorization") is not None and not (
        cc.has("public") or cc.has("s-maxage") or cc.has("must-revalidate")
    ):
        return False, "authorization"
    if get_header(response_headers, b"set-cookie") is not None:
        return False, "set-cookie"
    if vary_names(response_headers) == ["*"]:
        return False, "vary *"
    if get_header(response_headers, b"content-range") is not None:
        return False, "partial content"
    explicit = (
        cc.has("s-maxage")
        or cc.has("max-age")
        or get_header(response_headers, b"expires") is not None
    )
    if explicit or cc.has("public"):
        return True, ""
    # A heuristically cacheable status may be stored; PIBL only bothers when it can be
    # fresh (a default TTL or Last-Modified) or must be revalidated anyway (no-cache).
    heuristic = default_ttl > 0 or get_header(response_headers, b"last-modified") is not None
    if status in HEURISTIC_STATUSES and (heuristic or cc.has("no-cache")):
        return True, ""
    return False, "no freshness information"


# -- freshness and age ------------------------------------------------------------------


def freshness_lifetime(status: int, headers: HeaderList, *, default_ttl: float) -> float:
    """Seconds a stored response is fresh for a shared cache (section 4.2.1)."""
    cc = parse_cache_control(headers)
    s_maxage = cc.seconds("s-maxage")
    if s_maxage is not None:
        return float(s_maxage)
    max_age = cc.seconds("max-age")
    if max_age is not None:
        return float(max_age)
    if cc.has("max-age") or cc.has("s-maxage"):
        return 0.0  # present but invalid: treat as stale (section 4.2.1)
    expires_raw = get_header(headers, b"expires")
    if expires_raw is not None:
        expires = parse_http_date(expires_raw)
        date = parse_http_date(get_header(headers, b"date"))
        if expires is None or date is None:
            return 0.0  # an invalid Expires (such as "0") means already expired
        return max(0.0, expires - date)
    if default_ttl > 0:
        return float(default_ttl)
    if status in HEURISTIC_STATUSES or cc.has("public"):
        last_modified = parse_http_date(get_header(headers, b"last-modified"))
        date = parse_http_date(get_header(headers, b"date"))
        if last_modified is not None and date is not None and date > last_modified:
            return min(HEURISTIC_MAX, (date - last_modified) * HEURISTIC_FRACTION)
    return 0.0


def initial_age(headers: HeaderList, request_time: float, response_time: float) -> float:
    """``corrected_initial_age`` of section 4.2.3, fixed when the response is received."""
    age_raw = get_header(headers, b"age")
    age_value = 0.0
    if age_raw is not None and age_raw.strip().isdigit():
        age_value = float(int(age_raw.strip()))
    date = parse_http_date(get_header(headers, b"date"))
    apparent_age = max(0.0, response_time - date) if date is not None else 0.0
    response_delay = max(0.0, response_time - request_time)
    corrected_age_value = age_value + response_delay
    return max(apparent_age, corrected_age_value)


def current_age(initial: float, response_time: float, now: float) -> float:
    return initial + max(0.0, now - response_time)


# -- using a stored response --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Decision:
    """How a stored response may be used for a request.

    ``action`` is one of:
    ``"fresh"``   serve it;
    ``"stale"``   serve it although stale (max-stale, or stale-while-revalidate: then
                  ``background`` asks for a revalidation in the background);
    ``"revalidate"`` ask the origin first (with validators if the entry has any);
    ``"miss"``    it cannot be used at all for this request.
    """

    action: str
    age: float
    lifetime: float
    background: bool = False
    stale_if_error: float = 0.0  # seconds of staleness allowed if the origin fails


def usable(
    request_headers: HeaderList,
    stored_headers: HeaderList,
    *,
    lifetime: float,
    age: float,
    max_stale_on_error: float,
) -> Decision:
    req = parse_cache_control(request_headers)
    res = parse_cache_control(stored_headers)
    staleness = age - lifetime
    fresh = staleness < 0
    # How long past freshness the origin's failure may be covered by this entry.
    no_stale = res.has("must-revalidate") or res.has("proxy-revalidate") or res.has("s-maxage")
    sie = 0.0
    if not no_stale:
        sie_res = res.seconds("stale-if-error")
        sie_req = req.seconds("stale-if-error")
        sie = float(max(max_stale_on_error, sie_res or 0, sie_req or 0))
    pragma_no_cache = not req.directives and any(
        b"no-cache" in v.lower() for v in get_all(request_headers, b"pragma")
    )
    if res.has("no-cache"):
        # Never used without a successful validation, not even when the origin fails.
        return Decision("revalidate", age, lifetime, stale_if_error=float("-inf"))
    if req.has("no-cache") or pragma_no_cache:
        return Decision("revalidate", age, lifetime, stale_if_error=sie)
    max_age = req.seconds("max-age")
    if max_age is not None and age > max_age:
        return Decision("revalidate", age, lifetime, stale_if_error=sie)
    min_fresh = req.seconds("min-fresh")
    if min_fresh is not None and lifetime - age < min_fresh:
        return Decision("revalidate", age, lifetime, stale_if_error=sie)
    if fresh:
        return Decision("fresh", age, lifetime, stale_if_error=sie)
    if no_stale:
        return Decision("revalidate", age, lifetime)
    if req.has("max-stale"):
        limit = req.seconds("max-stale")
        if limit is None or staleness <= limit:
            return Decision("stale", age, lifetime, stale_if_error=sie)
    swr = res.seconds("stale-while-revalidate")
    if swr is not None and staleness <= swr:
        return Decision("stale", age, lifetime, background=True, stale_if_error=sie)
    return Decision("revalidate", age, lifetime, stale_if_error=sie)


def only_if_cached(request_headers: HeaderList) -> bool:
    return parse_cache_control(request_headers).has("only-if-cached")


def bypass_reason(method: bytes, request_headers: HeaderList) -> str | None:
    """Requests that never use the cache (the response may still invalidate it)."""
    if method not in (b"GET", b"HEAD"):
        return "method"
    if get_header(request_headers, b"range") is not None:
        return "range"
    if parse_cache_control(request_headers).has("no-store"):
        return "no-store"
    return None


def may_serve_with_authorization(request_headers: HeaderList, stored_headers: HeaderList) -> bool:
    """Section 3.5: a request with Authorization may only get a response marked shareable."""
    if get_header(request_headers, b"authorization") is None:
        return True
    cc = parse_cache_control(stored_headers)
    return cc.has("public") or cc.has("s-maxage") or cc.has("must-revalidate")


# -- conditional requests -----------------------------------------------------------------


_ENTITY_TAG = re.compile(rb'\*|(?:W/)?"[\x21\x23-\x7e\x80-\xff]*"')


def _etags(value: bytes) -> list[bytes]:
    """Entity tags of an If-None-Match value (a tag may itself contain a comma)."""
    return list(_ENTITY_TAG.findall(value))


def _weak_equal(a: bytes, b: bytes) -> bool:
    return a.removeprefix(b"W/") == b.removeprefix(b"W/")


def not_modified(request_headers: HeaderList, stored_headers: HeaderList) -> bool:
    """Whether a GET/HEAD conditional request is answered 304 by the stored response."""
    inm = get_all(request_headers, b"if-none-match")
    if inm:
        etag = get_header(stored_headers, b"etag")
        tags = [t for v in inm for t in _etags(v)]
        if b"*" in tags:
            return True
        return etag is not None and any(_weak_equal(etag.strip(), t) for t in tags)
    ims_values = get_all(request_headers, b"if-modified-since")
    # RFC 9110 section 13.1.3: a field with more than one member is ignored.
    if len(ims_values) != 1 or ims_values[0].count(b",") > 1:
        return False
    ims = parse_http_date(ims_values[0])
    if ims is None:
        return False
    last = parse_http_date(get_header(stored_headers, b"last-modified"))
    if last is None:
        last = parse_http_date(get_header(stored_headers, b"date"))
    return last is not None and last <= ims


NOT_MODIFIED_FIELDS = frozenset(
    {b"cache-control", b"content-location", b"date", b"etag", b"expires", b"vary", b"last-modified"}
)


def not_modified_headers(stored_headers: HeaderList) -> HeaderList:
    """Fields a 304 made from a stored response carries (RFC 9110 section 15.4.5)."""
    return [(k, v) for k, v in stored_headers if k.lower() in NOT_MODIFIED_FIELDS]


def validators(stored_headers: HeaderList) -> HeaderList:
    """Conditional headers to revalidate a stored response with its origin."""
    out: HeaderList = []
    etag = get_header(stored_headers, b"etag")
    if etag is not None:
        out.append((b"If-None-Match", etag))
    last = get_header(stored_headers, b"last-modified")
    if last is not None:
        out.append((b"If-Modified-Since", last))
    return out


# Fields never taken from a 304 when updating a stored response (section 3.2).
_NOT_UPDATED = frozenset(
    {b"content-length", b"content-encoding", b"transfer-encoding", b"content-range"}
)


def merge_304(stored_headers: HeaderList, fresh_headers: HeaderList) -> HeaderList:
    """Stored headers updated with those of a 304 (section 4.3.4)."""
    replace = {k.lower() for k, _ in fresh_headers if k.lower() not in _NOT_UPDATED}
    merged = [(k, v) for k, v in stored_headers if k.lower() not in replace]
    # A weak stored ETag stays weak: PIBL weakens the origin's strong tag on a body it
    # compressed, and that body must never be offered under the strong tag (RFC 9110 8.8.1).
    stored_etag = get_header(stored_headers, b"etag")
    weak = stored_etag is not None and stored_etag.strip().startswith(b"W/")
    for k, v in fresh_headers:
        if k.lower() not in replace:
            continue
        if weak and k.lower() == b"etag" and not v.strip().startswith(b"W/"):
            v = b"W/" + v.strip()
        merged.append((k, v))
    return merged


# -- invalidation ---------------------------------------------------------------------------


def invalidates(method: bytes, status: int) -> bool:
    """Section 4.4: a non-error response to an unsafe request invalidates the target."""
    return method not in SAFE_METHODS and 200 <= status < 400


def invalidated_targets(host: bytes, response_headers: HeaderList) -> list[bytes]:
    """Same-origin ``Location`` / ``Content-Location`` targets, as origin-form paths."""
    out: list[bytes] = []
    for name in (b"location", b"content-location"):
        value = get_header(response_headers, name)
        if value is None:
            continue
        value = value.strip()
        if value.startswith(b"/"):
            out.append(value)
            continue
        for scheme in (b"http://", b"https://"):
            if value.lower().startswith(scheme):
                rest = value[len(scheme) :]
                authority, slash, path = rest.partition(b"/")
                if authority.lower() == host.lower():
                    out.append(b"/" + path if slash else b"/")
    return out
