"""Response compression (pibl.compress): negotiation, the decision, headers, streaming."""

from __future__ import annotations

import gzip
import os
import sys
import tracemalloc
import zlib
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pibl import compress
from pibl.compress import (
    CompressionSettings,
    add_vary_accept_encoding,
    available_encodings,
    compressible,
    expensive,
    make_compressor,
    negotiate,
    plan,
    rewrite_headers,
)

brotli = pytest.importorskip("brotli")
zstandard = pytest.importorskip("zstandard")

ALL = ("br", "zstd", "gzip")
Headers = list[tuple[bytes, bytes]]


def streaming_decoder(encoding: str) -> Callable[[bytes], bytes]:
    """A function that decodes the next piece of an ``encoding`` stream."""
    if encoding == "gzip":
        return zlib.decompressobj(wbits=31).decompress
    if encoding == "br":
        return brotli.Decompressor().process  # type: ignore[no-any-return]
    return zstandard.ZstdDecompressor().decompressobj().decompress  # type: ignore[no-any-return]


def decode(encoding: str, data: bytes) -> bytes:
    """Decode a whole stream with the standard one-shot decoders."""
    if encoding == "gzip":
        return gzip.decompress(data)
    if encoding == "br":
        return brotli.decompress(data)  # type: ignore[no-any-return]
    # zstandard's one-shot decompress() needs the content size in the frame header, which a
    # stream does not know in advance; the streaming object is the standard way then.
    return zstandard.ZstdDecompressor().decompressobj().decompress(data)  # type: ignore[no-any-return]


# --- settings and availability ------------------------------------------------------------


def test_defaults() -> None:
    s = CompressionSettings()
    assert s.enabled and s.encodings == ("br", "zstd", "gzip") and s.min_size == 1024
    assert "text/*" in s.types and "application/json" in s.types and "image/svg+xml" in s.types
    assert "application/wasm" not in s.types and "image/png" not in s.types
    assert (s.gzip_level, s.brotli_quality, s.zstd_level) == (6, 4, 3)


def test_settings_are_normalised() -> None:
    s = CompressionSettings(encodings=(" GZIP", "Br"), types=("Text/HTML",))
    assert s.encodings == ("gzip", "br") and s.types == ("text/html",)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"encodings": ("deflate",)},
        {"encodings": ("gzip", "gzip")},
        {"types": ("text",)},
        {"types": ("*/*",)},
        {"types": ("text/",)},
        {"types": ("text/ html",)},
        {"types": ("application/x-*",)},  # * stands for a whole subtype or before +suffix
        {"types": ("application/*+*",)},
        {"min_size": -1},
        {"gzip_level": 0},
        {"gzip_level": 10},
        {"brotli_quality": 12},
        {"brotli_window": 9},
        {"zstd_level": 0},
        {"zstd_level": 20},  # needs a window over 8 MiB
    ],
)
def test_settings_reject_nonsense(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        CompressionSettings(**kwargs)  # type: ignore[arg-type]


def test_available_encodings_here() -> None:
    assert available_encodings() == ALL


@pytest.fixture
def without_zstandard(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make ``import zstandard`` fail, as on an interpreter without the package."""
    monkeypatch.setitem(sys.modules, "zstandard", None)
    compress._load.cache_clear()
    available_encodings.cache_clear()
    yield
    monkeypatch.undo()
    compress._load.cache_clear()
    available_encodings.cache_clear()


@pytest.mark.usefixtures("without_zstandard")
def test_zstandard_is_optional() -> None:
    assert available_encodings() == ("br", "gzip")
    with pytest.raises(ValueError, match="not available"):
        make_compressor("zstd", CompressionSettings())
    req = [(b"Accept-Encoding", b"zstd, gzip;q=0.5")]
    assert plan(b"GET", 200, req, HTML, CompressionSettings(), content_length=None) == "gzip"
    only_zstd = CompressionSettings(encodings=("zstd",))
    assert plan(b"GET", 200, req, HTML, only_zstd, content_length=None) is None
    assert not compressible(200, HTML, only_zstd, content_length=None)


# --- negotiation --------------------------------------------------------------------------

NEGOTIATION = [
    # (Accept-Encoding lines, offered, expected)
    ([], ALL, None),  # no header: identity (nginx-like, see the module docstring)
    ([b""], ALL, None),  # empty header: identity only
    ([b"gzip"], ALL, "gzip"),
    ([b"gzip, deflate, br"], ALL, "br"),  # equal weights: server order
    ([b"gzip, deflate, br, zstd"], ALL, "br"),
    ([b"gzip, deflate, br, zstd"], ("zstd", "br", "gzip"), "zstd"),
    ([b"br;q=0.5, gzip"], ALL, "gzip"),
    ([b"br;q=0.9, zstd;q=0.9, gzip;q=1"], ALL, "gzip"),
    ([b"br;q=0, gzip;q=0.1"], ALL, "gzip"),  # q=0 forbids
    ([b"br;q=0"], ALL, None),
    ([b"br;q=0.000, zstd;q=0.001"], ALL, "zstd"),
    ([b"*"], ALL, "br"),
    ([b"*;q=0"], ALL, None),
    ([b"*;q=0.5, br;q=0"], ALL, "zstd"),  # * covers only codings not listed
    ([b"gzip;q=0.2, *;q=0.3"], ALL, "br"),
    ([b"*, br;q=0"], ("br", "gzip"), "gzip"),
    ([b"identity"], ALL, None),
    ([b"identity;q=0"], ALL, None),  # nothing acceptable: send it as it is
    ([b"identity;q=0, gzip"], ALL, "gzip"),
    ([b"identity;q=0.5, *;q=0"], ALL, None),
    ([b"gzip;q=0.5, identity"], ALL, None),  # identity explicitly preferred
    ([b"gzip, identity;q=0.5"], ALL, "gzip"),
    ([b"gzip, identity"], ALL, "gzip"),  # a tie with identity goes to compression
    ([b"GZIP"], ALL, "gzip"),  # case-insensitive names
    ([b"Br;Q=0.9, gZip;q=0.8"], ALL, "br"),
    ([b"  gzip ;  q=0.8 ,\tbr ; q=0.9  "], ALL, "br"),  # optional whitespace
    ([b",, gzip ,,"], ALL, "gzip"),  # empty list elements
    ([b"gzip", b"br"], ALL, "br"),  # several header lines
    ([b"br;q=0.1", b"gzip;q=0.2"], ALL, "gzip"),
    ([b"gzip", b"gzip;q=0"], ALL, None),  # listed twice: the lowest weight wins
    ([b"br;q=2, gzip"], ALL, "gzip"),  # malformed q: member ignored
    ([b"br;q=0.5555, gzip;q=0.1"], ALL, "gzip"),  # more than three decimals
    ([b"br;q=, gzip;q=0.1"], ALL, "gzip"),
    ([b"br;q, gzip;q=0.1"], ALL, "gzip"),
    ([b"br;q=abc"], ALL, None),
    ([b"br;q=-0.5"], ALL, None),
    ([b"br;q=1.000"], ALL, "br"),
    ([b"br;q=1.001"], ALL, None),
    ([b"br;q=0.5;q=1"], ALL, None),  # repeated q: malformed
    ([b"gzip;level=9"], ALL, "gzip"),  # other parameters are ignored
    ([b"deflate, compress, exi"], ALL, None),  # unsupported codings only
    ([b"x-gzip"], ALL, "gzip"),  # RFC 9110 section 8.4.1.3
    ([b"br"], ("gzip",), None),  # not offered
    ([b"br, gzip"], (), None),
]


@pytest.mark.parametrize(("lines", "offered", "expected"), NEGOTIATION)
def test_negotiate(lines: list[bytes], offered: tuple[str, ...], expected: str | None) -> None:
    assert negotiate(lines, offered) == expected


@given(st.lists(st.binary(max_size=40), max_size=3))
def test_negotiate_never_fails_and_only_offers(lines: list[bytes]) -> None:
    assert negotiate(lines, ALL) in (*ALL, None)


# --- the decision -------------------------------------------------------------------------

HTML: Headers = [(b"Content-Type", b"text/html; charset=utf-8")]
ACCEPT: Headers = [(b"Accept-Encoding", b"gzip, deflate, br, zstd")]


def case(
    *,
    method: bytes = b"GET",
    status: int = 200,
    request: Headers | None = None,
    response: Headers | None = None,
    length: int | None = 5000,
    **overrides: object,
) -> tuple[bytes, int, Headers, Headers, CompressionSettings, int | None]:
    return (
        method,
        status,
        ACCEPT if request is None else request,
        HTML if response is None else response,
        CompressionSettings(**overrides),  # type: ignore[arg-type]
        length,
    )


PLAN = {
    # positive cases
    "html": (case(), "br"),
    "chunked body, length unknown": (case(length=None), "br"),
    "exactly min_size": (case(length=1024), "br"),
    "error page": (case(status=404), "br"),
    "server error": (case(status=503), "br"),
    "POST": (case(method=b"POST"), "br"),
    "json": (case(response=[(b"Content-Type", b"application/json")]), "br"),
    "json suffix": (case(response=[(b"content-type", b"application/problem+json")]), "br"),
    "svg": (case(response=[(b"Content-Type", b"image/svg+xml")]), "br"),
    "javascript": (case(response=[(b"Content-Type", b"application/javascript")]), "br"),
    "upper-case type": (case(response=[(b"CONTENT-TYPE", b"Text/CSS;Charset=UTF-8")]), "br"),
    "content-encoding identity": (case(response=[*HTML, (b"Content-Encoding", b"identity")]), "br"),
    "client prefers gzip": (case(request=[(b"Accept-Encoding", b"gzip, br;q=0.5")]), "gzip"),
    "server prefers gzip": (case(encodings=("gzip", "br")), "gzip"),
    "min_size 0": (case(length=1, min_size=0), "br"),
    "cache-control without no-transform": (
        case(response=[*HTML, (b"Cache-Control", b"public, max-age=60")]),
        "br",
    ),
    "custom exact type": (
        case(
            response=[(b"Content-Type", b"application/x-custom")], types=("application/x-custom",)
        ),
        "br",
    ),
    # never compress
    "disabled": (case(enabled=False), None),
    "HEAD": (case(method=b"HEAD"), None),
    "100": (case(status=100), None),
    "101": (case(status=101), None),
    "103": (case(status=103), None),
    "204": (case(status=204), None),
    "206": (case(status=206, response=[*HTML, (b"Content-Range", b"bytes 0-99/5000")]), None),
    "206 without Content-Range": (case(status=206), None),
    "304": (case(status=304), None),
    "Content-Range on a 200": (case(response=[*HTML, (b"content-range", b"bytes */5000")]), None),
    "request with Range": (case(request=[*ACCEPT, (b"Range", b"bytes=0-99")]), None),
    "already gzip": (case(response=[*HTML, (b"Content-Encoding", b"gzip")]), None),
    "already BR upper-case": (case(response=[*HTML, (b"content-encoding", b"BR")]), None),
    "identity then gzip": (case(response=[*HTML, (b"Content-Encoding", b"identity, gzip")]), None),
    "two Content-Encoding lines": (
        case(response=[*HTML, (b"Content-Encoding", b"identity"), (b"Content-Encoding", b"br")]),
        None,
    ),
    "response no-transform": (case(response=[*HTML, (b"Cache-Control", b"no-transform")]), None),
    "response No-Transform among others": (
        case(response=[*HTML, (b"cache-control", b"public, No-Transform, max-age=5")]),
        None,
    ),
    "request no-transform": (case(request=[*ACCEPT, (b"Cache-Control", b"no-transform")]), None),
    "missing Content-Type": (case(response=[]), None),
    "empty Content-Type": (case(response=[(b"Content-Type", b"")]), None),
    "Content-Type without subtype": (case(response=[(b"Content-Type", b"text")]), None),
    "conflicting Content-Types": (
        case(response=[*HTML, (b"Content-Type", b"image/png")]),
        None,
    ),
    "png": (case(response=[(b"Content-Type", b"image/png")]), None),
    "octet-stream": (case(response=[(b"Content-Type", b"application/octet-stream")]), None),
    "wasm": (case(response=[(b"Content-Type", b"application/wasm")]), None),
    "woff2": (case(response=[(b"Content-Type", b"font/woff2")]), None),
    "bare suffix is not a subtype": (
        case(response=[(b"Content-Type", b"application/+json")]),
        None,
    ),
    "known length below min_size": (case(length=1023), None),
    "empty body": (case(length=0, min_size=0), None),
    "Content-Digest": (case(response=[*HTML, (b"Content-Digest", b"sha-256=:x:")]), None),
    "Repr-Digest": (case(response=[*HTML, (b"Repr-Digest", b"sha-256=:x:")]), None),
    "no Accept-Encoding": (case(request=[]), None),
    "empty Accept-Encoding": (case(request=[(b"Accept-Encoding", b"")]), None),
    "unsupported codings only": (case(request=[(b"Accept-Encoding", b"deflate, compress")]), None),
    "everything forbidden": (case(request=[(b"Accept-Encoding", b"*;q=0")]), None),
    "no encodings configured": (case(encodings=()), None),
}


@pytest.mark.parametrize(("args", "expected"), PLAN.values(), ids=PLAN.keys())
def test_plan(
    args: tuple[bytes, int, Headers, Headers, CompressionSettings, int | None],
    expected: str | None,
) -> None:
    method, status, request, response, config, length = args
    assert plan(method, status, request, response, config, content_length=length) == expected


@pytest.mark.parametrize(("args", "expected"), PLAN.values(), ids=PLAN.keys())
def test_compressible_agrees_with_plan(
    args: tuple[bytes, int, Headers, Headers, CompressionSettings, int | None],
    expected: str | None,
) -> None:
    """``plan()`` only picks a coding for responses ``compressible()`` accepts."""
    _, status, _, response, config, length = args
    if expected is not None:
        assert compressible(status, response, config, content_length=length)


@pytest.mark.parametrize(
    ("args", "vary"),
    [
        (case(request=[]), True),  # compressible, but this client did not ask
        (case(request=[(b"Accept-Encoding", b"identity")]), True),
        (case(method=b"HEAD"), True),  # a HEAD answer carries the GET answer's fields
        (case(request=[*ACCEPT, (b"Range", b"bytes=0-9")]), True),
        (case(response=[(b"Content-Type", b"image/png")]), False),
        (case(length=10), False),
        (case(status=304), False),
        (case(enabled=False), False),
    ],
)
def test_compressible_for_vary(
    args: tuple[bytes, int, Headers, Headers, CompressionSettings, int | None], vary: bool
) -> None:
    _, status, _, response, config, length = args
    assert compressible(status, response, config, content_length=length) is vary


# --- header rewriting ---------------------------------------------------------------------


def values(headers: Headers, name: bytes) -> list[bytes]:
    return [v for k, v in headers if k.lower() == name]


def test_rewrite_headers_basics() -> None:
    original: Headers = [
        (b"Content-Type", b"text/html"),
        (b"Content-Length", b"5000"),
        (b"Set-Cookie", b"a=1"),
        (b"content-length", b"5000"),
        (b"Accept-Ranges", b"bytes"),
        (b"Set-Cookie", b"b=2"),
        (b"Cache-Control", b"max-age=60"),
    ]
    snapshot = list(original)
    out = rewrite_headers(original, "br")
    assert original == snapshot  # the input is not modified
    assert out == [
        (b"Content-Type", b"text/html"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
        (b"Cache-Control", b"max-age=60"),
        (b"Content-Encoding", b"br"),
        (b"Vary", b"Accept-Encoding"),
    ]


def test_rewrite_headers_replaces_identity() -> None:
    out = rewrite_headers([(b"Content-Encoding", b"identity"), (b"Content-Type", b"a/b")], "gzip")
    assert values(out, b"content-encoding") == [b"gzip"]


def test_rewrite_headers_refuses_encoded_responses() -> None:
    with pytest.raises(ValueError, match="already encoded"):
        rewrite_headers([(b"Content-Encoding", b"gzip")], "br")


@pytest.mark.parametrize(
    ("etag", "expected"),
    [
        (b'"abc"', b'W/"abc"'),
        (b'""', b'W/""'),
        (b' "abc" ', b'W/"abc"'),
        (b'W/"abc"', b'W/"abc"'),  # weak already
        (b"abc", b"abc"),  # malformed: left alone
    ],
)
def test_rewrite_headers_weakens_etag(etag: bytes, expected: bytes) -> None:
    out = rewrite_headers([(b"ETag", etag)], "zstd")
    assert values(out, b"etag") == [expected]


VARY = [
    # (Vary lines before, Vary lines after)
    ([], [b"Accept-Encoding"]),
    ([b"Cookie"], [b"Cookie, Accept-Encoding"]),
    ([b"Origin, Cookie"], [b"Origin, Cookie, Accept-Encoding"]),
    ([b"accept-encoding"], [b"accept-encoding"]),
    ([b"Origin, ACCEPT-ENCODING"], [b"Origin, ACCEPT-ENCODING"]),
    ([b"Origin,accept-encoding "], [b"Origin,accept-encoding "]),
    ([b"*"], [b"*"]),
    ([b"Cookie, *"], [b"Cookie, *"]),
    ([b"Cookie", b"*"], [b"Cookie", b"*"]),
    ([b"Cookie", b"Accept-Encoding"], [b"Cookie", b"Accept-Encoding"]),
    ([b"Cookie", b"Origin"], [b"Cookie", b"Origin, Accept-Encoding"]),
    ([b""], [b"Accept-Encoding"]),
    ([b"Cookie, "], [b"Cookie, Accept-Encoding"]),
    ([b"Accept-Encoding-X"], [b"Accept-Encoding-X, Accept-Encoding"]),
]


@pytest.mark.parametrize(("before", "after"), VARY)
def test_rewrite_headers_vary(before: list[bytes], after: list[bytes]) -> None:
    headers = [(b"Content-Type", b"text/html"), *((b"Vary", v) for v in before)]
    assert values(rewrite_headers(headers, "gzip"), b"vary") == after


@pytest.mark.parametrize(("before", "after"), VARY)
def test_add_vary_accept_encoding(before: list[bytes], after: list[bytes]) -> None:
    headers: Headers = [
        (b"Content-Length", b"10"),
        (b"ETag", b'"x"'),
        *((b"vary", v) for v in before),
    ]
    snapshot = list(headers)
    out = add_vary_accept_encoding(headers)
    assert headers == snapshot
    assert values(out, b"vary") == after
    # only Vary changes: length and validator stay, since the body is sent as it is
    assert values(out, b"content-length") == [b"10"] and values(out, b"etag") == [b'"x"']
    assert [k.lower() for k, _ in out if k.lower() != b"vary"] == [b"content-length", b"etag"]


# --- compressors --------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ALL)
def test_empty_stream_is_valid(encoding: str) -> None:
    c = make_compressor(encoding, CompressionSettings())
    assert c.compress(b"") == b""
    assert c.flush() == b""  # nothing fed, nothing to flush
    assert decode(encoding, c.finish()) == b""


@pytest.mark.parametrize("encoding", ALL)
def test_lifecycle(encoding: str) -> None:
    c = make_compressor(encoding, CompressionSettings())
    out = c.compress(b"hello " * 100) + c.flush()
    assert c.flush() == b""  # idle flushes are free
    out += c.finish()
    assert c.finish() == b""
    with pytest.raises(ValueError):
        c.compress(b"x")
    with pytest.raises(ValueError):
        c.flush()
    assert decode(encoding, out) == b"hello " * 100


def test_gzip_is_gzip() -> None:
    c = make_compressor("gzip", CompressionSettings())
    out = c.compress(b"abc") + c.finish()
    assert out[:3] == b"\x1f\x8b\x08"
    assert gzip.decompress(out) == b"abc"


@pytest.mark.parametrize("text", [True, False])
def test_brotli_modes(text: bool) -> None:
    c = make_compressor("br", CompressionSettings(), text=text)
    data = "¿Qué tal? ünïcödé ".encode() * 200
    assert brotli.decompress(c.compress(data) + c.finish()) == data


def test_zstd_window_fits_browsers() -> None:
    """The highest level allowed still uses at most the 8 MiB window of RFC 9659."""
    c = make_compressor("zstd", CompressionSettings(zstd_level=19))
    out = c.compress(b"0123456789abcdef" * 4096) + c.finish()
    params = zstandard.get_frame_parameters(out)
    assert params.window_size <= 8 * 1024 * 1024
    assert params.has_checksum
    assert decode("zstd", out) == b"0123456789abcdef" * 4096


@pytest.mark.parametrize("encoding", ALL)
def test_output_is_emitted_as_it_goes(encoding: str) -> None:
    """Without any flush(), output leaves compress() as blocks fill up, and what finish()
    still has to emit is bounded (the encoder keeps a window, not the body)."""
    c = make_compressor(encoding, CompressionSettings())
    early = sum(len(c.compress(chunk)) for chunk in _chunks(8 * 1024 * 1024))
    late = len(c.finish())
    assert early > late
    assert late < 64 * 1024


@pytest.mark.parametrize("encoding", ["deflate", "identity", "BR", ""])
def test_make_compressor_rejects_unknown(encoding: str) -> None:
    with pytest.raises(ValueError):
        make_compressor(encoding, CompressionSettings())


@pytest.mark.parametrize(
    ("encoding", "overrides", "costly"),
    [
        ("br", {}, False),
        ("br", {"brotli_quality": 5}, False),
        ("br", {"brotli_quality": 6}, True),
        ("br", {"brotli_quality": 11}, True),
        ("gzip", {}, False),
        ("gzip", {"gzip_level": 7}, False),
        ("gzip", {"gzip_level": 8}, True),
        ("zstd", {}, False),
        ("zstd", {"zstd_level": 9}, False),
        ("zstd", {"zstd_level": 10}, True),
        ("zstd", {"zstd_level": 19}, True),
    ],
)
def test_expensive(encoding: str, overrides: dict[str, int], costly: bool) -> None:
    assert expensive(encoding, CompressionSettings(**overrides)) is costly  # type: ignore[arg-type]


def test_expensive_rejects_unknown() -> None:
    with pytest.raises(ValueError):
        expensive("deflate", CompressionSettings())


# A stream of operations: feed bytes (sometimes repetitive text, sometimes noise) or flush.
_chunk = st.one_of(
    st.binary(max_size=600),
    st.builds(lambda word, n: word * n, st.binary(min_size=1, max_size=12), st.integers(1, 400)),
)
_ops = st.lists(st.one_of(_chunk, st.just(None)), max_size=25)


@pytest.mark.parametrize("encoding", ALL)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_ops, level=st.sampled_from([1, 4, 9]))
def test_round_trip(encoding: str, ops: list[bytes | None], level: int) -> None:
    """Random chunks and flushes decode to the input, and every flush makes all input so
    far decodable: a client sees each flushed piece without waiting for the end."""
    config = CompressionSettings(gzip_level=level, brotli_quality=level, zstd_level=level)
    c = make_compressor(encoding, config)
    decoder = streaming_decoder(encoding)
    fed = bytearray()
    sent = bytearray()
    decoded = bytearray()
    for op in ops:
        if op is None:
            piece = c.flush()
            sent += piece
            decoded += decoder(piece)
            assert decoded == fed
        else:
            fed += op
            piece = c.compress(op)
            sent += piece
            decoded += decoder(piece)
            assert fed.startswith(decoded)
    piece = c.finish()
    sent += piece
    decoded += decoder(piece)
    assert decoded == fed
    assert decode(encoding, bytes(sent)) == fed


# --- constant memory ----------------------------------------------------------------------

CHUNK = 64 * 1024
TOTAL = 200 * 1024 * 1024


def _html_pool() -> bytes:
    """~20 KB of HTML-like text: shorter than gzip's 32 KiB window, so it is compressible
    by every coding and the test stays fast."""
    rows = [
        b'<tr class="row-%d"><td><a href="/items/%d">item %d</a></td><td>%d.%02d EUR</td>'
        b"<td>in stock: %s</td></tr>\n"
        % (i, i * 7919, i, i * 13 % 997, i % 100, b"yes" if i % 3 else b"no")
        for i in range(200)
    ]
    return b"".join(rows)


def _chunks(total: int) -> Iterator[bytes]:
    """``total`` bytes of generated HTML in 64 KiB chunks; no two chunks are the same."""
    pool = _html_pool()
    period = len(pool)
    ring = pool * (CHUNK // period + 2)
    for index in range(total // CHUNK):
        start = index * 4099 % period
        yield b"%08x" % index + ring[start + 8 : start + CHUNK]


def _rss() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


@pytest.mark.parametrize("encoding", ALL)
def test_constant_memory(encoding: str) -> None:
    """200 MB through each coding: Python allocations (tracemalloc, which also sees zlib's
    state) stay far below the body size, and so does the resident size of the process,
    which also covers the brotli and zstd libraries' own buffers. The output is decoded
    on the way and checked by length and CRC. Takes about 0.1 s (zstd) to 1.5 s (gzip)."""
    c = make_compressor(encoding, CompressionSettings())
    decoder = streaming_decoder(encoding)
    crc_in = crc_out = size_in = size_out = sent = 0
    rss_before = _rss()
    tracemalloc.start()
    try:
        for chunk in _chunks(TOTAL):
            crc_in = zlib.crc32(chunk, crc_in)
            size_in += len(chunk)
            piece = c.compress(chunk)
            sent += len(piece)
            plain = decoder(piece)
            crc_out = zlib.crc32(plain, crc_out)
            size_out += len(plain)
        piece = c.finish()
        sent += len(piece)
        plain = decoder(piece)
        crc_out = zlib.crc32(plain, crc_out)
        size_out += len(plain)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rss_after = _rss()
    assert size_in == TOTAL and (size_out, crc_out) == (size_in, crc_in)
    assert sent < TOTAL // 20  # it did compress
    assert peak < 16 * 1024 * 1024, f"tracemalloc peak {peak / 1e6:.1f} MB"
    if rss_before is not None and rss_after is not None:
        grown = rss_after - rss_before
        assert grown < 64 * 1024 * 1024, f"resident size grew by {grown / 1e6:.1f} MB"
