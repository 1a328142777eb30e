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
import re
import time
from dataclasses import dataclass

from pibl.http.message import HeaderList, get_all, get_header

# RFC 9110 section 15.1: status codes heuristically cacheable by default. Only these get a
# lifetime without explicit freshness (the launch-time TTL or Last-Modified heuristics).
HEURISTIC_STATUSES = frozenset({200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501})
# Final status codes this cache understands (RFC 9111 section 3 and the must-understand
# directive of 5.2.2.3): every code RFC 9110 defines except 206 (PIBL does not combine
# partial content) and 304 (an answer to a conditional request, never a stored response).
# Any of them may be stored when the response gives explicit freshness; a code outside
# this set is stored only without must-understand.
UNDERSTOOD_STATUSES = frozenset(
    {200, 201, 202, 203, 204, 205, 300, 301, 302, 303, 305, 307, 308}
    | set(range(400, 418))
    | {421, 422, 426}
    | set(range(500, 506))
) - {206, 304}
NEVER_STORED_STATUSES = frozenset({206, 304})
# RFC 9213: targeted cache-control fields this cache obeys (over Cache-Control and Expires),
# in order; [cache] targeted_field puts PIBL's own field first.
CDN_CACHE_CONTROL = b"cdn-cache-control"
SAFE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE"})
HEURISTIC_FRACTION = 0.1
HEURISTIC_MAX = 86400.0


# ``init=False`` and an ``__init__`` of their own: made for every cache lookup, and the
# compiled build makes only such a constructor native (see pibl.http.message).
@dataclass(slots=True, init=False)
class CacheControl:
    """Parsed Cache-Control directives (names lower-case; value None when absent)."""

    directives: dict[str, str | None]

    def __init__(self, directives: dict[str, str | None]) -> None:
        self.directives = directives

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
        return min(int(value[:11]) if len(value) <= 11 else 2**31, 2**31)


def parse_cache_control(headers: HeaderList, field: bytes = b"cache-control") -> CacheControl:
    out: dict[str, str | None] = {}
    for name, raw in headers:
        if name.lower() != field:
            continue
        for part in _split_directives(raw.decode("latin-1")):
            key, sep, value = part.partition("=")
            key = key.strip().lower()
            if not key:
                continue
            if key not in out:  # first occurrence wins for a repeated directive
                out[key] = value.strip() if sep else None
    return CacheControl(out)


# RFC 8941 section 3.2: a Dictionary member is a key, optionally "=" and a bare item.
_SF_MEMBER = re.compile(
    r"^[a-z*][a-z0-9_\-.*]*"
    r'(?:=(?:-?[0-9]{1,15}(?:\.[0-9]{1,3})?|"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*"'
    r"|[A-Za-z*][!#$%&'*+\-.^_`|~0-9A-Za-z:/]*|\?[01]))?"
    r"(?:;[a-z*][a-z0-9_\-.*]*(?:=[^;]*)?)*$"
)


def response_cache_control(
    headers: HeaderList, targeted: tuple[bytes, ...] = (CDN_CACHE_CONTROL,)
) -> tuple[CacheControl, bool]:
    """The directives this cache obeys for a response, and whether they came from a
    targeted field (RFC 9213 section 2.1).

    The first field of ``targeted`` (lower-case names) with a valid, non-empty value wins,
    and then ``Cache-Control`` and ``Expires`` are ignored for this cache's decisions;
    otherwise ``Cache-Control`` applies. Either way every field is passed on untouched.
    A targeted field is a Structured Field Dictionary: one that does not parse is ignored.
    """
    for field in targeted:
        values = get_all(headers, field)
        if not values:
            continue
        text = ",".join(v.decode("latin-1") for v in values)
        members = [m.strip(" \t") for m in _split_quoted(text)]
        if all(m and _SF_MEMBER.match(m) for m in members):
            return parse_cache_control(headers, field), True
    return parse_cache_control(headers), False


def _split_directives(text: str) -> list[str]:
    """Split on commas outside quoted strings (``no-cache="a, b"`` is one directive)."""
    return [p.strip() for p in _split_quoted(text) if p.strip()]


def _split_quoted(text: str) -> list[str]:
    """Split on commas outside quoted strings, keeping empty members."""
    if '"' not in text:  # the usual case, without walking every character
        return text.split(",")
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
    return parts


_DAY = rb"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
_LONG_DAY = rb"(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday)"
_MONTH = rb"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
_TIME = rb"([0-9]{2}):([0-9]{2}):([0-9]{2})"
_IMF_FIXDATE = re.compile(
    rb"^" + _DAY + rb", ([0-9]{2}) " + _MONTH + rb" ([0-9]{4}) " + _TIME + rb" GMT$"
)
_RFC850 = re.compile(
    rb"^" + _LONG_DAY + rb", ([0-9]{2})-" + _MONTH + rb"-([0-9]{2}) " + _TIME + rb" GMT$"
)
_ASCTIME = re.compile(
    rb"^" + _DAY + rb" " + _MONTH + rb" ([ 0-9][0-9]) " + _TIME + rb" ([0-9]{4})$"
)
_MONTHS = {
    m: i for i, m in enumerate(b"Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split(), 1)
}


def parse_http_date(value: bytes | None, *, now: float | None = None) -> float | None:
    """An HTTP-date (RFC 9110 section 5.6.7) as a timestamp; None if invalid.

    Exactly one of the three formats, case and spacing as the grammar says: IMF-fixdate
    (``Sun, 06 Nov 1994 08:49:37 GMT``), the obsolete RFC 850 form (``Sunday, 06-Nov-94
    08:49:37 GMT``, a two-digit year more than 50 years ahead is in the past century) and
    asctime (``Sun Nov  6 08:49:37 1994``, UTC). Anything else (another zone, a list, a
    number, trailing text) is invalid: for ``Expires`` that means already expired.
    """
    if value is None:
        return None
    value = value.strip()
    if m := _IMF_FIXDATE.match(value):
        day, month, year, hh, mm, ss = m.groups()
        y = int(year)
    elif m := _RFC850.match(value):
        day, month, year, hh, mm, ss = m.groups()
        current = datetime.datetime.fromtimestamp(
            time.time() if now is None else now, datetime.UTC
        ).year
        y = current - current % 100 + int(year)
        if y > current + 50:
            y -= 100
    elif m := _ASCTIME.match(value):
        month, day, hh, mm, ss, year = m.groups()
        y = int(year)
    else:
        return None
    try:
        parsed = datetime.datetime(
            y, _MONTHS[month], int(day), int(hh), int(mm), min(int(ss), 59), tzinfo=datetime.UTC
        )
    except ValueError:  # 31 Feb, hour 24, ...
        return None
    return parsed.timestamp() + (1 if int(ss) == 60 else 0)


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
    targeted: tuple[bytes, ...] = (CDN_CACHE_CONTROL,),
) -> tuple[bool, str]:
    """Whether a shared cache may store this response, and the reason if not (section 3).

    Any final status may be stored when the response gives explicit freshness and no
    directive forbids it; without explicit freshness only the heuristically cacheable
    ones are (with the launch-time TTL or Last-Modified heuristics).
    """
    if method != b"GET":
        return False, "method"
    if status < 200 or status in NEVER_STORED_STATUSES:
        return False, "status"
    req_cc = parse_cache_control(request_headers)
    if req_cc.has("no-store"):
        return False, "request no-store"
    if get_header(request_headers, b"range") is not None:
        return False, "range request"
    cc, is_targeted = response_cache_control(response_headers, targeted)
    if cc.has("must-understand"):
        if status not in UNDERSTOOD_STATUSES:
            return False, "must-understand"
        # section 5.2.2.3: a cache that understands the status ignores no-store
    elif cc.has("no-store"):
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
    explicit = (
        cc.has("s-maxage")
        or cc.has("max-age")
        or (not is_targeted and get_header(response_headers, b"expires") is not None)
    )
    if explicit:
        return True, ""
    if cc.has("public") and status < 400:
        # section 4.2.2: public allows heuristic freshness; PIBL keeps it off errors
        return True, ""
    # A heuristically cacheable status may be stored; PIBL only bothers when it can be
    # fresh (a default TTL or Last-Modified) or must be revalidated anyway (no-cache).
    heuristic = default_ttl > 0 or get_header(response_headers, b"last-modified") is not None
    if status in HEURISTIC_STATUSES and (heuristic or cc.has("no-cache")):
        return True, ""
    return False, "no freshness information"


# -- freshness and age ------------------------------------------------------------------


def freshness_lifetime(
    status: int,
    headers: HeaderList,
    *,
    default_ttl: float,
    targeted: tuple[bytes, ...] = (CDN_CACHE_CONTROL,),
) -> float:
    """Seconds a stored response is fresh for a shared cache (section 4.2.1)."""
    cc, is_targeted = response_cache_control(headers, targeted)
    s_maxage = cc.seconds("s-maxage")
    if s_maxage is not None:
        return float(s_maxage)
    max_age = cc.seconds("max-age")
    if max_age is not None:
        return float(max_age)
    if cc.has("max-age") or cc.has("s-maxage"):
        return 0.0  # present but invalid: treat as stale (section 4.2.1)
    expires_all = [] if is_targeted else get_all(headers, b"expires")
    if expires_all:
        # section 5.3: an invalid Expires (such as "0", another format, or several values)
        # means already expired
        expires = parse_http_date(expires_all[0]) if len(expires_all) == 1 else None
        date = parse_http_date(get_header(headers, b"date"))
        if expires is None or date is None:
            return 0.0
        return max(0.0, expires - date)
    if status not in HEURISTIC_STATUSES and not (cc.has("public") and status < 400):
        return 0.0  # no explicit freshness and no heuristics for this status
    if default_ttl > 0:
        return float(default_ttl)
    last_modified = parse_http_date(get_header(headers, b"last-modified"))
    date = parse_http_date(get_header(headers, b"date"))
    if last_modified is not None and date is not None and date > last_modified:
        return min(HEURISTIC_MAX, (date - last_modified) * HEURISTIC_FRACTION)
    return 0.0


def initial_age(headers: HeaderList, request_time: float, response_time: float) -> float:
    """``corrected_initial_age`` of section 4.2.3, fixed when the response is received."""
    age_value = float(parse_age(get_header(headers, b"age")))
    date = parse_http_date(get_header(headers, b"date"))
    apparent_age = max(0.0, response_time - date) if date is not None else 0.0
    response_delay = max(0.0, response_time - request_time)
    corrected_age_value = age_value + response_delay
    return max(apparent_age, corrected_age_value)


_DELTA_SECONDS = re.compile(rb"[ \t]*([0-9]{1,10})")


def parse_age(value: bytes | None) -> int:
    """The Age field's delta-seconds (section 5.1): of a list, its first member; digits
    followed by junk count as the digits (never 0 for an age the origin did state)."""
    if value is None:
        return 0
    m = _DELTA_SECONDS.match(value.split(b",", 1)[0])
    return min(int(m.group(1)), 2**31) if m else 0


def current_age(initial: float, response_time: float, now: float) -> float:
    return initial + max(0.0, now - response_time)


# -- using a stored response --------------------------------------------------------------


@dataclass(slots=True, init=False)
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
    background: bool
    stale_if_error: float  # seconds of staleness allowed if the origin fails

    def __init__(
        self,
        action: str,
        age: float,
        lifetime: float,
        background: bool = False,
        stale_if_error: float = 0.0,
    ) -> None:
        self.action = action
        self.age = age
        self.lifetime = lifetime
        self.background = background
        self.stale_if_error = stale_if_error


def usable(
    request_headers: HeaderList,
    stored_headers: HeaderList,
    *,
    lifetime: float,
    age: float,
    max_stale_on_error: float,
    targeted: tuple[bytes, ...] = (CDN_CACHE_CONTROL,),
    stored: CacheControl | None = None,
) -> Decision:
    """``stored``: the stored response's directives (``response_cache_control``), when
    the caller kept them from an earlier use of the same entry."""
    req = parse_cache_control(request_headers)
    res = stored if stored is not None else response_cache_control(stored_headers, targeted)[0]
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
    """Requests that never use the cache (the response may still invalidate it).

    A ``Range`` request is not one of them: a stored complete response answers it with
    ``206`` (see :func:`byte_range`); only its misses are passed on, Range and all.
    """
    if method not in (b"GET", b"HEAD"):
        return "method"
    if parse_cache_control(request_headers).has("no-store"):
        return "no-store"
    return None


# -- ranges (RFC 9110 section 14) ----------------------------------------------------------

UNSATISFIABLE = (-1, -1)
_RANGE_SPEC = re.compile(rb"^\s*(?:([0-9]{1,18})-([0-9]{0,18})|-([0-9]{1,18}))\s*$")


def byte_range(value: bytes | None, length: int) -> tuple[int, int] | None:
    """The one byte range (first, last) a ``Range`` value asks of ``length`` bytes.

    None means "send the whole representation with 200": no Range, another unit, a syntax
    error, or several ranges (which a server may answer in full, RFC 9110 section 14.2).
    ``UNSATISFIABLE`` means ``416`` (no range starts within the representation).
    """
    if value is None:
        return None
    unit, eq, spec = value.partition(b"=")
    if not eq or unit.strip().lower() != b"bytes" or b"," in spec:
        return None
    m = _RANGE_SPEC.match(spec)
    if m is None:
        return None
    first, last, suffix = m.groups()
    if suffix is not None:
        n = int(suffix)
        if n == 0 or length == 0:
            return UNSATISFIABLE
        return max(0, length - n), length - 1
    start = int(first)
    if last and int(last) < start:
        return None  # invalid: ignored (section 14.1.1)
    if start >= length:
        return UNSATISFIABLE
    end = int(last) if last else length - 1
    return start, min(end, length - 1)


def if_range_matches(request_headers: HeaderList, stored_headers: HeaderList) -> bool:
    """Section 13.1.5: whether the Range applies (no If-Range, or its validator matches).

    An entity tag must match strongly (a weak tag never does); a date must equal
    Last-Modified, which must be strong (at least a second before the response's Date).
    """
    value = get_header(request_headers, b"if-range")
    if value is None:
        return True
    value = value.strip()
    if value.startswith(b'"') or value.startswith(b"W/"):
        etag = get_header(stored_headers, b"etag")
        return (
            etag is not None
            and not value.startswith(b"W/")
            and not etag.strip().startswith(b"W/")
            and etag.strip() == value
        )
    when = parse_http_date(value)
    last = parse_http_date(get_header(stored_headers, b"last-modified"))
    date = parse_http_date(get_header(stored_headers, b"date"))
    return when is not None and when == last and date is not None and date - last >= 1


def may_serve_with_authorization(
    request_headers: HeaderList,
    stored_headers: HeaderList,
    targeted: tuple[bytes, ...] = (CDN_CACHE_CONTROL,),
) -> bool:
    """Section 3.5: a request with Authorization may only get a response marked shareable."""
    if get_header(request_headers, b"authorization") is None:
        return True
    cc, _ = response_cache_control(stored_headers, targeted)
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
