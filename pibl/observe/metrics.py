"""Prometheus metrics through the official client library, correct with several workers.

With one process the metrics live in a registry of their own (several proxies can exist
in one test process). With worker processes the master sets ``PROMETHEUS_MULTIPROC_DIR``
before any worker starts; each worker then writes its samples to memory-mapped files in
that directory and whichever worker answers ``/metrics`` merges them all with the
library's ``MultiProcessCollector`` — counters are summed, gauges use the mode noted on
each one. The master wipes the directory at start so a restart begins from zero.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    values,
)
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from pibl.procs import MULTIPROC_ENV

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def multiprocess_dir() -> Path | None:
    value = os.environ.get(MULTIPROC_ENV)
    return Path(value) if value else None


def worker_exited(pid: int) -> None:
    """Drop a dead worker's live gauges (its counters keep counting in the sums)."""
    if multiprocess_dir() is not None:
        mark_process_dead(pid)  # type: ignore[no-untyped-call]


class Batch:
    """Per-request metric updates added up in plain Python, handed to the library in one go.

    With worker processes every library update takes a lock, calls ``getpid()`` and writes
    a memory-mapped file; per request that cost a fifth of PIBL's CPU (bench/compare.py:
    149 against 117 us per 1 KB request). The exchange records here; the worker flushes
    once a second and before it answers ``/metrics``, so a scrape sees its own worker's
    traffic at once and the other workers' within a second.
    """

    def __init__(self) -> None:
        self._counts: dict[Any, float] = {}
        self._histograms: dict[Any, list[float]] = {}  # child -> [sum, count per bucket...]
        self._gauges: list[tuple[Any, Callable[[], float]]] = []
        # runs first at every flush: what was tallied per request elsewhere comes in here
        self.before_flush: Callable[[], None] | None = None

    def track(self, gauge: Any, read: Callable[[], float]) -> None:
        """Set ``gauge`` to ``read()`` at every flush (instead of an update per event)."""
        self._gauges.append((gauge, read))

    def inc(self, child: Any, amount: float = 1.0) -> None:
        counts = self._counts
        counts[child] = counts.get(child, 0.0) + amount

    def observe_all(self, child: Any, values: list[float]) -> None:
        """The histogram ``child`` observes each of ``values`` (at the next flush)."""
        acc = self._histograms.get(child)
        if acc is None:
            acc = self._histograms[child] = [0.0] * (len(child._upper_bounds) + 1)
        bounds = child._upper_bounds
        for value in values:
            acc[0] += value
            # the library's bucket for a value is the first bound >= value (the last is +Inf)
            acc[1 + bisect.bisect_left(bounds, value)] += 1

    def flush(self) -> None:
        if self.before_flush is not None:
            self.before_flush()
        counts, self._counts = self._counts, {}
        histograms, self._histograms = self._histograms, {}
        for gauge, read in self._gauges:
            gauge.set(read())
        for child, amount in counts.items():
            child.inc(amount)
        for child, acc in histograms.items():
            # Histogram.observe() per value would redo the per-update cost; its sum and
            # bucket values take the totals directly (the same values observe() updates).
            child._sum.inc(acc[0])
            for bucket, n in zip(child._buckets, acc[1:], strict=True):
                if n:
                    bucket.inc(n)


class Metrics:
    def __init__(self) -> None:
        self.batch = Batch()
        if multiprocess_dir() is not None and values.ValueClass is values.MutexValue:
            # The library picks its value class when first imported; a worker forked from
            # a master that imported it before setting the directory must switch here.
            values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "pibl_requests",
            "Requests answered, by status class and backend",
            ["code", "backend"],
            registry=r,
        )
        self.latency = Histogram(
            "pibl_request_duration_seconds",
            "Time from a request's head to the end of its response",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_latency = Histogram(
            "pibl_upstream_response_seconds",
            "Time from sending a request to a backend to its response head",
            ["backend"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.bytes_out = Counter(
            "pibl_response_bytes", "Response body bytes sent to clients", registry=r
        )
        self.bytes_in = Counter(
            "pibl_request_bytes", "Request body bytes received from clients", registry=r
        )
        self.connections = Gauge(
            "pibl_client_connections",
            "Open client connections",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.backend_up = Gauge(
            "pibl_backend_up",
            "1 when the backend is in rotation (as seen by the worker that saw it last)",
            ["backend"],
            multiprocess_mode="livemin",
            registry=r,
        )
        self.ejections = Counter(
            "pibl_backend_ejections",
            "Backends taken out by passive checks",
            ["backend"],
            registry=r,
        )
        self.backend_errors = Counter(
            "pibl_backend_errors", "Failed attempts on a backend", ["backend"], registry=r
        )
        self.route_requests = Counter(
            "pibl_route_requests",
            "Requests by the [[routes]] entry they matched, its pool and status class",
            ["route", "pool", "code"],
            registry=r,
        )
        self.connect_refused = Counter(
            "pibl_backend_connects_refused",
            "Connections to a backend that nothing accepted (refused or unreachable)",
            ["backend"],
            registry=r,
        )
        self.panics = Counter(
            "pibl_balancer_panics",
            "Times passive ejections were ignored because too few backends were available",
            registry=r,
        )
        self.panic = Gauge(
            "pibl_balancer_panic",
            "1 while passive ejections are ignored (below [health] panic_threshold)",
            multiprocess_mode="livemax",
            registry=r,
        )
        self.retries = Counter("pibl_retries", "Requests retried on another backend", registry=r)
        self.divergences = Counter(
            "pibl_consistency_divergences",
            "Answers of a backend found different from the other replicas' (majority vote)",
            ["backend"],
            registry=r,
        )
        self.shadow_requests = Counter(
            "pibl_consistency_requests",
            "Requests PIBL sent on its own to compare replicas (kind: shadow, replay), "
            "never counted as client requests",
            ["kind", "result"],
            registry=r,
        )
        self.cache = Counter(
            "pibl_cache_requests",
            "Cacheable requests by outcome (HIT, MISS, STALE, REVALIDATED, EXPIRED, BYPASS)",
            ["result"],
            registry=r,
        )
        self.cache_stored = Counter(
            "pibl_cache_stored", "Responses stored in the cache", registry=r
        )
        self.cache_evictions = Counter(
            "pibl_cache_evictions", "Entries evicted to respect max_size", registry=r
        )
        self.cache_size = Gauge(
            "pibl_cache_size_bytes",
            "Bytes in the cache directory as indexed",
            multiprocess_mode="livemax",
            registry=r,
        )
        self.cache_entries = Gauge(
            "pibl_cache_entries",
            "Entries in the cache directory as indexed",
            multiprocess_mode="livemax",
            registry=r,
        )
        self.redis_errors = Counter(
            "pibl_redis_errors", "Failed calls to the shared Redis cache tier", registry=r
        )
        self.tls_handshakes = Counter(
            "pibl_tls_handshakes", "Completed TLS handshakes with clients", registry=r
        )
        self.h2_connections = Counter(
            "pibl_http2_connections", "Client connections that spoke HTTP/2", registry=r
        )
        self.h2_streams = Counter(
            "pibl_http2_streams", "HTTP/2 request streams opened by clients", registry=r
        )
        self.h2_refused = Counter(
            "pibl_http2_refused_streams",
            "HTTP/2 streams PIBL refused, by reason (malformed, content_length: RST_STREAM "
            "PROTOCOL_ERROR; concurrency: REFUSED_STREAM; header_list: answered 431)",
            ["reason"],
            registry=r,
        )
        self.h2_goaways = Counter(
            "pibl_http2_goaways",
            "HTTP/2 connections PIBL ended with GOAWAY, by reason "
            "(rapid_reset, protocol_error, header_block, idle, ping_timeout, shutdown)",
            ["reason"],
            registry=r,
        )

    def exposition(self) -> bytes:
        """The text format, merged over every worker when there are several."""
        self.batch.flush()
        directory = multiprocess_dir()
        if directory is None:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=str(directory))  # type: ignore[no-untyped-call]
        return generate_latest(merged)
