"""Lock files per listening address: what may share a port and what may not."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pibl.ports import Listen, PortInUse, PortLocks
from tests.support import free_port


def test_specific_addresses_share_a_port_a_wildcard_does_not(tmp_path: Path) -> None:
    port = free_port()
    one, two, three = PortLocks(tmp_path), PortLocks(tmp_path), PortLocks(tmp_path)
    one.acquire([Listen("127.0.0.1", port, "http")])
    two.acquire([Listen("127.0.0.2", port, "http")])  # another address: allowed, as the kernel
    with pytest.raises(PortInUse) as busy:
        three.acquire([Listen("0.0.0.0", port, "http")])
    assert f"port {port}" in str(busy.value) and "another PIBL" in str(busy.value)
    with pytest.raises(PortInUse):
        three.acquire([Listen("127.0.0.1", port, "http")])
    one.release_all()
    two.release_all()
    three.acquire([Listen("0.0.0.0", port, "http")])
    with pytest.raises(PortInUse):
        one.acquire([Listen("127.0.0.1", port, "http")])
    three.release_all()
    assert list(tmp_path.iterdir()) == []


def test_all_or_nothing_and_held_addresses_are_not_taken_again(tmp_path: Path) -> None:
    a, b = free_port(), free_port()
    mine, other = PortLocks(tmp_path), PortLocks(tmp_path)
    other.acquire([Listen("127.0.0.1", b, "admin")])
    with pytest.raises(PortInUse):
        mine.acquire([Listen("127.0.0.1", a, "http"), Listen("127.0.0.1", b, "admin")])
    assert mine.held == set()  # the first address was let go again
    assert not (tmp_path / f"{a}@127.0.0.1.lock").exists()
    mine.acquire([Listen("127.0.0.1", a, "http")])
    mine.acquire([Listen("127.0.0.1", a, "http")])  # a reload: already held, no conflict
    mine.keep_only([])
    assert mine.held == set()
    other.release_all()


def test_a_leftover_file_of_a_dead_process_does_not_block(tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / f"{port}.lock").write_text("")
    (tmp_path / f"{port}@*.lock").write_text("999999\n")  # nobody holds it
    locks = PortLocks(tmp_path)
    locks.acquire([Listen("0.0.0.0", port, "http")])
    assert (tmp_path / f"{port}@*.lock").read_text() == f"{os.getpid()}\n"
    locks.release_all()
