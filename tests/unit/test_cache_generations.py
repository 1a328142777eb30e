"""The change counters shared by the processes of one cache directory (pibl.cache.generations)."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pibl.cache.generations import SLOTS, Generations, slot_of
from pibl.cache.key import digest


def test_a_count_made_in_one_mapping_is_read_in_another(tmp_path: Path) -> None:
    one = Generations.open(tmp_path)
    two = Generations.open(tmp_path)
    assert one is not None and two is not None
    before = two.counts[7]
    one.bump(7)
    assert two.counts[7] == before + 1
    assert two.counts[8] == 0
    two.bump_all()
    assert one.counts[7] == before + 2
    assert all(one.counts[slot] >= 1 for slot in range(SLOTS))
    one.close()
    two.close()


def test_a_file_of_another_size_is_left_alone_and_no_counters_are_used(tmp_path: Path) -> None:
    # (resizing a file other processes map would kill them with SIGBUS)
    (tmp_path / "generations").write_bytes(b"not counters")
    assert Generations.open(tmp_path) is None
    assert (tmp_path / "generations").read_bytes() == b"not counters"


def test_the_file_has_its_blocks_from_the_start(tmp_path: Path) -> None:
    # a first write into a hole of a mapped file on a full disk is a SIGBUS
    gens = Generations.open(tmp_path)
    assert gens is not None
    assert (tmp_path / "generations").stat().st_blocks * 512 >= SLOTS * 8
    gens.close()


def test_no_counters_where_the_file_cannot_be_made(tmp_path: Path) -> None:
    assert Generations.open(tmp_path / "missing") is None


def _bump_many(directory: str, times: int) -> None:
    gens = Generations.open(Path(directory))
    assert gens is not None
    for _ in range(times):
        gens.bump(3)
    gens.close()


def test_counts_from_processes_at_once_are_not_lost(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_bump_many, args=(str(tmp_path), 10000)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    gens = Generations.open(tmp_path)
    assert gens is not None
    assert gens.counts[3] == 40000
    gens.close()


@given(st.binary(max_size=64))
def test_the_slot_of_a_metadata_file_comes_from_its_digest(name: bytes) -> None:
    hexdigest = digest(name)
    slot = slot_of(f"/some/cache/{hexdigest[:2]}/{hexdigest}.meta")
    assert slot == int(hexdigest[-8:], 16) % SLOTS
    assert slot == slot_of(f"cache/{hexdigest[:2]}/{hexdigest}.meta")  # any directory


@pytest.mark.parametrize("key", ["", "x.meta", "cache/zz/not-hex-at-all!.meta"])
def test_a_name_without_a_digest_has_slot_zero(key: str) -> None:
    assert slot_of(key) == 0
