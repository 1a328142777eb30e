"""Body framing helpers and the message value types."""

from __future__ import annotations

import re
from email.utils import parsedate_to_datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pibl.http.framing import LAST_CHUNK, client_framing, encode_chunk, http_date
from pibl.http.message import (
    BodyKind,
    RequestHead,
    ResponseHead,
    get_all,
    get_header,
    header_tokens,
)
from pibl.http.parse import Body, End, Head, RequestParser

# -- encode_chunk ---------------------------------------------------------------------


def test_encode_chunk_small() -> None:
    assert encode_chunk(b"abc") == b"3\r\nabc\r\n"


def test_encode_chunk_uses_lowercase_hex_size() -> None:
    assert encode_chunk(b"x" * 255) == b"ff\r\n" + b"x" * 255 + b"\r\n"
    assert encode_chunk(b"x" * 4096).startswith(b"1000\r\n")


def test_encode_chunk_empty_yields_nothing() -> None:
    # An empty chunk would be the last-chunk marker and end the body early.
    assert encode_chunk(b"") == b""


def test_last_chunk() -> None:
    assert LAST_CHUNK == b"0\r\n\r\n"


def test_encode_chunk_keeps_crlf_in_data() -> None:
    assert encode_chunk(b"\r\n0\r\n\r\n") == b"7\r\n\r\n0\r\n\r\n\r\n"


@settings(max_examples=150, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=8))
def test_encoded_chunks_parse_back(parts: list[bytes]) -> None:
    wire = (
        b"POST /u HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"".join(encode_chunk(p) for p in parts)
        + LAST_CHUNK
    )
    events = RequestParser().feed(wire)
    assert isinstance(events[0], Head)
    assert events[-1] == End()
    body = b"".join(e.data for e in events if isinstance(e, Body))
    assert body == b"".join(parts)


# -- client_framing -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("upstream", "version", "expected"),
    [
        (BodyKind.CHUNKED, b"1.1", BodyKind.CHUNKED),
        (BodyKind.CLOSE, b"1.1", BodyKind.CHUNKED),
        (BodyKind.CHUNKED, b"1.0", BodyKind.CLOSE),
        (BodyKind.CLOSE, b"1.0", BodyKind.CLOSE),
        (BodyKind.LENGTH, b"1.1", BodyKind.LENGTH),
        (BodyKind.LENGTH, b"1.0", BodyKind.LENGTH),
        (BodyKind.NONE, b"1.1", BodyKind.NONE),
        (BodyKind.NONE, b"1.0", BodyKind.NONE),
    ],
)
def test_client_framing_table(upstream: BodyKind, version: bytes, expected: BodyKind) -> None:
    assert client_framing(upstream, version) is expected


# -- http_date ------------------------------------------------------------------------

IMF_FIXDATE = re.compile(
    rb"^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d{2} "
    rb"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} \d{2}:\d{2}:\d{2} GMT$"
)


def test_http_date_is_imf_fixdate() -> None:
    value = http_date()
    assert IMF_FIXDATE.match(value), value
    assert parsedate_to_datetime(value.decode()).tzinfo is not None


def test_http_date_is_cached_within_a_second() -> None:
    first = http_date()
    second = http_date()
    # Either the same cached object, or the clock moved to the next second in between.
    assert first is second or first != second


# -- message helpers ------------------------------------------------------------------

HEADERS = [
    (b"Host", b"example.com"),
    (b"Set-Cookie", b"a=1"),
    (b"CONNECTION", b"keep-alive, Upgrade"),
    (b"set-cookie", b"b=2"),
    (b"Connection", b" ,x-foo ,"),
]


def test_get_header_is_case_insensitive_and_returns_first() -> None:
    assert get_header(HEADERS, b"set-cookie") == b"a=1"
    assert get_header(HEADERS, b"host") == b"example.com"
    assert get_header(HEADERS, b"missing") is None


def test_get_all_keeps_order() -> None:
    assert get_all(HEADERS, b"set-cookie") == [b"a=1", b"b=2"]
    assert get_all(HEADERS, b"missing") == []


def test_header_tokens_across_lines_lowercased_and_without_empties() -> None:
    assert header_tokens(HEADERS, b"connection") == [b"keep-alive", b"upgrade", b"x-foo"]


def test_request_line() -> None:
    head = RequestHead(method=b"GET", target=b"/a?b=c", version=b"1.0", headers=[])
    assert head.request_line == "GET /a?b=c HTTP/1.0"


def test_request_line_latin1_target() -> None:
    head = RequestHead(method=b"GET", target=b"/caf\xe9", version=b"1.1", headers=[])
    assert head.request_line == "GET /caf\xe9 HTTP/1.1"


def test_head_defaults() -> None:
    req = RequestHead(method=b"GET", target=b"/", version=b"1.1", headers=[])
    assert req.body is BodyKind.NONE
    assert req.keep_alive is True
    assert req.expect_continue is False
    assert req.upgrade is None
    resp = ResponseHead(status=200, reason=b"OK", version=b"1.1")
    assert resp.headers == []
    assert resp.body is BodyKind.NONE
    # Each instance gets its own header list.
    resp.headers.append((b"a", b"b"))
    assert ResponseHead(status=200, reason=b"OK", version=b"1.1").headers == []
