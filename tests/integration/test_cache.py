"""The cache over real sockets: RFC 9111 behaviour end to end, with an injected clock."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from email.utils import formatdate
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import Backend, ProxyThread, wait_for


class Clock:
    """PIBL's cache clock; it also moves the backends' Date headers along."""

    def __init__(self, backends: list[Backend]) -> None:
        self.offset = 0.0
        self.backends = backends

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds
        for b in self.backends:
            b.clock_offset = self.offset


@pytest.fixture
def cached(
    backends: list[Backend], make_proxy: Callable[..., ProxyThread], tmp_path: Path
) -> Callable[..., tuple[ProxyThread, Clock, httpx.Client]]:
    clients: list[httpx.Client] = []

    def factory(**cache: Any) -> tuple[ProxyThread, Clock, httpx.Client]:
        settings = {"dir": str(tmp_path / "cache"), "ttl": 60, **cache}
        proxy = make_proxy(backends[:1], cache=settings)
        clock = Clock(backends)
        assert proxy.worker is not None and proxy.worker.proxy.cache is not None
        proxy.worker.proxy.cache.clock = clock
        client = httpx.Client(base_url=proxy.url, timeout=10)
        clients.append(client)
        return proxy, clock, client

    yield factory  # type: ignore[misc]
    for c in clients:
        c.close()


def test_miss_then_hit_byte_identical(cached: Callable[..., Any], backends: list[Backend]) -> None:
    _, _, client = cached()
    first = client.get("/cache/a?cc=max-age=100")
    second = client.get("/cache/a?cc=max-age=100")
    assert first.headers["cache-status"].startswith("pibl; fwd=miss; fwd-status=200; stored")
    assert second.headers["cache-status"].startswith("pibl; hit; ttl=")
    assert second.content == first.content
    # the backend's Date has one-second resolution: a response that crossed a second
    # boundary is already up to 1 s old (RFC 9111 section 4.2.3's apparent_age)
    assert second.headers["age"] in ("0", "1")
    assert backends[0].hits == 1


def test_default_ttl_applies_only_without_explicit_freshness(
    cached: Callable[..., Any], backends: list[Backend]
) -> None:
    _, clock, client = cached(ttl=30, max_stale_on_error=0)
    client.get("/cache/plain")  # no freshness information: gets the launch-time TTL
    client.get("/cache/explicit?cc=max-age=100")
    clock.advance(27)  # (Date has one-second resolution: the age may read one more)
    hit = client.get("/cache/plain")
    assert hit.headers["cache-status"].startswith("pibl; hit")
    assert hit.headers["age"] in ("27", "28")
    clock.advance(4)  # 31 s: past the TTL, never served again without asking the origin
    r = client.get("/cache/plain")
    assert "fwd=stale" in r.headers["cache-status"]
    assert backends[0].hits == 3
    # an explicit max-age=100 wins over the 30 s default
    assert "hit" in client.get("/cache/explicit?cc=max-age=100").headers["cache-status"]


def test_past_ttl_goes_to_the_origin(cached: Callable[..., Any], backends: list[Backend]) -> None:
    _, clock, client = cached(ttl=10)
    assert client.get("/cache/t").text == "b1 hit 1 "
    clock.advance(11)
    r = client.get("/cache/t")
    assert r.text == "b1 hit 2 "  # a fresh copy from the origin, not the expired one
    assert "fwd=stale" in r.headers["cache-status"]


def test_ttl_zero_is_strict(cached: Callable[..., Any], backends: list[Backend]) -> None:
    _, _, client = cached(ttl=0)
    client.get("/cache/strict")
    r = client.get("/cache/strict")
    assert "detail=no-freshness-information" in r.headers["cache-status"]
    assert backends[0].hits == 2
    # heuristic freshness from Last-Modified is still allowed
    lm = formatdate(time.time() - 10 * 86400, usegmt=True)
    client.get(f"/cache/h?lm={lm}")
    assert "hit" in client.get(f"/cache/h?lm={lm}").headers["cache-status"]


@pytest.mark.parametrize(
    "query",
    [
        "cc=no-store",
        "cc=private",
        "cc=max-age=60&cookie=1",
        "cc=max-age=60&vary=*",
        "status=500",  # no explicit freshness: errors get no launch-time TTL
        "cc=max-age=60&status=206",
    ],
)
def test_not_stored(cached: Callable[..., Any], backends: list[Backend], query: str) -> None:
    _, _, client = cached()
    client.get(f"/cache/n?{query}")
    r = client.get(f"/cache/n?{query}")
    assert "hit" not in r.headers["cache-status"]
    assert backends[0].hits == 2


def test_authorization_needs_explicit_permission(
    cached: Callable[..., Any], backends: list[Backend]
) -> None:
    _, _, client = cached()
    auth = {"Authorization": "Bearer x"}
    client.get("/cache/auth?cc=max-age=60", headers=auth)
    assert (
        "hit" not in client.get("/cache/auth?cc=max-age=60", headers=auth).headers["cache-status"]
    )
    client.get("/cache/auth?cc=public,max-age=60", headers=auth)
    assert (
        "hit"
        in client.get("/cache/auth?cc=public,max-age=60", headers=auth).headers["cache-status"]
    )


def test_request_no_store_and_no_cache(cached: Callable[..., Any], backends: list[Backend]) -> None:
    _, _, client = cached()
    client.get("/cache/r?cc=max-age=60&etag=%22e%22")
    r = client.get("/cache/r?cc=max-age=60&etag=%22e%22", headers={"Cache-Control": "no-store"})
    assert r.headers["cache-status"] == "pibl; fwd=bypass"
    r = client.get("/cache/r?cc=max-age=60&etag=%22e%22", headers={"Cache-Control": "no-cache"})
    assert r.headers["cache-status"].startswith("pibl; fwd=stale; fwd-status=304")
    r = client.get("/cache/r?cc=max-age=60&etag=%22e%22", headers={"Pragma": "no-cache"})
    assert "fwd-status=304" in r.headers["cache-status"]


def test_only_if_cached(cached: Callable[..., Any], backends: list[Backend]) -> None:
    _, _, client = cached()
    r = client.get("/cache/oic?cc=max-age=60", headers={"Cache-Control": "only-if-cached"})
    assert r.status_code == 504
    assert backends[0].hits == 0
    client.get("/cache/oic?cc=max-age=60")
    r = client.get("/cache/oic?cc=max-age=60", headers={"Cache-Control": "only-if-cached"})
    assert r.status_code == 200


def test_vary_secondary_keys(cached: Callable[..., Any], backends: list[Backend]) -> None:
    _, _, client = cached()
    url = "/cache/v?vary=Accept-Language&cc=max-age=60"
    es = client.get(url, headers={"Accept-Language": "es"}).text
    en = client.get(url, headers={"Accept-Language": "en"}).text
    assert es != en
    again = client.get(url, headers={"Accept-Language": "es"})
    assert again.text == es and "hit" in again.headers["cache-status"]
    assert "hit" in client.get(url, headers={"Accept-Language": "en"}).headers["cache-status"]
    assert backends[0].hits == 2


def test_head_answered_from_stored_get(cached: Callable[..., Any], backends: list[Backend]) -> None:
    _, _, client = cached()
    body = client.get("/cache/head?cc=max-age=60").content
    r = client.head("/cache/head?cc=max-age=60")
    assert "hit" in r.headers["cache-status"]
    assert r.headers["content-length"] == str(len(body))
    assert r.content == b""
    assert backends[0].hits == 1


def test_client_conditionals_answered_304_from_cache(
    cached: Callable[..., Any], backends: list[Backend]
) -> None:
    _, _, client = cached()
    lm = formatdate(time.time() - 3600, usegmt=True)
    url = f"/cache/cond?cc=max-age=60&etag=%22v1%22&lm={lm}"
    client.get(url)
    r = client.get(url, headers={"If-None-Match": '"v1"'})
    assert r.status_code == 304 and r.content == b""
    assert r.headers["etag"] == '"v1"'
    r = client.get(url, headers={"If-None-Match": 'W/"v1"'})
    assert r.status_code == 304
    r = client.get(url, headers={"If-Modified-Since": formatdate(time.time(), usegmt=True)})
    assert r.status_code == 304
    r = client.get(url, headers={"If-None-Match": '"other"'})
    assert r.status_code == 200
    assert backends[0].hits == 1
    # preconditions apply to 2xx answers only: a stored 404 stays a 404
    missing = "/cache/gone?cc=max-age=60&status=404"
    client.get(missing)
    r = client.get(missing, headers={"If-None-Match": "*"})
    assert r.status_code == 404 and "hit" in r.headers["cache-status"]


def test_stale_entry_revalidated_with_304(
    cached: Callable[..., Any], backends: list[Backend]
) -> None:
    _, clock, client = cached()
    url = "/cache/reval?cc=max-age=10&etag=%22v1%22"
    first = client.get(url).content
    clock.advance(20)
    r = client.get(url)
    assert r.headers["cache-status"].startswith("pibl; fwd=stale; fwd-status=304")
    assert r.content == first
    seen = backends[0].seen[-1]
    assert ("If-None-Match", '"v1"') in seen.headers
    r = client.get(url)  # refreshed: fresh again
    assert r.headers["cache-status"].startswith("pibl; hit")


def test_stale_while_revalidate(cached: Callable[..., Any], backends: list[Backend]) -> None:
    proxy, clock, client = cached()
    store = proxy.worker.proxy.cache.store
    url = "/cache/swr?cc=max-age=10,stale-while-revalidate=60"
    first = client.get(url).text
    assert wait_for(lambda: store.stats.stored == 1)  # committed just after the response
    clock.advance(15)
    r = client.get(url)
    assert r.text == first
    assert "detail=stale-while-revalidate" in r.headers["cache-status"]
    # refreshed in the background: fetched once more and stored
    assert wait_for(lambda: store.stats.stored == 2, timeout=5.0)
    assert backends[0].hits == 2
    r = client.get(url)
    assert "hit" in r.headers["cache-status"] and r.text != first


def test_stale_if_error_when_backends_down(
    cached: Callable[..., Any], backends: list[Backend]
) -> None:
    _, clock, client = cached(max_stale_on_error=100)
    url = "/cache/sie?cc=max-age=10"
    body = client.get(url).content
    backends[0].stop()
    clock.advance(50)  # stale by 40 s, within the allowed 100
    r = client.get(url)
    assert r.status_code == 200 and r.content == body
    assert "detail=stale-if-error" in r.headers["cache-status"]
    clock.advance(100)  # too stale now: every backend is unreachable
    assert client.get(url).status_code == 503


def test_must_revalidate_never_served_stale(
    cached: Callable[..., Any], backends: list[Backend]
) -> None:
    _, clock, client = cached(max_stale_on_error=1000)
    url = "/cache/mr?cc=max-age=10,must-revalidate"
    client.get(url)
    backends[0].stop()
    clock.advance(20)
    assert client.get(url).status_code == 503
    assert client.get(url, headers={"Cache-Control": "max-stale=1000"}).status_code == 503


def test_unsafe_methods_invalidate(cached: Callable[..., Any], backends: list[Backend]) -> None:
    _, _, client = cached()
    target = "/cache/inv?cc=max-age=60&loc=/cache/other%3Fcc=max-age=60"
    client.get(target)
    client.get("/cache/other?cc=max-age=60")
    assert "hit" in client.get(target).headers["cache-status"]
    assert "hit" in client.get("/cache/other?cc=max-age=60").headers["cache-status"]
    r = client.post(target)
    assert r.headers["cache-status"] == "pibl; fwd=method"
    # the target URI and its Content-Location are both gone
    assert "hit" not in client.get(target).headers["cache-status"]
    assert "hit" not in client.get("/cache/other?cc=max-age=60").headers["cache-status"]


def test_coalescing_100_concurrent_cold_requests(
    cached: Callable[..., Any], backends: list[Backend]
) -> None:
    proxy, _, _ = cached()
    url = f"{proxy.url}/cache/slow?cc=max-age=60&delay=0.5"

    def get(_: int) -> bytes:
        with httpx.Client(timeout=20) as c:
            r = c.get(url)
            assert r.status_code == 200
            return r.content

    with ThreadPoolExecutor(100) as pool:
        bodies = list(pool.map(get, range(100)))
    assert backends[0].hits == 1
    assert len(set(bodies)) == 1


def test_large_entry_served_with_sendfile(
    cached: Callable[..., Any], backends: list[Backend]
) -> None:
    _, _, client = cached()
    url = "/cache/big?cc=max-age=60&size=3000000"
    first = client.get(url).content
    r = client.get(url)
    assert "hit" in r.headers["cache-status"]
    assert r.content == first and len(first) == 3_000_000


def test_uncacheable_uri_is_not_collapsed_after_its_first_answer(
    cached: Callable[..., Any], backends: list[Backend]
) -> None:
    """After a response that may not be stored, concurrent requests go to the backend together."""
    proxy, _, _ = cached()
    url = f"{proxy.url}/cache/private?cc=private&delay=1"

    def timed(_: int) -> float:
        started = time.monotonic()
        with httpx.Client(timeout=20) as c:
            assert c.get(url).status_code == 200
        return time.monotonic() - started

    with ThreadPoolExecutor(5) as pool:
        first = list(pool.map(timed, range(5)))
    # the first burst: followers wait only for the leader's response head, not its whole body
    assert max(first) < 2.8, first
    with ThreadPoolExecutor(5) as pool:
        second = list(pool.map(timed, range(5)))
    assert max(second) < 1.8, second  # all in parallel: about the backend's one second
    assert backends[0].hits == 10


def test_revalidating_an_entry_without_validators_never_sends_the_clients_conditionals(
    cached: Callable[..., Any], backends: list[Backend]
) -> None:
    _, clock, client = cached()
    url = "/cache/novalidators?cc=max-age=10"
    first = client.get(url).text
    clock.advance(20)
    r = client.get(url, headers={"If-None-Match": '"whatever"'})
    sent = backends[0].seen[-1].headers
    assert not any(k.lower() == "if-none-match" for k, _ in sent)  # a 304 could not apply
    assert r.status_code == 200 and r.text != first


def test_requests_that_cannot_be_stored_for_their_own_reasons_keep_collapsing(
    cached: Callable[..., Any], backends: list[Backend]
) -> None:
    """A HEAD or an Authorization header says nothing about the next GETs: they still collapse."""
    proxy, _, client = cached()
    url = "/cache/shared?cc=max-age=60&delay=0.5"
    client.head(url)
    client.get(url, headers={"Authorization": "Bearer x"})
    hits = backends[0].hits

    def get(_: int) -> int:
        with httpx.Client(timeout=20) as c:
            return c.get(proxy.url + url).status_code

    with ThreadPoolExecutor(10) as pool:
        assert list(pool.map(get, range(10))) == [200] * 10
    assert backends[0].hits == hits + 1


def test_only_if_cached_never_reaches_the_backend_even_for_a_passed_uri(
    cached: Callable[..., Any], backends: list[Backend]
) -> None:
    _, _, client = cached()
    url = "/cache/mine?cc=private"
    client.get(url)
    hits = backends[0].hits
    r = client.get(url, headers={"Cache-Control": "only-if-cached"})
    assert r.status_code == 504 and backends[0].hits == hits


# -- RFC 9111 storability, dates and ages, targeted fields, against a scripted origin --


@pytest.mark.parametrize("status", [500, 503, 404, 403, 201])
def test_any_status_with_explicit_freshness_is_served_from_cache(
    cached: Callable[..., Any], backends: list[Backend], status: int
) -> None:
    _, _, client = cached()
    url = f"/cache/s?cc=max-age=60&status={status}"
    first = client.get(url)
    second = client.get(url)
    assert first.status_code == second.status_code == status
    assert second.headers["cache-status"].startswith("pibl; hit")
    assert backends[0].hits == 1


@pytest.mark.parametrize(
    "expires",
    ["0", "Thu, 01 Dec 2094 16:00:00 UTC", "thu, 01 dec 2094 16:00:00 gmt", "2094-12-01"],
)
def test_an_invalid_expires_is_never_served_from_cache(
    cached: Callable[..., Any], backends: list[Backend], expires: str
) -> None:
    _, _, client = cached()
    for _ in range(2):
        r = client.get("/cache/e", params={"expires": expires})
        assert "hit" not in r.headers["cache-status"]
    assert backends[0].hits == 2
    valid = {"expires": formatdate(time.time() + 3600, usegmt=True)}
    client.get("/cache/e", params=valid)
    assert client.get("/cache/e", params=valid).headers["cache-status"].startswith("pibl; hit")


@pytest.mark.parametrize("age", ["30, 60", "30abc", "30 junk"])
def test_an_age_list_or_junk_uses_its_first_value(
    cached: Callable[..., Any], backends: list[Backend], age: str
) -> None:
    _, _, client = cached()
    url = "/cache/a"
    params = {"cc": "max-age=100", "age": age}
    client.get(url, params=params)
    r = client.get(url, params=params)
    assert r.headers["cache-status"].startswith("pibl; hit; ttl=")
    assert 30 <= int(r.headers["age"]) <= 31
    assert int(r.headers["cache-status"].split("ttl=")[1].split(";")[0]) <= 70


def test_pibl_cache_control_gives_a_ttl_browsers_never_see(
    cached: Callable[..., Any], backends: list[Backend]
) -> None:
    _, _, client = cached()
    params = {"cc": "no-store", "pcc": "max-age=300"}
    first = client.get("/cache/t", params=params)
    second = client.get("/cache/t", params=params)
    assert second.headers["cache-status"].startswith("pibl; hit; ttl=")
    assert backends[0].hits == 1
    # both fields reach the client untouched
    for r in (first, second):
        assert r.headers["cache-control"] == "no-store"
        assert r.headers["pibl-cache-control"] == "max-age=300"


def test_cdn_cache_control_overrides_cache_control(
    cached: Callable[..., Any], backends: list[Backend]
) -> None:
    _, _, client = cached()
    stored = {"cc": "max-age=600", "cdncc": "no-store"}
    client.get("/cache/c1", params=stored)
    assert "hit" not in client.get("/cache/c1", params=stored).headers["cache-status"]
    fresh = {"cc": "private", "cdncc": "max-age=600"}
    client.get("/cache/c2", params=fresh)
    assert client.get("/cache/c2", params=fresh).headers["cache-status"].startswith("pibl; hit")


def test_targeted_fields_can_be_turned_off(
    cached: Callable[..., Any], backends: list[Backend]
) -> None:
    _, _, client = cached(targeted_field="", cdn_cache_control=False)
    params = {"cc": "no-store", "pcc": "max-age=300", "cdncc": "max-age=300"}
    client.get("/cache/off", params=params)
    assert "hit" not in client.get("/cache/off", params=params).headers["cache-status"]


# -- ranges from the cache ------------------------------------------------------------


def _stored(client: httpx.Client, url: str) -> bytes:
    body = client.get(url, headers={"Accept-Encoding": "identity"}).content
    for _ in range(100):
        r = client.get(url, headers={"Accept-Encoding": "identity"})
        if r.headers["cache-status"].startswith("pibl; hit"):
            return body
        time.sleep(0.02)
    raise AssertionError("never stored")


@pytest.mark.parametrize("size", [5000, 2_500_000])  # memory/disk read, and sendfile
def test_a_range_of_a_stored_response_is_answered_from_the_cache(
    cached: Callable[..., Any], backends: list[Backend], size: int
) -> None:
    _, _, client = cached()
    url = f"/cache/r?cc=max-age=60&size={size}&etag=%22v1%22"
    body = _stored(client, url)
    hits_before = backends[0].hits
    for spec, first, last in [
        ("bytes=0-9", 0, 9),
        (f"bytes={size - 100}-", size - 100, size - 1),
        ("bytes=-42", size - 42, size - 1),
        (f"bytes=1000-{size * 2}", 1000, size - 1),
    ]:
        r = client.get(url, headers={"Range": spec, "Accept-Encoding": "identity"})
        assert r.status_code == 206, spec
        assert r.headers["content-range"] == f"bytes {first}-{last}/{size}"
        assert r.content == body[first : last + 1]
        assert r.headers["cache-status"].startswith("pibl; hit")
    assert backends[0].hits == hits_before  # all from the cache


def test_if_range_and_several_ranges_get_the_whole_body(
    cached: Callable[..., Any], backends: list[Backend]
) -> None:
    _, _, client = cached()
    url = "/cache/ir?cc=max-age=60&size=3000&etag=%22v1%22"
    body = _stored(client, url)
    ident = {"Accept-Encoding": "identity"}
    same = client.get(url, headers={"Range": "bytes=0-1", "If-Range": '"v1"', **ident})
    assert same.status_code == 206 and same.content == body[:2]
    other = client.get(url, headers={"Range": "bytes=0-1", "If-Range": '"v2"', **ident})
    assert other.status_code == 200 and other.content == body
    several = client.get(url, headers={"Range": "bytes=0-1,5-6", **ident})
    assert several.status_code == 200 and several.content == body
    assert several.headers["accept-ranges"] == "bytes"


def test_an_unsatisfiable_range_gets_416_with_the_length(
    cached: Callable[..., Any], backends: list[Backend]
) -> None:
    _, _, client = cached()
    url = "/cache/u?cc=max-age=60&size=3000"
    _stored(client, url)
    r = client.get(url, headers={"Range": "bytes=5000-", "Accept-Encoding": "identity"})
    assert r.status_code == 416
    assert r.headers["content-range"] == "bytes */3000"


def test_a_range_miss_is_passed_on_and_not_stored(
    cached: Callable[..., Any], backends: list[Backend]
) -> None:
    _, _, client = cached()
    url = "/cache/m?cc=max-age=60&size=3000"
    r = client.get(url, headers={"Range": "bytes=0-9"})
    assert r.headers["cache-status"] == "pibl; fwd=miss; detail=range"
    assert ("Range", "bytes=0-9") in [(k, v) for k, v in backends[0].seen[-1].headers]
    again = client.get(url)  # the first full request is a miss: nothing was stored
    assert again.headers["cache-status"].startswith("pibl; fwd=miss")
