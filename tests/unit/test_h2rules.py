"""HTTP/2 request fields to an HTTP/1.1 head (RFC 9113 section 8): every rule, both ways."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pibl.errors import ProtocolError
from pibl.http.h2rules import request_head, response_fields
from pibl.http.message import BodyKind

BASE = [
    (b":method", b"GET"),
    (b":scheme", b"https"),
    (b":path", b"/a?b=1"),
    (b":authority", b"example.com"),
]


def test_a_plain_request() -> None:
    head = request_head([*BASE, (b"accept", b"*/*")], end_stream=True)
    assert head.method == b"GET"
    assert head.target == b"/a?b=1"
    assert head.host == b"example.com"
    assert head.version == b"1.1"  # served as HTTP/1.1 upstream
    assert head.request_line == "GET /a?b=1 HTTP/2.0"  # logged as HTTP/2.0
    assert head.headers == [(b"host", b"example.com"), (b"accept", b"*/*")]
    assert head.body is BodyKind.NONE


def test_host_without_authority_and_same_host_with_it() -> None:
    fields = [f for f in BASE if f[0] != b":authority"] + [(b"host", b"h.test:8080")]
    assert request_head(fields, True).host == b"h.test:8080"
    head = request_head([*BASE, (b"host", b"EXAMPLE.com")], True)
    assert head.host == b"example.com"
    assert [v for n, v in head.headers if n == b"host"] == [b"EXAMPLE.com"]


def test_cookies_are_joined() -> None:
    head = request_head([*BASE, (b"cookie", b"a=1"), (b"x", b"y"), (b"cookie", b"b=2")], True)
    assert (b"cookie", b"a=1; b=2") in head.headers
    assert sum(1 for n, _ in head.headers if n == b"cookie") == 1


def test_bodies() -> None:
    head = request_head([*BASE, (b"content-length", b"5")], end_stream=False)
    assert (head.body, head.content_length) == (BodyKind.LENGTH, 5)
    head = request_head(BASE, end_stream=False)  # length unknown: chunked upstream
    assert head.body is BodyKind.CHUNKED
    assert request_head([*BASE, (b"content-length", b"0")], True).body is BodyKind.NONE
    head = request_head([*BASE, (b"expect", b"100-continue")], end_stream=False)
    assert head.expect_continue


def test_te_trailers_is_allowed_and_not_forwarded() -> None:
    head = request_head([*BASE, (b"te", b"trailers")], True)
    assert all(n != b"te" for n, _ in head.headers)


MALFORMED = {
    "connection": [*BASE, (b"connection", b"keep-alive")],
    "keep-alive": [*BASE, (b"keep-alive", b"5")],
    "proxy-connection": [*BASE, (b"proxy-connection", b"close")],
    "transfer-encoding": [*BASE, (b"transfer-encoding", b"chunked")],
    "upgrade": [*BASE, (b"upgrade", b"websocket")],
    "te gzip": [*BASE, (b"te", b"gzip")],
    "te trailers, gzip": [*BASE, (b"te", b"trailers, gzip")],
    "uppercase name": [*BASE, (b"X-Upper", b"1")],
    "CR in value": [*BASE, (b"x", b"a\rb")],
    "LF in value": [*BASE, (b"x", b"a\nb")],
    "NUL in value": [*BASE, (b"x", b"a\x00b")],
    "CR in name": [*BASE, (b"x\r", b"1")],
    "space in name": [*BASE, (b"x y", b"1")],
    "leading space": [*BASE, (b"x", b" a")],
    "trailing tab": [*BASE, (b"x", b"a\t")],
    "empty name": [*BASE, (b"", b"1")],
    "missing :method": BASE[1:],
    "missing :scheme": [BASE[0], *BASE[2:]],
    "missing :path": [*BASE[:2], BASE[3]],
    "duplicated :method": [*BASE, (b":method", b"GET")],
    "duplicated :path": [BASE[2], *BASE],
    "duplicated :authority": [*BASE, (b":authority", b"x.test")],
    "unknown pseudo": [*BASE, (b":protocol", b"websocket")],
    "response pseudo": [*BASE, (b":status", b"200")],
    "pseudo after regular": [*BASE[:3], (b"x", b"1"), BASE[3]],
    "CONNECT": [(b":method", b"CONNECT"), (b":authority", b"example.com:443")],
    "relative path": [*BASE[:2], (b":path", b"a"), BASE[3]],
    "empty path": [*BASE[:2], (b":path", b""), BASE[3]],
    "host differs": [*BASE, (b"host", b"other.test")],
    "no authority no host": BASE[:3],
    "bad authority": [*BASE[:3], (b":authority", b"user@example.com")],
    "bad content-length": [*BASE, (b"content-length", b"5x")],
    "conflicting content-length": [*BASE, (b"content-length", b"5"), (b"content-length", b"6")],
    "content-length without DATA": [*BASE, (b"content-length", b"5")],
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_requests_are_refused(name: str) -> None:
    with pytest.raises(ProtocolError):
        request_head(MALFORMED[name], end_stream=True)


_token = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)


@given(st.lists(st.tuples(st.binary(max_size=12), st.binary(max_size=20)), max_size=6))
def test_any_input_is_a_sane_head_or_refused(extra: list[tuple[bytes, bytes]]) -> None:
    try:
        head = request_head([*BASE, *extra], end_stream=True)
    except ProtocolError:
        return
    for name, value in head.headers:  # nothing that could split or smuggle on HTTP/1.1
        assert name and name == name.lower() and b":" not in name
        assert not any(c in value for c in b"\r\n\x00")
        assert name not in (b"connection", b"transfer-encoding", b"upgrade", b"te")
    assert head.host == b"example.com"


@given(st.lists(st.tuples(_token, st.text(min_size=0, max_size=8)), max_size=6))
def test_valid_fields_pass_through_in_order(extra: list[tuple[str, str]]) -> None:
    fields = [
        (n.encode(), v.strip(" \t").encode())
        for n, v in extra
        if n not in ("connection", "keep-alive", "proxy-connection", "transfer-encoding")
        and n not in ("upgrade", "te", "host", "cookie", "content-length", "expect")
        and "\r" not in v
        and "\n" not in v
        and "\x00" not in v
    ]
    head = request_head([*BASE, *fields], end_stream=True)
    assert head.headers == [(b"host", b"example.com"), *fields]


def test_response_fields_drop_hop_by_hop() -> None:
    out = response_fields(
        200,
        [
            (b"Content-Type", b"text/plain"),
            (b"Connection", b"close, X-Private"),
            (b"X-Private", b"1"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Set-Cookie", b"a=1"),
            (b"Set-Cookie", b"b=2"),
        ],
    )
    assert out == [
        (b":status", b"200"),
        (b"content-type", b"text/plain"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
    ]


def test_a_header_list_beyond_max_size_is_431() -> None:
    fields = [*BASE, (b"x-big", b"v" * 1000)]
    size = sum(len(n) + len(v) + 32 for n, v in fields)  # RFC 9113 §6.5.2
    assert request_head(fields, True, max_size=size).host == b"example.com"  # at the limit
    with pytest.raises(ProtocolError) as info:
        request_head(fields, True, max_size=size - 1)
    assert info.value.status == 431
    assert f"{size} bytes" in info.value.reason
    # the 32 bytes a field count too: many small fields reach the limit as well
    small = [*BASE, *[(b"a", b"") for _ in range(40)]]
    with pytest.raises(ProtocolError) as info:
        request_head(small, True, max_size=40 * 32)
    assert info.value.status == 431


def test_more_fields_than_max_headers_is_431_and_cookie_crumbs_count_once() -> None:
    fields = [*BASE, *[(b"x-h%d" % i, b"v") for i in range(10)]]
    regular = sum(1 for n, _ in fields if not n.startswith(b":"))
    assert request_head(fields, True, max_fields=regular).host == b"example.com"
    with pytest.raises(ProtocolError) as info:
        request_head(fields, True, max_fields=regular - 1)
    assert info.value.status == 431 and info.value.reason == "too many header fields"
    crumbs = [*BASE, *[(b"cookie", b"c%d=1" % i) for i in range(50)]]
    head = request_head(crumbs, True, max_fields=regular + 1)
    assert sum(1 for n, _ in head.headers if n == b"cookie") == 1
