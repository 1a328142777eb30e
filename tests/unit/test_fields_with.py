"""``fields_with``: a rule given no fields when the request lacks the ones it reads
decides exactly as when it walks them all (the hot path skips such walks)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pibl import compress
from pibl.cache import policy
from pibl.http.message import RequestHead, fields_with, get_header
from pibl.http.parse import Head, RequestParser

SETTINGS = compress.CompressionSettings()
STORED = [
    (b"ETag", b'"v1"'),
    (b"Last-Modified", b"Mon, 07 Dec 2026 09:00:00 GMT"),
    (b"Date", b"Mon, 07 Dec 2026 10:00:00 GMT"),
    (b"Cache-Control", b"public, max-age=60"),
]
FIELDS = {
    "Cache-Control": ["no-store", "no-cache", "max-age=0", "max-stale", "min-fresh=5", "x"],
    "Pragma": ["no-cache", "x"],
    "Authorization": ["Basic eDp5"],
    "If-Range": ['"v1"', '"v2"', "Mon, 07 Dec 2026 09:00:00 GMT", 'W/"v1"'],
    "Range": ["bytes=0-9", "bytes=5-", "bytes=-3", "bytes=x"],
    "If-None-Match": ['"v1"', '"v2"', "*", 'W/"v1"'],
    "If-Modified-Since": ["Mon, 07 Dec 2026 09:00:00 GMT", "Sun, 06 Dec 2026 09:00:00 GMT"],
    "Accept-Encoding": ["gzip", "br;q=0.5, gzip", "identity", "*;q=0"],
    "Accept": ["*/*"],
    "Cookie": ["a=1"],
}


def _case(name: str, style: int) -> str:
    return (name, name.lower(), name.upper())[style]


fields = st.lists(
    st.sampled_from(sorted(FIELDS)).flatmap(
        lambda name: st.tuples(
            st.just(name), st.sampled_from(FIELDS[name]), st.integers(min_value=0, max_value=2)
        )
    ),
    max_size=6,
)


def _head(chosen: list[tuple[str, str, int]], method: str) -> RequestHead:
    lines = "".join(f"{_case(n, c)}: {v}\r\n" for n, v, c in chosen)
    raw = f"{method} /x HTTP/1.1\r\nHost: h\r\n{lines}\r\n".encode()
    head = RequestParser().feed(raw)[0]
    assert isinstance(head, Head) and isinstance(head.head, RequestHead)
    assert head.head.names is not None
    return head.head


@settings(max_examples=300, deadline=None)
@given(fields, st.sampled_from(["GET", "HEAD", "POST"]))
def test_rules_decide_the_same_with_only_the_fields_they_read(
    chosen: list[tuple[str, str, int]], method: str
) -> None:
    head = _head(chosen, method)
    every = head.headers
    m = head.method
    assert policy.bypass_reason(m, fields_with(head, b"cache-control")) == policy.bypass_reason(
        m, every
    )
    assert policy.may_serve_with_authorization(
        fields_with(head, b"authorization"), STORED
    ) == policy.may_serve_with_authorization(every, STORED)
    assert policy.if_range_matches(fields_with(head, b"if-range"), STORED) == (
        policy.if_range_matches(every, STORED)
    )
    assert get_header(fields_with(head, b"range"), b"range") == get_header(every, b"range")
    conditionals = fields_with(head, b"if-none-match", b"if-modified-since")
    assert policy.not_modified(conditionals, STORED) == policy.not_modified(every, STORED)
    for age in (0.0, 30.0, 90.0):
        kwargs = {"lifetime": 60.0, "age": age, "max_stale_on_error": 0.0}
        assert policy.usable(
            fields_with(head, b"cache-control", b"pragma"), STORED, **kwargs
        ) == policy.usable(every, STORED, **kwargs)
    assert compress.request_coding(
        m, fields_with(head, b"accept-encoding"), SETTINGS
    ) == compress.request_coding(m, every, SETTINGS)


def test_a_head_made_elsewhere_gives_every_field() -> None:
    head = RequestHead(b"GET", b"/", b"1.1", [(b"Cache-Control", b"no-store")], host=b"h")
    assert head.names is None
    assert fields_with(head, b"authorization") is head.headers
