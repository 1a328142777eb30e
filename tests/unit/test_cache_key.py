"""Cache keys (pibl.cache.key): primary key, Vary secondary key, file-name digests."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pibl.cache.key import digest, primary_key, secondary_key, variant_digest, variant_name

HEX64 = re.compile(r"^[0-9a-f]{64}$")


# -- primary key ----------------------------------------------------------------------------


def test_primary_key_is_the_effective_uri() -> None:
    assert primary_key(b"http", b"example.com", b"/a?b=c") == b"http://example.com/a?b=c"


def test_primary_key_lower_cases_scheme_and_host() -> None:
    assert primary_key(b"HTTPS", b"Example.COM", b"/x") == b"https://example.com/x"
    assert primary_key(b"HTTPS", b"Example.COM", b"/x") == primary_key(
        b"https", b"example.com", b"/x"
    )


def test_primary_key_keeps_path_and_query_case() -> None:
    assert primary_key(b"http", b"h", b"/Path?Q=A") == b"http://h/Path?Q=A"
    assert primary_key(b"http", b"h", b"/a") != primary_key(b"http", b"h", b"/A")
    assert primary_key(b"http", b"h", b"/a?x=1") != primary_key(b"http", b"h", b"/a?x=2")
    assert primary_key(b"http", b"h", b"/a") != primary_key(b"http", b"h", b"/a?")


def test_primary_key_distinguishes_scheme_host_and_port() -> None:
    keys = {
        primary_key(b"http", b"h", b"/"),
        primary_key(b"https", b"h", b"/"),
        primary_key(b"http", b"h:8080", b"/"),
        primary_key(b"http", b"g", b"/"),
    }
    assert len(keys) == 4


# -- secondary key (Vary) ---------------------------------------------------------------------


def test_secondary_key_lists_the_vary_fields_in_order() -> None:
    req = [(b"Accept-Language", b"es"), (b"Accept-Encoding", b"gzip")]
    assert secondary_key(["accept-encoding", "accept-language"], req) == (
        b"accept-encoding=gzip\naccept-language=es"
    )
    assert secondary_key(["accept-language", "accept-encoding"], req) == (
        b"accept-language=es\naccept-encoding=gzip"
    )


def test_secondary_key_matches_request_field_names_case_insensitively() -> None:
    assert secondary_key(["accept"], [(b"ACCEPT", b"text/html")]) == secondary_key(
        ["accept"], [(b"accept", b"text/html")]
    )


@pytest.mark.parametrize(
    "value", [b"gzip,br", b"gzip, br", b"gzip ,br", b"  gzip \t,\t br  ", b"gzip  ,   br"]
)
def test_secondary_key_normalises_whitespace_around_commas(value: bytes) -> None:
    assert secondary_key(["accept-encoding"], [(b"Accept-Encoding", value)]) == (
        b"accept-encoding=gzip,br"
    )


def test_secondary_key_joins_repeated_lines_like_one_list() -> None:
    two_lines = [(b"Accept-Encoding", b"gzip"), (b"accept-encoding", b" br ")]
    one_line = [(b"Accept-Encoding", b"gzip, br")]
    assert secondary_key(["accept-encoding"], two_lines) == secondary_key(
        ["accept-encoding"], one_line
    )


def test_secondary_key_keeps_case_and_order_of_values() -> None:
    names = ["accept-encoding"]
    assert secondary_key(names, [(b"Accept-Encoding", b"GZIP")]) != secondary_key(
        names, [(b"Accept-Encoding", b"gzip")]
    )
    assert secondary_key(names, [(b"Accept-Encoding", b"gzip, br")]) != secondary_key(
        names, [(b"Accept-Encoding", b"br, gzip")]
    )


def test_secondary_key_ignores_fields_not_listed() -> None:
    base = [(b"Accept-Encoding", b"gzip")]
    assert secondary_key(["accept-encoding"], base) == secondary_key(
        ["accept-encoding"], [*base, (b"User-Agent", b"x"), (b"Cookie", b"a=b")]
    )


def test_secondary_key_does_not_mix_values_of_different_fields() -> None:
    names = ["a", "b"]
    assert secondary_key(names, [(b"a", b"1,2")]) != secondary_key(
        names, [(b"a", b"1"), (b"b", b"2")]
    )


def test_absent_field_differs_from_a_present_one() -> None:
    assert secondary_key(["accept-encoding"], []) != secondary_key(
        ["accept-encoding"], [(b"Accept-Encoding", b"gzip")]
    )


def test_absent_field_differs_from_an_empty_one() -> None:
    assert secondary_key(["accept-encoding"], []) != secondary_key(
        ["accept-encoding"], [(b"Accept-Encoding", b"")]
    )


def test_no_vary_names_is_the_empty_key() -> None:
    assert secondary_key([], [(b"Accept", b"x")]) == b""


TOKEN_CHARS = "abcXYZ019;=.*/-"


@settings(max_examples=100, deadline=None)
@given(
    tokens=st.lists(st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=8), min_size=1, max_size=6),
    spaces=st.lists(st.sampled_from(["", " ", "  ", "\t", " \t "]), min_size=2, max_size=2),
)
def test_secondary_key_whitespace_never_matters(tokens: list[str], spaces: list[str]) -> None:
    left, right = spaces
    spaced = (left + "," + right).join(tokens).encode()
    plain = ",".join(tokens).encode()
    assert secondary_key(["accept"], [(b"Accept", spaced)]) == secondary_key(
        ["accept"], [(b"Accept", plain)]
    )


# -- digests ------------------------------------------------------------------------------


def test_digest_is_64_lower_case_hex() -> None:
    assert HEX64.match(digest(b"http://example.com/"))
    assert HEX64.match(variant_digest(b"http://example.com/", b"accept=x"))


def test_digest_is_deterministic_and_distinct() -> None:
    assert digest(b"http://h/a") == digest(b"http://h/a")
    assert digest(b"http://h/a") != digest(b"http://h/b")


def test_variant_digest_differs_from_the_primary_digest() -> None:
    assert variant_digest(b"http://h/a", b"") != digest(b"http://h/a")


def test_different_vary_values_give_different_digests() -> None:
    primary = b"http://h/a"
    names = ["accept-encoding"]
    gzip = secondary_key(names, [(b"Accept-Encoding", b"gzip")])
    br = secondary_key(names, [(b"Accept-Encoding", b"br")])
    none = secondary_key(names, [])
    digests = {variant_digest(primary, s) for s in (gzip, br, none)}
    assert len(digests) == 3


def test_same_secondary_under_different_primary_keys_differs() -> None:
    secondary = b"accept=x"
    assert variant_digest(b"http://h/a", secondary) != variant_digest(b"http://h/b", secondary)


@settings(max_examples=100, deadline=None)
@given(key=st.binary(max_size=200), secondary=st.binary(max_size=50))
def test_digests_are_always_64_hex(key: bytes, secondary: bytes) -> None:
    assert HEX64.match(digest(key))
    assert HEX64.match(variant_digest(key, secondary))


@given(st.binary(max_size=64), st.binary(max_size=64))
def test_a_variant_digest_is_the_digest_of_its_name(primary: bytes, secondary: bytes) -> None:
    # the store remembers metadata paths by name, primary keys and variant names alike
    assert variant_digest(primary, secondary) == digest(variant_name(primary, secondary))
    assert variant_name(primary, secondary) != primary
