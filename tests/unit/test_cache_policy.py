"""Shared-cache policy (pibl.cache.policy): RFC 9111, RFC 9110 conditionals, RFC 5861.

Every function is pure: header lists and times go in, decisions come out. Times are plain
floats; HTTP dates are built from them with ``email.utils.formatdate``.
"""

from __future__ import annotations

import email.utils
import os
import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pibl.cache import policy
from pibl.cache.policy import (
    HEURISTIC_MAX,
    UNSATISFIABLE,
    Decision,
    bypass_reason,
    byte_range,
    current_age,
    freshness_lifetime,
    if_range_matches,
    initial_age,
    invalidated_targets,
    invalidates,
    may_serve_with_authorization,
    merge_304,
    not_modified,
    not_modified_headers,
    only_if_cached,
    parse_cache_control,
    parse_http_date,
    storable,
    usable,
    validators,
    vary_names,
)
from pibl.http.message import HeaderList

T0 = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 GMT


def http_date(ts: float) -> bytes:
    return email.utils.formatdate(ts, usegmt=True).encode()


def cc(value: str) -> HeaderList:
    return [(b"Cache-Control", value.encode("latin-1"))]


def store_ok(
    res: HeaderList,
    *,
    method: bytes = b"GET",
    req: HeaderList | None = None,
    status: int = 200,
    ttl: float = 0.0,
) -> tuple[bool, str]:
    return storable(method, req or [], status, res, default_ttl=ttl)


def life(headers: HeaderList, *, status: int = 200, ttl: float = 0.0) -> float:
    return freshness_lifetime(status, headers, default_ttl=ttl)


def use(
    req: HeaderList | None = None,
    res: HeaderList | None = None,
    *,
    lifetime: float = 100.0,
    age: float = 10.0,
    floor: float = 0.0,
) -> Decision:
    return usable(req or [], res or [], lifetime=lifetime, age=age, max_stale_on_error=floor)


# -- storable (RFC 9111 section 3) ------------------------------------------------------------


def test_get_200_with_max_age_is_storable() -> None:
    assert store_ok(cc("max-age=60")) == (True, "")


@pytest.mark.parametrize(
    "method", [b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"get", b"PURGE"]
)
def test_only_get_responses_are_stored(method: bytes) -> None:
    assert store_ok(cc("max-age=60, public"), method=method) == (False, "method")


@pytest.mark.parametrize(
    "status", [200, 203, 204, 300, 301, 302, 303, 307, 308, 404, 405, 410, 414, 501]
)
def test_understood_final_statuses_with_max_age_are_stored(status: int) -> None:
    assert store_ok(cc("max-age=60"), status=status) == (True, "")


@pytest.mark.parametrize("status", [201, 202, 400, 401, 403, 409, 429, 500, 502, 503, 504, 599])
def test_any_final_status_with_explicit_freshness_is_stored(status: int) -> None:
    """RFC 9111 section 3: not a fixed list; explicit freshness makes it storable."""
    assert store_ok(cc("max-age=60"), status=status) == (True, "")
    assert store_ok(cc("s-maxage=60"), status=status) == (True, "")
    expires = [(b"Date", http_date(T0)), (b"Expires", http_date(T0 + 60))]
    assert store_ok(expires, status=status) == (True, "")


@pytest.mark.parametrize("status", [100, 101, 103, 206, 304])
def test_interim_partial_and_not_modified_are_never_stored(status: int) -> None:
    res = [*cc("max-age=60, public"), (b"Last-Modified", http_date(T0 - 3600))]
    assert store_ok(res, status=status, ttl=300) == (False, "status")


@pytest.mark.parametrize("status", [201, 400, 403, 500, 503])
def test_heuristic_freshness_only_for_heuristically_cacheable_statuses(status: int) -> None:
    res = [(b"Last-Modified", http_date(T0 - 3600))]
    assert store_ok(res, status=status, ttl=300) == (False, "no freshness information")
    assert freshness_lifetime(status, res, default_ttl=300) == 0.0


def test_must_understand_stores_only_understood_statuses_and_overrides_no_store() -> None:
    res = cc("max-age=60, must-understand, no-store")
    assert store_ok(res, status=200) == (True, "")
    assert store_ok(res, status=299) == (False, "must-understand")
    assert store_ok(cc("max-age=60, no-store"), status=299) == (False, "no-store")
    assert store_ok(cc("max-age=60"), status=299) == (True, "")


def test_206_partial_content_is_not_stored() -> None:
    res = [*cc("max-age=60"), (b"Content-Range", b"bytes 0-9/100")]
    ok, _ = store_ok(res, status=206)
    assert not ok


def test_500_is_not_given_the_launch_ttl_even_when_marked_public() -> None:
    assert store_ok(cc("public"), status=500, ttl=600)[0] is False
    assert store_ok(cc("public, max-age=600"), status=500, ttl=600)[0] is True


@pytest.mark.parametrize("value", ["no-store", "NO-STORE", "max-age=0, no-store", 'No-Store="x"'])
def test_request_no_store_prevents_storing(value: str) -> None:
    assert store_ok(cc("max-age=60"), req=cc(value)) == (False, "request no-store")


@pytest.mark.parametrize(
    "value", ["no-store", "public, no-store, max-age=60", "NO-STORE", "max-age=60, no-store"]
)
def test_response_no_store_prevents_storing(value: str) -> None:
    assert store_ok(cc(value), ttl=300) == (False, "no-store")


def test_no_store_in_a_second_cache_control_line_is_honoured() -> None:
    res = [*cc("max-age=60"), *cc("no-store")]
    assert store_ok(res) == (False, "no-store")


@pytest.mark.parametrize(
    "value",
    ["private", "PRIVATE", "private, max-age=60", 'private="Set-Cookie", max-age=60',
     "public, private, s-maxage=60"],
)  # fmt: skip
def test_private_responses_are_not_stored_by_a_shared_cache(value: str) -> None:
    assert store_ok(cc(value), ttl=300) == (False, "private")


@pytest.mark.parametrize("name", [b"Authorization", b"authorization", b"AUTHORIZATION"])
def test_authorization_request_is_not_stored_without_a_shareable_directive(name: bytes) -> None:
    req = [(name, b"Bearer x")]
    assert store_ok(cc("max-age=60"), req=req, ttl=300) == (False, "authorization")


@pytest.mark.parametrize(
    "value", ["proxy-revalidate, max-age=60", "no-cache", "max-age=60, stale-if-error=60"]
)
def test_authorization_other_directives_do_not_allow_storing(value: str) -> None:
    req = [(b"Authorization", b"Basic dTpw")]
    assert store_ok(cc(value), req=req) == (False, "authorization")


@pytest.mark.parametrize("value", ["public", "s-maxage=60", "must-revalidate, max-age=60"])
def test_authorization_request_stored_with_public_s_maxage_or_must_revalidate(value: str) -> None:
    req = [(b"Authorization", b"Basic dTpw")]
    assert store_ok(cc(value), req=req) == (True, "")


@pytest.mark.parametrize("name", [b"Set-Cookie", b"set-cookie"])
def test_set_cookie_responses_are_not_stored(name: bytes) -> None:
    res = [*cc("public, max-age=60"), (name, b"sid=1")]
    assert store_ok(res) == (False, "set-cookie")


@pytest.mark.parametrize("vary", [b"*", b"Accept, *", b" * "])
def test_vary_star_is_not_stored(vary: bytes) -> None:
    assert store_ok([*cc("max-age=60"), (b"Vary", vary)]) == (False, "vary *")


def test_vary_star_in_a_second_vary_line_is_not_stored() -> None:
    res = [*cc("max-age=60"), (b"Vary", b"Accept"), (b"Vary", b"*")]
    assert store_ok(res) == (False, "vary *")


def test_vary_with_field_names_is_storable() -> None:
    assert store_ok([*cc("max-age=60"), (b"Vary", b"Accept-Encoding")]) == (True, "")


def test_content_range_in_a_200_is_stored_like_any_200() -> None:
    res = [*cc("max-age=60"), (b"Content-Range", b"bytes 0-1/2")]
    assert store_ok(res) == (True, "")


@pytest.mark.parametrize("name", [b"Range", b"range"])
def test_range_request_is_not_stored(name: bytes) -> None:
    assert store_ok(cc("max-age=60"), req=[(name, b"bytes=0-10")]) == (False, "range request")


def test_no_cache_response_is_stored_to_be_revalidated() -> None:
    assert store_ok(cc("no-cache")) == (True, "")


@pytest.mark.parametrize("status", [200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501])
def test_default_ttl_makes_heuristically_cacheable_statuses_storable(status: int) -> None:
    assert store_ok([], status=status, ttl=60) == (True, "")


@pytest.mark.parametrize("status", [302, 303, 307])
def test_default_ttl_does_not_make_other_statuses_storable(status: int) -> None:
    assert store_ok([], status=status, ttl=60) == (False, "no freshness information")


def test_no_freshness_information_and_no_ttl_is_not_stored() -> None:
    assert store_ok([(b"Content-Type", b"text/plain")]) == (False, "no freshness information")


@pytest.mark.parametrize("status", [200, 404, 410])
def test_last_modified_allows_heuristic_storing_without_ttl(status: int) -> None:
    res = [(b"Date", http_date(T0)), (b"Last-Modified", http_date(T0 - 3600))]
    assert store_ok(res, status=status) == (True, "")


def test_last_modified_does_not_make_a_302_storable() -> None:
    res = [(b"Date", http_date(T0)), (b"Last-Modified", http_date(T0 - 3600))]
    assert store_ok(res, status=302) == (False, "no freshness information")


@pytest.mark.parametrize("status", [200, 302, 307])
def test_public_makes_a_response_storable(status: int) -> None:
    assert store_ok(cc("public"), status=status) == (True, "")


@pytest.mark.parametrize(
    "res",
    [cc("s-maxage=30"), cc("max-age=30"), [(b"Expires", http_date(T0 + 60))], [(b"Expires", b"0")]],
)
def test_explicit_freshness_makes_a_302_storable(res: HeaderList) -> None:
    assert store_ok(res, status=302) == (True, "")


@pytest.mark.parametrize("status", [302, 303, 307])
def test_no_cache_alone_does_not_make_a_non_heuristic_status_storable(status: int) -> None:
    assert store_ok(cc("no-cache"), status=status)[0] is False


# -- freshness_lifetime (RFC 9111 section 4.2.1) ------------------------------------------------


def test_s_maxage_beats_max_age() -> None:
    assert life(cc("max-age=60, s-maxage=120")) == 120.0
    assert life(cc("s-maxage=10, max-age=600")) == 10.0


def test_max_age_beats_expires() -> None:
    res = [*cc("max-age=60"), (b"Date", http_date(T0)), (b"Expires", http_date(T0 + 3600))]
    assert life(res) == 60.0


def test_s_maxage_beats_expires() -> None:
    res = [*cc("s-maxage=5"), (b"Date", http_date(T0)), (b"Expires", http_date(T0 + 3600))]
    assert life(res) == 5.0


def test_explicit_max_age_beats_default_ttl() -> None:
    assert life(cc("max-age=7"), ttl=3600) == 7.0


def test_max_age_zero_is_zero() -> None:
    assert life(cc("max-age=0"), ttl=3600) == 0.0


def test_quoted_max_age_is_accepted() -> None:
    assert life(cc('max-age="60"')) == 60.0


def test_max_age_overflow_is_clamped_to_2_pow_31() -> None:
    assert life(cc("max-age=99999999999999999999")) == float(2**31)


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "", "6O", " ", "0x10"])
def test_invalid_max_age_means_stale(value: str) -> None:
    res = [
        *cc(f"max-age={value}"),
        (b"Date", http_date(T0)),
        (b"Expires", http_date(T0 + 3600)),
    ]
    assert life(res, ttl=3600) == 0.0


def test_max_age_without_value_means_stale() -> None:
    assert life(cc("max-age"), ttl=3600) == 0.0


def test_invalid_s_maxage_alone_means_stale() -> None:
    assert life(cc("s-maxage=never"), ttl=3600) == 0.0


def test_expires_minus_date() -> None:
    res = [(b"Date", http_date(T0)), (b"Expires", http_date(T0 + 3600))]
    assert life(res, ttl=99) == 3600.0


def test_expires_header_names_are_case_insensitive() -> None:
    res = [(b"date", http_date(T0)), (b"EXPIRES", http_date(T0 + 90))]
    assert life(res) == 90.0


@pytest.mark.parametrize("delta", [0, -1, -86400])
def test_expires_not_after_date_is_zero(delta: int) -> None:
    res = [(b"Date", http_date(T0)), (b"Expires", http_date(T0 + delta))]
    assert life(res, ttl=600) == 0.0


@pytest.mark.parametrize("value", [b"0", b"-1", b"garbage", b"", b"Thu, 99 Foo 2023"])
def test_invalid_expires_means_already_expired(value: bytes) -> None:
    res = [(b"Date", http_date(T0)), (b"Expires", value)]
    assert life(res, ttl=600) == 0.0


def test_default_ttl_used_without_explicit_freshness() -> None:
    assert life([(b"Content-Type", b"text/html")], ttl=300) == 300.0


def test_default_ttl_wins_over_heuristic() -> None:
    res = [(b"Date", http_date(T0)), (b"Last-Modified", http_date(T0 - 10_000))]
    assert life(res, ttl=42) == 42.0


def test_heuristic_is_ten_percent_of_date_minus_last_modified() -> None:
    res = [(b"Date", http_date(T0)), (b"Last-Modified", http_date(T0 - 10_000))]
    assert life(res) == pytest.approx(1000.0)


def test_heuristic_is_capped_at_one_day() -> None:
    res = [(b"Date", http_date(T0)), (b"Last-Modified", http_date(T0 - 10_000_000))]
    assert life(res) == HEURISTIC_MAX == 86400.0


def test_heuristic_cap_boundary() -> None:
    res = [(b"Date", http_date(T0)), (b"Last-Modified", http_date(T0 - 864_000))]
    assert life(res) == pytest.approx(86400.0)
    res = [(b"Date", http_date(T0)), (b"Last-Modified", http_date(T0 - 863_990))]
    assert life(res) == pytest.approx(86399.0)


@pytest.mark.parametrize("status", [302, 303, 307])
def test_no_heuristic_for_non_heuristic_status(status: int) -> None:
    res = [(b"Date", http_date(T0)), (b"Last-Modified", http_date(T0 - 10_000))]
    assert life(res, status=status) == 0.0


def test_heuristic_allowed_for_public_response_of_any_status() -> None:
    res = [*cc("public"), (b"Date", http_date(T0)), (b"Last-Modified", http_date(T0 - 10_000))]
    assert life(res, status=302) == pytest.approx(1000.0)


@pytest.mark.parametrize(
    "res",
    [
        [(b"Date", http_date(T0)), (b"Last-Modified", http_date(T0))],
        [(b"Date", http_date(T0)), (b"Last-Modified", http_date(T0 + 60))],
        [(b"Date", http_date(T0)), (b"Last-Modified", b"yesterday")],
        [(b"Last-Modified", http_date(T0 - 10_000))],
    ],
    ids=["lm-equals-date", "lm-after-date", "lm-invalid", "no-date"],
)
def test_no_heuristic_without_a_usable_last_modified(res: HeaderList) -> None:
    assert life(res) == 0.0


def test_nothing_at_all_is_zero() -> None:
    assert life([]) == 0.0


def test_heuristic_never_used_when_an_explicit_expiry_exists() -> None:
    res = [
        (b"Date", http_date(T0)),
        (b"Expires", http_date(T0 + 5)),
        (b"Last-Modified", http_date(T0 - 10_000_000)),
    ]
    assert life(res, ttl=9999) == 5.0


@settings(max_examples=200, deadline=None)
@given(seconds=st.integers(min_value=0, max_value=10**30))
def test_max_age_lifetime_is_the_value_clamped(seconds: int) -> None:
    assert life(cc(f"max-age={seconds}")) == float(min(seconds, 2**31))


# -- HTTP dates (RFC 9110 section 5.6.7, RFC 9111 section 4.2) ----------------------------------

SUNDAY = 784111777.0  # Sun, 06 Nov 1994 08:49:37 GMT


@pytest.fixture
def non_utc_local_time() -> Iterator[None]:
    """Run with a local time zone five hours behind UTC (POSIX TZ, no tzdata needed)."""
    saved = os.environ.get("TZ")
    os.environ["TZ"] = "EST+5"
    time.tzset()
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = saved
        time.tzset()


@pytest.mark.parametrize(
    "value",
    [
        b"Sun, 06 Nov 1994 08:49:37 GMT",
        b"Sunday, 06-Nov-94 08:49:37 GMT",
        b"Sun Nov  6 08:49:37 1994",
    ],
    ids=["imf-fixdate", "rfc850", "asctime"],
)
def test_all_three_http_date_formats_are_accepted(value: bytes) -> None:
    assert parse_http_date(value) == SUNDAY


@pytest.mark.parametrize(
    "value",
    [
        b"sun, 06 nov 1994 08:49:37 gmt",  # the grammar's names are case-sensitive
        b"Sun, 06 Nov 1994 08:49:37 UTC",
        b"Sun, 06 Nov 1994 08:49:37 +0000",
        b"Sun, 6 Nov 1994 08:49:37 GMT",
        b"Sun, 06 Nov 94 08:49:37 GMT",
        b"Sun,  06 Nov 1994 08:49:37 GMT",
        b"Sun, 06 Nov 1994 08:49:37 GMT junk",
        b"Sun, 06 Nov 1994 08:49:37 GMT, Mon, 07 Nov 1994 08:49:37 GMT",
        b"Sun, 31 Feb 1994 08:49:37 GMT",
        b"Sun, 06 Nov 1994 24:49:37 GMT",
        b"1994-11-06T08:49:37Z",
        b"0",
        b"-1",
        b"",
    ],
)
def test_anything_else_is_not_an_http_date(value: bytes) -> None:
    assert parse_http_date(value) is None


@pytest.mark.parametrize(
    "expires",
    [
        [b"0"],
        [b"Thu, 01 Dec 2094 16:00:00 UTC"],
        [b"thu, 01 dec 2094 16:00:00 gmt"],
        [b"Thu, 01 Dec 2094 16:00:00 GMT", b"Thu, 01 Dec 2094 16:00:00 GMT"],
    ],
    ids=["zero", "utc", "lower-case", "two-fields"],
)
def test_an_invalid_expires_means_already_expired(expires: list[bytes]) -> None:
    res = [(b"Date", http_date(T0)), *((b"Expires", e) for e in expires)]
    assert freshness_lifetime(200, res, default_ttl=300) == 0.0


@pytest.mark.parametrize(
    "value",
    [b"Sun, 06 Nov 1994 08:49:37 GMT", b"Sunday, 06-Nov-94 08:49:37 GMT"],
    ids=["imf-fixdate", "rfc850"],
)
def test_dates_with_gmt_ignore_the_local_time_zone(non_utc_local_time: None, value: bytes) -> None:
    assert parse_http_date(value) == SUNDAY


def test_asctime_date_ignores_the_local_time_zone(non_utc_local_time: None) -> None:
    assert parse_http_date(b"Sun Nov  6 08:49:37 1994") == SUNDAY


def test_asctime_expires_lifetime_ignores_the_local_time_zone(non_utc_local_time: None) -> None:
    res = [(b"Date", b"Sun, 06 Nov 1994 08:49:37 GMT"), (b"Expires", b"Sun Nov  6 09:49:37 1994")]
    assert life(res) == 3600.0


def test_expires_with_a_non_gmt_zone_abbreviation_is_invalid() -> None:
    res = [
        (b"Date", b"Sun, 06 Nov 1994 08:49:37 GMT"),
        (b"Expires", b"Sun, 06 Nov 1994 09:49:37 EST"),
    ]
    assert life(res) == 0.0


@pytest.mark.parametrize("value", [None, b"", b"0", b"never", b"Sun, 99 Nov 1994 08:49:37 GMT"])
def test_invalid_dates_parse_to_none(value: bytes | None) -> None:
    assert parse_http_date(value) is None


# -- age (RFC 9111 section 4.2.3) ---------------------------------------------------------------


def test_age_header_alone() -> None:
    assert initial_age([(b"Age", b"100")], T0, T0) == 100.0


def test_apparent_age_from_date() -> None:
    assert initial_age([(b"Date", http_date(T0 - 30))], T0, T0) == 30.0


def test_response_delay_is_added_to_age_value() -> None:
    headers = [(b"Date", http_date(T0)), (b"Age", b"10")]
    assert initial_age(headers, T0 - 5, T0) == 15.0


def test_response_delay_alone_counts() -> None:
    assert initial_age([], T0 - 2, T0) == 2.0


def test_corrected_initial_age_is_the_larger_of_apparent_and_corrected() -> None:
    headers = [(b"Date", http_date(T0 - 60)), (b"Age", b"10")]
    assert initial_age(headers, T0 - 5, T0) == 60.0
    headers = [(b"Date", http_date(T0 - 3)), (b"Age", b"50")]
    assert initial_age(headers, T0 - 5, T0) == 55.0


def test_date_in_the_future_gives_no_negative_apparent_age() -> None:
    assert initial_age([(b"Date", http_date(T0 + 600))], T0, T0) == 0.0


@pytest.mark.parametrize("value", [b"abc", b"-5", b"", b"x10"])
def test_invalid_age_is_ignored(value: bytes) -> None:
    headers = [(b"Date", http_date(T0)), (b"Age", value)]
    assert initial_age(headers, T0 - 1, T0) == 1.0


@pytest.mark.parametrize("value", [b"30, 60", b"30,60", b"30 60", b"30.5", b"30abc", b" 30 , x"])
def test_an_age_list_or_trailing_junk_uses_the_first_delta_seconds(value: bytes) -> None:
    headers = [(b"Date", http_date(T0)), (b"Age", value)]
    assert initial_age(headers, T0, T0) == 30.0


def test_age_value_with_surrounding_whitespace() -> None:
    assert initial_age([(b"age", b" 42 ")], T0, T0) == 42.0


def test_resident_time_is_added() -> None:
    assert current_age(15.0, T0, T0 + 100) == 115.0


def test_clock_going_backwards_adds_no_negative_resident_time() -> None:
    assert current_age(15.0, T0, T0 - 100) == 15.0


def test_worked_example_age_lifetime_and_use() -> None:
    # Date 30 s before receipt, Age 20 from an upstream cache, 2 s of response delay.
    headers = [(b"Date", http_date(T0 - 30)), (b"Age", b"20"), *cc("max-age=100")]
    initial = initial_age(headers, T0 - 2, T0)
    assert initial == 30.0  # max(30, 20 + 2)
    lifetime = life(headers)
    assert lifetime == 100.0
    age = current_age(initial, T0, T0 + 69)
    assert use(res=headers, lifetime=lifetime, age=age).action == "fresh"
    age = current_age(initial, T0, T0 + 70)
    assert age == 100.0
    assert use(res=headers, lifetime=lifetime, age=age).action == "revalidate"


# -- usable (RFC 9111 sections 4, 4.2.4, 5.2; RFC 5861) ----------------------------------------


def test_fresh_entry_is_served() -> None:
    d = use(lifetime=100, age=10)
    assert (d.action, d.age, d.lifetime, d.background) == ("fresh", 10, 100, False)


def test_entry_whose_age_equals_lifetime_is_stale() -> None:
    assert use(lifetime=100, age=100).action == "revalidate"


def test_stale_entry_is_revalidated() -> None:
    d = use(lifetime=100, age=101)
    assert (d.action, d.background) == ("revalidate", False)


@pytest.mark.parametrize("value", ["no-cache", "NO-CACHE", 'no-cache="x"', "max-stale, no-cache"])
def test_request_no_cache_forces_revalidation_of_a_fresh_entry(value: str) -> None:
    assert use(req=cc(value), lifetime=100, age=1).action == "revalidate"


@pytest.mark.parametrize("value", [b"no-cache", b"No-Cache"])
def test_pragma_no_cache_without_cache_control_forces_revalidation(value: bytes) -> None:
    assert use(req=[(b"Pragma", value)], lifetime=100, age=1).action == "revalidate"


@pytest.mark.parametrize("value", ["max-age=600", "max-stale", "no-transform"])
def test_pragma_is_ignored_when_cache_control_is_present(value: str) -> None:
    req = [(b"Pragma", b"no-cache"), *cc(value)]
    assert use(req=req, lifetime=100, age=1).action == "fresh"


def test_other_pragma_values_do_nothing() -> None:
    assert use(req=[(b"Pragma", b"x-foo")], lifetime=100, age=1).action == "fresh"


def test_request_max_age_exceeded_forces_revalidation() -> None:
    assert use(req=cc("max-age=5"), lifetime=100, age=10).action == "revalidate"
    assert use(req=cc("max-age=0"), lifetime=100, age=1).action == "revalidate"


def test_request_max_age_equal_to_age_is_fine() -> None:
    assert use(req=cc("max-age=10"), lifetime=100, age=10).action == "fresh"
    assert use(req=cc("max-age=0"), lifetime=100, age=0).action == "fresh"


def test_invalid_request_max_age_is_ignored() -> None:
    assert use(req=cc("max-age=soon"), lifetime=100, age=10).action == "fresh"


def test_min_fresh() -> None:
    # 90 s of freshness left.
    assert use(req=cc("min-fresh=90"), lifetime=100, age=10).action == "fresh"
    assert use(req=cc("min-fresh=91"), lifetime=100, age=10).action == "revalidate"


def test_max_stale_without_value_accepts_any_staleness() -> None:
    d = use(req=cc("max-stale"), lifetime=100, age=1_000_000)
    assert (d.action, d.background) == ("stale", False)


def test_max_stale_with_value() -> None:
    assert use(req=cc("max-stale=50"), lifetime=100, age=150).action == "stale"
    assert use(req=cc("max-stale=50"), lifetime=100, age=151).action == "revalidate"


def test_max_stale_on_a_fresh_entry_is_fresh() -> None:
    assert use(req=cc("max-stale=50"), lifetime=100, age=1).action == "fresh"


@pytest.mark.parametrize("directive", ["must-revalidate", "proxy-revalidate", "s-maxage=100"])
@pytest.mark.parametrize("req", ["max-stale", "max-stale=1000000", "stale-if-error=600"])
def test_revalidate_directives_forbid_serving_stale(directive: str, req: str) -> None:
    res = cc(f"{directive}, stale-while-revalidate=600, stale-if-error=600")
    d = use(req=cc(req), res=res, lifetime=100, age=150, floor=300)
    assert d.action == "revalidate"
    assert d.background is False
    assert d.stale_if_error == 0.0


@pytest.mark.parametrize("directive", ["must-revalidate", "proxy-revalidate", "s-maxage=100"])
def test_revalidate_directives_give_no_stale_if_error_even_while_fresh(directive: str) -> None:
    d = use(res=cc(f"{directive}, stale-if-error=600"), lifetime=100, age=1, floor=300)
    assert d.action == "fresh"
    assert d.stale_if_error == 0.0


def test_stale_while_revalidate_within_window() -> None:
    d = use(res=cc("max-age=100, stale-while-revalidate=30"), lifetime=100, age=120)
    assert (d.action, d.background) == ("stale", True)


def test_stale_while_revalidate_window_boundary() -> None:
    res = cc("max-age=100, stale-while-revalidate=30")
    assert use(res=res, lifetime=100, age=130).action == "stale"
    d = use(res=res, lifetime=100, age=131)
    assert (d.action, d.background) == ("revalidate", False)


def test_stale_while_revalidate_does_not_override_request_no_cache() -> None:
    res = cc("max-age=100, stale-while-revalidate=30")
    assert use(req=cc("no-cache"), res=res, lifetime=100, age=110).action == "revalidate"


def test_stale_while_revalidate_does_not_override_request_max_age() -> None:
    res = cc("max-age=100, stale-while-revalidate=30")
    assert use(req=cc("max-age=50"), res=res, lifetime=100, age=110).action == "revalidate"


def test_invalid_stale_while_revalidate_is_ignored() -> None:
    res = cc("max-age=100, stale-while-revalidate=abc")
    assert use(res=res, lifetime=100, age=101).action == "revalidate"


def test_stale_if_error_from_response() -> None:
    d = use(res=cc("max-age=100, stale-if-error=600"), lifetime=100, age=150)
    assert (d.action, d.stale_if_error) == ("revalidate", 600.0)


def test_stale_if_error_from_request() -> None:
    d = use(req=cc("stale-if-error=900"), lifetime=100, age=150)
    assert d.stale_if_error == 900.0


def test_stale_if_error_takes_the_largest_of_response_request_and_floor() -> None:
    res = cc("stale-if-error=600")
    assert use(req=cc("stale-if-error=900"), res=res, floor=300).stale_if_error == 900.0
    assert use(req=cc("stale-if-error=100"), res=res, floor=300).stale_if_error == 600.0
    assert use(req=cc("stale-if-error=100"), res=res, floor=1000).stale_if_error == 1000.0


def test_stale_if_error_floor_applies_without_directives() -> None:
    assert use(floor=300, lifetime=100, age=150).stale_if_error == 300.0
    assert use(floor=0, lifetime=100, age=150).stale_if_error == 0.0


def test_invalid_stale_if_error_counts_as_absent() -> None:
    assert use(res=cc("stale-if-error=later"), floor=0).stale_if_error == 0.0


def test_response_no_cache_forces_revalidation_even_when_fresh() -> None:
    assert use(res=cc("no-cache, max-age=3600"), lifetime=3600, age=1).action == "revalidate"


def test_response_no_cache_beats_max_stale_and_stale_while_revalidate() -> None:
    res = cc("no-cache, stale-while-revalidate=600")
    assert use(req=cc("max-stale"), res=res, lifetime=0, age=10).action == "revalidate"


def test_response_no_cache_gets_no_stale_if_error_allowance() -> None:
    d = use(res=cc("no-cache"), lifetime=0, age=10, floor=300)
    # negative infinity: not even a copy that is still fresh may cover an origin failure
    assert d.stale_if_error == float("-inf")
    fresh = use(res=cc("no-cache, max-age=3600"), lifetime=3600, age=1, floor=300)
    assert fresh.age - fresh.lifetime > fresh.stale_if_error


_REQUEST_DIRECTIVES = [
    "max-stale",
    "max-stale=5",
    "max-stale=100000",
    "max-age=3",
    "min-fresh=4",
    "stale-if-error=50",
    "no-transform",
]


@settings(max_examples=200, deadline=None)
@given(
    req=st.lists(st.sampled_from(_REQUEST_DIRECTIVES), max_size=4),
    forbid=st.sampled_from(["must-revalidate", "proxy-revalidate", "s-maxage=10"]),
    extra=st.lists(
        st.sampled_from(["stale-while-revalidate=100", "stale-if-error=100", "public"]),
        max_size=3,
    ),
    lifetime=st.integers(min_value=0, max_value=100),
    age=st.integers(min_value=0, max_value=300),
)
def test_never_stale_when_revalidation_is_required(
    req: list[str], forbid: str, extra: list[str], lifetime: int, age: int
) -> None:
    res = cc(", ".join([forbid, *extra]))
    req_h = cc(", ".join(req)) if req else []
    d = use(req=req_h, res=res, lifetime=lifetime, age=age, floor=1000)
    assert d.action != "stale"
    assert d.stale_if_error == 0.0
    if age >= lifetime:
        assert d.action == "revalidate"


@settings(max_examples=200, deadline=None)
@given(
    lifetime=st.floats(min_value=0, max_value=1e6, allow_nan=False),
    age=st.floats(min_value=0, max_value=1e6, allow_nan=False),
)
def test_without_directives_fresh_iff_lifetime_exceeds_age(lifetime: float, age: float) -> None:
    expected = "fresh" if lifetime > age else "revalidate"
    assert use(lifetime=lifetime, age=age).action == expected


# -- only-if-cached, bypass, Authorization -------------------------------------------------------


@pytest.mark.parametrize("value", ["only-if-cached", "ONLY-IF-CACHED", "max-age=0, only-if-cached"])
def test_only_if_cached(value: str) -> None:
    assert only_if_cached(cc(value)) is True


@pytest.mark.parametrize("req", [[], cc("no-cache"), [(b"Pragma", b"only-if-cached")]])
def test_not_only_if_cached(req: HeaderList) -> None:
    assert only_if_cached(req) is False


@pytest.mark.parametrize("method", [b"GET", b"HEAD"])
def test_get_and_head_use_the_cache(method: bytes) -> None:
    assert bypass_reason(method, []) is None
    assert bypass_reason(method, cc("no-cache")) is None


@pytest.mark.parametrize("method", [b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"get"])
def test_other_methods_bypass(method: bytes) -> None:
    assert bypass_reason(method, []) == "method"


def test_range_request_bypasses() -> None:
    assert bypass_reason(b"GET", [(b"range", b"bytes=0-1")]) is None  # hits answer ranges


def test_request_no_store_bypasses() -> None:
    assert bypass_reason(b"GET", cc("No-Store")) == "no-store"


def test_without_authorization_anything_stored_may_be_served() -> None:
    assert may_serve_with_authorization([], cc("max-age=60")) is True


@pytest.mark.parametrize("value", ["public", "s-maxage=1", "must-revalidate", "PUBLIC"])
def test_authorization_served_only_from_shareable_responses(value: str) -> None:
    req = [(b"Authorization", b"Bearer t")]
    assert may_serve_with_authorization(req, cc(value)) is True


@pytest.mark.parametrize("res", [[], cc("max-age=60"), cc("proxy-revalidate, max-age=60")])
def test_authorization_not_served_from_plain_responses(res: HeaderList) -> None:
    req = [(b"authorization", b"Bearer t")]
    assert may_serve_with_authorization(req, res) is False


# -- conditional requests (RFC 9110 section 13.1, RFC 9111 section 4.3.2) ------------------------

STORED = [
    (b"ETag", b'"a"'),
    (b"Last-Modified", http_date(T0)),
    (b"Date", http_date(T0 + 100)),
]


@pytest.mark.parametrize(
    ("inm", "etag"),
    [
        (b'"a"', b'"a"'),
        (b'W/"a"', b'"a"'),
        (b'"a"', b'W/"a"'),
        (b'W/"a"', b'W/"a"'),
        (b'"x", "a"', b'"a"'),
        (b'"x",W/"a" ,"y"', b'"a"'),
        (b"*", b'"a"'),
    ],
)
def test_if_none_match_weak_comparison_matches(inm: bytes, etag: bytes) -> None:
    assert not_modified([(b"If-None-Match", inm)], [(b"ETag", etag)]) is True


@pytest.mark.parametrize("inm", [b'"b"', b'"A"', b'W/"b"', b'"x", "y"', b"a", b'"a "'])
def test_if_none_match_non_matching(inm: bytes) -> None:
    assert not_modified([(b"If-None-Match", inm)], STORED) is False


def test_if_none_match_list_spread_over_several_lines() -> None:
    req = [(b"If-None-Match", b'"x"'), (b"if-none-match", b'"a"')]
    assert not_modified(req, STORED) is True


def test_if_none_match_star_matches_any_stored_response() -> None:
    assert not_modified([(b"If-None-Match", b"*")], [(b"Date", http_date(T0))]) is True


def test_if_none_match_without_stored_etag_is_false() -> None:
    req = [(b"If-None-Match", b'"a"'), (b"If-Modified-Since", http_date(T0 + 10))]
    assert not_modified(req, [(b"Last-Modified", http_date(T0))]) is False


def test_if_none_match_takes_precedence_over_if_modified_since() -> None:
    ims = (b"If-Modified-Since", http_date(T0 + 3600))  # alone it would give 304
    assert not_modified([(b"If-None-Match", b'"other"'), ims], STORED) is False
    old = (b"If-Modified-Since", http_date(T0 - 3600))  # alone it would give 200
    assert not_modified([(b"If-None-Match", b'"a"'), old], STORED) is True


@pytest.mark.parametrize(
    ("delta", "expected"), [(3600, True), (0, True), (-1, False), (-3600, False)]
)
def test_if_modified_since_against_last_modified(delta: int, expected: bool) -> None:
    req = [(b"If-Modified-Since", http_date(T0 + delta))]
    assert not_modified(req, STORED) is expected


@pytest.mark.parametrize(("delta", "expected"), [(0, True), (10, True), (-10, False)])
def test_if_modified_since_falls_back_to_date(delta: int, expected: bool) -> None:
    stored = [(b"ETag", b'"a"'), (b"Date", http_date(T0))]
    req = [(b"If-Modified-Since", http_date(T0 + delta))]
    assert not_modified(req, stored) is expected


def test_if_modified_since_without_last_modified_or_date_is_false() -> None:
    req = [(b"If-Modified-Since", http_date(T0))]
    assert not_modified(req, [(b"ETag", b'"a"')]) is False


@pytest.mark.parametrize("value", [b"0", b"garbage", b"", b"-1", b"Sun, 99 Nov 1994 08:49:37 GMT"])
def test_invalid_if_modified_since_is_ignored(value: bytes) -> None:
    assert not_modified([(b"If-Modified-Since", value)], STORED) is False


def test_no_conditionals_is_not_a_match() -> None:
    assert not_modified([(b"Accept", b"*/*")], STORED) is False


def test_if_modified_since_with_two_members_is_ignored() -> None:
    value = http_date(T0 + 3600) + b", " + http_date(T0 + 7200)
    assert not_modified([(b"If-Modified-Since", value)], STORED) is False


def test_if_none_match_entity_tag_containing_a_comma() -> None:
    assert not_modified([(b"If-None-Match", b'"a,b"')], [(b"ETag", b'"a,b"')]) is True


def test_not_modified_headers_keep_only_304_fields() -> None:
    stored = [
        (b"Content-Type", b"text/html"),
        (b"Cache-Control", b"max-age=60"),
        (b"ETag", b'"a"'),
        (b"content-length", b"5"),
        (b"Content-Encoding", b"gzip"),
        (b"Vary", b"Accept"),
        (b"vary", b"Accept-Language"),
        (b"Expires", http_date(T0 + 60)),
        (b"Date", http_date(T0)),
        (b"Last-Modified", http_date(T0 - 60)),
        (b"Content-Location", b"/x"),
        (b"X-Custom", b"1"),
        (b"Set-Cookie", b"a=b"),
    ]
    assert not_modified_headers(stored) == [
        (b"Cache-Control", b"max-age=60"),
        (b"ETag", b'"a"'),
        (b"Vary", b"Accept"),
        (b"vary", b"Accept-Language"),
        (b"Expires", http_date(T0 + 60)),
        (b"Date", http_date(T0)),
        (b"Last-Modified", http_date(T0 - 60)),
        (b"Content-Location", b"/x"),
    ]


def test_validators_from_etag_and_last_modified() -> None:
    assert validators(STORED) == [
        (b"If-None-Match", b'"a"'),
        (b"If-Modified-Since", http_date(T0)),
    ]


def test_validators_weak_etag_sent_as_is() -> None:
    assert validators([(b"etag", b'W/"v1"')]) == [(b"If-None-Match", b'W/"v1"')]


def test_validators_last_modified_only() -> None:
    assert validators([(b"last-modified", b"x")]) == [(b"If-Modified-Since", b"x")]


def test_no_validators() -> None:
    assert validators([(b"Date", http_date(T0)), (b"Content-Type", b"text/plain")]) == []


# -- merge_304 (RFC 9111 sections 3.2 and 4.3.4) --------------------------------------------------


def test_merge_304_replaces_fields_it_carries_and_keeps_the_rest() -> None:
    stored = [
        (b"Content-Type", b"text/html"),
        (b"Cache-Control", b"max-age=60"),
        (b"ETag", b'"a"'),
        (b"Date", b"old"),
    ]
    fresh = [(b"cache-control", b"max-age=600"), (b"Date", b"new"), (b"X-New", b"1")]
    merged = merge_304(stored, fresh)
    assert merged == [
        (b"Content-Type", b"text/html"),
        (b"ETag", b'"a"'),
        (b"cache-control", b"max-age=600"),
        (b"Date", b"new"),
        (b"X-New", b"1"),
    ]


def test_merge_304_replaces_every_line_of_a_repeated_field() -> None:
    stored = [(b"Link", b"</a>"), (b"Link", b"</b>"), (b"X", b"1")]
    merged = merge_304(stored, [(b"link", b"</c>")])
    assert [v for k, v in merged if k.lower() == b"link"] == [b"</c>"]
    assert (b"X", b"1") in merged


@pytest.mark.parametrize(
    "name", [b"Content-Length", b"content-length", b"Content-Encoding", b"Content-Range"]
)
def test_merge_304_never_takes_representation_framing_fields(name: bytes) -> None:
    stored = [(b"Content-Length", b"5"), (b"Content-Encoding", b"gzip")]
    merged = merge_304(stored, [(name, b"0")])
    assert merged == stored


def test_merge_304_does_not_add_a_content_length_absent_from_the_stored_response() -> None:
    merged = merge_304([(b"ETag", b'"a"')], [(b"Content-Length", b"0"), (b"ETag", b'"a"')])
    assert merged == [(b"ETag", b'"a"')]


def test_merge_304_with_empty_304_keeps_everything() -> None:
    stored = [(b"A", b"1"), (b"B", b"2")]
    assert merge_304(stored, []) == stored


# -- invalidation (RFC 9111 section 4.4) -----------------------------------------------------------


@pytest.mark.parametrize("method", [b"POST", b"PUT", b"DELETE", b"PATCH", b"PURGE", b"get"])
@pytest.mark.parametrize("status", [200, 201, 204, 301, 303, 307, 399])
def test_unsafe_method_non_error_response_invalidates(method: bytes, status: int) -> None:
    assert invalidates(method, status) is True


@pytest.mark.parametrize("method", [b"POST", b"PUT", b"DELETE", b"PATCH"])
@pytest.mark.parametrize("status", [100, 199, 400, 403, 404, 409, 500, 502, 503])
def test_error_responses_do_not_invalidate(method: bytes, status: int) -> None:
    assert invalidates(method, status) is False


@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"OPTIONS", b"TRACE"])
@pytest.mark.parametrize("status", [200, 204, 301])
def test_safe_methods_never_invalidate(method: bytes, status: int) -> None:
    assert invalidates(method, status) is False


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(b"Location", b"/new")], [b"/new"]),
        ([(b"Content-Location", b"/cl?x=1")], [b"/cl?x=1"]),
        ([(b"content-location", b"/b"), (b"location", b"/a")], [b"/a", b"/b"]),
        ([(b"Location", b"  /spaced  ")], [b"/spaced"]),
        ([(b"Location", b"http://example.com/a?b=c")], [b"/a?b=c"]),
        ([(b"Location", b"https://example.com/s")], [b"/s"]),
        ([(b"Location", b"HTTP://Example.COM/Up")], [b"/Up"]),
        ([(b"Location", b"http://example.com")], [b"/"]),
    ],
)
def test_invalidated_targets_same_origin(headers: HeaderList, expected: list[bytes]) -> None:
    assert invalidated_targets(b"example.com", headers) == expected


@pytest.mark.parametrize(
    "location",
    [
        b"http://other.com/a",
        b"http://example.com.evil/a",
        b"http://evil/example.com/a",
        b"http://example.com@evil.com/a",
        b"http://example.com:8080/a",
        b"ftp://example.com/a",
        b"relative/path",
        b"",
    ],
)
def test_invalidated_targets_ignores_other_origins(location: bytes) -> None:
    headers = [(b"Location", location), (b"Content-Location", location)]
    assert invalidated_targets(b"example.com", headers) == []


def test_invalidated_targets_host_with_port() -> None:
    headers = [
        (b"Location", b"http://example.com:8080/x"),
        (b"Content-Location", b"http://example.com/y"),
    ]
    assert invalidated_targets(b"example.com:8080", headers) == [b"/x"]


def test_invalidated_targets_none() -> None:
    assert invalidated_targets(b"example.com", [(b"Content-Type", b"text/plain")]) == []


# -- parsing Cache-Control and Vary ---------------------------------------------------------------


def test_parse_cache_control_lower_cases_names_and_keeps_values() -> None:
    parsed = parse_cache_control([(b"Cache-Control", b"Max-Age=60, PUBLIC, X-Ext=AbC")])
    assert parsed.directives == {"max-age": "60", "public": None, "x-ext": "AbC"}


def test_parse_cache_control_keeps_quoted_commas_together() -> None:
    parsed = parse_cache_control(cc('no-cache="Set-Cookie, X-Foo", max-age=5'))
    assert parsed.directives == {"no-cache": '"Set-Cookie, X-Foo"', "max-age": "5"}


def test_parse_cache_control_first_occurrence_wins() -> None:
    assert parse_cache_control(cc("max-age=5, max-age=10")).seconds("max-age") == 5
    two_lines = [*cc("max-age=5"), *cc("max-age=10")]
    assert parse_cache_control(two_lines).seconds("max-age") == 5


def test_parse_cache_control_merges_repeated_header_lines() -> None:
    headers = [
        (b"cache-control", b"public"),
        (b"X-Other", b"no-store"),
        (b"CACHE-CONTROL", b"max-age=5"),
    ]
    parsed = parse_cache_control(headers)
    assert parsed.directives == {"public": None, "max-age": "5"}


def test_parse_cache_control_ignores_other_headers() -> None:
    assert parse_cache_control([(b"X-Cache-Control", b"no-store")]).directives == {}


def test_parse_cache_control_empty_members_and_whitespace() -> None:
    parsed = parse_cache_control(cc(" ,, ,  Max-Age = 30 , ,no-cache,"))
    assert parsed.directives == {"max-age": "30", "no-cache": None}
    assert parsed.seconds("max-age") == 30


@pytest.mark.parametrize(
    ("value", "expected"),
    [("max-age=7", 7), ('max-age="7"', 7), ("max-age=abc", None), ("max-age=-1", None),
     ("max-age", None), ("max-age=", None), ("no-cache", None), ("max-age=007", 7)],
)  # fmt: skip
def test_seconds(value: str, expected: int | None) -> None:
    assert parse_cache_control(cc(value)).seconds("max-age") == expected


@pytest.mark.parametrize("raw", [b"max-age=\xb2", b"s-maxage=\xb9", b"max-age=1\xb3"])
def test_non_ascii_digits_are_an_invalid_delta_seconds(raw: bytes) -> None:
    headers = [(b"Cache-Control", raw)]
    assert freshness_lifetime(200, headers, default_ttl=60) == 0.0


@settings(max_examples=300, deadline=None)
@given(value=st.binary(max_size=60).map(lambda b: bytes(c & 0x7F for c in b)))
def test_parse_cache_control_never_raises_on_ascii(value: bytes) -> None:
    parsed = parse_cache_control([(b"Cache-Control", value)])
    for name in parsed.directives:
        seconds = parsed.seconds(name)
        assert seconds is None or 0 <= seconds <= 2**31
    assert 0 <= freshness_lifetime(200, [(b"Cache-Control", value)], default_ttl=0) <= 2**31


def test_vary_names() -> None:
    assert vary_names([(b"Vary", b"Accept-Encoding, User-Agent")]) == [
        "accept-encoding",
        "user-agent",
    ]


def test_vary_names_merges_lines_drops_duplicates_and_empty_members() -> None:
    headers = [(b"Vary", b"Accept,, accept"), (b"vary", b" Accept-Language ,ACCEPT")]
    assert vary_names(headers) == ["accept", "accept-language"]


def test_vary_star_anywhere_is_just_star() -> None:
    assert vary_names([(b"Vary", b"Accept"), (b"Vary", b"*")]) == ["*"]


def test_no_vary() -> None:
    assert vary_names([(b"Content-Type", b"text/plain")]) == []


def test_header_helpers_are_case_insensitive() -> None:
    headers = [(b"X-A", b"1"), (b"x-a", b"2")]
    assert policy.get_header(headers, b"x-a") == b"1"
    assert policy.get_all(headers, b"x-a") == [b"1", b"2"]
    assert policy.get_header(headers, b"x-b") is None


@given(st.text(alphabet=' ,="abc-=0123456789\t', max_size=40))
def test_cache_control_split_respects_quotes(text: str) -> None:
    """Commas split directives except inside quoted strings, with or without quotes present."""
    from pibl.cache.policy import _split_directives

    expected: list[str] = []
    current = ""
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            expected.append(current)
            current = ""
        else:
            current += ch
    expected.append(current)
    assert _split_directives(text) == [p.strip() for p in expected if p.strip()]


def test_merge_304_keeps_a_weak_stored_etag_weak() -> None:
    """A body PIBL compressed carries W/ of the origin's tag; a 304 must not make it strong."""
    stored = [(b"ETag", b'W/"big"'), (b"Content-Encoding", b"gzip")]
    merged = merge_304(stored, [(b"ETag", b'"big"'), (b"Cache-Control", b"max-age=60")])
    assert (b"ETag", b'W/"big"') in merged
    strong = merge_304([(b"ETag", b'"a"')], [(b"ETag", b'"a"')])
    assert strong == [(b"ETag", b'"a"')]


# -- targeted cache control (RFC 9213) ---------------------------------------------------

OWN = (b"pibl-cache-control", b"cdn-cache-control")


def test_cdn_cache_control_overrides_cache_control_for_this_cache() -> None:
    res = [(b"Cache-Control", b"no-store"), (b"CDN-Cache-Control", b"max-age=600")]
    assert store_ok(res) == (True, "")
    assert freshness_lifetime(200, res, default_ttl=0) == 600.0


def test_a_ttl_browsers_never_see() -> None:
    """Cache-Control: private for browsers, PIBL's own field for PIBL (first in order)."""
    res = [
        (b"Cache-Control", b"private, max-age=0"),
        (b"CDN-Cache-Control", b"no-store"),
        (b"PIBL-Cache-Control", b"max-age=300"),
    ]
    assert storable(b"GET", [], 200, res, default_ttl=0, targeted=OWN) == (True, "")
    assert freshness_lifetime(200, res, default_ttl=0, targeted=OWN) == 300.0
    # without PIBL's field configured, the CDN field (no-store) decides
    assert storable(b"GET", [], 200, res, default_ttl=0)[0] is False


def test_a_targeted_field_ignores_expires() -> None:
    res = [
        (b"Date", http_date(T0)),
        (b"Expires", http_date(T0 + 3600)),
        (b"CDN-Cache-Control", b"max-age=10"),
    ]
    assert freshness_lifetime(200, res, default_ttl=0) == 10.0


@pytest.mark.parametrize("value", [b"max-age=abc def", b"Max-Age=60", b"max-age=60,,", b""])
def test_an_invalid_targeted_field_falls_back_to_cache_control(value: bytes) -> None:
    res = [(b"Cache-Control", b"max-age=5"), (b"CDN-Cache-Control", value)]
    assert freshness_lifetime(200, res, default_ttl=0) == 5.0


def test_targeted_directives_decide_revalidation_too() -> None:
    stored = [(b"Cache-Control", b"no-cache"), (b"CDN-Cache-Control", b"max-age=60")]
    decision = usable([], stored, lifetime=60, age=1, max_stale_on_error=0)
    assert decision.action == "fresh"


# -- ranges ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"bytes=0-9", (0, 9)),
        (b"bytes=10-", (10, 99)),
        (b"bytes=-10", (90, 99)),
        (b"bytes=-1000", (0, 99)),
        (b"bytes=90-1000", (90, 99)),
        (b"Bytes = 5-5", (5, 5)),
        (b"bytes=100-", UNSATISFIABLE),
        (b"bytes=500-600", UNSATISFIABLE),
        (b"bytes=-0", UNSATISFIABLE),
        (b"bytes=0-1,5-6", None),
        (b"bytes=9-1", None),
        (b"items=0-1", None),
        (b"bytes=a-b", None),
        (b"bytes", None),
    ],
)
def test_byte_range(value: bytes, expected: tuple[int, int] | None) -> None:
    assert byte_range(value, 100) == expected


def test_no_range_of_an_empty_body() -> None:
    assert byte_range(b"bytes=0-", 0) == UNSATISFIABLE
    assert byte_range(None, 10) is None


@pytest.mark.parametrize(
    ("if_range", "ok"),
    [
        (None, True),
        (b'"v1"', True),
        (b'"v2"', False),
        (b'W/"v1"', False),
        (http_date(T0 - 100), True),
        (http_date(T0 - 99), False),
        (b"garbage", False),
    ],
)
def test_if_range(if_range: bytes | None, ok: bool) -> None:
    stored = [(b"ETag", b'"v1"'), (b"Last-Modified", http_date(T0 - 100)), (b"Date", http_date(T0))]
    req = [] if if_range is None else [(b"If-Range", if_range)]
    assert if_range_matches(req, stored) is ok


def test_if_range_with_a_weak_stored_tag_or_a_weak_date_never_matches() -> None:
    assert not if_range_matches([(b"If-Range", b'"v1"')], [(b"ETag", b'W/"v1"')])
    same_second = [(b"Last-Modified", http_date(T0)), (b"Date", http_date(T0))]
    assert not if_range_matches([(b"If-Range", http_date(T0))], same_second)
