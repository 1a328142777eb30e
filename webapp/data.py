"""Deterministic byte pattern used by the ``/download`` endpoint.

The pattern is defined so that any client can regenerate it and compare
checksums without the server having to buffer or pre-compute anything:

* A 64 KiB *base block* is the concatenation of
  ``SHA-256(b"PIBL-pattern-v1" + i.to_bytes(4, "big"))`` for
  ``i = 0 .. 2047`` (2048 digests of 32 bytes).
* Block number ``n`` (counting from 0) is the base block rotated left by
  ``(n * 4099) % 65536`` bytes, i.e. ``base[r:] + base[:r]``.
* A stream of ``size`` bytes is blocks 0, 1, 2, ... concatenated and cut
  after ``size`` bytes (only the last block may be shorter).

Because every block is rotated differently, reordered, duplicated or
dropped blocks change the SHA-256 of the whole stream.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

BLOCK_SIZE = 64 * 1024
"""Size of one generated block (and of the chunks the server sends)."""

SEED = b"PIBL-pattern-v1"
ROTATION_STEP = 4099


def _make_base_block() -> bytes:
    digests = (
        hashlib.sha256(SEED + i.to_bytes(4, "big")).digest()
        for i in range(BLOCK_SIZE // hashlib.sha256().digest_size)
    )
    return b"".join(digests)


_BASE_BLOCK = _make_base_block()


def pattern_block(index: int) -> bytes:
    """Return the full 64 KiB block number ``index`` of the pattern."""
    if index < 0:
        raise ValueError("block index must be >= 0")
    shift = (index * ROTATION_STEP) % BLOCK_SIZE
    return _BASE_BLOCK[shift:] + _BASE_BLOCK[:shift]


def pattern_bytes(size: int) -> Iterator[bytes]:
    """Yield the first ``size`` bytes of the pattern in blocks of 64 KiB.

    Memory use is constant (one block at a time) whatever ``size`` is.
    """
    if size < 0:
        raise ValueError("size must be >= 0")
    index = 0
    remaining = size
    while remaining > 0:
        block = pattern_block(index)
        if remaining < BLOCK_SIZE:
            block = block[:remaining]
        yield block
        remaining -= len(block)
        index += 1


def pattern_sha256(size: int) -> str:
    """Return the hex SHA-256 of the first ``size`` bytes of the pattern."""
    digest = hashlib.sha256()
    for block in pattern_bytes(size):
        digest.update(block)
    return digest.hexdigest()
