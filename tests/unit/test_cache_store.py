"""The on-disk cache store (pibl.cache.store): atomic entries, integrity checks, Vary, LRU."""

from __future__ import annotations

import json
import os
import re
import stat
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pibl.cache import store as store_module
from pibl.cache.key import digest, secondary_key, variant_digest
from pibl.cache.store import MAGIC, BodyWriter, DiskStore, Entry
from pibl.http.message import HeaderList
from pibl.proxy.cached import SENDFILE_MIN

A = b"http://example.com/a"
B = b"http://example.com/b"
C = b"http://example.com/c"
HEADERS: HeaderList = [(b"Content-Type", b"text/plain"), (b"Cache-Control", b"max-age=60")]
AE = ["accept-encoding"]


def make_store(
    directory: Path,
    *,
    max_size: int = 10_000_000,
    fsync: bool = False,
    memory_entry_max: int = 64 * 1024,
) -> DiskStore:
    return DiskStore(directory, max_size=max_size, fsync=fsync, memory_entry_max=memory_entry_max)


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def store(cache_dir: Path) -> DiskStore:
    return make_store(cache_dir)


def begin(
    store: DiskStore,
    primary: bytes,
    *,
    vary: list[str] | None = None,
    req: HeaderList | None = None,
    headers: HeaderList | None = None,
    limit: int = 1_000_000,
) -> BodyWriter:
    writer = store.begin(
        primary,
        vary or [],
        req or [],
        status=200,
        reason=b"OK",
        headers=list(HEADERS if headers is None else headers),
        request_time=1000.0,
        response_time=1001.0,
        initial_age=1.0,
        lifetime=60.0,
        limit=limit,
    )
    assert writer is not None
    return writer


def put(
    store: DiskStore,
    primary: bytes,
    body: bytes,
    *,
    vary: list[str] | None = None,
    req: HeaderList | None = None,
    headers: HeaderList | None = None,
) -> Entry:
    writer = begin(store, primary, vary=vary, req=req, headers=headers)
    writer.write(body)
    entry = writer.commit()
    assert entry is not None
    return entry


def get(store: DiskStore, primary: bytes, req: HeaderList | None = None) -> Entry | None:
    return store.lookup(primary, req or [])[0]


def files(root: Path, pattern: str = "*") -> list[Path]:
    return sorted(p for p in root.rglob(pattern) if p.is_file())


def data_files(cache_dir: Path, suffix: str) -> list[Path]:
    return [p for p in files(cache_dir, f"*{suffix}") if p.parent.name != "tmp"]


def tmp_files(cache_dir: Path) -> list[Path]:
    return files(cache_dir / "tmp")


def encode_meta(obj: object) -> bytes:
    payload = json.dumps(obj).encode()
    return MAGIC + payload + b"\n" + b"%08x\n" % zlib.crc32(payload)


# -- writing and reading ----------------------------------------------------------------------


def test_commit_makes_the_entry_visible(store: DiskStore) -> None:
    assert store.lookup(A, []) == (None, "uri-miss")
    writer = begin(store, A)
    writer.write(b"hello ")
    writer.write(b"world")
    assert store.lookup(A, []) == (None, "uri-miss")  # not visible before commit
    committed = writer.commit()
    assert committed is not None
    entry, found = store.lookup(A, [])
    assert found == "hit"
    assert entry is not None
    assert entry.key == A
    assert entry.secondary == b""
    assert (entry.status, entry.reason) == (200, b"OK")
    assert entry.headers == HEADERS
    assert (entry.request_time, entry.response_time) == (1000.0, 1001.0)
    assert (entry.initial_age, entry.lifetime) == (1.0, 60.0)
    assert entry.body_length == 11
    assert entry.body_crc == zlib.crc32(b"hello world")
    assert store.stats.stored == 1


@pytest.mark.parametrize(
    "chunks",
    [[b""], [b"x"], [b"\x00\r\n\xff" * 1000], [bytes(range(256))] * 300, [b"a", b"", b"b" * 70000]],
    ids=["empty", "one-byte", "binary", "large", "mixed-chunks"],
)
def test_body_reads_back_identical_and_crc_checked(store: DiskStore, chunks: list[bytes]) -> None:
    writer = begin(store, A)
    for chunk in chunks:
        writer.write(chunk)
    assert writer.commit() is not None
    body = b"".join(chunks)
    entry = get(store, A)
    assert entry is not None
    assert entry.body_crc == zlib.crc32(body)
    assert entry.body_path.read_bytes() == body
    assert store.verify_body(entry) is True
    assert store.read_body(entry) == body


def test_commit_with_fsync(cache_dir: Path) -> None:
    store = make_store(cache_dir, fsync=True)
    put(store, A, b"durable")
    entry = get(store, A)
    assert entry is not None
    assert store.read_body(entry) == b"durable"


def test_other_keys_are_not_hit(store: DiskStore) -> None:
    put(store, A, b"a")
    assert store.lookup(B, []) == (None, "uri-miss")
    assert store.lookup(b"http://EXAMPLE.com/a", []) == (None, "uri-miss")


def test_aborted_writer_leaves_nothing(store: DiskStore, cache_dir: Path) -> None:
    writer = begin(store, A)
    writer.write(b"partial")
    assert len(tmp_files(cache_dir)) == 1
    writer.abort()
    assert writer.commit() is None
    assert tmp_files(cache_dir) == []
    assert data_files(cache_dir, ".meta") == []
    assert data_files(cache_dir, ".body") == []
    assert store.lookup(A, []) == (None, "uri-miss")


def test_writer_over_the_limit_stores_nothing(store: DiskStore, cache_dir: Path) -> None:
    writer = begin(store, A, limit=10)
    writer.write(b"0123456789")
    writer.write(b"!")
    assert writer.failed
    assert writer.commit() is None
    assert tmp_files(cache_dir) == []
    assert data_files(cache_dir, ".meta") == []
    assert get(store, A) is None


def test_aborted_vary_writer_serves_nothing(store: DiskStore, cache_dir: Path) -> None:
    req = [(b"Accept-Encoding", b"gzip")]
    writer = begin(store, A, vary=AE, req=req)
    writer.write(b"zz")
    writer.abort()
    assert tmp_files(cache_dir) == []
    assert data_files(cache_dir, ".body") == []
    assert get(store, A, req) is None


def test_aborted_replacement_keeps_serving_the_old_entry(store: DiskStore) -> None:
    put(store, A, b"old")
    writer = begin(store, A)
    writer.write(b"new")
    entry = get(store, A)
    assert entry is not None
    assert store.read_body(entry) == b"old"
    writer.abort()
    entry = get(store, A)
    assert entry is not None
    assert store.read_body(entry) == b"old"


def test_replacing_an_entry_removes_the_old_body(store: DiskStore, cache_dir: Path) -> None:
    put(store, A, b"first")
    put(store, A, b"second version")
    entry = get(store, A)
    assert entry is not None
    assert store.read_body(entry) == b"second version"
    assert len(data_files(cache_dir, ".body")) == 1
    assert len(data_files(cache_dir, ".meta")) == 1


# -- torn, foreign and corrupt files ------------------------------------------------------------


def meta_of(store: DiskStore, primary: bytes) -> Path:
    return store.meta_path(digest(primary))


def assert_orphan_collected(store: DiskStore, cache_dir: Path) -> None:
    """The body of an unreadable meta is no longer named: the scan collects it once old."""
    (body,) = data_files(cache_dir, ".body")
    old = time.time() - 120
    os.utime(body, (old, old))
    store.scan()
    assert data_files(cache_dir, ".body") == []


@pytest.mark.parametrize("keep", [0, 1, 5, len(MAGIC), 40, -10, -2, -1])
def test_torn_meta_is_discarded(store: DiskStore, cache_dir: Path, keep: int) -> None:
    put(store, A, b"body")
    path = meta_of(store, A)
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    assert store.lookup(A, []) == (None, "uri-miss")
    assert not path.exists()
    assert store.stats.discarded == 1
    assert get(store, A) is None


def test_garbage_meta_is_discarded(store: DiskStore) -> None:
    put(store, A, b"body")
    path = meta_of(store, A)
    path.write_bytes(os.urandom(300))
    assert store.lookup(A, []) == (None, "uri-miss")
    assert not path.exists()


def test_wrong_magic_is_discarded(store: DiskStore, cache_dir: Path) -> None:
    put(store, A, b"body")
    path = meta_of(store, A)
    data = path.read_bytes()
    path.write_bytes(b"PIBL-CACHE/2\n" + data[len(MAGIC) :])
    assert store.lookup(A, []) == (None, "uri-miss")
    assert not path.exists()
    assert_orphan_collected(store, cache_dir)


def test_meta_with_bad_crc_is_discarded(store: DiskStore, cache_dir: Path) -> None:
    put(store, A, b"body")
    path = meta_of(store, A)
    data = path.read_bytes()
    tampered = data.replace(b'"status":200', b'"status":201')
    assert tampered != data
    path.write_bytes(tampered)
    assert store.lookup(A, []) == (None, "uri-miss")
    assert not path.exists()
    assert_orphan_collected(store, cache_dir)


def test_meta_with_damaged_crc_line_is_discarded(store: DiskStore) -> None:
    put(store, A, b"body")
    path = meta_of(store, A)
    data = path.read_bytes()
    path.write_bytes(data[:-9] + b"zzzzzzzz\n")
    assert get(store, A) is None
    assert not path.exists()


def test_meta_of_another_key_is_never_returned(store: DiskStore) -> None:
    a_entry = put(store, A, b"body of a")
    foreign = meta_of(store, B)
    foreign.parent.mkdir(mode=0o700, exist_ok=True)
    foreign.write_bytes(a_entry.meta_path.read_bytes())
    # The body it names is there too: only the key inside tells the files apart.
    (foreign.parent / a_entry.body_path.name).write_bytes(b"body of a")
    assert store.lookup(B, []) == (None, "uri-miss")
    a = get(store, A)
    assert a is not None
    assert store.read_body(a) == b"body of a"
    put(store, B, b"body of b")  # the real owner of the path replaces the foreign file
    b = get(store, B)
    assert b is not None
    assert (b.key, store.read_body(b)) == (B, b"body of b")


def test_meta_missing_fields_is_discarded(store: DiskStore) -> None:
    path = meta_of(store, A)
    path.parent.mkdir(mode=0o700, parents=True)
    path.write_bytes(encode_meta({"type": "entry", "key": A.decode(), "status": 200}))
    assert get(store, A) is None
    assert not path.exists()


@pytest.mark.parametrize("cut", [1, 3, 100])
def test_truncated_body_is_detected_at_lookup(store: DiskStore, cache_dir: Path, cut: int) -> None:
    body = b"0123456789" * 20
    entry = put(store, A, body)
    with open(entry.body_path, "r+b") as fh:
        fh.truncate(len(body) - cut)
    assert store.lookup(A, []) == (None, "uri-miss")
    assert not entry.body_path.exists()
    assert not entry.meta_path.exists()
    assert store.stats.discarded == 1


def test_longer_body_is_detected_at_lookup(store: DiskStore) -> None:
    entry = put(store, A, b"abc")
    with open(entry.body_path, "ab") as fh:
        fh.write(b"extra")
    assert get(store, A) is None
    assert not entry.meta_path.exists()


def test_missing_body_is_detected_at_lookup(store: DiskStore) -> None:
    entry = put(store, A, b"abc")
    entry.body_path.unlink()
    assert get(store, A) is None
    assert not entry.meta_path.exists()


@pytest.mark.parametrize("offset", [0, 57, -1])
def test_flipped_body_byte_is_detected_by_read_body(store: DiskStore, offset: int) -> None:
    body = bytes(range(100))
    put(store, A, body)
    entry = get(store, A)
    assert entry is not None
    data = bytearray(entry.body_path.read_bytes())
    data[offset] ^= 0x01
    entry.body_path.write_bytes(bytes(data))
    again = get(store, A)  # same size: lookup alone cannot tell
    assert again is not None
    assert store.read_body(again) is None
    assert not again.body_path.exists()
    assert not again.meta_path.exists()
    assert get(store, A) is None


def test_a_body_is_crc_checked_at_its_first_read_only(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store(cache_dir, memory_entry_max=100)  # read from disk at every hit
    body = os.urandom(5000)
    put(store, A, body)
    checks: list[int] = []
    real = zlib.crc32

    def counted(data: bytes, value: int = 0) -> int:
        if len(data) == len(body):  # (metadata files have a CRC of their own)
            checks.append(len(data))
        return real(data, value)

    monkeypatch.setattr(zlib, "crc32", counted)
    for _ in range(3):
        entry = get(store, A)
        assert entry is not None and entry.body is None
        assert store.read_body(entry) == body
    assert checks == [5000]
    restarted = make_store(cache_dir, memory_entry_max=100)  # another process checks anew
    entry = get(restarted, A)
    assert entry is not None and restarted.read_body(entry) == body
    assert checks == [5000, 5000]


def test_flipped_body_byte_is_detected_by_verify_body(store: DiskStore) -> None:
    body = b"x" * 5000
    put(store, A, body)
    entry = get(store, A)
    assert entry is not None
    data = bytearray(body)
    data[4321] = ord("y")
    entry.body_path.write_bytes(bytes(data))
    assert store.verify_body(entry) is False
    assert not entry.meta_path.exists()
    assert get(store, A) is None


def test_verify_body_passes_for_an_intact_body(store: DiskStore) -> None:
    entry = put(store, A, b"intact" * 1000)
    assert store.verify_body(entry) is True
    assert store.verify_body(entry) is True


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> DiskStore:
    """One store for the property tests: each example rewrites the same meta file."""
    store = make_store(tmp_path_factory.mktemp("shared") / "cache")
    put(store, A, b"real body")
    return store


@settings(max_examples=100, deadline=None)
@given(
    content=st.one_of(
        st.binary(max_size=300),
        st.binary(max_size=300).map(lambda b: MAGIC + b),
        st.binary(max_size=300).map(lambda b: MAGIC + b + b"\n%08x\n" % zlib.crc32(b)),
    )
)
def test_random_meta_content_is_never_returned(shared_store: DiskStore, content: bytes) -> None:
    path = meta_of(shared_store, A)
    path.write_bytes(content)
    assert shared_store.lookup(A, []) == (None, "uri-miss")
    assert not path.exists()
    path.write_bytes(content)
    assert shared_store.lookup(A, [(b"Accept-Encoding", b"gzip")]) == (None, "uri-miss")


@settings(max_examples=60, deadline=None)
@given(
    obj=st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=10),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=12,
    )
)
def test_well_framed_foreign_meta_is_never_returned(shared_store: DiskStore, obj: object) -> None:
    if isinstance(obj, dict):
        obj.setdefault("key", "http://other.example/")
    path = meta_of(shared_store, A)
    path.write_bytes(encode_meta(obj))
    assert shared_store.lookup(A, []) == (None, "uri-miss")


def _framed_entry(**fields: object) -> dict[str, object]:
    meta: dict[str, object] = {
        "type": "entry", "key": A.decode(), "secondary": "", "status": 200, "reason": "OK",
        "headers": [], "request_time": 0, "response_time": 0, "initial_age": 0,
        "lifetime": 60, "body_file": "missing.body", "body_length": 0, "body_crc": 0,
    }  # fmt: skip
    meta.update(fields)
    return meta


@pytest.mark.parametrize(
    "meta",
    [
        {"type": "vary", "key": A.decode(), "vary": 5},
        {"type": "vary", "key": A.decode(), "vary": ["\u20ac"]},
        _framed_entry(status=float("inf")),
        _framed_entry(body_length=-1),
        _framed_entry(body_file="../../elsewhere.body"),
    ],
    ids=[
        "vary-not-a-list",
        "vary-name-not-latin-1",
        "status-infinity",
        "length-minus-one",
        "body-file-with-path",
    ],
)
def test_well_framed_meta_of_the_wrong_shape_is_never_used(
    store: DiskStore, meta: dict[str, object]
) -> None:
    path = meta_of(store, A)
    path.parent.mkdir(mode=0o700, parents=True)
    path.write_bytes(encode_meta(meta))
    entry, _ = store.lookup(A, [(b"Accept-Encoding", b"gzip")])
    assert entry is None


# -- Vary -----------------------------------------------------------------------------------


GZIP = [(b"Accept-Encoding", b"gzip")]
BR = [(b"Accept-Encoding", b"br")]


def test_two_variants_under_one_primary_key(store: DiskStore) -> None:
    put(store, A, b"gzipped", vary=AE, req=GZIP)
    put(store, A, b"brotli", vary=AE, req=BR)
    gz, found = store.lookup(A, GZIP)
    assert found == "hit"
    assert gz is not None
    assert gz.secondary == b"accept-encoding=gzip"
    assert store.read_body(gz) == b"gzipped"
    br = get(store, A, BR)
    assert br is not None
    assert store.read_body(br) == b"brotli"
    assert gz.meta_path != br.meta_path


def test_hits_on_variants_read_the_vary_index_once_until_it_changes(
    store: DiskStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    put(store, A, b"gzipped", vary=AE, req=GZIP)
    put(store, A, b"brotli", vary=AE, req=BR)
    index = str(store.meta_path(digest(A)))
    reads: list[str] = []
    read_meta = store._read_meta

    def counting(path: Path) -> dict[str, object] | None:
        reads.append(str(path))
        return read_meta(path)

    monkeypatch.setattr(store, "_read_meta", counting)
    for _ in range(3):
        for req, body in ((GZIP, b"gzipped"), (BR, b"brotli")):
            entry, found = store.lookup(A, req)
            assert found == "hit" and entry is not None
            assert store.read_body(entry) == body
    assert reads.count(index) == 1  # the index, once; then from memory
    # replaced on disk (another worker stored the URI without Vary): read again
    put(store, A, b"plain")
    entry = get(store, A, GZIP)
    assert entry is not None and store.read_body(entry) == b"plain"


def test_vary_miss_for_a_third_value(store: DiskStore) -> None:
    put(store, A, b"gzipped", vary=AE, req=GZIP)
    put(store, A, b"brotli", vary=AE, req=BR)
    assert store.lookup(A, [(b"Accept-Encoding", b"identity")]) == (None, "vary-miss")
    assert store.lookup(A, []) == (None, "vary-miss")
    assert store.lookup(A, [(b"Accept-Encoding", b"GZIP")]) == (None, "vary-miss")


def test_vary_lookup_uses_the_normalised_value(store: DiskStore) -> None:
    put(store, A, b"both", vary=AE, req=[(b"Accept-Encoding", b"gzip, br")])
    entry = get(store, A, [(b"accept-encoding", b"gzip ,br")])
    assert entry is not None
    assert store.read_body(entry) == b"both"


def test_variant_meta_at_the_wrong_variant_path_is_not_served(store: DiskStore) -> None:
    put(store, A, b"gzipped", vary=AE, req=GZIP)
    put(store, A, b"brotli", vary=AE, req=BR)
    gz_path = store.meta_path(variant_digest(A, secondary_key(AE, GZIP)))
    br_path = store.meta_path(variant_digest(A, secondary_key(AE, BR)))
    br_path.write_bytes(gz_path.read_bytes())
    assert store.lookup(A, BR) == (None, "vary-miss")
    gz = get(store, A, GZIP)
    assert gz is not None
    assert store.read_body(gz) == b"gzipped"


def test_variant_of_another_primary_key_is_not_served(store: DiskStore) -> None:
    put(store, A, b"a-gzip", vary=AE, req=GZIP)
    put(store, B, b"b-brotli", vary=AE, req=BR)
    b_path = store.meta_path(variant_digest(B, secondary_key(AE, BR)))
    a_path = store.meta_path(variant_digest(A, secondary_key(AE, GZIP)))
    # B's variant has the right secondary key for the request but names another URI.
    a_path.write_bytes(b_path.read_bytes())
    forged = store.meta_path(variant_digest(A, secondary_key(AE, BR)))
    forged.parent.mkdir(mode=0o700, exist_ok=True)
    forged.write_bytes(b_path.read_bytes())
    assert store.lookup(A, BR) == (None, "vary-miss")
    assert store.lookup(A, GZIP) == (None, "vary-miss")


def test_torn_vary_pointer_hides_every_variant(store: DiskStore) -> None:
    put(store, A, b"gzipped", vary=AE, req=GZIP)
    put(store, A, b"brotli", vary=AE, req=BR)
    pointer = meta_of(store, A)
    pointer.write_bytes(pointer.read_bytes()[:-3])
    assert store.lookup(A, GZIP) == (None, "uri-miss")
    assert store.lookup(A, BR) == (None, "uri-miss")
    assert not pointer.exists()


def test_vary_response_replaces_a_plain_entry(store: DiskStore, cache_dir: Path) -> None:
    put(store, A, b"plain")
    put(store, A, b"gzipped", vary=AE, req=GZIP)
    assert store.lookup(A, BR) == (None, "vary-miss")
    assert store.lookup(A, []) == (None, "vary-miss")
    gz = get(store, A, GZIP)
    assert gz is not None
    assert store.read_body(gz) == b"gzipped"
    assert len(data_files(cache_dir, ".body")) == 1


def test_plain_response_replaces_vary_pointer(store: DiskStore) -> None:
    put(store, A, b"gzipped", vary=AE, req=GZIP)
    put(store, A, b"plain")
    for req in ([], GZIP, BR):
        entry = get(store, A, req)
        assert entry is not None
        assert store.read_body(entry) == b"plain"


def test_changed_vary_fields_drop_the_old_variants(store: DiskStore) -> None:
    put(store, A, b"gzipped", vary=AE, req=GZIP)
    lang = [(b"Accept-Language", b"es"), *GZIP]
    put(store, A, b"spanish", vary=["accept-language"], req=lang)
    assert store.lookup(A, GZIP) == (None, "vary-miss")
    entry = get(store, A, lang)
    assert entry is not None
    assert store.read_body(entry) == b"spanish"


# -- update, invalidate, purge ----------------------------------------------------------------


def test_update_changes_headers_without_touching_the_body(store: DiskStore) -> None:
    put(store, A, b"unchanged body")
    entry = get(store, A)
    assert entry is not None
    assert store.read_body(entry) == b"unchanged body"  # now in the memory tier too
    body_path = entry.body_path
    before = body_path.stat()
    refreshed = get(make_store(store.dir), A)  # a separate object, as after a 304
    assert refreshed is not None
    new_headers = [(b"Content-Type", b"text/plain"), (b"Cache-Control", b"max-age=600")]
    refreshed.headers = new_headers
    refreshed.lifetime = 600.0
    refreshed.response_time = 2000.0
    store.update(refreshed)
    after = body_path.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (
        before.st_ino,
        before.st_mtime_ns,
        before.st_size,
    )
    fresh_store = make_store(store.dir)
    for s in (store, fresh_store):
        again = get(s, A)
        assert again is not None
        assert again.headers == new_headers
        assert (again.lifetime, again.response_time) == (600.0, 2000.0)
        assert again.body_path == body_path
        assert s.read_body(again) == b"unchanged body"


def test_invalidate_removes_an_entry(store: DiskStore, cache_dir: Path) -> None:
    put(store, A, b"a")
    put(store, B, b"b")
    entry = get(store, A)
    assert entry is not None
    store.read_body(entry)  # memory tier
    assert store.invalidate(A) is True
    assert get(store, A) is None
    assert get(store, B) is not None
    assert len(data_files(cache_dir, ".meta")) == 1
    assert len(data_files(cache_dir, ".body")) == 1


def test_invalidate_removes_all_variants(store: DiskStore, cache_dir: Path) -> None:
    put(store, A, b"gzipped", vary=AE, req=GZIP)
    put(store, A, b"brotli", vary=AE, req=BR)
    gz = get(store, A, GZIP)
    assert gz is not None
    store.read_body(gz)  # memory tier
    assert store.invalidate(A) is True
    assert get(store, A, GZIP) is None
    assert get(store, A, BR) is None
    assert data_files(cache_dir, ".meta") == []
    assert data_files(cache_dir, ".body") == []


def test_invalidate_unknown_key(store: DiskStore) -> None:
    put(store, A, b"a")
    assert store.invalidate(B) is False
    assert get(store, A) is not None


def test_purge_all(store: DiskStore, cache_dir: Path) -> None:
    put(store, A, b"a")
    put(store, B, b"b")
    put(store, C, b"gz", vary=AE, req=GZIP)
    entry = get(store, A)
    assert entry is not None
    store.read_body(entry)
    assert store.purge_all() == 4  # three entries and one Vary pointer
    for primary, req in ((A, []), (B, []), (C, GZIP)):
        assert get(store, primary, req) is None
    assert sorted(p.name for p in cache_dir.iterdir()) == ["generations", "purged", "tmp"]
    assert (store.stats.entries, store.stats.bytes) == (0, 0)
    put(store, A, b"again")
    assert get(store, A) is not None


def test_purge_all_drops_bodies_still_being_stored(cache_dir: Path) -> None:
    store = make_store(cache_dir)
    other = make_store(cache_dir)  # another process sharing the directory
    writer = begin(store, A)
    writer.write(b"streaming while the purge comes")
    other.purge_all()
    assert writer.commit() is None
    assert get(store, A) is None
    assert list(store.tmp_dir.iterdir()) == []
    after = begin(store, A)  # what starts after the purge is stored as usual
    after.write(b"new")
    assert after.commit() is not None
    assert get(store, A) is not None


def test_entries_on_disk(store: DiskStore) -> None:
    put(store, A, b"a")
    put(store, B, b"gz", vary=AE, req=GZIP)
    put(store, B, b"br", vary=AE, req=BR)
    entries, size = store.entries_on_disk()
    assert entries == 3
    assert size > 3


# -- memory tier ----------------------------------------------------------------------------


def test_small_bodies_are_served_from_memory(store: DiskStore) -> None:
    put(store, A, b"small")
    entry = get(store, A)
    assert entry is not None
    assert entry.body is None
    assert store.read_body(entry) == b"small"
    again = get(store, A)
    assert again is not None
    assert again.body == b"small"


def test_large_bodies_are_not_kept_in_memory(cache_dir: Path) -> None:
    store = make_store(cache_dir, memory_entry_max=100)
    put(store, A, b"x" * 101)
    entry = get(store, A)
    assert entry is not None
    assert store.read_body(entry) == b"x" * 101
    again = get(store, A)
    assert again is not None
    assert again.body is None


def test_a_body_larger_than_the_whole_memory_tier_leaves_the_others_in_it(
    cache_dir: Path,
) -> None:
    # memory_max set below the default memory_entry_max: the large body is read from disk
    # at every hit, and the small ones stay in memory
    store = DiskStore(cache_dir, max_size=100_000_000, fsync=False, memory_max=10_000)
    put(store, A, b"a" * 100)
    put(store, B, b"b" * 100)
    large = os.urandom(20_000)
    put(store, C, large)
    for key in (A, B):
        entry = get(store, key)
        assert entry is not None and store.read_body(entry) is not None
    entry = get(store, C)
    assert entry is not None and store.read_body(entry) == large
    for key, body in ((A, b"a" * 100), (B, b"b" * 100)):
        again = get(store, key)
        assert again is not None and again.body == body  # still in memory
    again = get(store, C)
    assert again is not None and again.body is None


def test_by_default_a_body_below_the_sendfile_size_is_kept_in_memory(cache_dir: Path) -> None:
    store = DiskStore(cache_dir, max_size=100_000_000, fsync=False)  # the default tier
    body = os.urandom(900_000)  # (more than the 64 KiB the tier kept before)
    assert len(body) < SENDFILE_MIN
    put(store, A, body)
    entry = get(store, A)
    assert entry is not None and store.read_body(entry) == body
    again = get(store, A)
    assert again is not None and again.body == body  # not read from disk again


def test_memory_tier_does_not_outlive_removal_by_another_store(store: DiskStore) -> None:
    put(store, A, b"small")
    entry = get(store, A)
    assert entry is not None
    store.read_body(entry)
    other = make_store(store.dir)
    assert other.invalidate(A) is True
    assert get(store, A) is None


def _count_stats(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The metadata files the store checks with a ``stat`` from now on."""
    seen: list[str] = []
    real = store_module._mtime

    def counted(path: str) -> int:
        seen.append(path)
        return real(path)

    monkeypatch.setattr(store_module, "_mtime", counted)
    return seen


def in_memory(store: DiskStore, primary: bytes, req: HeaderList | None = None) -> Entry:
    entry = get(store, primary, req)
    assert entry is not None
    assert store.read_body(entry) is not None  # now in the memory tier
    return entry


def test_memory_tier_hits_take_no_stat_while_nothing_changes(
    store: DiskStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    put(store, A, b"plain")
    put(store, C, b"gzipped", vary=AE, req=GZIP)
    in_memory(store, A)
    in_memory(store, C, GZIP)
    stats = _count_stats(monkeypatch)
    for _ in range(50):
        hit = get(store, A)
        assert hit is not None and hit.body == b"plain"
        variant = get(store, C, GZIP)  # the Vary index and the variant, both from memory
        assert variant is not None and variant.body == b"gzipped"
    assert stats == []


def test_without_shared_counters_every_memory_tier_hit_takes_a_stat(
    store: DiskStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.generations = None  # (a directory where the counters cannot be mapped)
    put(store, A, b"plain")
    in_memory(store, A)
    stats = _count_stats(monkeypatch)
    for _ in range(3):
        assert get(store, A) is not None
    assert len(stats) == 3


def test_memory_tier_sees_a_replacement_by_another_store_at_the_next_hit(
    store: DiskStore,
) -> None:
    put(store, A, b"old")
    put(store, C, b"old gzip", vary=AE, req=GZIP)
    in_memory(store, A)
    in_memory(store, C, GZIP)
    other = make_store(store.dir)  # another worker, or pibl cache purge
    put(other, A, b"new")
    put(other, C, b"new gzip", vary=AE, req=GZIP)
    for primary, req, body in ((A, None, b"new"), (C, GZIP, b"new gzip")):
        entry = get(store, primary, req)
        assert entry is not None
        assert store.read_body(entry) == body


def test_a_copy_read_while_another_store_replaced_it_is_not_kept(
    store: DiskStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    put(store, A, b"v1")
    entry = get(store, A)  # its metadata read: version 1
    assert entry is not None
    other = make_store(store.dir)
    real = Path.read_bytes

    def replaced_meanwhile(path: Path) -> bytes:
        data = real(path)
        if path.suffix == ".body":  # between the metadata and the body, another worker
            monkeypatch.setattr(Path, "read_bytes", real)
            put(other, A, b"v2")
        return data

    monkeypatch.setattr(Path, "read_bytes", replaced_meanwhile)
    assert store.read_body(entry) == b"v1"  # what this request gets, read before the change
    again = get(store, A)
    assert again is not None
    assert store.read_body(again) == b"v2"  # not version 1 from memory, now or later


def test_memory_tier_sees_a_purge_by_another_store_at_the_next_hit(store: DiskStore) -> None:
    put(store, A, b"plain")
    put(store, C, b"gzipped", vary=AE, req=GZIP)
    in_memory(store, A)
    in_memory(store, C, GZIP)
    make_store(store.dir).purge_all()
    assert get(store, A) is None
    assert store.lookup(C, GZIP) == (None, "uri-miss")


def test_memory_tier_sees_a_file_removed_by_hand_within_the_recheck_interval(
    store: DiskStore,
) -> None:
    store.recheck = 0.2
    entry = put(store, A, b"plain")
    in_memory(store, A)
    entry.meta_path.unlink()  # no process counted this change
    deadline = time.monotonic() + 5
    while get(store, A) is not None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert time.monotonic() < deadline


# -- LRU bound ------------------------------------------------------------------------------


def lru_store(cache_dir: Path) -> DiskStore:
    # Each 100-byte entry is accounted as 612 bytes: two fit, three do not.
    return make_store(cache_dir, max_size=1300)


def test_lru_evicts_the_oldest_entry_first(cache_dir: Path) -> None:
    store = lru_store(cache_dir)
    put(store, A, b"a" * 100)
    put(store, B, b"b" * 100)
    put(store, C, b"c" * 100)
    assert get(store, A) is None
    assert get(store, B) is not None
    assert get(store, C) is not None
    assert store.stats.evictions == 1
    assert store.stats.bytes <= store.max_size
    assert len(data_files(cache_dir, ".body")) == 2


def test_lookup_makes_an_entry_recently_used(cache_dir: Path) -> None:
    store = lru_store(cache_dir)
    put(store, A, b"a" * 100)
    put(store, B, b"b" * 100)
    assert get(store, A) is not None
    put(store, C, b"c" * 100)
    assert get(store, B) is None
    assert get(store, A) is not None
    assert get(store, C) is not None


def test_memory_tier_hit_makes_an_entry_recently_used(cache_dir: Path) -> None:
    store = lru_store(cache_dir)
    put(store, A, b"a" * 100)
    put(store, B, b"b" * 100)
    entry = get(store, A)
    assert entry is not None
    store.read_body(entry)  # A is now in the memory tier
    assert get(store, B) is not None
    assert get(store, A) is not None  # most recent use, from memory
    put(store, C, b"c" * 100)
    assert get(store, A) is not None
    assert get(store, B) is None


def test_an_entry_larger_than_the_store_is_not_kept(cache_dir: Path) -> None:
    store = lru_store(cache_dir)
    put(store, A, b"a" * 100)
    put(store, B, b"b" * 2000)
    assert get(store, B) is None
    assert store.stats.bytes <= store.max_size


def test_store_never_exceeds_max_size(cache_dir: Path) -> None:
    store = make_store(cache_dir, max_size=5000)
    for i in range(20):
        put(store, b"http://example.com/%d" % i, b"z" * (100 * (i % 7)))
        assert store.stats.bytes <= store.max_size
    assert get(store, b"http://example.com/19") is not None


# -- restart, scan, garbage -----------------------------------------------------------------


def test_scan_after_restart_rebuilds_sizes(store: DiskStore, cache_dir: Path) -> None:
    put(store, A, b"a" * 10)
    put(store, B, b"b" * 20)
    put(store, C, b"gz" * 5, vary=AE, req=GZIP)
    put(store, C, b"br" * 7, vary=AE, req=BR)
    restarted = make_store(cache_dir)
    assert (restarted.stats.entries, restarted.stats.indexed) == (0, False)
    entry = get(restarted, A)  # lookups work before the scan
    assert entry is not None
    restarted.scan()
    expected = 0
    for meta in data_files(cache_dir, ".meta"):
        obj = json.loads(meta.read_bytes()[len(MAGIC) :].rsplit(b"\n", 2)[0])
        if obj["type"] == "entry":
            expected += meta.stat().st_size + obj["body_length"]
    assert restarted.stats.entries == 4
    assert restarted.stats.bytes == expected
    assert restarted.stats.indexed is True
    for primary, req, body in ((B, [], b"b" * 20), (C, BR, b"br" * 7)):
        found = get(restarted, primary, req)
        assert found is not None
        assert restarted.read_body(found) == body


def test_leftover_tmp_files_are_removed_at_start(store: DiskStore, cache_dir: Path) -> None:
    put(store, A, b"a")
    writer = begin(store, B)
    writer.write(b"interrupted")  # a crash now leaves this file behind
    (cache_dir / "tmp" / "0123456789abcdef.meta").write_bytes(b"half a meta")
    assert len(tmp_files(cache_dir)) == 2
    restarted = make_store(cache_dir)
    assert tmp_files(cache_dir) == []
    assert get(restarted, A) is not None
    assert get(restarted, B) is None
    writer.abort()
    assert get(restarted, B) is None


def test_scan_removes_old_orphan_bodies_only(store: DiskStore, cache_dir: Path) -> None:
    entry = put(store, A, b"referenced")
    sub = entry.meta_path.parent
    old_orphan = sub / f"{'ab' * 32}.deadbeef.body"
    new_orphan = sub / f"{'cd' * 32}.cafebabe.body"
    old_orphan.write_bytes(b"orphan")
    new_orphan.write_bytes(b"commit in progress")
    old = time.time() - 120
    os.utime(old_orphan, (old, old))
    os.utime(entry.body_path, (old, old))  # referenced: kept however old
    make_store(cache_dir).scan()
    assert not old_orphan.exists()
    assert new_orphan.exists()
    assert entry.body_path.exists()
    again = get(make_store(cache_dir), A)
    assert again is not None
    assert store.read_body(again) == b"referenced"


def test_orphan_just_over_sixty_seconds(store: DiskStore, cache_dir: Path) -> None:
    entry = put(store, A, b"x")
    sub = entry.meta_path.parent
    young = sub / f"{'01' * 32}.00000001.body"
    aged = sub / f"{'02' * 32}.00000002.body"
    for path in (young, aged):
        path.write_bytes(b"o")
    now = time.time()
    os.utime(young, (now - 50, now - 50))
    os.utime(aged, (now - 70, now - 70))
    store.scan()
    assert young.exists()
    assert not aged.exists()


def test_scan_discards_torn_meta_files(store: DiskStore, cache_dir: Path) -> None:
    put(store, A, b"a")
    put(store, B, b"b")
    torn = meta_of(store, B)
    torn.write_bytes(torn.read_bytes()[:20])
    restarted = make_store(cache_dir)
    restarted.scan()
    assert not torn.exists()
    assert restarted.stats.entries == 1
    assert restarted.stats.discarded == 1


def _reading_keeps_atime(directory: Path) -> bool:
    probe = directory / "atime-probe"
    probe.write_bytes(b"probe")
    now = time.time()
    # Future access times: relatime only updates an atime older than mtime or ctime.
    os.utime(probe, (now + 100, now - 1000))
    before = probe.stat().st_atime
    probe.read_bytes()
    kept = probe.stat().st_atime == before
    probe.unlink()
    return kept


def test_scan_evicts_least_recently_accessed_first(store: DiskStore, cache_dir: Path) -> None:
    if not _reading_keeps_atime(cache_dir):
        pytest.skip("this file system updates atime on every read")
    entries = {p: put(store, p, p[-1:] * 100) for p in (A, B, C)}
    now = time.time()
    atimes = {A: now + 300, B: now + 100, C: now + 200}  # B least recently used
    for primary, entry in entries.items():
        os.utime(entry.meta_path, (atimes[primary], now - 1000))
    restarted = make_store(cache_dir, max_size=1200)  # two of the three fit
    restarted.scan()
    assert get(restarted, B) is None
    assert get(restarted, A) is not None
    assert get(restarted, C) is not None
    assert restarted.stats.bytes <= 1200
    assert restarted.stats.evictions == 1


# -- file system hygiene ----------------------------------------------------------------------


def test_files_are_0600_and_directories_0700(cache_dir: Path) -> None:
    old_umask = os.umask(0)  # the store must not rely on the process umask
    try:
        store = make_store(cache_dir)
        put(store, A, b"a")
        put(store, B, b"gz", vary=AE, req=GZIP)
        entry = get(store, A)
        assert entry is not None
        store.update(entry)
        writer = begin(store, C)
        try:
            writer.write(b"in progress")
            paths = [cache_dir, *cache_dir.rglob("*")]
            assert len([p for p in paths if p.is_file()]) >= 6
            for path in paths:
                mode = stat.S_IMODE(path.stat().st_mode)
                assert mode == (0o700 if path.is_dir() else 0o600), path
        finally:
            writer.abort()
    finally:
        os.umask(old_umask)


NAME = re.compile(
    r"^(tmp|generations|[0-9a-f]{2}|[0-9a-f]{64}\.meta|[0-9a-f]{64}\.[0-9a-f]{8}\.body)$"
)


def test_file_names_contain_no_request_text(store: DiskStore, cache_dir: Path) -> None:
    secret = b"http://example.com/account/../secret?token=hunter2&name=%2F..%2F"
    put(store, secret, b"a")
    put(store, secret + b"x", b"b", vary=AE, req=[(b"Accept-Encoding", b"/etc/passwd")])
    names = [p.name for p in cache_dir.rglob("*")]
    assert len(names) >= 6
    for name in names:
        assert NAME.match(name), name
    for path in cache_dir.rglob("*"):
        assert path.resolve().is_relative_to(cache_dir.resolve())
    meta = meta_of(store, secret)
    assert meta.name == digest(secret) + ".meta"
    assert meta.parent.name == digest(secret)[:2]


def test_an_entry_replaced_while_it_is_read_is_not_discarded(store: DiskStore) -> None:
    """Two writers of one URL (concurrent hydrations, two workers): a reader that saw the old
    metadata finds its body gone; it must read the new version, not remove it."""
    key = b"http://h/replaced"
    first = put(store, key, b"first version")
    old_meta = store._read_meta(first.meta_path)
    assert old_meta is not None
    second = put(store, key, b"second, longer version")
    assert not first.body_path.exists()  # the commit of the second removed the first body
    # What a reader holding the old metadata does next:
    with pytest.raises(Exception) as raised:
        store._entry(old_meta, first.meta_path)
    assert type(raised.value).__name__ == "_Replaced"
    assert second.meta_path.exists() and second.body_path.exists()  # left alone
    entry = get(store, key)
    assert entry is not None and store.read_body(entry) == b"second, longer version"


def test_a_purge_during_the_commit_itself_removes_the_entry(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store(cache_dir)
    other = make_store(cache_dir)
    writer = begin(store, A)
    writer.write(b"body")
    original = store.write_entry_meta

    def then_purge(entry: Entry, **kw: Any) -> None:
        original(entry, **kw)
        other.purge_all()  # lands after the commit's first check

    monkeypatch.setattr(store, "write_entry_meta", then_purge)
    assert writer.commit() is None
    assert get(store, A) is None


def test_startup_cleans_only_temporary_files_of_writers_that_are_gone(cache_dir: Path) -> None:
    make_store(cache_dir)
    tmp = cache_dir / "tmp"
    live = tmp / f"{os.getppid()}-0123456789abcdef.body"  # a process that is still running
    dead = tmp / "999999999-0123456789abcdef.body"
    old_style = tmp / "0123456789abcdef.body"
    for path in (live, dead, old_style):
        path.write_bytes(b"partial")
    make_store(cache_dir)  # another worker, or `pibl cache stats`, opening the same directory
    assert live.exists() and not dead.exists() and not old_style.exists()


def listed_variants(store: DiskStore, primary: bytes) -> list[str]:
    path = store.meta_path(digest(primary))
    if not path.exists():
        return []
    data = path.read_bytes()
    meta = json.loads(data[len(MAGIC) :].rsplit(b"\n", 2)[0])
    return [str(v) for v in meta.get("variants", [])]


def test_a_variant_is_listed_only_once_committed(store: DiskStore) -> None:
    writer = begin(store, A, vary=AE, req=GZIP)
    writer.write(b"gzipped")
    assert listed_variants(store, A) == []  # still streaming: nothing points at it
    entry = writer.commit()
    assert entry is not None
    assert listed_variants(store, A) == [entry.meta_path.stem]


def test_an_aborted_variant_is_never_listed(store: DiskStore) -> None:
    kept = put(store, A, b"brotli", vary=AE, req=BR)
    writer = begin(store, A, vary=AE, req=GZIP)
    writer.write(b"gz")
    writer.abort()
    assert listed_variants(store, A) == [kept.meta_path.stem]
    assert store.lookup(A, GZIP) == (None, "vary-miss")


def test_listings_whose_variant_is_gone_are_pruned(store: DiskStore) -> None:
    gone = put(store, A, b"gzipped", vary=AE, req=GZIP)
    gone.meta_path.unlink()  # evicted or removed by another process
    kept = put(store, A, b"brotli", vary=AE, req=BR)
    assert listed_variants(store, A) == [kept.meta_path.stem]


def test_open_body_holds_the_version_it_opened(store: DiskStore) -> None:
    old = put(store, A, b"x" * 1000)
    fd = store.open_body(old)
    assert fd is not None
    try:
        put(store, A, b"y" * 1000)  # replaced: the old body file is unlinked
        assert not old.body_path.exists()
        assert os.pread(fd, 2000, 0) == b"x" * 1000
        assert store.verify_body(old, fd) is True
    finally:
        os.close(fd)


def test_open_body_of_a_removed_or_short_body_is_none(store: DiskStore) -> None:
    entry = put(store, A, b"x" * 1000)
    entry.body_path.write_bytes(b"x" * 999)
    assert store.open_body(entry) is None
    entry.body_path.unlink()
    assert store.open_body(entry) is None


def _resync(store: DiskStore, now: float) -> bool:
    started = store.resync_if_due(now)
    if started:
        assert store._resync is not None
        store._resync.join(10)
    return started


def test_the_index_follows_purges_and_stores_of_other_processes(cache_dir: Path) -> None:
    worker = make_store(cache_dir)
    for name in (b"a", b"b", b"c", b"d"):
        put(worker, name, b"x" * 100)
    assert worker.stats.entries == 4
    now = time.monotonic()
    assert not _resync(worker, now)  # nothing changed and not due yet
    # `pibl cache purge --all` in another process, then another worker stores one entry
    cli = make_store(cache_dir)
    cli.purge_all()
    put(make_store(cache_dir), b"e", b"y" * 10)
    assert worker.stats.entries == 4  # this process cannot know yet
    assert _resync(worker, now + 1)  # the purge marker changed: at once, not after 5 s
    assert (worker.stats.entries, worker.stats.bytes) == cli.entries_on_disk()
    assert worker.stats.entries == 1
    # a single URL purged elsewhere: followed at the next periodic resync
    put(worker, b"f", b"z" * 10)
    cli.invalidate(b"e")
    assert worker.stats.entries == 2
    assert not _resync(worker, time.monotonic() + 1)
    assert _resync(worker, time.monotonic() + 6)
    assert worker.stats.entries == 1
    assert get(worker, b"f") is not None and get(worker, b"e") is None


def test_resync_keeps_what_this_process_stores_meanwhile(cache_dir: Path) -> None:
    store = make_store(cache_dir)
    put(store, b"a", b"1")
    with store._lock:
        store._touched = set()
    entry = put(store, b"b", b"2")
    assert str(entry.meta_path) in store._touched
    store._touched = None
    store.resync()
    assert store.stats.entries == 2
