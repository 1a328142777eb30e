"""The disk cache outlives PIBL: kill -9, restart, answers from disk; crashes never corrupt it."""

from __future__ import annotations

import random
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import (
    Backend,
    free_port,
    sized_body,
    start_backend,
    start_pibl_process,
    wait_closed,
    wait_port,
    write_config,
)

pytestmark = pytest.mark.e2e


def origin_bytes(size: int) -> bytes:
    return sized_body(size)


class Pibl:
    def __init__(self, workdir: Path, backends: list[str], extra: str = "") -> None:
        self.workdir = workdir
        self.port = free_port()
        self.config = write_config(
            workdir / "pibl.toml",
            self.port,
            backends,
            "[log]\nstdout = false\n" + extra,
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *args: str) -> None:
        self.proc = start_pibl_process(self.config, self.workdir, *args)
        wait_port(self.port)

    def kill9(self) -> None:
        """kill -9 of the master; its workers follow it (parent-death signal) a moment
        later, so wait until nothing listens any more: a new master must not be taken for
        ready because a dying worker still accepted a connection."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        wait_closed(self.port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def pibl_factory(tmp_path: Path) -> Iterator[list[Pibl]]:
    made: list[Pibl] = []
    yield made
    for p in made:
        p.stop()


def test_cache_survives_kill9_with_backends_down(
    tmp_path: Path, backends: list[Backend], pibl_factory: list[Pibl]
) -> None:
    pibl = Pibl(tmp_path, [b.url for b in backends], "[cache]\nmax_stale_on_error = 0\n")
    pibl_factory.append(pibl)
    pibl.start("--cache-ttl", "120")
    urls = [
        "/cache/small?cc=max-age=300",
        "/cache/plain",  # no freshness of its own: the launch-time TTL applies
        "/cache/big?size=3000000",
        "/cache/v?vary=Accept-Language&cc=max-age=300",
        "/cache/short?cc=max-age=2",
    ]
    bodies: dict[str, bytes] = {}
    with httpx.Client(base_url=pibl.url, timeout=30) as client:
        for url in urls:
            bodies[url] = client.get(url, headers={"Accept-Language": "es"}).content
        for url in urls:  # wait until each is committed to disk
            deadline = time.monotonic() + 5
            while (
                "hit"
                not in client.get(url, headers={"Accept-Language": "es"}).headers["cache-status"]
            ):
                assert time.monotonic() < deadline, url
                time.sleep(0.05)
    stored_at = time.monotonic()
    pibl.kill9()
    for b in backends:
        b.stop()
    pibl.start("--cache-ttl", "120")
    with httpx.Client(base_url=pibl.url, timeout=30) as client:
        for url in urls[:-1]:
            r = client.get(url, headers={"Accept-Language": "es"})
            assert r.status_code == 200, url
            assert r.content == bodies[url], url
            assert r.headers["cache-status"].startswith("pibl; hit"), url
        # the other variant was never stored: with every backend down it cannot be served
        assert client.get(urls[3], headers={"Accept-Language": "en"}).status_code == 503
        time.sleep(max(0.0, 2.5 - (time.monotonic() - stored_at)))
        r = client.get(urls[-1])
        assert r.status_code == 503  # past its lifetime: never served
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []


def test_kill9_while_writing_never_corrupts(tmp_path: Path, pibl_factory: list[Pibl]) -> None:
    origin = start_backend("origin")
    try:
        pibl = Pibl(tmp_path, [origin.url], "[cache]\nfsync = false\n")
        pibl_factory.append(pibl)
        sizes = [700_000 + 37_000 * i for i in range(24)]
        urls = [f"/cache/w{i}?cc=max-age=600&size={size}" for i, size in enumerate(sizes)]
        expected = {url: origin_bytes(size) for url, size in zip(urls, sizes, strict=True)}
        rng = random.Random(7)
        for _round in range(5):
            pibl.start()
            # once a worker answers, the leftovers of the previous crash are gone
            assert httpx.get(pibl.url + "/cache/probe?cc=no-store", timeout=10).status_code == 200
            assert list((tmp_path / "cache" / "tmp").iterdir()) == []
            stop = threading.Event()

            def load(seed: int, stop: threading.Event = stop) -> None:
                r = random.Random(seed)
                with httpx.Client(base_url=pibl.url, timeout=10) as client:
                    while not stop.is_set():
                        url = r.choice(urls)
                        try:
                            resp = client.get(url)
                        except httpx.HTTPError:
                            return  # PIBL was killed under us
                        if resp.status_code == 200:
                            assert resp.content == expected[url], url

            threads = [threading.Thread(target=load, args=(rng.random(),)) for _ in range(8)]
            for t in threads:
                t.start()
            time.sleep(rng.uniform(0.3, 1.2))
            pibl.kill9()
            stop.set()
            for t in threads:
                t.join(15)
        # After the last crash: everything served equals the origin's bytes.
        pibl.start()
        with httpx.Client(base_url=pibl.url, timeout=30) as client:
            hits = 0
            for url in urls:
                r = client.get(url)
                assert r.status_code == 200
                assert r.content == expected[url], url
                hits += r.headers["cache-status"].startswith("pibl; hit")
        assert hits > 0  # some entries survived the crashes, and none of them was torn
    finally:
        origin.stop()
