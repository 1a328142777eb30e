"""On-the-fly response compression (RFC 9110 sections 8.4 and 12.5.3), as pure pieces.

Many backends send text uncompressed and leave compression to whatever sits in front of
them. The exchange does it here, in four steps:

1. ``plan()`` decides whether a response gets a content coding and which one. Everything
   that would make compression wrong or pointless says no before the client's
   ``Accept-Encoding`` is even looked at:

   * ``HEAD``, 1xx, 204 and 304 carry no body; 206 (or any ``Content-Range``) and
     requests with ``Range`` address byte ranges of the *uncompressed* representation,
     and compressing would make those offsets meaningless;
   * a body that already has a content coding is left alone (no double compression);
   * ``Cache-Control: no-transform``, in the request or the response, forbids
     intermediaries to change the content (RFC 9111 section 5.2);
   * ``Content-Digest``, ``Repr-Digest``, ``Digest`` and ``Content-MD5`` describe the
     bytes the origin sent; re-encoding would make them lie, so such a response passes
     untouched;
   * only the configured media types are compressed (text, JSON, XML, JavaScript, SVG,
     ...): images, video, archives and fonts such as WOFF2 are compressed already;
   * a body known to be smaller than ``min_size`` stays as it is: the coding's framing and
     the CPU spent are not worth the few bytes saved.

2. ``negotiate()`` reads ``Accept-Encoding``: q-values (``q=0`` forbids a coding), ``*``,
   ``identity``, several header lines, case-insensitive names. A member with a malformed
   q-value is ignored, as if the client had not sent it. Ties go to the server's own order
   (``br``, ``zstd``, ``gzip`` by default). A request *without* the header gets no coding:
   RFC 9110 would allow any, but the clients that omit it (scripts, health checks, old
   tools) are the ones least likely to decode it; nginx, Apache and Caddy agree.

3. ``rewrite_headers()`` turns the backend's head into the compressed response's head:
   ``Content-Length`` goes (the exchange re-frames the body), ``Content-Encoding`` is
   added, ``Vary`` gains ``Accept-Encoding`` so caches keep the variants apart, a strong
   ``ETag`` becomes weak (the bytes differ from the backend's, RFC 9110 section 8.8.1) and
   ``Accept-Ranges`` goes because ranges of the compressed body are not served. A
   response that *could* have been compressed but was not (the client did not ask) still
   needs ``Vary: Accept-Encoding``; ``compressible()`` tells when, and
   ``add_vary_accept_encoding()`` adds it.

4. ``make_compressor()`` returns a streaming ``Compressor``. Bodies are never held whole:
   each ``compress()`` returns whatever the library emits (often nothing while it fills a
   block), so memory per response is the library's own state, bounded by its window.
   ``flush()`` pushes out what is buffered as a complete, decodable block (a zlib sync
   flush, a brotli flush, a zstd block end): the exchange calls it when the backend has
   nothing more to send right now, so server-sent events, long polls and slow generators
   reach the client promptly instead of waiting for a full block. It costs nothing when
   nothing was fed since the previous flush.

The libraries: gzip comes from ``zlib`` (always there); ``br`` needs the ``brotli``
package and ``zstd`` the ``zstandard`` package. Both are optional and imported on first
use; ``available_encodings()`` reports what this interpreter can do and negotiation only
offers those.

Cost and memory. The defaults aim at on-the-fly use, not at the best ratio. On generated
HTML (64 KiB chunks, one core) brotli quality 4 ran at about 100 MB/s and zstd level 3 at
about 280 MB/s for ratios of 5.8 and 6.2, against 43 MB/s and 6.5 for gzip level 6;
brotli 11 and zstd 19 reach 8.0 but at 1-2 MB/s, which makes them offline settings.
``expensive()`` tells the caller when a configured level is slow enough that the work
belongs in a thread pool rather than on the event loop (brotli 6+, gzip 8+, zstd 10+:
26-46 MB/s here, falling steeply with each level above); the three libraries release
the GIL while they compress, so the pool does run in parallel.

Per-stream state matters when thousands of responses are compressed at once: about
0.3 MB for gzip, 3 MB for zstd level 3, and for brotli quality 4 about 2 MB with the
256 KiB window used here against 10 MB with brotli's default 4 MiB window (the ratio on
HTML barely changes). High levels cost far more (zstd 19 needs some 85 MB per stream).
zstd stops at level 19: levels 20-22 need windows over 8 MiB, the most browsers accept
for the ``zstd`` content coding (RFC 9659).
"""

from __future__ import annotations

import importlib
import re
import zlib
from dataclasses import dataclass
from functools import cache, lru_cache
from types import ModuleType
from typing import Final, Protocol

from pibl.http.message import HeaderList

ENCODINGS: Final = ("br", "zstd", "gzip")
"""Every content coding this module can produce, in the default preference order."""

DEFAULT_TYPES: Final = (
    "text/*",
    "application/json",
    "application/*+json",
    "application/x-ndjson",
    "application/javascript",
    "application/x-javascript",
    "application/ecmascript",
    "application/xml",
    "application/*+xml",
    "application/yaml",
    "application/x-yaml",
    "application/toml",
    "application/graphql",
    "image/svg+xml",
    "image/x-icon",
    "image/vnd.microsoft.icon",
    "image/bmp",
    "font/ttf",
    "font/otf",
    "application/vnd.ms-fontobject",
)
"""Media types worth compressing. ``type/*`` matches any subtype and ``type/*+suffix``
any subtype with that structured-syntax suffix (``application/ld+json``). Formats that
are compressed already (PNG, JPEG, WebP, video, ZIP, WOFF2) are absent, and so is
``application/wasm``, which build pipelines usually pre-compress. ``text/*`` includes
``text/event-stream``: events get through promptly because the exchange flushes the
compressor whenever the backend pauses."""

# zstd levels 20-22 need windows over 8 MiB, more than browsers accept for the zstd
# content coding (RFC 9659 section 3); levels up to 19 stay within it.
_ZSTD_MAX_LEVEL: Final = 19
_DIGEST_FIELDS: Final = (b"content-digest", b"repr-digest", b"digest", b"content-md5")
# the response fields _rules_out() looks at (one set test per field instead of a call)
_RULING_FIELDS: Final = frozenset(
    {b"content-range", b"content-encoding", b"cache-control", *_DIGEST_FIELDS}
)
_DECIDING_FIELDS: Final = _RULING_FIELDS | {b"content-type"}
_TOKEN = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+\Z")
_QVALUE = re.compile(rb"(?:0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?)\Z")


@dataclass(frozen=True, slots=True)
class CompressionSettings:
    """How PIBL compresses responses. Names are normalised to lower case.

    ``encodings`` is the server's preference order, used to break ties between codings the
    client weighs equally; codings this interpreter lacks are skipped at negotiation.
    ``min_size`` applies only when the body length is known in advance.
    """

    enabled: bool = True
    encodings: tuple[str, ...] = ("br", "zstd", "gzip")
    min_size: int = 1024
    types: tuple[str, ...] = DEFAULT_TYPES
    gzip_level: int = 6
    brotli_quality: int = 4
    brotli_window: int = 18  # log2 of the window: 256 KiB keeps per-stream memory near 2 MB
    zstd_level: int = 3

    def __post_init__(self) -> None:
        encodings = tuple(e.strip().lower() for e in self.encodings)
        unknown = [e for e in encodings if e not in ENCODINGS]
        if unknown:
            raise ValueError(f"unknown content codings {unknown}; choose from {list(ENCODINGS)}")
        if len(set(encodings)) != len(encodings):
            raise ValueError(f"content codings listed twice: {list(self.encodings)}")
        types = tuple(t.strip().lower() for t in self.types)
        for media in types:
            main, slash, sub = media.partition("/")
            rest = sub.removeprefix("*+")
            sub_ok = sub == "*" or (bool(_TOKEN.match(rest)) and "*" not in rest)
            if not slash or not _TOKEN.match(main) or "*" in main or not sub_ok:
                raise ValueError(f"bad media type pattern {media!r}")
        if self.min_size < 0:
            raise ValueError("min_size must be >= 0")
        _check_range("gzip_level", self.gzip_level, 1, 9)
        _check_range("brotli_quality", self.brotli_quality, 0, 11)
        _check_range("brotli_window", self.brotli_window, 10, 24)
        _check_range("zstd_level", self.zstd_level, 1, _ZSTD_MAX_LEVEL)
        object.__setattr__(self, "encodings", encodings)
        object.__setattr__(self, "types", types)


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], not {value}")


# --- which libraries are there ------------------------------------------------------------


@cache
def _load(module: str) -> ModuleType | None:
    """The optional compression library ``module``, or None when it is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


@cache
def available_encodings() -> tuple[str, ...]:
    """The content codings this interpreter can produce, in ``ENCODINGS`` order."""
    have = {"br": _load("brotli") is not None, "zstd": _load("zstandard") is not None}
    return tuple(e for e in ENCODINGS if have.get(e, True))


def _offered(settings: CompressionSettings) -> tuple[str, ...]:
    return _intersect(settings.encodings, available_encodings())


@lru_cache(maxsize=64)
def _intersect(wanted: tuple[str, ...], available: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(e for e in wanted if e in available)


# --- negotiation --------------------------------------------------------------------------


def _qvalue(raw: bytes) -> int | None:
    """A qvalue in thousandths (``b"0.5"`` -> 500), or None when malformed."""
    if not _QVALUE.match(raw):
        return None
    whole, _, fraction = raw.partition(b".")
    return int(whole) * 1000 + int((fraction + b"000")[:3])


def _weights(accept_encoding: list[bytes]) -> dict[bytes, int]:
    """Each coding named in the header lines with its weight in thousandths.

    Parameters other than ``q`` are ignored; a member whose ``q`` is malformed or repeated
    is dropped. A coding listed twice keeps its lowest weight, so a ``q=0`` anywhere wins.
    ``x-gzip`` counts as ``gzip`` (RFC 9110 section 8.4.1.3).
    """
    weights: dict[bytes, int] = {}
    for line in accept_encoding:
        for member in line.split(b","):
            coding, *params = member.split(b";")
            coding = coding.strip().lower()
            if not coding:
                continue  # empty list elements are allowed (RFC 9110 section 5.6.1)
            weight: int | None = 1000
            seen_q = False
            for param in params:
                name, eq, value = param.partition(b"=")
                if name.strip().lower() != b"q":
                    continue
                weight = None if seen_q or not eq else _qvalue(value.strip())
                seen_q = True
                if weight is None:
                    break
            if weight is None:
                continue
            if coding == b"x-gzip":
                coding = b"gzip"
            weights[coding] = min(weight, weights.get(coding, weight))
    return weights


def accepted_codings(accept_encoding: list[bytes]) -> list[str]:
    """The codings (``*`` included) the client accepts with a non-zero weight, sorted."""
    return sorted(c.decode("latin-1") for c, w in _weights(accept_encoding).items() if w > 0)


def negotiate(accept_encoding: list[bytes], offered: tuple[str, ...]) -> str | None:
    """The coding of ``offered`` the client prefers, or None for no coding.

    ``accept_encoding`` holds the values of every ``Accept-Encoding`` line in the request
    (none: no header). A coding the client does not list gets the weight of ``*`` if
    present, else it is not acceptable. The highest weight wins, ties going to the order of
    ``offered``; when the client gives ``identity`` an explicitly higher weight than the
    best coding, the answer is None. An empty header means identity only; a missing one is
    treated the same (see the module docstring). ``identity;q=0`` with nothing acceptable
    also gives None: sending the body as it is beats failing the request.
    """
    if not accept_encoding:
        return None
    weights = _weights(accept_encoding)
    if not weights:
        return None
    star = weights.get(b"*", 0)
    best: str | None = None
    best_weight = 0
    for coding in offered:
        weight = weights.get(coding.lower().encode("ascii"), star)
        if weight > best_weight:
            best, best_weight = coding, weight
    if best is not None and weights.get(b"identity", -1) > best_weight:
        return None
    return best


# --- the decision -------------------------------------------------------------------------


_TYPE_CACHE_MAX = 512


@lru_cache(maxsize=_TYPE_CACHE_MAX)  # a site serves few distinct Content-Type values
def _type_matches(value: bytes, patterns: tuple[str, ...]) -> bool:
    """Whether one Content-Type value (lower case) matches one of ``patterns``."""
    media = value.split(b";", 1)[0].strip().decode("latin-1")
    main, slash, sub = media.partition("/")
    if not slash or not main or not sub:
        return False
    for pattern in patterns:
        p_main, _, p_sub = pattern.partition("/")
        if p_main != main:
            continue
        if p_sub in ("*", sub):
            return True
        if p_sub.startswith("*+") and sub.endswith(p_sub[1:]) and len(sub) > len(p_sub) - 1:
            return True
    return False


def compressible(
    status: int,
    response_headers: HeaderList,
    settings: CompressionSettings,
    *,
    content_length: int | None,
) -> bool:
    """Whether this response would be compressed for a client that asks for it.

    This is ``plan()`` without the request: when it holds but the response goes out
    uncompressed (the client did not accept any coding), the response still depends on
    ``Accept-Encoding`` and needs ``add_vary_accept_encoding()``.
    """
    if not settings.enabled or not _offered(settings):
        return False
    if status < 200 or status in (204, 206, 304):
        return False
    if content_length is not None and content_length < max(settings.min_size, 1):
        return False
    # one pass over the fields (this runs for every response)
    content_type: bytes | None = None
    for name, value in response_headers:
        lname = name.lower()
        if lname not in _DECIDING_FIELDS:
            continue
        if lname == b"content-type":
            value = value.strip().lower()
            if content_type is not None and value != content_type:
                return False  # conflicting values: do not guess
            content_type = value
        elif _rules_out(lname, value):
            return False
    return content_type is not None and _type_matches(content_type, settings.types)


def _rules_out(lname: bytes, value: bytes) -> bool:
    """Whether this response field forbids compressing the body."""
    if lname == b"content-range" or lname in _DIGEST_FIELDS:
        return True
    if lname == b"content-encoding":
        return any(c != b"identity" for c in _tokens(value))
    if lname == b"cache-control":
        return _no_transform(value)
    return False


def _no_transform(cache_control: bytes) -> bool:
    if b"no-transform" not in cache_control.lower():
        return False  # (most values: no token to split out)
    return any(t.partition(b"=")[0].strip() == b"no-transform" for t in _tokens(cache_control))


def _tokens(value: bytes) -> list[bytes]:
    return [t.strip().lower() for t in value.split(b",") if t.strip()]


def plan(
    method: bytes,
    status: int,
    request_headers: HeaderList,
    response_headers: HeaderList,
    settings: CompressionSettings,
    *,
    content_length: int | None,
) -> str | None:
    """The content coding to apply to this response, or None to send it as it is.

    ``content_length`` is the body length when known in advance (None for chunked or
    close-delimited bodies). See the module docstring for every rule.
    """
    if method == b"HEAD":
        return None
    if not compressible(status, response_headers, settings, content_length=content_length):
        return None
    return request_coding(method, request_headers, settings)


def request_coding(
    method: bytes, request_headers: HeaderList, settings: CompressionSettings
) -> str | None:
    """The request's side of ``plan()``, for a response already known to be compressible.

    None for a HEAD, a ``Range`` request or ``Cache-Control: no-transform``; otherwise what
    ``negotiate`` makes of every ``Accept-Encoding`` line. One pass over the fields: the
    fast path asks this of every request.
    """
    if method == b"HEAD":
        return None
    accept: list[bytes] = []
    for name, value in request_headers:
        lname = name.lower()
        if lname == b"accept-encoding":
            accept.append(value)
        elif lname == b"range" or (lname == b"cache-control" and _no_transform(value)):
            return None
    return negotiate(accept, _offered(settings)) if accept else None


# --- header rewriting ---------------------------------------------------------------------


def add_vary_accept_encoding(headers: HeaderList) -> HeaderList:
    """A copy of ``headers`` whose ``Vary`` names ``Accept-Encoding``.

    An existing ``Vary`` keeps its values (``Accept-Encoding`` is appended to the last
    line), ``Vary: *`` stays as it is, and nothing is added twice.
    """
    out = list(headers)
    last: int | None = None
    for index, (name, value) in enumerate(out):
        if name.lower() != b"vary":
            continue
        tokens = {token.strip().lower() for token in value.split(b",")}
        if b"*" in tokens or b"accept-encoding" in tokens:
            return out
        last = index
    if last is None:
        out.append((b"Vary", b"Accept-Encoding"))
    else:
        name, value = out[last]
        value = value.strip().rstrip(b" \t,")
        out[last] = (name, value + b", Accept-Encoding" if value else b"Accept-Encoding")
    return out


def _weak_etag(value: bytes) -> bytes:
    """``"abc"`` -> ``W/"abc"``; weak tags and malformed (unquoted) values are kept."""
    value = value.strip()
    return b"W/" + value if value.startswith(b'"') else value


def rewrite_headers(response_headers: HeaderList, encoding: str) -> HeaderList:
    """The backend's response headers as they must be sent once compressed with ``encoding``.

    Returns a new list: ``Content-Length`` and ``Accept-Ranges`` dropped, a
    ``Content-Encoding: identity`` replaced, strong ``ETag`` values weakened, ``Vary``
    extended, and ``Content-Encoding`` appended. Every other field keeps its place. A
    response that already has a real content coding is an error (``plan()`` never
    chooses to compress one).
    """
    out: HeaderList = []
    for name, value in response_headers:
        lname = name.lower()
        if lname in (b"content-length", b"accept-ranges"):
            continue
        if lname == b"content-encoding":
            codings = [t.strip().lower() for t in value.split(b",") if t.strip()]
            if any(c != b"identity" for c in codings):
                raise ValueError(f"response is already encoded: {value!r}")
            continue
        if lname == b"etag":
            value = _weak_etag(value)
        out.append((name, value))
    out.append((b"Content-Encoding", encoding.encode("ascii")))
    return add_vary_accept_encoding(out)


# --- streaming compressors ----------------------------------------------------------------


class Compressor(Protocol):
    """One response body being compressed, chunk by chunk."""

    def compress(self, data: bytes) -> bytes:
        """Feed ``data``; return what the encoder emits now (maybe b"")."""
        ...

    def flush(self) -> bytes:
        """Emit everything fed so far as decodable output, keeping the stream open."""
        ...

    def finish(self) -> bytes:
        """End the stream; return the last bytes. Further calls return b""."""
        ...


class _Encoder(Protocol):
    """What ``brotli.Compressor`` offers (the package ships no type information)."""

    def process(self, data: bytes) -> bytes: ...
    def flush(self) -> bytes: ...
    def finish(self) -> bytes: ...


class _ZstdObj(Protocol):
    """What a ``zstandard`` compression object offers (typed here to keep it optional)."""

    def compress(self, data: bytes) -> bytes: ...
    def flush(self, flush_mode: int) -> bytes: ...


class _Stream:
    """State shared by every compressor: no work on empty input or idle flushes, and a
    clear error for use after ``finish()``."""

    __slots__ = ("_done", "_pending")

    def __init__(self) -> None:
        self._done = False
        self._pending = False

    def compress(self, data: bytes) -> bytes:
        if self._done:
            raise ValueError("compress() after finish()")
        if not data:
            return b""
        self._pending = True
        return self._process(data)

    def flush(self) -> bytes:
        if self._done:
            raise ValueError("flush() after finish()")
        if not self._pending:
            return b""  # a sync flush of nothing would still cost an empty block
        self._pending = False
        return self._flush()

    def finish(self) -> bytes:
        if self._done:
            return b""
        self._done = True
        return self._finish()

    def _process(self, data: bytes) -> bytes:
        raise NotImplementedError

    def _flush(self) -> bytes:
        raise NotImplementedError

    def _finish(self) -> bytes:
        raise NotImplementedError


class _Gzip(_Stream):
    __slots__ = ("_z",)

    def __init__(self, level: int) -> None:
        super().__init__()
        self._z = zlib.compressobj(level, zlib.DEFLATED, 31)  # 16 + 15: gzip wrapper

    def _process(self, data: bytes) -> bytes:
        return self._z.compress(data)

    def _flush(self) -> bytes:
        return self._z.flush(zlib.Z_SYNC_FLUSH)

    def _finish(self) -> bytes:
        return self._z.flush(zlib.Z_FINISH)


class _Brotli(_Stream):
    __slots__ = ("_b",)

    def __init__(self, module: ModuleType, quality: int, window: int, text: bool) -> None:
        super().__init__()
        mode = module.MODE_TEXT if text else module.MODE_GENERIC
        self._b: _Encoder = module.Compressor(mode=mode, quality=quality, lgwin=window)

    def _process(self, data: bytes) -> bytes:
        return self._b.process(data)

    def _flush(self) -> bytes:
        return self._b.flush()

    def _finish(self) -> bytes:
        return self._b.finish()


class _Zstd(_Stream):
    __slots__ = ("_block", "_end", "_z")

    def __init__(self, module: ModuleType, level: int) -> None:
        super().__init__()
        compressor = module.ZstdCompressor(level=level, write_checksum=True)
        self._z: _ZstdObj = compressor.compressobj()
        self._block: int = module.COMPRESSOBJ_FLUSH_BLOCK
        self._end: int = module.COMPRESSOBJ_FLUSH_FINISH

    def _process(self, data: bytes) -> bytes:
        return self._z.compress(data)

    def _flush(self) -> bytes:
        return self._z.flush(self._block)

    def _finish(self) -> bytes:
        return self._z.flush(self._end)


def make_compressor(
    encoding: str, settings: CompressionSettings, *, text: bool = True
) -> Compressor:
    """A fresh streaming compressor for ``encoding`` at the levels of ``settings``.

    ``text`` is brotli's hint that the input is UTF-8 text (all default types are); the
    output is valid either way. Raises ValueError for a coding that is unknown or whose
    library is not installed.
    """
    if encoding not in available_encodings():
        raise ValueError(f"content coding {encoding!r} is not available here")
    if encoding == "gzip":
        return _Gzip(settings.gzip_level)
    module = _load("brotli" if encoding == "br" else "zstandard")
    assert module is not None  # available_encodings() checked it
    if encoding == "br":
        return _Brotli(module, settings.brotli_quality, settings.brotli_window, text)
    return _Zstd(module, settings.zstd_level)


def expensive(encoding: str, settings: CompressionSettings) -> bool:
    """Whether the configured level is slow enough to run off the event loop.

    Brotli quality 6 and up, gzip level 8 and up, zstd level 10 and up: there a 64 KiB
    chunk takes a couple of milliseconds or more, and each level above costs much more.
    """
    if encoding == "br":
        return settings.brotli_quality >= 6
    if encoding == "gzip":
        return settings.gzip_level >= 8
    if encoding == "zstd":
        return settings.zstd_level >= 10
    raise ValueError(f"unknown content coding {encoding!r}")
