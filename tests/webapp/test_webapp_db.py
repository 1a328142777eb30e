"""Tests of the SQLite guestbook store, including concurrent writers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from webapp.db import GuestbookStore

WRITER = """
import sys
from webapp.db import GuestbookStore
store = GuestbookStore(sys.argv[1])
for i in range(int(sys.argv[3])):
    store.add(sys.argv[2], f"message {i}", sys.argv[2])
"""


def test_store_uses_wal_and_orders_newest_first(tmp_path: Path) -> None:
    store = GuestbookStore(str(tmp_path / "g.sqlite3"))
    store.initialize()
    assert store.journal_mode() == "wal"
    first = store.add("a", "one", "r1")
    second = store.add("b", "two", "r2")
    assert second.id > first.id
    assert store.recent() == [second, first]
    assert store.recent(limit=1) == [second]
    assert store.count() == 2


def test_two_stores_share_one_file(tmp_path: Path) -> None:
    path = str(tmp_path / "g.sqlite3")
    writer, reader = GuestbookStore(path), GuestbookStore(path)
    entry = writer.add("a", "hello", "r1")
    assert reader.recent() == [entry]


def test_concurrent_writers_from_several_processes(
    tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    path = str(tmp_path / "shared.sqlite3")
    writers, per_writer = 4, 40
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, path, f"w{n}", str(per_writer)],
            env=subprocess_env,
            stderr=subprocess.PIPE,
        )
        for n in range(writers)
    ]
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=15)
            assert proc.returncode == 0, err.decode()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    store = GuestbookStore(path)
    assert store.count() == writers * per_writer
    names = {entry.name for entry in store.recent(limit=1000)}
    assert names == {f"w{n}" for n in range(writers)}
