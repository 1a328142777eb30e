"""Live status of the proxy for the admin API, the dashboard and ``pibl status``.

Each worker knows only its own traffic and health view. Once a second it writes a small
JSON snapshot to the shared state directory (the one the metrics use); any worker that
answers ``/api/status`` merges the snapshots of the live workers. Operator actions
(drain, disable, enable a backend) go the other way: they are written to ``control.json``
in the same directory and every worker applies the newest version within a second. In a
single process (tests, the demo) the same code runs without files.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pibl.proxy.exchange import Proxy

HISTORY = 120  # seconds of per-second samples kept for the charts


class StatusTracker:
    """Per-worker counters and a short per-second history for the charts."""

    def __init__(self, proxy: Proxy, state_dir: Path | None) -> None:
        self.proxy = proxy
        self.state_dir = state_dir
        self.started = time.time()
        self.requests = 0
        self.by_class: dict[str, int] = {}
        self.cache: dict[str, int] = {}
        self.latency_sum = 0.0
        self.backend_latency: dict[str, float] = {}  # EWMA of upstream response time
        self.backend_requests: dict[str, int] = {}
        self.backend_errors: dict[str, int] = {}
        self.route_requests: dict[str, int] = {}
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self._last = (0, 0.0, 0, 0)  # requests, latency sum, hits, cacheable
        self._control_version = -1

    # -- fed by the exchange ----------------------------------------------------------

    def record(
        self,
        status: int,
        backend: str,
        cache: str,
        route: str,
        totals: list[float],
        upstreams: list[float],
    ) -> None:
        """Exchanges with these labels: their total times, and their backend's response
        times where one answered (``Proxy.flush_tallies``)."""
        count = len(totals)
        self.requests += count
        self.route_requests[route] = self.route_requests.get(route, 0) + count
        klass = f"{status // 100}xx" if status else "aborted"
        self.by_class[klass] = self.by_class.get(klass, 0) + count
        self.latency_sum += sum(totals)
        if cache != "-":
            self.cache[cache] = self.cache.get(cache, 0) + count
        if backend:
            self.backend_requests[backend] = self.backend_requests.get(backend, 0) + count
            if status >= 500 or status == 0:
                self.backend_errors[backend] = self.backend_errors.get(backend, 0) + count
            for upstream in upstreams:
                old = self.backend_latency.get(backend, upstream)
                self.backend_latency[backend] = old * 0.8 + upstream * 0.2

    # -- once a second ----------------------------------------------------------------

    def tick(self) -> None:
        """Append a history sample, publish the snapshot, apply operator actions."""
        hits = self.cache.get("HIT", 0) + self.cache.get("STALE", 0)
        cacheable = sum(v for k, v in self.cache.items() if k != "BYPASS")
        requests, latency_sum, last_hits, last_cacheable = self._last
        n = self.requests - requests
        self.history.append(
            {
                "t": round(time.time(), 3),
                "requests": n,
                "latency_ms": round((self.latency_sum - latency_sum) / n * 1000, 3) if n else None,
                "hits": hits - last_hits,
                "cacheable": cacheable - last_cacheable,
            }
        )
        self._last = (self.requests, self.latency_sum, hits, cacheable)
        if self.state_dir is not None:
            with contextlib.suppress(OSError):
                write_json(self.state_dir / f"status-{os.getpid()}.json", self.snapshot())
            self.apply_control()

    def snapshot(self) -> dict[str, Any]:
        proxy = self.proxy
        proxy.flush_tallies()  # the exchanges finished since the last second count too
        now = time.monotonic()
        if proxy.shadow is not None:
            proxy.shadow.adopt()  # holds set by another worker show here at once
        backends = []
        for backend, state, group in zip(proxy.backends, proxy.states, proxy.group_of, strict=True):
            name = state.name
            backends.append(
                {
                    "name": name,
                    "pool": group.name,
                    "url": backend.url,
                    "state": state.state(now),
                    "weight": state.weight,
                    "requests": self.backend_requests.get(name, 0),
                    "errors": self.backend_errors.get(name, 0),
                    "active": state.active,
                    "ejections": state.ejections,
                    "latency_ms": round(self.backend_latency.get(name, 0.0) * 1000, 3),
                }
            )
        store = proxy.cache.store if proxy.cache is not None else None
        return {
            "pid": os.getpid(),
            "time": time.time(),
            "started": self.started,
            "connections": len(proxy.connections),
            "in_flight": proxy.in_flight,
            "log_dropped": proxy.log.dropped,  # lines lost to a full or unwritable log file
            "requests": self.requests,
            "by_class": self.by_class,
            "cache": self.cache,
            "cache_store": (
                {"entries": store.stats.entries, "bytes": store.stats.bytes}
                if store is not None
                else None
            ),
            "backends": backends,
            "panic": proxy.panicking,  # passive ejections ignored (panic_threshold)
            # [consistency]: shadow comparisons and the divergences found by this worker
            "consistency": proxy.shadow.snapshot() if proxy.shadow is not None else None,
            "routes": [
                {
                    "name": r.name,
                    "target": r.pool or ("redirect" if r.redirect else "respond"),
                    "requests": self.route_requests.get(r.name, 0),
                }
                for r in proxy.router.routes
            ],
            "pools": [
                {
                    "name": g.name,
                    "backends": len(g.backends),
                    "maxconn": g.maxconn,
                    "queued": g.queued,
                    "rejected": g.rejected,
                    "panic": g.balancer.panicking,
                }
                for g in proxy.groups.values()
            ],
            "history": list(self.history),
        }

    # -- operator actions -------------------------------------------------------------

    def apply_control(self) -> None:
        if self.state_dir is None:
            return
        control = read_json(self.state_dir / "control.json")
        if control is None or control.get("version", -1) == self._control_version:
            return
        self._control_version = int(control.get("version", 0))
        flags = control.get("backends", {})
        for state in self.proxy.states:
            wanted = flags.get(state.name, {})
            state.draining = bool(wanted.get("draining", False))
            state.disabled = bool(wanted.get("disabled", False))

    def set_backend_flags(self, name: str, **flags: bool) -> bool:
        """Apply here at once and publish for the other workers."""
        states = [s for s in self.proxy.states if s.name == name]
        if not states:
            return False
        for flag, value in flags.items():
            setattr(states[0], flag, value)
        if self.state_dir is not None:
            path = self.state_dir / "control.json"
            control = read_json(path) or {"version": 0, "backends": {}}
            entry = control.setdefault("backends", {}).setdefault(name, {})
            entry.update(flags)
            control["version"] = int(control.get("version", 0)) + 1
            self._control_version = control["version"]
            write_json(path, control)
        return True

    # -- merging ------------------------------------------------------------------------

    def merged(self) -> dict[str, Any]:
        """This worker's snapshot, or all live workers' merged when there are several."""
        mine = self.snapshot()
        if self.state_dir is None:
            return merge([mine])
        snapshots = [mine]
        for path in self.state_dir.glob("status-*.json"):
            if path.name == f"status-{os.getpid()}.json":
                continue
            data = read_json(path)
            if data is None or time.time() - float(data.get("time", 0)) > 5:
                continue  # a worker that stopped writing is gone
            snapshots.append(data)
        return merge(snapshots)


def merge(snapshots: list[dict[str, Any]]) -> dict[str, Any]:
    first = snapshots[0]
    out: dict[str, Any] = {
        "workers": len(snapshots),
        "pids": sorted(s["pid"] for s in snapshots),
        "started": min(s["started"] for s in snapshots),
        "time": max(s["time"] for s in snapshots),
        "connections": sum(s["connections"] for s in snapshots),
        "in_flight": sum(s["in_flight"] for s in snapshots),
        "log_dropped": sum(s.get("log_dropped", 0) for s in snapshots),
        "requests": sum(s["requests"] for s in snapshots),
        "by_class": _sum_dicts([s["by_class"] for s in snapshots]),
        "cache": _sum_dicts([s["cache"] for s in snapshots]),
        "cache_store": first.get("cache_store"),
        # workers in a balancer panic (passive ejections ignored, [health] panic_threshold)
        "panic": sum(1 for s in snapshots if s.get("panic")),
        "consistency": _merge_consistency(snapshots),
    }
    backends = []
    for i, b in enumerate(first["backends"]):
        rows = [s["backends"][i] for s in snapshots if i < len(s["backends"])]
        total = sum(r["requests"] for r in rows)
        latency = sum(r["latency_ms"] * r["requests"] for r in rows) / total if total else 0.0
        states = {r["state"] for r in rows}
        backends.append(
            {
                **b,
                "state": b["state"] if len(states) == 1 else "/".join(sorted(states)),
                "requests": total,
                "errors": sum(r["errors"] for r in rows),
                "active": sum(r["active"] for r in rows),
                "ejections": sum(r["ejections"] for r in rows),
                "latency_ms": round(latency, 3),
            }
        )
    out["backends"] = backends
    out["routes"] = [
        {**r, "requests": sum(s["routes"][i]["requests"] for s in snapshots if "routes" in s)}
        for i, r in enumerate(first.get("routes", []))
    ]
    out["pools"] = [
        {
            **g,
            "queued": sum(s["pools"][i]["queued"] for s in snapshots if "pools" in s),
            "rejected": sum(s["pools"][i]["rejected"] for s in snapshots if "pools" in s),
            "panic": any(s["pools"][i]["panic"] for s in snapshots if "pools" in s),
        }
        for i, g in enumerate(first.get("pools", []))
    ]
    # history: sum the per-second samples of all workers, aligned on whole seconds
    buckets: dict[int, dict[str, Any]] = {}
    for s in snapshots:
        for sample in s.get("history", []):
            second = int(sample["t"])
            slot = buckets.setdefault(
                second, {"t": second, "requests": 0, "hits": 0, "cacheable": 0, "lat": 0.0}
            )
            slot["requests"] += sample["requests"]
            slot["hits"] += sample["hits"]
            slot["cacheable"] += sample["cacheable"]
            if sample["latency_ms"] is not None:
                slot["lat"] += sample["latency_ms"] * sample["requests"]
    history = []
    for second in sorted(buckets):
        slot = buckets[second]
        n = slot["requests"]
        cacheable = slot["cacheable"]
        history.append(
            {
                "t": second,
                "requests": n,
                "latency_ms": round(slot["lat"] / n, 3) if n else None,
                "hit_ratio": round(slot["hits"] / cacheable, 4) if cacheable else None,
            }
        )
    out["history"] = history
    return out


def _merge_consistency(snapshots: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The workers' consistency checks as one: counts summed, one report per URL and
    replica (whichever worker found it)."""
    from pibl.balance.consistency import merge_reports

    parts = [s["consistency"] for s in snapshots if s.get("consistency")]
    if not parts:
        return None
    versions: dict[str, str] = {}
    for p in parts:
        versions.update(p.get("versions") or {})
    return {
        "sample": parts[0].get("sample"),
        "on_divergence": parts[0].get("on_divergence"),
        "shadow": _sum_dicts([p.get("shadow") or {} for p in parts]),
        "versions": versions,
        "divergences": merge_reports(p.get("divergences") or [] for p in parts),
    }


def _sum_dicts(dicts: list[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class ProxyAdmin:
    """What the admin listener can ask of, and do to, one worker (see pibl/observe/admin.py)."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def status(self) -> dict[str, Any]:
        return self.proxy.status.merged()

    def metrics(self) -> bytes:
        return self.proxy.metrics.exposition()

    # One model for the operator: ``drain`` (no new requests, in-flight ones finish) and
    # ``disable`` take a backend out of service; ``enable`` returns it from either.
    # ``undrain`` is an older name of ``enable``.

    def drain(self, backend: str, on: bool = True) -> bool:
        """Stop sending new requests to ``backend`` (in-flight ones finish); off: enable it."""
        if not on:
            return self.set_enabled(backend, True)
        return self.proxy.status.set_backend_flags(backend, draining=True)

    def set_enabled(self, backend: str, enabled: bool) -> bool:
        """Disable ``backend``, or return it to service whether it was drained or disabled."""
        if enabled:
            return self.proxy.status.set_backend_flags(backend, draining=False, disabled=False)
        return self.proxy.status.set_backend_flags(backend, disabled=True)

    def purge(self, url: str | None) -> int:
        """Remove one URL's cached entry (as clients request it) or everything (None)."""
        from urllib.parse import urlsplit

        from pibl.cache.key import primary_key

        cache = self.proxy.cache
        if cache is None:
            return 0
        remote = cache.remote
        if url is None:
            if remote is not None:
                remote.spawn(remote.purge(None))
            return cache.store.purge_all()
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{url!r} is not an http(s) URL")
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        key = primary_key(parts.scheme.encode(), parts.netloc.encode(), target.encode())
        if remote is not None:
            remote.spawn(remote.purge(key))
        return 1 if cache.store.invalidate(key) else 0
