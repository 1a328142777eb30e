"""The on-disk cache store: atomic entries that survive crashes, an LRU bound, a memory tier.

Layout under the cache directory (files ``0600``, directories ``0700``)::

    tmp/                         bodies and metadata being written
    ab/<sha256>.meta             metadata of one entry, or a Vary pointer
    ab/<sha256>.<nonce>.body     the body an entry's metadata points to
    generations                  change counters every process maps (see generations)
    purged                       a new token at every purge of everything

Why two files per entry: a 304 from the origin refreshes an entry's headers and times; with
the metadata apart, that is a small atomic rewrite instead of copying the body.

Durability rules:

* a body is written to ``tmp/``, fsynced (policy ``fsync``), then renamed into place; only
  then is the metadata that names it written the same way. A reader therefore never sees
  metadata whose body is missing, and a crash leaves at worst files in ``tmp/`` (removed at
  start) or a body no metadata names (removed by the background scan);
* metadata carries a magic line, its own CRC-32, the full key (a hash collision or a foreign
  file is detected, not served), and the body's length and CRC-32. A body whose size is wrong
  is never served; its CRC is checked when it is read into memory, and for large bodies once
  per process before the first ``sendfile``;
* startup never waits for a scan: lookups go straight to the file named by the key; a
  background thread walks the directory to learn sizes for the LRU bound and to collect
  garbage.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pibl.cache.generations import Generations, slot_of
from pibl.cache.key import Normalizer, digest, secondary_key, variant_digest, variant_name
from pibl.http.message import HeaderList
from pibl.procs import alive

MAGIC = b"PIBL-CACHE/1\n"
MAX_VARIANTS = 32
RESYNC_INTERVAL = 5.0  # seconds between walks that bring the index back in line with the disk


@dataclass(slots=True)
class Entry:
    """A stored response, as read from its metadata."""

    key: bytes
    secondary: bytes
    status: int
    reason: bytes
    headers: HeaderList
    request_time: float
    response_time: float
    initial_age: float
    lifetime: float
    body_length: int
    body_crc: int
    body_path: Path
    meta_path: Path
    body: bytes | None = None  # set when served from the memory tier
    # the cache layer's parse of ``headers``' directives, kept with the list it came from
    # (a revalidation replaces the list): (headers, pibl.cache.policy.CacheControl)
    directives: tuple[HeaderList, Any] | None = field(default=None, compare=False, repr=False)
    # and of the head a hit sends (see ``CacheLayer.hit_response``): (headers, the bytes
    # that depend on the entry only, whether they hold a Date)
    head: tuple[HeaderList, bytes, bool] | None = field(default=None, compare=False, repr=False)
    # its metadata file as checked before it was read (for the memory tier)
    checked: Checked | None = field(default=None, compare=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "entry",
            "key": self.key.decode("latin-1"),
            "secondary": self.secondary.decode("latin-1"),
            "status": self.status,
            "reason": self.reason.decode("latin-1"),
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in self.headers],
            "request_time": self.request_time,
            "response_time": self.response_time,
            "initial_age": self.initial_age,
            "lifetime": self.lifetime,
            "body_file": self.body_path.name,
            "body_length": self.body_length,
            "body_crc": self.body_crc,
        }


@dataclass(slots=True)
class Stats:
    entries: int = 0
    bytes: int = 0
    hits: int = 0
    stored: int = 0
    evictions: int = 0
    discarded: int = 0  # torn, foreign or corrupt files found and removed
    indexed: bool = False


def _encode_meta(obj: dict[str, Any]) -> bytes:
    payload = json.dumps(obj, separators=(",", ":")).encode()
    return MAGIC + payload + b"\n" + b"%08x\n" % zlib.crc32(payload)


def _decode_meta(data: bytes) -> dict[str, Any] | None:
    if not data.startswith(MAGIC) or not data.endswith(b"\n"):
        return None
    body = data[len(MAGIC) : -1]
    payload, _, crc = body.rpartition(b"\n")
    try:
        if int(crc, 16) != zlib.crc32(payload):
            return None
        obj = json.loads(payload)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


class _Replaced(Exception):
    """The entry being read was replaced by a newer commit while it was read."""


class BodyWriter:
    """Collects a response body into a temporary file while it streams to the client."""

    __slots__ = (
        "_fd",
        "_tmp",
        "crc",
        "entry",
        "failed",
        "length",
        "limit",
        "purges",
        "store",
        "vary",
    )

    def __init__(self, store: DiskStore, entry: Entry, limit: int, vary: list[str]) -> None:
        self.store = store
        self.entry = entry
        self.vary = vary  # the response's Vary: the primary key lists this variant at commit
        self.purges = store.purge_generation()
        # named after the writing process, so another process cleaning up leaves it alone
        self._tmp = store.tmp_dir / f"{os.getpid()}-{secrets.token_hex(8)}.body"
        self._fd: int | None = os.open(
            self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
        )
        self.length = 0
        self.crc = 0
        self.failed = False
        self.limit = limit

    def write(self, data: bytes) -> None:
        if self.failed or self._fd is None:
            return
        self.length += len(data)
        if self.length > self.limit:
            self.abort()
            return
        try:
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError:
            self.abort()
            return
        self.crc = zlib.crc32(data, self.crc)

    def abort(self) -> None:
        self.failed = True
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        with contextlib.suppress(OSError):
            self._tmp.unlink()

    def commit(self) -> Entry | None:
        """Make the entry visible (blocking: run it in a thread). None if it failed."""
        if self.failed or self._fd is None:
            self.abort()
            return None
        store = self.store
        if store.purge_generation() != self.purges:  # a purge of everything while it streamed
            self.abort()
            return None
        try:
            if store.fsync:
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            entry = self.entry
            entry.body_length = self.length
            entry.body_crc = self.crc
            entry.body_path = entry.meta_path.with_name(
                f"{entry.meta_path.stem}.{secrets.token_hex(4)}.body"
            )
            entry.body_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.replace(self._tmp, entry.body_path)
            store.write_entry_meta(entry)
            if self.vary:  # listed only now that it exists: no listing points nowhere
                store.list_variant(entry.key, self.vary, entry.meta_path.stem)
        except OSError:
            self.abort()
            return None
        if store.purge_generation() != self.purges:  # the purge came during the commit
            store.invalidate_entry(entry)
            return None
        return entry


RECHECK = 1.0  # seconds a memory-tier copy may go without a stat (files changed by hand)
VARY_INDEXES = 4096  # Vary indexes kept in memory (a few hundred bytes each)
KEYS_KEPT = 8192  # primary keys whose metadata path is remembered
VERIFIED_KEPT = 8192  # body files whose CRC this process checked


class Checked:
    """A metadata file as last checked: its generations slot and the count read there,
    its mtime (-1: gone) and when (monotonic seconds). Renewed in place, so a copy in
    memory is never put back into its dict after another thread removed it."""

    __slots__ = ("at", "mtime", "seen", "slot")

    def __init__(self, slot: int, seen: int, mtime: int, at: float) -> None:
        self.slot = slot
        self.seen = seen
        self.mtime = mtime
        self.at = at


def _mtime(path: str) -> int:
    """The file's mtime in nanoseconds, -1 if it is gone."""
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return -1


def _writer_alive(name: str) -> bool:
    """Whether the process named in a temporary file's name (``<pid>-...``) still runs."""
    pid, dash, _ = name.partition("-")
    if not dash or not pid.isdigit() or int(pid) == os.getpid():
        return False
    return alive(int(pid))


class DiskStore:
    """Entries on disk plus a bounded memory tier of small hot bodies."""

    def __init__(
        self,
        directory: Path,
        *,
        max_size: int,
        fsync: bool = True,
        memory_max: int = 32 * 1024 * 1024,
        memory_entry_max: int = 1024 * 1024,
        normalize: Normalizer | None = None,
    ) -> None:
        self.dir = directory
        self._dir_str = str(directory)
        self.normalize = normalize
        self.tmp_dir = directory / "tmp"
        # a new token at every purge of everything, in any process sharing the directory
        self.purge_marker = directory / "purged"
        self.max_size = max_size
        self.fsync = fsync
        self.memory_max = memory_max
        # (a body larger than the whole tier would only push every other one out of it)
        self.memory_entry_max = min(memory_entry_max, memory_max)
        self.stats = Stats()
        self._lock = threading.Lock()
        self._sizes: OrderedDict[str, int] = OrderedDict()  # meta path -> bytes, LRU order
        # meta path -> (entry, body, Checked): a hot entry's body in memory
        self._memory: OrderedDict[str, tuple[Entry, bytes, Checked]] = OrderedDict()
        self._memory_bytes = 0
        # the Vary index of each URI stored in variants (its field names), by metadata path,
        # as last checked against the disk: a hit on a variant reads no index file
        self._varies: OrderedDict[str, tuple[list[str], Checked]] = OrderedDict()
        # a primary key or variant name -> its metadata path (a SHA-256 spared per hit)
        self._keys: dict[bytes, str] = {}
        self._verified: set[str] = set()
        # resync: the index follows what other processes store, purge and evict
        self._touched: set[str] | None = None  # keys accounted while a resync runs
        self._resync: threading.Thread | None = None
        self._resynced_at = time.monotonic()
        self._resync_seconds = 0.0
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.tmp_dir.mkdir(mode=0o700, exist_ok=True)
        # what every process sharing the directory changes, counted (see generations)
        self.generations = Generations.open(self.dir)
        self.recheck = RECHECK  # seconds a copy in memory goes without a stat at most
        self._seen_purge = self.purge_generation()
        for leftover in self.tmp_dir.iterdir():  # a crash mid-write leaves these
            if not _writer_alive(leftover.name):
                with contextlib.suppress(OSError):
                    leftover.unlink()

    # -- index --------------------------------------------------------------------------

    def start_indexing(self) -> threading.Thread:
        thread = threading.Thread(target=self.scan, name="pibl-cache-index", daemon=True)
        thread.start()
        return thread

    def scan(self) -> None:
        """Walk the directory: sizes for the LRU bound, garbage removed."""
        referenced: set[str] = set()
        bodies: list[Path] = []
        sizes: list[tuple[float, str, int]] = []
        for sub in self.dir.iterdir():
            if not sub.is_dir() or sub.name == "tmp":
                continue
            for path in sub.iterdir():
                if path.suffix == ".body":
                    bodies.append(path)
                    continue
                if path.suffix != ".meta":
                    continue
                try:
                    data = path.read_bytes()
                    st = path.stat()
                except OSError:
                    continue
                meta = _decode_meta(data)
                if meta is None:
                    self._discard(path)
                    continue
                if meta.get("type") == "entry":
                    referenced.add(str(meta.get("body_file")))
                    size = len(data) + int(meta.get("body_length", 0))
                    sizes.append((st.st_atime, str(path), size))
        for body in bodies:
            if body.name not in referenced:
                try:
                    if time.time() - body.stat().st_mtime > 60:  # not a commit in progress
                        body.unlink()
                except OSError:
                    pass
        sizes.sort()
        with self._lock:
            known = self._sizes
            self._sizes = OrderedDict((p, s) for _, p, s in sizes if p not in known)
            self._sizes.update(known)
            self.stats.entries = len(self._sizes)
            self.stats.bytes = sum(self._sizes.values())
            self.stats.indexed = True
        self.evict()

    def resync_if_due(self, now: float, interval: float = RESYNC_INTERVAL) -> bool:
        """Start a background resync after a purge of everything or every few seconds.

        Other workers, ``pibl cache purge`` and a manual ``rm`` change the directory
        without telling this process; the index (and the figures the dashboard shows)
        follows the disk again after a resync. The interval grows with the time a walk
        takes, so a large cache spends at most about 2% of one thread on it.
        """
        if self._resync is not None and self._resync.is_alive():
            return False
        purged = self.purge_generation()
        due = now - self._resynced_at >= max(interval, 50 * self._resync_seconds)
        if purged == self._seen_purge and not due:
            return False
        self._seen_purge = purged
        self._resynced_at = now
        self._resync = threading.Thread(target=self.resync, name="pibl-cache-resync", daemon=True)
        self._resync.start()
        return True

    def resync(self) -> None:
        """Rebuild the index from the directory: add what is new, drop what is gone."""
        started = time.monotonic()
        with self._lock:
            self._touched = set()
        try:
            self.scan()  # adds entries found on disk, keeps the known ones in LRU order
            gone = [key for key in list(self._sizes) if not os.path.exists(key)]
            with self._lock:
                for key in gone:
                    if key in self._touched:
                        continue  # stored or removed by this process meanwhile: already right
                    size = self._sizes.pop(key, None)
                    if size is not None:  # (a memory-tier copy is checked against the disk)
                        self.stats.bytes -= size
                        self.stats.entries -= 1
        except OSError:
            pass  # a directory removed under the walk (a purge): the next resync catches up
        finally:
            with self._lock:
                self._touched = None
            self._resync_seconds = time.monotonic() - started
            self._resynced_at = time.monotonic()

    def _account(self, meta_path: Path, size: int) -> None:
        with self._lock:
            key = str(meta_path)
            if self._touched is not None:
                self._touched.add(key)
            old = self._sizes.pop(key, None)
            if old is not None:
                self.stats.bytes -= old
                self.stats.entries -= 1
            if size >= 0:
                self._sizes[key] = size
                self.stats.bytes += size
                self.stats.entries += 1

    def _touch(self, meta_path: Path | str) -> None:
        with self._lock:
            key = str(meta_path)
            if key in self._sizes:
                self._sizes.move_to_end(key)

    def evict(self) -> int:
        """Remove least recently used entries until the store fits in ``max_size``."""
        removed = 0
        while True:
            with self._lock:
                if self.stats.bytes <= self.max_size or not self._sizes:
                    break
                victim, _ = next(iter(self._sizes.items()))
            self._remove_meta(Path(victim))
            self.stats.evictions += 1
            removed += 1
        return removed

    # -- paths --------------------------------------------------------------------------

    def meta_key(self, hexdigest: str) -> str:
        """The metadata file's path as a string (the memory tier and LRU index key)."""
        return f"{self._dir_str}/{hexdigest[:2]}/{hexdigest}.meta"

    def meta_path(self, hexdigest: str) -> Path:
        return Path(self.meta_key(hexdigest))

    # -- reading ------------------------------------------------------------------------

    def _read_meta(self, path: Path) -> dict[str, Any] | None:
        try:
            data = path.read_bytes()
        except OSError:
            return None
        meta = _decode_meta(data)
        if meta is None:
            self._discard(path)
        return meta

    def lookup(self, primary: bytes, request_headers: HeaderList) -> tuple[Entry | None, str]:
        """The stored response for this request, and "hit", "uri-miss" or "vary-miss".

        Metadata that decodes but makes no sense (written by another version, or foreign)
        is discarded, never served and never allowed to raise.
        """
        try:
            for _ in range(2):  # once more if a newer version replaced it while reading
                try:
                    return self._lookup(primary, request_headers)
                except _Replaced:
                    continue
            return None, "uri-miss"
        except (TypeError, ValueError, OverflowError, AttributeError, KeyError):
            with contextlib.suppress(Exception):
                self._discard(self.meta_path(digest(primary)))
            return None, "uri-miss"

    def _meta_key_of(self, name: bytes) -> str:
        """``meta_key(digest(name))``, remembered: a SHA-256 and a path spared per hit."""
        keys = self._keys
        key = keys.get(name)
        if key is None:
            if len(keys) >= KEYS_KEPT:
                keys.clear()
            key = keys[name] = self.meta_key(digest(name))
        return key

    def _lookup(self, primary: bytes, request_headers: HeaderList) -> tuple[Entry | None, str]:
        key = self._meta_key_of(primary)
        cached = self._memory_get(key)
        if cached is not None:
            return cached, "hit"
        names = self._vary_get(key)
        meta: dict[str, Any] | None = None
        path: Path | None = None
        if names is None:
            checked = self._check(key)
            path = Path(key)
            meta = self._read_meta(path)
            if meta is None or meta.get("key") != primary.decode("latin-1"):
                return None, "uri-miss"
            if meta.get("type") == "vary":
                names = [str(n) for n in meta.get("vary", [])]
                self._vary_remember(key, names, checked)
        if names is not None:
            secondary = secondary_key(names, request_headers, self.normalize)
            vkey = self._meta_key_of(variant_name(primary, secondary))
            cached = self._memory_get(vkey)
            if cached is not None:
                return cached, "hit"
            vpath = Path(vkey)
            checked = self._check(vkey)  # (before the read: a change after it is seen)
            vmeta = self._read_meta(vpath)
            if vmeta is None or vmeta.get("secondary") != secondary.decode("latin-1"):
                return None, "vary-miss"
            if vmeta.get("key") != primary.decode("latin-1"):
                return None, "vary-miss"
            entry = self._entry(vmeta, vpath)
        else:
            assert meta is not None and path is not None
            entry = self._entry(meta, path)
        if entry is None:
            return None, "uri-miss"
        entry.checked = checked
        self._touch(entry.meta_path)
        return entry, "hit"

    def _entry(self, meta: dict[str, Any], path: Path) -> Entry | None:
        try:
            entry = Entry(
                key=str(meta["key"]).encode("latin-1"),
                secondary=str(meta.get("secondary", "")).encode("latin-1"),
                status=int(meta["status"]),
                reason=str(meta.get("reason", "")).encode("latin-1"),
                headers=[(k.encode("latin-1"), v.encode("latin-1")) for k, v in meta["headers"]],
                request_time=float(meta["request_time"]),
                response_time=float(meta["response_time"]),
                initial_age=float(meta["initial_age"]),
                lifetime=float(meta["lifetime"]),
                body_length=int(meta["body_length"]),
                body_crc=int(meta["body_crc"]),
                body_path=path.with_name(str(meta["body_file"])),
                meta_path=path,
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            self._discard(path)
            return None
        try:
            size = entry.body_path.stat().st_size
        except OSError:
            size = -1
        if size < 0 or size != entry.body_length or "/" in str(meta["body_file"]):
            if not self._discard(path, str(meta["body_file"])):
                raise _Replaced  # a newer version was committed meanwhile: read it instead
            return None
        return entry

    def read_body(self, entry: Entry) -> bytes | None:
        """The whole body (for bodies below the ``sendfile`` size); None if corrupt.

        Its CRC is checked the first time this process reads it, as a large body's is
        before its first ``sendfile``: a committed body file is never rewritten (a new
        version has a new name), and a body too large for the memory tier is read at every
        hit, where a CRC of 100 KB cost more than the read.
        """
        if entry.body is not None:
            return entry.body
        try:
            data = entry.body_path.read_bytes()
        except OSError:
            return None
        name = str(entry.body_path)
        if len(data) != entry.body_length or (
            name not in self._verified and zlib.crc32(data) != entry.body_crc
        ):
            self._discard(entry.meta_path, entry.body_path.name)
            return None
        if len(data) <= self.memory_entry_max:
            self._remember(entry, data)
        else:  # (read again at the next hit: checked once)
            self._note_verified(name)
        return data

    def verified(self, entry: Entry) -> bool:
        """Whether this body was already CRC-checked by this process."""
        return str(entry.body_path) in self._verified

    def open_body(self, entry: Entry) -> int | None:
        """A descriptor on the entry's body, or None if it is gone or has the wrong size.

        A large hit opens its body before the response head is written: once open, the
        body stays readable even if another request or process replaces or removes the
        entry, so the client gets either the whole body or (None here) a miss.
        """
        try:
            fd = os.open(entry.body_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            size = os.fstat(fd).st_size
        except OSError:
            size = -1
        if size != entry.body_length:
            os.close(fd)
            return None
        return fd

    def verify_body(self, entry: Entry, fd: int | None = None) -> bool:
        """CRC check of a large body, once per process (blocking: run it in a thread).

        With ``fd`` (from :meth:`open_body`) the open file is checked, which is the one
        that will be sent whatever happened to the path since.
        """
        name = str(entry.body_path)
        if name in self._verified:
            return True
        crc = 0
        length = 0
        try:
            own = fd is None
            if fd is None:
                fd = os.open(entry.body_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                while chunk := os.pread(fd, 1 << 20, length):
                    crc = zlib.crc32(chunk, crc)
                    length += len(chunk)
            finally:
                if own:
                    os.close(fd)
        except OSError:
            return False
        if crc != entry.body_crc or length != entry.body_length:
            self._discard(entry.meta_path, entry.body_path.name)
            return False
        self._note_verified(name)
        return True

    def _note_verified(self, name: str) -> None:
        """Remember a body file whose CRC matched (a bounded set of names)."""
        verified = self._verified
        if name not in verified:
            if len(verified) >= VERIFIED_KEPT:
                verified.clear()
            verified.add(name)

    def _check(self, key: str) -> Checked:
        """The metadata file at ``key`` as it is now: its slot's count, read first (a change
        after it is counted later), then its mtime."""
        slot = slot_of(key)
        gens = self.generations
        seen = gens.counts[slot] if gens is not None else 0
        return Checked(slot, seen, _mtime(key), time.monotonic())

    def _still(self, key: str, checked: Checked) -> bool:
        """Whether the file at ``key`` is still the one ``checked`` describes (renewed in
        place when that took a ``stat``).

        No ``stat`` while no process counted a change in the file's slot and the last
        check is recent: another worker, ``pibl cache purge`` or the admin API count every
        file they replace or remove; a file changed by hand is seen within ``recheck``
        seconds.
        """
        gens = self.generations
        if (
            gens is not None
            and gens.counts[checked.slot] == checked.seen
            and time.monotonic() - checked.at < self.recheck
        ):
            return True
        now = self._check(key)
        if now.mtime != checked.mtime:
            return False
        checked.seen, checked.at = now.seen, now.at
        return True

    def _memory_get(self, key: str) -> Entry | None:
        """A memory-tier entry, if its metadata file is still the one it was read from."""
        cached = self._memory.get(key)
        if cached is None:
            return None
        entry, _, checked = cached
        if not self._still(key, checked):
            self._forget(key)
            return None
        with contextlib.suppress(KeyError):  # (removed by another thread meanwhile)
            self._memory.move_to_end(key)
        self._touch(key)  # a memory hit is a use for the LRU bound too
        return entry

    def _vary_get(self, key: str) -> list[str] | None:
        """The Vary index at ``key`` as last read, if the file is still that one."""
        cached = self._varies.get(key)
        if cached is None:
            return None
        names, checked = cached
        if not self._still(key, checked):
            self._varies.pop(key, None)
            return None
        return names

    def _vary_remember(self, key: str, names: list[str], checked: Checked) -> None:
        if checked.mtime < 0:
            return
        self._varies[key] = (names, checked)
        self._varies.move_to_end(key)
        while len(self._varies) > VARY_INDEXES:
            self._varies.popitem(last=False)

    def _remember(self, entry: Entry, body: bytes) -> None:
        key = str(entry.meta_path)
        old = self._memory.pop(key, None)
        if old is not None:
            self._memory_bytes -= len(old[1])
        # as checked before its metadata was read: a version replaced since then is seen
        checked = entry.checked if entry.checked is not None else self._check(key)
        if checked.mtime < 0:
            return
        entry.body = body
        self._memory[key] = (entry, body, checked)
        self._memory_bytes += len(body)
        while self._memory_bytes > self.memory_max and self._memory:
            _, (_, dropped, _) = self._memory.popitem(last=False)
            self._memory_bytes -= len(dropped)

    def _forget(self, meta_path: Path | str) -> None:
        old = self._memory.pop(str(meta_path), None)
        if old is not None:
            self._memory_bytes -= len(old[1])

    # -- writing ------------------------------------------------------------------------

    def begin(
        self,
        primary: bytes,
        vary: list[str],
        request_headers: HeaderList,
        *,
        status: int,
        reason: bytes,
        headers: HeaderList,
        request_time: float,
        response_time: float,
        initial_age: float,
        lifetime: float,
        limit: int,
    ) -> BodyWriter | None:
        secondary = secondary_key(vary, request_headers, self.normalize) if vary else b""
        hexdigest = variant_digest(primary, secondary) if vary else digest(primary)
        meta_path = self.meta_path(hexdigest)
        entry = Entry(
            key=primary,
            secondary=secondary,
            status=status,
            reason=reason,
            headers=headers,
            request_time=request_time,
            response_time=response_time,
            initial_age=initial_age,
            lifetime=lifetime,
            body_length=0,
            body_crc=0,
            body_path=meta_path,
            meta_path=meta_path,
        )
        try:
            return BodyWriter(self, entry, limit, vary)
        except OSError:
            return None

    def list_variant(self, primary: bytes, vary: list[str], variant: str) -> None:
        """Point the primary key at a committed variant (kept to a bounded list).

        Called once the variant's own metadata is in place, and listings whose metadata is
        gone (evicted, discarded, never committed by a crashed writer) are dropped on the
        way, so a lookup never follows a listing to nothing.
        """
        path = self.meta_path(digest(primary))
        meta = self._read_meta(path)
        variants: list[str] = []
        if meta is not None and meta.get("type") == "vary" and meta.get("vary") == vary:
            variants = [str(v) for v in meta.get("variants", [])]
        elif meta is not None and meta.get("type") == "entry":
            self._remove_meta(path)
        listed = [v for v in variants if v != variant and os.path.exists(self.meta_key(v))]
        if variant in variants and listed == [v for v in variants if v != variant]:
            return  # already listed, nothing stale
        variants = [*listed, variant]
        for old in variants[:-MAX_VARIANTS]:
            self._remove_meta(self.meta_path(old))
        variants = variants[-MAX_VARIANTS:]
        self._write_atomic(
            path,
            _encode_meta(
                {
                    "type": "vary",
                    "key": primary.decode("latin-1"),
                    "vary": vary,
                    "variants": variants,
                }
            ),
        )

    def write_entry_meta(self, entry: Entry, *, replace_body: bool = True) -> None:
        path = entry.meta_path
        old = self._read_meta(path) if replace_body else None
        self._write_atomic(path, _encode_meta(entry.to_json()))
        self._forget(path)
        if old is not None and old.get("type") == "entry":
            old_body = path.with_name(str(old.get("body_file")))
            if old_body != entry.body_path:
                with contextlib.suppress(OSError):
                    old_body.unlink()
        self._account(path, entry.body_length + 512)
        self.stats.stored += 1
        self.evict()

    def update(self, entry: Entry) -> None:
        """Rewrite an entry's metadata after a 304 refreshed it (body unchanged)."""
        self._write_atomic(entry.meta_path, _encode_meta(entry.to_json()))
        self._forget(entry.meta_path)

    def _write_atomic(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.tmp_dir / f"{os.getpid()}-{secrets.token_hex(8)}.meta"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if path.suffix == ".meta":
            self._changed(str(path))

    def _changed(self, key: str) -> None:
        """Tell every process sharing the directory that the metadata at ``key`` changed."""
        if self.generations is not None:
            self.generations.bump(slot_of(key))

    # -- removing -----------------------------------------------------------------------

    def _remove_meta(self, path: Path) -> None:
        meta = None
        with contextlib.suppress(OSError):
            meta = _decode_meta(path.read_bytes())
        with contextlib.suppress(OSError):
            path.unlink()
        self._forget(path)
        self._changed(str(path))
        self._account(path, -1)
        if meta is None:
            return
        if meta.get("type") == "entry":
            body_file = str(meta.get("body_file"))
            if "/" not in body_file and body_file.endswith(".body"):
                with contextlib.suppress(OSError):
                    path.with_name(body_file).unlink()
        elif meta.get("type") == "vary":
            for variant in meta.get("variants", []):
                self._remove_meta(self.meta_path(str(variant)))

    def _discard(self, path: Path, body_file: str | None = None) -> bool:
        """A torn, foreign or corrupt entry: never served, removed.

        With ``body_file`` the metadata is removed only if it still names that body: when
        another request or process committed a new version in the meantime (and removed the
        old body), the new version is left alone. Returns whether anything was removed.
        """
        if body_file is not None:
            current = self._read_meta(path)
            if current is not None and str(current.get("body_file")) != body_file:
                return False
        self.stats.discarded += 1
        self._remove_meta(path)
        return True

    def invalidate_entry(self, entry: Entry) -> None:
        """Remove one stored variant (a commit that raced with a purge)."""
        self._remove_meta(entry.meta_path)

    def invalidate(self, primary: bytes) -> bool:
        path = self.meta_path(digest(primary))
        existed = path.exists()
        self._remove_meta(path)
        return existed

    def purge_generation(self) -> bytes:
        """Changes with every purge of everything, in any process sharing the directory."""
        try:
            return self.purge_marker.read_bytes()
        except OSError:
            return b""

    def purge_all(self) -> int:
        """Remove every entry; bodies still being stored when it happens are dropped too."""
        self._write_atomic(self.purge_marker, secrets.token_hex(8).encode())
        count = 0
        for sub in list(self.dir.iterdir()):
            if sub.is_dir() and sub.name != "tmp":
                count += sum(1 for p in sub.iterdir() if p.suffix == ".meta")
                shutil.rmtree(sub, ignore_errors=True)
        if self.generations is not None:
            self.generations.bump_all()
        with self._lock:
            self._sizes.clear()
            self._memory.clear()
            self._varies.clear()
            self._memory_bytes = 0
            self.stats.entries = 0
            self.stats.bytes = 0
        return count

    def entries_on_disk(self) -> tuple[int, int]:
        """(entries, bytes) by walking the directory; for ``pibl cache stats``."""
        entries = 0
        size = 0
        for sub in self.dir.iterdir():
            if not sub.is_dir() or sub.name == "tmp":
                continue
            for path in sub.iterdir():
                with contextlib.suppress(OSError):
                    size += path.stat().st_size
                    if path.suffix == ".meta":
                        meta = _decode_meta(path.read_bytes())
                        if meta is not None and meta.get("type") == "entry":
                            entries += 1
        return entries, size


__all__ = ["BodyWriter", "DiskStore", "Entry", "Stats", "field"]
