"""Tests of the deterministic download pattern."""

from __future__ import annotations

import hashlib

import pytest

from webapp.data import BLOCK_SIZE, pattern_block, pattern_bytes, pattern_sha256


def test_pattern_is_deterministic_and_sized() -> None:
    size = 3 * BLOCK_SIZE + 123
    first = b"".join(pattern_bytes(size))
    second = b"".join(pattern_bytes(size))
    assert first == second
    assert len(first) == size
    assert hashlib.sha256(first).hexdigest() == pattern_sha256(size)


def test_pattern_blocks_are_64k_and_only_last_is_short() -> None:
    sizes = [len(b) for b in pattern_bytes(2 * BLOCK_SIZE + 10)]
    assert sizes == [BLOCK_SIZE, BLOCK_SIZE, 10]
    assert list(pattern_bytes(0)) == []
    assert [len(b) for b in pattern_bytes(BLOCK_SIZE)] == [BLOCK_SIZE]


def test_pattern_blocks_differ_and_prefixes_are_consistent() -> None:
    assert pattern_block(0) != pattern_block(1)
    assert sorted(pattern_block(0)) == sorted(pattern_block(1))  # same bytes, rotated
    # A shorter stream is a prefix of a longer one.
    assert b"".join(pattern_bytes(1000)) == b"".join(pattern_bytes(BLOCK_SIZE + 5))[:1000]


def test_pattern_matches_documented_definition() -> None:
    base = b"".join(
        hashlib.sha256(b"PIBL-pattern-v1" + i.to_bytes(4, "big")).digest() for i in range(2048)
    )
    assert pattern_block(0) == base
    shift = 4099 % BLOCK_SIZE
    assert pattern_block(1) == base[shift:] + base[:shift]


def test_pattern_rejects_negative_size() -> None:
    with pytest.raises(ValueError):
        list(pattern_bytes(-1))
