"""The pure core of the consistency checks: sampling, fingerprints, verdicts, replay, holds."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pibl.balance.consistency import (
    DIVERGENT,
    IN_ROTATION,
    REPLAY_SLOTS,
    VERIFYING,
    Fingerprint,
    Holds,
    ReplayEntry,
    ReplayRing,
    Rules,
    Votes,
    decode_entry,
    difference,
    encode_entry,
    fingerprint,
    first_report,
    forget_report,
    may_hold,
    merge_reports,
    report_key,
    sampled,
    verdict,
    version_verdict,
)
from pibl.config import ConsistencyConfig, validate
from pibl.errors import ConfigError

HTML = [(b"Content-Type", b"text/html; charset=utf-8")]


def rules(**kw: object) -> Rules:
    return Rules.from_config(ConsistencyConfig(**kw))  # type: ignore[arg-type]


# -- sampling ----------------------------------------------------------------------------


def test_sampling_follows_the_draw_and_the_share() -> None:
    r = rules(sample=0.01)
    assert sampled(r, 0.005, b"GET", b"/", [])
    assert not sampled(r, 0.5, b"GET", b"/", [])
    assert not sampled(rules(sample=0.0), 0.0, b"GET", b"/", [])


@pytest.mark.parametrize("method", [b"POST", b"PUT", b"DELETE", b"PATCH"])
def test_only_configured_methods(method: bytes) -> None:
    assert not sampled(rules(sample=1.0), 0.0, method, b"/", [])


def test_credentials_and_cookies_are_not_shadowed_unless_configured() -> None:
    for field in (b"Cookie", b"authorization"):
        assert not sampled(rules(sample=1.0), 0.0, b"GET", b"/", [(field, b"x")])
        assert sampled(rules(sample=1.0, credentials=True), 0.0, b"GET", b"/", [(field, b"x")])


def test_skipped_paths() -> None:
    r = rules(sample=1.0, skip_paths=["/api/live", "/admin"])
    assert not sampled(r, 0.0, b"GET", b"/api/live?x", [])
    assert not sampled(r, 0.0, b"GET", b"/admin/", [])
    assert sampled(r, 0.0, b"GET", b"/api/info", [])


@given(st.floats(min_value=0.0, max_value=1.0), st.floats(min_value=0.0, max_value=0.999))
def test_sampling_is_exactly_draw_below_share(share: float, draw: float) -> None:
    assert sampled(rules(sample=share), draw, b"GET", b"/", []) == (draw < share)


# -- fingerprints --------------------------------------------------------------------------


def test_fingerprint_compares_status_body_and_listed_fields_only() -> None:
    r = rules()
    a = fingerprint(r, 200, [*HTML, (b"Date", b"Mon"), (b"X-Replica", b"r1")], b"hello")
    b = fingerprint(r, 200, [*HTML, (b"Date", b"Tue"), (b"X-Replica", b"r2")], b"hello")
    assert a.same(b)
    assert not a.same(fingerprint(r, 404, HTML, b"hello"))
    assert not a.same(fingerprint(r, 200, HTML, b"hellO"))
    assert not a.same(fingerprint(r, 200, [(b"Content-Type", b"text/plain")], b"hello"))


def test_all_fields_but_the_volatile_ones() -> None:
    r = rules(headers=["*"])
    a = fingerprint(r, 200, [*HTML, (b"Date", b"1"), (b"ETag", b'"a"'), (b"X-App", b"1")], b"")
    b = fingerprint(r, 200, [*HTML, (b"Date", b"2"), (b"ETag", b'"b"'), (b"X-App", b"1")], b"")
    c = fingerprint(r, 200, [*HTML, (b"X-App", b"2")], b"")
    assert a.same(b)
    assert not a.same(c)
    assert "x-app" in difference(a, c)


def test_ignore_body_removes_volatile_parts_of_text_bodies_only() -> None:
    r = rules(ignore_body="<time>[^<]*</time>")
    one = b"<p>page</p><time>2024-01-01T00:00:00</time>"
    two = b"<p>page</p><time>2024-01-01T00:00:01</time>"
    assert fingerprint(r, 200, HTML, one).same(fingerprint(r, 200, HTML, two))
    binary = [(b"Content-Type", b"application/octet-stream")]
    assert not fingerprint(r, 200, binary, one).same(fingerprint(r, 200, binary, two))
    coded = [*HTML, (b"Content-Encoding", b"gzip")]
    assert not fingerprint(r, 200, coded, one).same(fingerprint(r, 200, coded, two))
    # without the expression the timestamps make them differ
    assert not fingerprint(rules(), 200, HTML, one).same(fingerprint(rules(), 200, HTML, two))


@given(st.binary(max_size=2048), st.binary(max_size=2048))
def test_digest_equality_is_body_equality(a: bytes, b: bytes) -> None:
    r = rules()
    assert fingerprint(r, 200, HTML, a).same(fingerprint(r, 200, HTML, b)) == (a == b)


def test_difference_names_status_length_digests_and_first_field() -> None:
    a = Fingerprint(200, 10, "a" * 32, (("content-type", "text/html"),))
    b = Fingerprint(500, 12, "b" * 32, (("content-type", "text/plain"),))
    text = difference(a, b)
    assert "status 200 vs 500" in text and "length 10 vs 12" in text
    assert "aaaaaaaaaaaa vs bbbbbbbbbbbb" in text
    assert "content-type: 'text/html' vs 'text/plain'" in text


# -- the verdict ----------------------------------------------------------------------------

A = Fingerprint(200, 1, "a")
B = Fingerprint(200, 1, "b")
C = Fingerprint(200, 1, "c")


def test_majority_names_the_outlier() -> None:
    out = verdict({"r1": A, "r2": A, "r3": B})
    assert out.outliers == ("r3",) and set(out.agreeing) == {"r1", "r2"} and out.expected == A


def test_two_replicas_cannot_tell() -> None:
    assert verdict({"r1": A, "r2": B}).undecided
    assert verdict({"r1": A, "r2": B, "r3": C}).undecided  # a three-way split
    assert verdict({"r1": A, "r2": A}).outliers == ()


@given(
    st.dictionaries(
        st.sampled_from(["r1", "r2", "r3", "r4", "r5"]), st.sampled_from([A, B, C]), min_size=1
    )
)
def test_an_agreeing_replica_is_never_an_outlier(answers: dict[str, Fingerprint]) -> None:
    out = verdict(answers)
    assert not set(out.outliers) & set(out.agreeing)
    if out.outliers:
        assert len(out.agreeing) * 2 > len(answers) and len(out.agreeing) >= 2
        for name in out.outliers:
            assert not answers[name].same(answers[out.agreeing[0]])
    if len({fp.digest for fp in answers.values()}) == 1:
        assert out.outliers == () and not out.undecided


def test_votes_forget_answers_older_than_the_window() -> None:
    votes = Votes(window=10)
    votes.record("/x", "r3", B, now=0.0)
    votes.record("/x", "r1", A, now=5.0)
    assert votes.record("/x", "r2", A, now=8.0).outliers == ("r3",)
    assert votes.record("/x", "r2", A, now=20.0).outliers == ()  # r3's answer is too old
    assert votes.seen("/x", 20.0) == {"r2"}


def test_votes_are_bounded() -> None:
    votes = Votes(max_urls=3)
    for i in range(10):
        votes.record(f"/{i}", "r1", A, now=0.0)
    assert len(votes) == 3


def test_version_verdict() -> None:
    assert version_verdict({"r1": "1.0", "r2": "1.0", "r3": "0.9"}).outliers == ("r3",)


def test_reports_merge_one_per_url_and_replica() -> None:
    one = {
        "backend": "r3",
        "url": "/",
        "diff": "x",
        "first_seen": 1.0,
        "last_seen": 2.0,
        "count": 1,
    }
    two = {**one, "diff": "y", "first_seen": 0.5, "last_seen": 3.0, "count": 2}
    merged = merge_reports([[one], [two]])
    assert merged == [{**one, "diff": "y", "first_seen": 0.5, "last_seen": 3.0, "count": 3}]


def test_first_report_once_per_key() -> None:
    table = [0] * 16
    key = report_key("r3", "/about")
    assert first_report(table, key)
    assert not first_report(table, key)
    forget_report(table, key)
    assert first_report(table, key)


# -- replay ----------------------------------------------------------------------------------


def entry(
    target: str, digest: str = "a", *, hot: bool = False, pool: str = "default"
) -> ReplayEntry:
    return ReplayEntry(
        pool, "GET", target, "example", (("accept", "*/*"),), Fingerprint(200, 1, digest), hot
    )


def test_entry_round_trip_and_size_bound() -> None:
    e = entry("/a?b=c", hot=True)
    data = encode_entry(e)
    assert data is not None and decode_entry(data + b"\0" * 10) == e
    assert encode_entry(entry("/" + "x" * 4096)) is None
    assert decode_entry(b"\x00\x05abc") is None


def test_ring_keeps_the_newest_one_per_url_hot_first() -> None:
    ring = ReplayRing()
    for i in range(REPLAY_SLOTS + 10):
        ring.add(entry(f"/{i}"))
    ring.add(entry("/hot", hot=True))
    ring.add(entry("/5", "b"))
    ring.add(entry("/5", "c"))
    found = ring.entries("default")
    assert len(found) == REPLAY_SLOTS  # bounded
    assert found[0].target == "/hot"
    assert [e.expected.digest for e in found if e.target == "/5"] == ["c"]
    for i in range(2 * REPLAY_SLOTS):
        ring.add(entry(f"/new{i}"))
    assert ring.entries("default")[0].target == "/hot"  # hot ones outlive ordinary ones
    recent = ring.to_replay("default", 3)
    assert [e.target for e in recent][:1] == ["/hot"] and len(recent) == 4
    assert ring.to_replay("other", 3) == []


def test_ring_keeps_the_hot_mark_while_the_answer_is_the_same() -> None:
    ring = ReplayRing()
    ring.add(entry("/x", hot=True))
    ring.add(entry("/x"))
    assert ring.entries("default")[0].hot


@given(st.lists(st.tuples(st.integers(0, 200), st.booleans()), max_size=300))
def test_ring_never_holds_two_entries_for_one_url(adds: list[tuple[int, bool]]) -> None:
    ring = ReplayRing()
    for n, hot in adds:
        ring.add(entry(f"/{n}", hot=hot))
    targets = [e.target for e in ring.entries("default")]
    assert len(targets) == len(set(targets)) <= REPLAY_SLOTS


# -- holds -----------------------------------------------------------------------------------


def test_a_return_is_verified_once_and_released() -> None:
    holds = Holds.local(3)
    assert holds.begin(1, 100.0, grace=5.0)
    assert holds.hold[1] == VERIFYING
    assert not holds.begin(1, 100.2, grace=5.0)  # another worker's checks: already held
    assert not holds.claim(1, 100.5, recheck=10, stale=30)  # under way
    holds.release(1, 101.0)
    assert holds.hold[1] == IN_ROTATION
    assert not holds.begin(1, 102.0, grace=5.0)  # verified a moment ago
    assert holds.begin(1, 200.0, grace=5.0)


def test_a_divergent_backend_is_rechecked_when_due() -> None:
    holds = Holds.local(2)
    holds.diverged(0, 10.0)
    assert holds.hold[0] == DIVERGENT
    assert not holds.claim(0, 15.0, recheck=10, stale=30)
    assert holds.claim(0, 20.0, recheck=10, stale=30)
    assert not holds.claim(0, 21.0, recheck=10, stale=30)  # claimed
    assert holds.claim(0, 51.0, recheck=10, stale=30)  # the claim went stale
    holds.mark(1, 0.0)  # added by a reload
    assert holds.claim(1, 0.1, recheck=10, stale=30)


def test_holding_never_goes_below_the_panic_threshold() -> None:
    assert may_hold([True, True, True], 2, 0.5)
    assert not may_hold([True, False, True], 2, 0.5)  # one of three left
    assert may_hold([True, False, True], 2, 0.0)
    assert may_hold([True, True], 1, 0.5)  # one of two is half
    assert not may_hold([False, True], 1, 0.0)  # never the last one


# -- configuration ---------------------------------------------------------------------------


def test_config_errors_name_the_key() -> None:
    base = {"backends": [{"url": "http://127.0.0.1:1"}]}
    cases = {
        "sample": (1.5, "consistency.sample"),
        "on_divergence": ("drop", "consistency.on_divergence"),
        "methods": (["POST"], "consistency.methods"),
        "ignore_body": ("(", "consistency.ignore_body: is not a valid regular expression"),
        "headers": (["Bad Name"], "consistency.headers: 'Bad Name' is not a header field name"),
        "version_path": ("version", "consistency.version_path: must be an origin-form path"),
        "skip_paths": (["x"], "consistency.skip_paths: 'x' must start with /"),
        "typo": (1, "consistency.typo: unknown key"),
    }
    for key, (value, message) in cases.items():
        with pytest.raises(ConfigError) as exc:
            validate({**base, "consistency": {key: value}}, "pibl.toml")
        assert f"pibl.toml: {message}" in str(exc.value)


def test_config_defaults() -> None:
    cfg = ConsistencyConfig()
    assert not cfg.enabled and not cfg.verifies_return
    assert ConsistencyConfig(sample=0.01).verifies_return
    assert not ConsistencyConfig(sample=0.01, verify_return=False).verifies_return
    assert ConsistencyConfig(max_body="2M").max_body == 2 * 1024 * 1024
