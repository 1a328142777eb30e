"""Cache hits of every size, byte for byte, under every event loop PIBL supports.

PIBL runs as a user runs it (``pibl run``, its defaults: uvloop where installed) and again
with ``event_loop = "asyncio"``. Bodies are random bytes: a repetitive body is stored
compressed in a few hundred bytes and would never reach the large-body path.
"""

from __future__ import annotations

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
    stop_process,
    wait_closed,
    wait_port,
    write_config,
)

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
# name -> (URL, expected body): Content-Length origins of 100 B .. 8 MiB, a chunked one
SIZES = [100, 100_000, MiB, 8 * MiB]
CHUNKED = 3 * MiB


def urls() -> dict[str, int]:
    out = {f"/cache/s{size}?cc=max-age=600&size={size}": size for size in SIZES}
    out[f"/download?size={CHUNKED}&chunked=1"] = CHUNKED  # no freshness: the --cache-ttl
    return out


@pytest.fixture(scope="module")
def bodies() -> dict[int, bytes]:
    return {size: sized_body(size) for size in [*SIZES, CHUNKED]}


@pytest.fixture
def origin() -> Iterator[Backend]:
    b = start_backend("origin")
    yield b
    b.stop()


def start(
    tmp_path: Path, origin: Backend, loop: str, port: int = 0
) -> tuple[subprocess.Popen[bytes], int]:
    """``pibl run`` with the defaults, or with ``event_loop = loop``; same port on restart
    (the Host is part of the cache key)."""
    port = port or free_port()
    config = write_config(tmp_path / "pibl.toml", port, [origin.url], "[log]\nstdout = false\n")
    if loop != "default":
        text = config.read_text().replace("[server]\n", f'[server]\nevent_loop = "{loop}"\n', 1)
        config.write_text(text)
    proc = start_pibl_process(config, tmp_path, "--cache-ttl", "600")
    wait_port(port)
    return proc, port


def fetch_all(base: str, bodies: dict[int, bytes], want_hit: bool) -> None:
    with httpx.Client(base_url=base, timeout=30) as client:
        for url, size in urls().items():
            for attempt in range(3):
                r = client.get(url)
                assert r.status_code == 200, (url, attempt, r.headers, r.text[:200])
                assert len(r.content) == size, (url, attempt, len(r.content))
                assert r.content == bodies[size], (url, attempt)
                if want_hit:
                    assert r.headers["cache-status"].startswith("pibl; hit"), (url, attempt)


def wait_stored(base: str) -> None:
    with httpx.Client(base_url=base, timeout=30) as client:
        for url in urls():
            deadline = time.monotonic() + 10
            while "hit" not in client.get(url).headers["cache-status"]:
                assert time.monotonic() < deadline, url
                time.sleep(0.05)


@pytest.mark.parametrize("loop", ["default", "asyncio"])
def test_hits_of_every_size_are_whole_before_and_after_kill9(
    tmp_path: Path, origin: Backend, bodies: dict[int, bytes], loop: str
) -> None:
    proc, port = start(tmp_path, origin, loop)
    base = f"http://127.0.0.1:{port}"
    try:
        fetch_all(base, bodies, want_hit=False)  # misses, then whatever is stored
        wait_stored(base)
        fetch_all(base, bodies, want_hit=True)
    finally:
        proc.kill()
        proc.wait(10)
        wait_closed(port)
    origin.stop()  # the origin is gone: only the disk can answer now
    proc, _ = start(tmp_path, origin, loop, port)
    try:
        fetch_all(base, bodies, want_hit=True)
    finally:
        stop_process(proc)
        out = proc.stdout.read() if proc.stdout else b""
    assert b"Traceback" not in out, out.decode(errors="replace")[-3000:]
    assert b"NotImplementedError" not in out


def test_hits_stay_whole_while_two_workers_replace_the_entry(
    tmp_path: Path, origin: Backend
) -> None:
    """Two clients make both workers refetch and replace one large entry again and again
    (``Cache-Control: no-cache``), while a third client reads hits: every response is
    complete and byte-exact, none is cut."""
    size = 2 * MiB
    body = sized_body(size)
    port = free_port()
    config = write_config(
        tmp_path / "pibl.toml", port, [origin.url], "workers = 2\n[log]\nstdout = false\n"
    )
    proc = start_pibl_process(config, tmp_path, "--cache-ttl", "600")
    url = f"http://127.0.0.1:{port}/download?size={size}"
    wait_port(port)
    deadline = time.monotonic() + 4.0
    problems: list[str] = []
    counts = {"replaced": 0, "hits": 0}

    def client(refetch: bool) -> None:
        headers = {"Cache-Control": "no-cache"} if refetch else {}
        while time.monotonic() < deadline and len(problems) < 5:
            try:  # a new connection each time: the requests spread over both workers
                r = httpx.get(url, headers=headers, timeout=10)
            except httpx.HTTPError as exc:
                problems.append(f"{'refetch' if refetch else 'read'}: {exc!r}")
                continue
            if r.status_code != 200 or r.content != body:
                problems.append(f"status {r.status_code}, {len(r.content)} bytes")
            status = r.headers.get("cache-status", "")
            if status.startswith("pibl; hit"):
                counts["hits"] += 1
            elif "stored" in status:
                counts["replaced"] += 1

    try:
        threads = [threading.Thread(target=client, args=(r,)) for r in (True, True, False)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        stop_process(proc)
    out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    assert problems == [], problems
    assert counts["replaced"] >= 5 and counts["hits"] >= 5, counts
    assert "Traceback" not in out, out[-3000:]
