"""A real ``pibl run`` process streams large bodies both ways in constant memory."""

from __future__ import annotations

import hashlib
import http.client
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import (
    Backend,
    free_port,
    pattern,
    pattern_sha256,
    start_pibl_process,
    tree_rss_kib,
    wait_port,
    write_config,
)

pytestmark = pytest.mark.e2e


@pytest.fixture
def pibl_process(
    tmp_path: Path, backends: list[Backend]
) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    port = free_port()
    config = write_config(
        tmp_path / "pibl.toml", port, [b.url for b in backends], "[log]\nstdout = false\n"
    )
    proc = start_pibl_process(config, tmp_path, "--workers", "1")
    try:
        wait_port(port)
        yield port, proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class _Sampler:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_kib(self.pid))
            time.sleep(0.05)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def test_200mb_download_and_50mb_upload_constant_memory(
    pibl_process: tuple[int, subprocess.Popen[bytes]],
) -> None:
    port, proc = pibl_process
    sampler = _Sampler(proc.pid)
    size = 200 * 1024 * 1024
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", f"/download?size={size}")
    resp = conn.getresponse()
    h = hashlib.sha256()
    got = 0
    while chunk := resp.read(1 << 20):
        h.update(chunk)
        got += len(chunk)
        if got < 8 << 20:
            time.sleep(0.01)  # a slow start: PIBL must apply backpressure, not buffer
    assert got == size
    assert h.hexdigest() == pattern_sha256(size)

    up = 50 * 1024 * 1024
    conn.request("POST", "/upload", body=pattern(up), headers={"Content-Length": str(up)})
    resp = conn.getresponse()
    assert resp.read().decode() == f"{up} {pattern_sha256(up)}"

    # chunked upload as well
    conn.request("POST", "/upload", body=pattern(up), encode_chunked=True)
    resp = conn.getresponse()
    assert resp.read().decode() == f"{up} {pattern_sha256(up)}"
    conn.close()
    peak_mib = sampler.stop() / 1024
    assert peak_mib < 100, f"PIBL peak RSS (master + worker) {peak_mib:.1f} MiB"
    print(f"peak RSS of master + worker: {peak_mib:.1f} MiB")


@pytest.mark.parametrize("encoding", ["gzip", "br"])
def test_200mb_compressible_download_compressed_in_flat_memory(
    pibl_process: tuple[int, subprocess.Popen[bytes]], encoding: str
) -> None:
    import zlib

    import brotli

    port, proc = pibl_process
    sampler = _Sampler(proc.pid)
    size = 200 * 1024 * 1024
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("GET", f"/text?size={size}", headers={"Accept-Encoding": encoding})
    resp = conn.getresponse()
    assert resp.getheader("Content-Encoding") == encoding
    assert "Accept-Encoding" in (resp.getheader("Vary") or "")
    if encoding == "gzip":
        decoder = zlib.decompressobj(wbits=31)
        decode = decoder.decompress
    else:
        decoder = brotli.Decompressor()
        decode = decoder.process
    got = 0
    wire = 0
    h = hashlib.sha256()
    line = b"PIBL streams this line again and again to test compression.\n" * 1024
    expected = hashlib.sha256()
    left = size
    while left > 0:
        block = line[: min(left, len(line))]
        expected.update(block)
        left -= len(block)
    while chunk := resp.read(1 << 20):
        wire += len(chunk)
        data = decode(chunk)
        got += len(data)
        h.update(data)
    conn.close()
    peak_mib = sampler.stop() / 1024
    assert got == size and h.hexdigest() == expected.hexdigest()
    assert wire < size / 20  # really compressed
    assert peak_mib < 100, f"PIBL peak RSS (master + worker) {peak_mib:.1f} MiB"
    print(
        f"{encoding}: {size >> 20} MiB -> {wire / 1024:.0f} KiB on the wire, peak RSS {peak_mib:.1f} MiB"
    )
