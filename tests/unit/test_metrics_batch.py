"""Batched metric updates give exactly what one library call per update gives."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pibl.observe.metrics import LATENCY_BUCKETS, Batch

values = st.floats(min_value=0, max_value=30, allow_nan=False)


def _metrics() -> tuple[CollectorRegistry, Counter, Histogram]:
    registry = CollectorRegistry()
    counter = Counter("c", "a counter", ["k"], registry=registry)
    histogram = Histogram("h", "a histogram", ["k"], buckets=LATENCY_BUCKETS, registry=registry)
    return registry, counter, histogram


@given(st.lists(st.tuples(st.sampled_from("ab"), values), max_size=60))
def test_flushed_batch_equals_direct_updates(samples: list[tuple[str, float]]) -> None:
    direct, d_counter, d_hist = _metrics()
    batched, b_counter, b_hist = _metrics()
    batch = Batch()
    for key, value in samples:
        d_counter.labels(key).inc(value)
        d_hist.labels(key).observe(value)
        batch.inc(b_counter.labels(key), value)
        batch.observe_all(b_hist.labels(key), [value])
    # bucket bounds themselves land in their own bucket (le is "less or equal")
    for bound in LATENCY_BUCKETS:
        d_hist.labels("a").observe(bound)
        batch.observe_all(b_hist.labels("a"), [bound])
    batch.flush()
    assert _samples(batched) == _samples(direct)


def _samples(registry: CollectorRegistry) -> list[tuple[str, dict[str, str], float]]:
    return [
        (s.name, s.labels, s.value)
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")  # when each child was made, not what it counted
    ]


def test_nothing_reaches_the_library_before_a_flush() -> None:
    registry, counter, histogram = _metrics()
    batch = Batch()
    batch.inc(counter.labels("a"), 3)
    batch.observe_all(histogram.labels("a"), [0.2])
    assert registry.get_sample_value("c_total", {"k": "a"}) == 0.0
    batch.flush()
    assert registry.get_sample_value("c_total", {"k": "a"}) == 3.0
    assert registry.get_sample_value("h_count", {"k": "a"}) == 1.0
    batch.flush()  # a second flush adds nothing
    assert registry.get_sample_value("c_total", {"k": "a"}) == 3.0


def test_tracked_gauges_are_read_at_each_flush() -> None:
    registry = CollectorRegistry()
    gauge = Gauge("g", "a gauge", registry=registry)
    open_now = [3]
    batch = Batch()
    batch.track(gauge, lambda: open_now[0])
    batch.flush()
    assert registry.get_sample_value("g") == 3.0
    open_now[0] = 1
    batch.flush()
    assert registry.get_sample_value("g") == 1.0
