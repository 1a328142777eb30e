"""Header rewriting between client and backend (pure functions in pibl.http.forward)."""

from __future__ import annotations

import os
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pibl.http.forward import (
    HOP_BY_HOP,
    REASONS,
    client_response,
    client_response_fields,
    request_id,
    simple_response,
    upstream_request,
)
from pibl.http.h2rules import response_fields
from pibl.http.message import BodyKind, RequestHead, ResponseHead
from pibl.http.parse import Body, End, Head, RequestParser, ResponseParser

RID = b"rid-1"


def parse_head(raw: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """Split a serialized head into its start line and header list (strictly CRLF)."""
    assert raw.endswith(b"\r\n\r\n")
    lines = raw[:-4].split(b"\r\n")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b": ")
        assert sep, line
        headers.append((name, value))
    return lines[0], headers


def names(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [n.lower() for n, _ in headers]


def values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for n, v in headers if n.lower() == name]


def request(
    headers: list[tuple[bytes, bytes]],
    *,
    method: bytes = b"GET",
    target: bytes = b"/path?q=1",
    version: bytes = b"1.1",
    host: bytes | None = None,
    upgrade: bytes | None = None,
) -> RequestHead:
    if host is None:
        host = next((v for n, v in headers if n.lower() == b"host"), b"")
    return RequestHead(
        method=method, target=target, version=version, headers=headers, host=host, upgrade=upgrade
    )


def forward(
    head: RequestHead,
    *,
    body: BodyKind = BodyKind.NONE,
    content_length: int = 0,
    client_ip: str = "203.0.113.7",
    scheme: bytes = b"http",
) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    raw = upstream_request(
        head,
        client_ip=client_ip,
        scheme=scheme,
        rid=RID,
        via=b"pibl",
        default_host=b"backend:9001",
        body=body,
        content_length=content_length,
    )
    return parse_head(raw)


# -- upstream_request -----------------------------------------------------------------


def test_request_line_is_always_http_11() -> None:
    line, _ = forward(request([(b"Host", b"h")], version=b"1.0", method=b"POST"))
    assert line == b"POST /path?q=1 HTTP/1.1"


def test_basic_forwarded_request() -> None:
    head = request([(b"Host", b"example.com"), (b"Accept", b"*/*")])
    _, headers = forward(head)
    assert headers == [
        (b"Host", b"example.com"),
        (b"Accept", b"*/*"),
        (b"X-Forwarded-For", b"203.0.113.7"),
        (b"X-Forwarded-Proto", b"http"),
        (b"X-Forwarded-Host", b"example.com"),
        (b"X-Request-ID", RID),
        (b"Via", b"1.1 pibl"),
    ]


@pytest.mark.parametrize(
    "name",
    [
        b"Connection",
        b"Keep-Alive",
        b"Proxy-Connection",
        b"TE",
        b"Trailer",
        b"Transfer-Encoding",
        b"Upgrade",
        b"connection",
        b"KEEP-ALIVE",
    ],
)
def test_hop_by_hop_headers_removed(name: bytes) -> None:
    head = request([(b"Host", b"h"), (name, b"something"), (b"Accept", b"x")])
    _, headers = forward(head)
    assert name.lower() not in names(headers)
    assert (b"Accept", b"x") in headers


def test_headers_named_in_connection_removed() -> None:
    head = request(
        [
            (b"Host", b"h"),
            (b"Connection", b"keep-alive, X-Secret ,  x-other"),
            (b"X-Secret", b"1"),
            (b"X-Other", b"2"),
            (b"Connection", b"X-Third"),
            (b"X-Third", b"3"),
            (b"X-Kept", b"4"),
        ]
    )
    _, headers = forward(head)
    lnames = names(headers)
    for gone in (b"connection", b"x-secret", b"x-other", b"x-third", b"keep-alive"):
        assert gone not in lnames
    assert (b"X-Kept", b"4") in headers


def test_repeated_end_to_end_headers_kept_in_order() -> None:
    head = request(
        [
            (b"Host", b"h"),
            (b"Cookie", b"a=1"),
            (b"Accept", b"text/html"),
            (b"Cookie", b"b=2"),
            (b"Via", b"1.1 first"),
            (b"Cookie", b"c=3"),
        ]
    )
    _, headers = forward(head)
    assert values(headers, b"cookie") == [b"a=1", b"b=2", b"c=3"]
    # A received Via comes first, PIBL's own is appended last.
    assert values(headers, b"via") == [b"1.1 first", b"1.1 pibl"]
    kept = [h for h in headers if h[0].lower() in (b"cookie", b"accept")]
    assert kept == [
        (b"Cookie", b"a=1"),
        (b"Accept", b"text/html"),
        (b"Cookie", b"b=2"),
        (b"Cookie", b"c=3"),
    ]


def test_host_kept_in_place_with_original_spelling() -> None:
    head = request([(b"accept", b"x"), (b"hOsT", b"Example.COM:8080")])
    _, headers = forward(head)
    assert headers[1] == (b"hOsT", b"Example.COM:8080")
    assert values(headers, b"x-forwarded-host") == [b"Example.COM:8080"]


def test_absolute_form_authority_replaces_host_value() -> None:
    # The parser puts the authority of an absolute-form target into head.host.
    head = request([(b"Host", b"ignored")], host=b"origin.example")
    _, headers = forward(head)
    assert values(headers, b"host") == [b"origin.example"]
    assert values(headers, b"x-forwarded-host") == [b"origin.example"]


def test_missing_host_uses_default_host() -> None:
    head = request([(b"Accept", b"x")], version=b"1.0")
    _, headers = forward(head)
    assert values(headers, b"host") == [b"backend:9001"]
    assert values(headers, b"x-forwarded-host") == [b"backend:9001"]


def test_empty_host_uses_default_host() -> None:
    head = request([(b"Host", b"")])
    _, headers = forward(head)
    assert values(headers, b"host") == [b"backend:9001"]


def test_x_forwarded_for_added() -> None:
    _, headers = forward(request([(b"Host", b"h")]), client_ip="10.0.0.9")
    assert values(headers, b"x-forwarded-for") == [b"10.0.0.9"]


def test_x_forwarded_for_appended_like_nginx() -> None:
    head = request([(b"Host", b"h"), (b"X-Forwarded-For", b"198.51.100.1")])
    _, headers = forward(head, client_ip="10.0.0.9")
    assert values(headers, b"x-forwarded-for") == [b"198.51.100.1, 10.0.0.9"]


def test_repeated_x_forwarded_for_joined_into_one() -> None:
    head = request(
        [
            (b"X-Forwarded-For", b"1.1.1.1"),
            (b"Host", b"h"),
            (b"x-forwarded-for", b"2.2.2.2, 3.3.3.3"),
        ]
    )
    _, headers = forward(head, client_ip="10.0.0.9")
    assert values(headers, b"x-forwarded-for") == [b"1.1.1.1, 2.2.2.2, 3.3.3.3, 10.0.0.9"]


def test_ipv6_client_ip() -> None:
    _, headers = forward(request([(b"Host", b"h")]), client_ip="2001:db8::1")
    assert values(headers, b"x-forwarded-for") == [b"2001:db8::1"]


def test_client_x_forwarded_proto_host_and_request_id_replaced() -> None:
    head = request(
        [
            (b"Host", b"real.example"),
            (b"X-Forwarded-Proto", b"gopher"),
            (b"X-Forwarded-Host", b"evil.example"),
            (b"X-Request-ID", b"client-id"),
        ]
    )
    _, headers = forward(head, scheme=b"https")
    assert values(headers, b"x-forwarded-proto") == [b"https"]
    assert values(headers, b"x-forwarded-host") == [b"real.example"]
    assert values(headers, b"x-request-id") == [RID]


@pytest.mark.parametrize(("version", "via"), [(b"1.1", b"1.1 pibl"), (b"1.0", b"1.0 pibl")])
def test_via_uses_received_version(version: bytes, via: bytes) -> None:
    _, headers = forward(request([(b"Host", b"h")], version=version))
    assert values(headers, b"via") == [via]


def test_client_content_length_replaced_by_framing() -> None:
    head = request([(b"Host", b"h"), (b"Content-Length", b"999")], method=b"POST")
    _, headers = forward(head, body=BodyKind.LENGTH, content_length=12)
    assert values(headers, b"content-length") == [b"12"]
    assert b"transfer-encoding" not in names(headers)


def test_chunked_body_forwarded_chunked() -> None:
    head = request([(b"Host", b"h"), (b"Transfer-Encoding", b"chunked")], method=b"POST")
    _, headers = forward(head, body=BodyKind.CHUNKED)
    assert values(headers, b"transfer-encoding") == [b"chunked"]
    assert b"content-length" not in names(headers)


def test_no_body_has_no_framing_headers() -> None:
    head = request([(b"Host", b"h"), (b"Content-Length", b"0")], method=b"POST")
    _, headers = forward(head, body=BodyKind.NONE)
    assert b"content-length" not in names(headers)
    assert b"transfer-encoding" not in names(headers)


def test_expect_is_not_forwarded() -> None:
    head = request([(b"Host", b"h"), (b"Expect", b"100-continue")], method=b"POST")
    _, headers = forward(head, body=BodyKind.LENGTH, content_length=3)
    assert b"expect" not in names(headers)


def test_upgrade_request_keeps_connection_upgrade() -> None:
    head = request(
        [
            (b"Host", b"h"),
            (b"Connection", b"keep-alive, Upgrade"),
            (b"Upgrade", b"websocket"),
            (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
            (b"Sec-WebSocket-Version", b"13"),
        ],
        upgrade=b"websocket",
    )
    _, headers = forward(head)
    assert values(headers, b"connection") == [b"upgrade"]
    assert values(headers, b"upgrade") == [b"websocket"]
    assert values(headers, b"sec-websocket-key") == [b"dGhlIHNhbXBsZSBub25jZQ=="]
    assert values(headers, b"sec-websocket-version") == [b"13"]
    assert b"keep-alive" not in names(headers)


def test_non_upgrade_request_has_no_connection_header() -> None:
    head = request([(b"Host", b"h"), (b"Connection", b"close"), (b"Upgrade", b"h2c")])
    _, headers = forward(head)
    assert b"connection" not in names(headers)
    assert b"upgrade" not in names(headers)


def test_forwarded_request_is_accepted_by_the_request_parser() -> None:
    head = request(
        [(b"Host", b"h"), (b"Transfer-Encoding", b"chunked"), (b"X-A", b"1")], method=b"POST"
    )
    raw = upstream_request(
        head,
        client_ip="127.0.0.1",
        scheme=b"http",
        rid=RID,
        via=b"pibl",
        default_host=b"d",
        body=BodyKind.CHUNKED,
    )
    events = RequestParser().feed(raw + b"3\r\nabc\r\n0\r\n\r\n")
    assert isinstance(events[0], Head)
    parsed = events[0].head
    assert isinstance(parsed, RequestHead)
    assert parsed.method == b"POST"
    assert parsed.body is BodyKind.CHUNKED
    assert events[1:] == [Body(b"abc"), End()]


# Property: hop-by-hop never leaks, kept headers keep their order.

_TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-0123456789", min_size=1, max_size=12)
_NAME_POOL = [
    b"Host",
    b"Connection",
    b"Keep-Alive",
    b"Proxy-Connection",
    b"TE",
    b"Trailer",
    b"Transfer-Encoding",
    b"Upgrade",
    b"Content-Length",
    b"Expect",
    b"X-Forwarded-For",
    b"X-Forwarded-Proto",
    b"X-Forwarded-Host",
    b"X-Request-ID",
    b"Via",
    b"Cookie",
    b"Set-Cookie",
    b"Date",
    b"Accept",
    b"X-Custom",
    b"x-custom",
]
header_names = st.one_of(
    st.sampled_from(_NAME_POOL),
    _TOKEN.map(lambda s: ("X-" + s).encode()),
)
header_values = st.one_of(
    _TOKEN.map(str.encode),
    st.lists(st.one_of(st.sampled_from(_NAME_POOL), _TOKEN.map(str.encode)), max_size=3).map(
        b", ".join
    ),
)
header_lists = st.lists(st.tuples(header_names, header_values), max_size=15)

_OWNED = {b"content-length", b"expect", b"x-forwarded-proto", b"x-forwarded-host", b"x-request-id"}


@settings(max_examples=200, deadline=None)
@given(
    headers=header_lists,
    version=st.sampled_from([b"1.0", b"1.1"]),
    body=st.sampled_from([BodyKind.NONE, BodyKind.LENGTH, BodyKind.CHUNKED]),
    upgrade=st.one_of(st.none(), st.just(b"websocket")),
)
def test_upstream_request_invariants(
    headers: list[tuple[bytes, bytes]], version: bytes, body: BodyKind, upgrade: bytes | None
) -> None:
    head = request(headers, version=version, upgrade=upgrade)
    line, out = forward(head, body=body, content_length=5)
    assert line == b"GET /path?q=1 HTTP/1.1"

    named: set[bytes] = set()
    for n, v in headers:
        if n.lower() == b"connection":
            named.update(t.strip().lower() for t in v.split(b","))

    # Only the hop-by-hop fields PIBL adds itself appear, each exactly once.
    hop = [n for n in names(out) if n in HOP_BY_HOP]
    expected_hop = []
    if upgrade is not None:
        expected_hop += [b"connection", b"upgrade"]
    if body is BodyKind.CHUNKED:
        expected_hop.append(b"transfer-encoding")
    assert hop == expected_hop
    if upgrade is not None:
        assert values(out, b"connection") == [b"upgrade"]

    # End-to-end fields that survive keep their relative order and exact bytes.
    def survives(name: bytes) -> bool:
        lname = name.lower()
        return not (
            lname in HOP_BY_HOP
            or lname in _OWNED
            or lname in named
            or lname in (b"host", b"x-forwarded-for", b"via")
        )

    expected_kept = [(n, v) for n, v in headers if survives(n)]
    assert [(n, v) for n, v in out if survives(n)] == expected_kept

    # Exactly one of each field PIBL owns.
    for owned in (b"host", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"):
        assert len(values(out, owned)) == 1, owned
    assert values(out, b"x-request-id") == [RID]
    assert values(out, b"via")[-1] == version + b" pibl"
    assert values(out, b"x-forwarded-for")[0].endswith(b"203.0.113.7")
    if body is BodyKind.LENGTH:
        assert values(out, b"content-length") == [b"5"]
    else:
        assert values(out, b"content-length") == []


# -- client_response ------------------------------------------------------------------


def response(
    headers: list[tuple[bytes, bytes]],
    *,
    status: int = 200,
    reason: bytes = b"OK",
    version: bytes = b"1.1",
    body: BodyKind = BodyKind.LENGTH,
) -> ResponseHead:
    return ResponseHead(status=status, reason=reason, version=version, headers=headers, body=body)


def respond(
    resp: ResponseHead,
    *,
    framing: BodyKind | None = None,
    keep_alive: bool = True,
    client_version: bytes = b"1.1",
    extra: list[tuple[bytes, bytes]] | None = None,
) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    raw = client_response(
        resp,
        framing=resp.body if framing is None else framing,
        keep_alive=keep_alive,
        client_version=client_version,
        rid=RID,
        via=b"pibl",
        extra=extra,
    )
    return parse_head(raw)


DATE = (b"Date", b"Tue, 01 Jul 2025 10:00:00 GMT")


def test_response_status_line_and_basic_headers() -> None:
    line, headers = respond(
        response([DATE, (b"Content-Type", b"text/plain"), (b"Content-Length", b"5")])
    )
    assert line == b"HTTP/1.1 200 OK"
    assert headers == [
        DATE,
        (b"Content-Type", b"text/plain"),
        (b"Content-Length", b"5"),
        (b"Via", b"1.1 pibl"),
        (b"X-Request-ID", RID),
    ]


def test_response_hop_by_hop_removed() -> None:
    resp = response(
        [
            DATE,
            (b"Connection", b"keep-alive, X-Internal"),
            (b"Keep-Alive", b"timeout=5"),
            (b"X-Internal", b"secret"),
            (b"Proxy-Connection", b"keep-alive"),
            (b"Trailer", b"X-Checksum"),
            (b"TE", b"trailers"),
            (b"Upgrade", b"h2c"),
            (b"Content-Length", b"3"),
        ]
    )
    _, headers = respond(resp)
    lnames = names(headers)
    for gone in HOP_BY_HOP | {b"x-internal"}:
        assert gone not in lnames, gone
    assert values(headers, b"content-length") == [b"3"]


def test_content_length_dropped_when_rechunked() -> None:
    resp = response(
        [DATE, (b"Transfer-Encoding", b"chunked"), (b"Content-Type", b"a/b")],
        body=BodyKind.CHUNKED,
    )
    _, headers = respond(resp, framing=BodyKind.CHUNKED)
    assert values(headers, b"transfer-encoding") == [b"chunked"]
    assert b"content-length" not in names(headers)


def test_close_delimited_upstream_rechunked_for_11_client() -> None:
    resp = response([DATE, (b"Content-Length", b"10")], body=BodyKind.CLOSE)
    _, headers = respond(resp, framing=BodyKind.CHUNKED)
    assert values(headers, b"transfer-encoding") == [b"chunked"]
    assert b"content-length" not in names(headers)


def test_close_delimited_for_10_client() -> None:
    resp = response([DATE, (b"Transfer-Encoding", b"chunked")], body=BodyKind.CHUNKED)
    _, headers = respond(resp, framing=BodyKind.CLOSE, keep_alive=False, client_version=b"1.0")
    assert b"transfer-encoding" not in names(headers)
    assert b"content-length" not in names(headers)
    assert values(headers, b"connection") == [b"close"]


def test_head_response_keeps_content_length() -> None:
    # Response to HEAD: no body is sent but Content-Length describes the resource.
    resp = response([DATE, (b"Content-Length", b"1234")], body=BodyKind.NONE)
    _, headers = respond(resp, framing=BodyKind.NONE)
    assert values(headers, b"content-length") == [b"1234"]
    assert b"transfer-encoding" not in names(headers)


def test_connection_close_when_not_keep_alive() -> None:
    _, headers = respond(response([DATE, (b"Content-Length", b"0")]), keep_alive=False)
    assert values(headers, b"connection") == [b"close"]


def test_no_connection_header_for_11_keep_alive() -> None:
    _, headers = respond(response([DATE, (b"Connection", b"close"), (b"Content-Length", b"0")]))
    assert b"connection" not in names(headers)


def test_keep_alive_announced_to_10_client() -> None:
    _, headers = respond(
        response([DATE, (b"Content-Length", b"0")]), keep_alive=True, client_version=b"1.0"
    )
    assert values(headers, b"connection") == [b"keep-alive"]


def test_via_uses_backend_version_and_follows_received_via() -> None:
    resp = response([DATE, (b"Via", b"1.1 cache"), (b"Content-Length", b"0")], version=b"1.0")
    _, headers = respond(resp)
    assert values(headers, b"via") == [b"1.1 cache", b"1.0 pibl"]


def test_backend_request_id_replaced() -> None:
    _, headers = respond(response([DATE, (b"X-Request-ID", b"backend-id")]))
    assert values(headers, b"x-request-id") == [RID]


def test_date_added_when_missing() -> None:
    _, headers = respond(response([(b"Content-Length", b"0")]))
    dates = values(headers, b"date")
    assert len(dates) == 1
    assert dates[0].endswith(b" GMT")


def test_date_not_duplicated_when_present() -> None:
    _, headers = respond(response([(b"date", DATE[1]), (b"Content-Length", b"0")]))
    assert values(headers, b"date") == [DATE[1]]


def test_set_cookie_repeats_kept_in_order() -> None:
    resp = response(
        [
            DATE,
            (b"Set-Cookie", b"a=1; Path=/"),
            (b"Content-Length", b"0"),
            (b"Set-Cookie", b"b=2, c=3; Expires=Wed, 09 Jun 2021 10:18:14 GMT"),
            (b"set-cookie", b"d=4"),
        ]
    )
    _, headers = respond(resp)
    assert values(headers, b"set-cookie") == [
        b"a=1; Path=/",
        b"b=2, c=3; Expires=Wed, 09 Jun 2021 10:18:14 GMT",
        b"d=4",
    ]


def test_extra_headers_appended() -> None:
    _, headers = respond(response([DATE]), extra=[(b"X-Backend", b"b1")])
    assert values(headers, b"x-backend") == [b"b1"]


def test_101_switching_protocols() -> None:
    resp = response(
        [
            (b"Connection", b"Upgrade"),
            (b"Upgrade", b"websocket"),
            (b"Sec-WebSocket-Accept", b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        ],
        status=101,
        reason=b"Switching Protocols",
        body=BodyKind.NONE,
    )
    line, headers = respond(resp, framing=BodyKind.NONE, keep_alive=False)
    assert line == b"HTTP/1.1 101 Switching Protocols"
    assert values(headers, b"connection") == [b"upgrade"]
    assert values(headers, b"upgrade") == [b"websocket"]
    assert values(headers, b"sec-websocket-accept") == [b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="]


@pytest.mark.parametrize(
    ("status", "reason", "line"),
    [
        (200, b"", b"HTTP/1.1 200 OK"),
        (404, b"Nope", b"HTTP/1.1 404 Nope"),
        (502, b"bad\x01reason", b"HTTP/1.1 502 Bad Gateway"),
        (200, b"x" * 65, b"HTTP/1.1 200 OK"),
        (299, b"", b"HTTP/1.1 299 Unknown"),
        (200, b"Fine \xe2\x9c\x93", b"HTTP/1.1 200 OK"),
    ],
)
def test_reason_phrase_sanitized(status: int, reason: bytes, line: bytes) -> None:
    got, _ = respond(response([DATE], status=status, reason=reason))
    assert got == line


def test_client_response_round_trips_through_response_parser() -> None:
    resp = response(
        [DATE, (b"Transfer-Encoding", b"chunked"), (b"X-A", b"1")], body=BodyKind.CHUNKED
    )
    raw = client_response(
        resp,
        framing=BodyKind.CHUNKED,
        keep_alive=True,
        client_version=b"1.1",
        rid=RID,
        via=b"pibl",
    )
    events = ResponseParser().feed(raw + b"2\r\nhi\r\n0\r\n\r\n")
    assert isinstance(events[0], Head)
    assert isinstance(events[0].head, ResponseHead)
    assert events[0].head.body is BodyKind.CHUNKED
    assert events[1:] == [Body(b"hi"), End()]


@settings(max_examples=200, deadline=None)
@given(
    headers=header_lists,
    framing=st.sampled_from(list(BodyKind)),
    keep_alive=st.booleans(),
    client_version=st.sampled_from([b"1.0", b"1.1"]),
)
def test_client_response_invariants(
    headers: list[tuple[bytes, bytes]],
    framing: BodyKind,
    keep_alive: bool,
    client_version: bytes,
) -> None:
    resp = response(headers, body=BodyKind.LENGTH if framing is BodyKind.LENGTH else framing)
    _, out = respond(resp, framing=framing, keep_alive=keep_alive, client_version=client_version)
    named: set[bytes] = set()
    for n, v in headers:
        if n.lower() == b"connection":
            named.update(t.strip().lower() for t in v.split(b","))
    hop = [n for n in names(out) if n in HOP_BY_HOP]
    expected_hop = []
    if framing is BodyKind.CHUNKED:
        expected_hop.append(b"transfer-encoding")
    if not keep_alive or client_version == b"1.0":
        expected_hop.append(b"connection")
    assert hop == expected_hop
    if framing not in (BodyKind.LENGTH, BodyKind.NONE):
        assert b"content-length" not in names(out)

    def survives(name: bytes) -> bool:
        lname = name.lower()
        return not (
            lname in HOP_BY_HOP or lname in named or lname in (b"content-length", b"x-request-id")
        )

    assert [h for h in out if survives(h[0]) and h[0].lower() not in (b"date", b"via")] == [
        h for h in headers if survives(h[0]) and h[0].lower() not in (b"date", b"via")
    ]
    assert values(out, b"x-request-id") == [RID]
    assert values(out, b"via")[-1] == b"1.1 pibl"
    received_dates = [v for n, v in headers if n.lower() == b"date" and b"date" not in named]
    assert values(out, b"date")[: len(received_dates)] == received_dates
    assert len(values(out, b"date")) == max(1, len(received_dates))


# -- simple_response ------------------------------------------------------------------


def test_simple_response_is_a_complete_message() -> None:
    raw = simple_response(404, "no such route", rid=b"abc")
    events = ResponseParser().feed(raw)
    assert isinstance(events[0], Head)
    head = events[0].head
    assert isinstance(head, ResponseHead)
    assert head.status == 404
    assert head.reason == b"Not Found"
    assert head.keep_alive is False
    body = b"".join(e.data for e in events if isinstance(e, Body))
    assert body == b"404 Not Found: no such route\n"
    assert events[-1] == End()
    assert (b"X-Request-ID", b"abc") in head.headers
    assert (b"Connection", b"close") in head.headers
    assert (b"Content-Type", b"text/plain; charset=utf-8") in head.headers


def test_simple_response_keep_alive_and_extra() -> None:
    raw = simple_response(503, "busy", keep_alive=True, extra=[(b"Retry-After", b"1")])
    _, headers = parse_head(raw[: raw.index(b"\r\n\r\n") + 4])
    assert values(headers, b"connection") == [b"keep-alive"]
    assert values(headers, b"retry-after") == [b"1"]
    assert b"x-request-id" not in names(headers)


def test_simple_response_head_only_has_length_but_no_body() -> None:
    full = simple_response(400, "bad")
    head_only = simple_response(400, "bad", head_only=True)
    assert full.startswith(head_only)
    assert head_only.endswith(b"\r\n\r\n")
    match = re.search(rb"Content-Length: (\d+)", head_only)
    assert match is not None
    length = int(match.group(1))
    assert length == len(full) - len(head_only) > 0


def test_simple_response_unknown_status() -> None:
    raw = simple_response(599, "odd")
    assert raw.startswith(b"HTTP/1.1 599 Error\r\n")
    assert raw.endswith(b"599 Error: odd\n")


def test_simple_response_utf8_message_length() -> None:
    raw = simple_response(400, "mal formé")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert f"Content-Length: {len(body)}".encode() in head
    assert body.decode("utf-8") == "400 Bad Request: mal formé\n"


def test_reasons_table_covers_proxy_statuses() -> None:
    for status in (400, 405, 408, 413, 414, 417, 431, 502, 503, 504, 505):
        assert status in REASONS


# -- request_id -----------------------------------------------------------------------

HEX32 = re.compile(rb"^[0-9a-f]{32}$")


@pytest.mark.parametrize(
    "value",
    [b"abc", b"req-123", b"a.b_c:d@e+f=g/h", b"x" * 128, b"0" * 32, b"550e8400-e29b-41d4"],
)
def test_sane_request_id_kept(value: bytes) -> None:
    assert request_id(value) == value


@pytest.mark.parametrize(
    "value",
    [
        None,
        b"",
        b"x" * 129,
        b"has space",
        b"tab\tid",
        b"nul\x00",
        b"ctl\x01",
        b"del\x7f",
        b"line\r\nX-Injected: 1",
        b'quote"',
        b"caf\xc3\xa9",
        b"semi;colon",
        b"comma,id",
    ],
)
def test_insane_request_id_replaced(value: bytes | None) -> None:
    new = request_id(value)
    assert HEX32.match(new)
    assert new != value


def test_new_request_ids_are_unique() -> None:
    ids = {request_id(None) for _ in range(200)}
    assert len(ids) == 200


def test_request_ids_are_unique_and_differ_in_a_forked_child() -> None:
    ids = {request_id(None) for _ in range(1000)}
    assert len(ids) == 1000 and all(HEX32.match(i) for i in ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its first id must not collide with the parent's
        os.write(write, request_id(None))
        os._exit(0)
    os.close(write)
    child = os.read(read, 64)
    os.close(read)
    os.waitpid(pid, 0)
    parent = request_id(None)
    assert HEX32.match(child)
    assert child[:16] != parent[:16]  # a new random prefix after the fork


# -- the HTTP/2 form of the client's response head -----------------------------------------

_FIELD_NAMES = st.sampled_from(
    [b"Content-Type", b"Date", b"Set-Cookie", b"Connection", b"Keep-Alive",
     b"Transfer-Encoding", b"X-Request-ID", b"Trailer", b"TE", b"Upgrade", b"X-Custom",
     b"Cache-Control", b"Vary", b"X-Named"]
)  # fmt: skip
_FIELD_VALUES = st.sampled_from([b"1", b"text/html", b"close", b"x-named", b"a, x-custom", b""])


@given(
    headers=st.lists(st.tuples(_FIELD_NAMES, _FIELD_VALUES), max_size=10),
    status=st.sampled_from([200, 204, 304, 404, 503]),
    body=st.sampled_from([BodyKind.LENGTH, BodyKind.CHUNKED, BodyKind.CLOSE, BodyKind.NONE]),
    framing=st.sampled_from([BodyKind.LENGTH, BodyKind.CHUNKED, BodyKind.NONE]),
    extra=st.lists(st.tuples(st.sampled_from([b"Set-Cookie", b"X-Cache"]), _FIELD_VALUES)),
)
@settings(max_examples=300)
def test_http2_fields_are_the_http11_head_read_back(
    headers: list[tuple[bytes, bytes]],
    status: int,
    body: BodyKind,
    framing: BodyKind,
    extra: list[tuple[bytes, bytes]],
) -> None:
    """What an HTTP/2 stream's fast path sends equals the HTTP/1.1 head PIBL would write,
    parsed back and translated (the way every other response reaches an HTTP/2 client)."""
    if body is BodyKind.LENGTH:  # (as parsed from a backend: one valid value)
        headers = [*headers[:1], (b"Content-Length", b"1"), *headers[1:]]
    resp = ResponseHead(status=status, reason=b"Whatever", version=b"1.1", headers=headers,
                        body=body, content_length=1 if body is BodyKind.LENGTH else 0)  # fmt: skip
    kw = {"framing": framing, "rid": b"rid-1", "via": b"pibl", "extra": extra}
    raw = client_response(resp, keep_alive=True, client_version=b"1.1", **kw)  # type: ignore[arg-type]
    head = next(
        ev.head for ev in ResponseParser(head_request=True).feed(raw) if isinstance(ev, Head)
    )
    assert isinstance(head, ResponseHead)
    expected = response_fields(head.status, head.headers)
    fields = client_response_fields(resp, **kw)  # type: ignore[arg-type]

    def undated(items: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        # each side stamps its own Date when the backend sent none: the two may straddle a
        # second, so the field is compared by presence and place, not by value
        return [(k, b"" if k == b"date" else v) for k, v in items]

    assert undated(fields) == undated(expected)
