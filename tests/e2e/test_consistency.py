"""Consistency of the replicas with real processes: three demo replicas, ``pibl run`` in front.

One replica started "on another release" (``--release``) is found by shadow comparison
and reported with the URL and the difference; with ``on_divergence = "eject"`` it stops
getting traffic; a returning replica is given traffic only when its answers match.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import (
    free_port,
    start_pibl_process,
    stop_process,
    wait_closed,
    wait_port,
    write_config,
)

pytestmark = pytest.mark.e2e

INTERVAL = 0.5
OTHER_RELEASE = "0.0.9-old"


def settings(admin: int, consistency: str) -> str:
    return f"""
[health]
interval = {INTERVAL}
timeout = 0.4
rise = 2
fall = 2
down_interval = 0.25

[cache]
enabled = false

[log]
stdout = false

[admin]
port = {admin}

[consistency]
{consistency}
"""


# the /about page's time is volatile: excluded from the comparison
VOLATILE = "ignore_body = '<time>[^<]*</time>'"


class Replica:
    def __init__(self, name: str, port: int, db: Path, release: str | None = None) -> None:
        self.name, self.port, self.db, self.release = name, port, db, release
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, release: str | None = None) -> None:
        if release is not None:
            self.release = release
        args = [sys.executable, "-m", "webapp", "--name", self.name, "--port", str(self.port)]
        args += ["--db", str(self.db)]
        if self.release is not None:
            args += ["--release", self.release]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, 20)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        wait_closed(self.port)

    @property
    def label(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.label}"


@contextlib.contextmanager
def cluster(
    tmp_path: Path, consistency: str, releases: tuple[str | None, ...] = (None, None, None)
) -> Iterator[tuple[list[Replica], int, int]]:
    db = tmp_path / "gb.sqlite3"
    replicas = [
        Replica(f"replica-{i}", free_port(), db, release)
        for i, release in enumerate(releases, start=1)
    ]
    port, admin = free_port(), free_port()
    cfg = write_config(
        tmp_path / "pibl.toml", port, [r.url for r in replicas], settings(admin, consistency)
    )
    proc = None
    try:
        for r in replicas:
            r.start()
        proc = start_pibl_process(cfg, tmp_path)
        wait_port(port)
        wait_port(admin)
        _wait_workers(admin)
        yield replicas, port, admin
    finally:
        if proc is not None:
            stop_process(proc)
        for r in replicas:
            r.stop()


def _wait_workers(admin: int, timeout: float = 15.0) -> None:
    """Every worker serves (each publishes its status snapshot once a second)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            if status(admin)["workers"] >= 2:
                return
        time.sleep(0.2)
    raise AssertionError("the workers did not all start")


def status(admin: int) -> dict[str, Any]:
    data = httpx.get(f"http://127.0.0.1:{admin}/api/status", timeout=5).json()
    assert isinstance(data, dict)
    return data


def divergences(admin: int) -> list[dict[str, Any]]:
    consistency = status(admin).get("consistency") or {}
    return list(consistency.get("divergences") or [])


def backend_state(admin: int, label: str) -> str:
    return next(b["state"] for b in status(admin)["backends"] if b["name"] == label)


def wait_state(admin: int, label: str, want: str, timeout: float = 10.0) -> bool:
    """Until every worker shows ``want`` for the backend, three reads in a row."""
    deadline = time.monotonic() + timeout
    streak = 0
    while time.monotonic() < deadline and streak < 3:
        streak = streak + 1 if backend_state(admin, label) == want else 0
        time.sleep(0.4)
    return streak >= 3


def log_lines(workdir: Path) -> list[str]:
    return (workdir / "pibl.log").read_text().splitlines()


URLS = ("/about", "/static/style.css", "/version")


def test_replica_on_another_release_is_found_and_reported(tmp_path: Path) -> None:
    with cluster(tmp_path, f"sample = 0.1\n{VOLATILE}", (None, None, OTHER_RELEASE)) as (
        replicas,
        port,
        admin,
    ):
        odd = replicas[2]
        sent = 0
        found: list[dict[str, Any]] = []
        with httpx.Client(timeout=10) as client:
            while sent < 600 and not found:
                for _ in range(10):
                    r = client.get(f"http://127.0.0.1:{port}{URLS[sent % len(URLS)]}")
                    assert r.status_code == 200
                    assert "pibl-shadow" not in r.headers
                    sent += 1
                time.sleep(0.05)  # the comparison runs after the answer, in the background
                found = divergences(admin)
            time.sleep(1.5)  # the other workers' snapshots too
            found = divergences(admin)
        assert found, f"no divergence reported after {sent} requests"
        assert {d["backend"] for d in found} == {odd.label}, found
        report = found[0]
        assert report["url"] in ("/about", "/version")
        assert "digest" in report["diff"] and "length" in report["diff"]
        events = "\n".join(log_lines(tmp_path))
        assert f"consistency: backend {odd.label} differs from the other replicas on" in events
        for good in replicas[:2]:
            assert f"backend {good.label} differs" not in events
        # pibl status shows it too
        out = subprocess.run(
            [sys.executable, "-m", "pibl", "status", "--config", str(tmp_path / "pibl.toml")],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert out.returncode == 0, out.stderr
        assert f"DIVERGENT    {odd.label} on {report['url']}" in out.stdout
        # the metric counts it, the shadow requests are not client requests
        metrics = httpx.get(f"http://127.0.0.1:{admin}/metrics", timeout=5).text
        assert f'pibl_consistency_divergences_total{{backend="{odd.label}"}}' in metrics
        time.sleep(1.2)
        lines = log_lines(tmp_path)
        access = [
            line for line in lines if " rid=" in line and " total=" in line and '"GET ' in line
        ]
        shadows = [line for line in lines if " shadow shadow rid=" in line]
        assert shadows, "no shadow request was logged"
        client_lines = [line for line in access if " shadow " not in line]
        assert len(client_lines) == sent, (len(client_lines), sent)
        assert status(admin)["requests"] == sent
        print(f"divergence reported after {sent} requests; {len(shadows)} shadow requests")


def test_eject_takes_the_odd_replica_out_of_rotation(tmp_path: Path) -> None:
    with cluster(
        tmp_path,
        f'sample = 0.2\non_divergence = "eject"\n{VOLATILE}',
        (None, OTHER_RELEASE, None),
    ) as (replicas, port, admin):
        odd = replicas[1]
        sent = 0
        with httpx.Client(timeout=10) as client:
            while sent < 600 and backend_state(admin, odd.label) != "divergent":
                for _ in range(10):
                    client.get(f"http://127.0.0.1:{port}/about")
                    sent += 1
                time.sleep(0.05)
            assert backend_state(admin, odd.label) == "divergent", f"not ejected after {sent}"
            time.sleep(1.2)  # every worker's snapshot
            assert backend_state(admin, odd.label) == "divergent"
            served = [
                client.get(f"http://127.0.0.1:{port}/about").headers["x-replica"] for _ in range(60)
            ]
        assert odd.name not in served, served
        assert set(served) == {replicas[0].name, replicas[2].name}
        assert {d["backend"] for d in divergences(admin)} == {odd.label}
        events = "\n".join(log_lines(tmp_path))
        assert f"consistency: backend {odd.label} taken out of rotation" in events
        print(f"ejected after {sent} requests")


def test_volatile_content_excluded_gives_no_false_report(tmp_path: Path) -> None:
    with cluster(tmp_path, f"sample = 0.5\n{VOLATILE}") as (_, port, admin):
        with httpx.Client(timeout=10) as client:
            for _ in range(150):
                assert client.get(f"http://127.0.0.1:{port}/about").status_code == 200
        time.sleep(1.5)
        shadow = (status(admin).get("consistency") or {}).get("shadow") or {}
        assert shadow.get("answered", 0) >= 20, shadow  # many comparisons were made
        assert divergences(admin) == []
        assert "answer /about differently" not in "\n".join(log_lines(tmp_path))


def _client_replicas(port: int, n: int) -> list[str]:
    with httpx.Client(timeout=10) as client:
        return [client.get(f"http://127.0.0.1:{port}/about").headers["x-replica"] for _ in range(n)]


def _fill_replay_set(port: int, admin: int) -> None:
    """Traffic until the replicas agreed on /about (kept for replay)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        _client_replicas(port, 20)
        shadow = (status(admin).get("consistency") or {}).get("shadow") or {}
        if shadow.get("answered", 0) >= 6:
            return
        time.sleep(0.3)
    raise AssertionError("no comparisons were made")


def test_returning_replica_with_other_content_stays_out(tmp_path: Path) -> None:
    with cluster(tmp_path, f"sample = 0.5\n{VOLATILE}") as (replicas, port, admin):
        _fill_replay_set(port, admin)
        victim = replicas[2]
        victim.stop()
        time.sleep(4 * INTERVAL)  # down for the health checks
        victim.start(release=OTHER_RELEASE)
        # every worker's view (each worker's own health checks see it come back)
        assert wait_state(admin, victim.label, "divergent"), backend_state(admin, victim.label)
        served = _client_replicas(port, 60)
        time.sleep(2.0)  # longer than its normal return time
        served += _client_replicas(port, 60)
        assert victim.name not in served
        assert any(d["backend"] == victim.label for d in divergences(admin))
        events = "\n".join(log_lines(tmp_path))
        assert f"consistency: backend {victim.label} stays out of rotation" in events


def test_returning_replica_with_the_same_content_is_back(tmp_path: Path) -> None:
    with cluster(tmp_path, f"sample = 0.5\n{VOLATILE}") as (replicas, port, admin):
        _fill_replay_set(port, admin)
        victim = replicas[0]
        victim.stop()
        time.sleep(4 * INTERVAL)
        victim.start()
        restarted = time.monotonic()
        back = None
        while time.monotonic() - restarted < 10 and back is None:
            if victim.name in _client_replicas(port, 6):
                back = time.monotonic() - restarted
        assert back is not None, "the replica never came back"
        # the normal return time is rise x down_interval after the port accepts; the replay
        # of a few requests adds milliseconds
        assert back <= 2 * INTERVAL + 1.0, f"back after {back:.2f} s"
        assert divergences(admin) == []
        events = "\n".join(log_lines(tmp_path))
        assert f"consistency: backend {victim.label} back in rotation" in events
        assert "replayed answers match" in events
        print(f"back in rotation {back:.2f} s after restart")


def test_version_probe_reports_at_once(tmp_path: Path) -> None:
    with cluster(tmp_path, 'version_path = "/version"', (OTHER_RELEASE, None, None)) as (
        replicas,
        _,
        admin,
    ):
        deadline = time.monotonic() + 3 * INTERVAL + 3
        found: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not found:
            found = divergences(admin)
            time.sleep(0.2)
        assert [d["backend"] for d in found] == [replicas[0].label]
        assert found[0]["url"] == "/version"
        assert OTHER_RELEASE in found[0]["diff"]
        versions = status(admin)["consistency"]["versions"]
        assert versions[replicas[0].label] == OTHER_RELEASE
        assert json.dumps(found)  # plain data for the dashboard
