"""Are the replicas the same application? Shadow comparison, majority verdict, replay (pure).

PIBL fronts one application replicated on several servers. Health checks only say that a
replica answers; a replica left on an old release, with a stale template or a missing
static file answers 200 too, and serves different pages to its share of the users. PIBL
sees every replica's answers, so it can compare them:

* **Sampling** (``sampled``): a share (``[consistency] sample``) of the idempotent requests
  (``GET``/``HEAD`` by default, never with ``Authorization`` or ``Cookie`` unless
  configured: a per-user page differs between users, not between replicas) is also sent
  to one other replica in the background. Its answer never reaches the client.
* **Comparison** (``fingerprint``): status, a digest of the body and a configured list
  of response fields. Volatile parts are left out first: fields such as ``Date`` are
  never compared, and a regular expression can remove timestamps or CSRF tokens from
  text bodies before hashing (``normalise_body``).
* **Verdict** (``Votes``): two answers that differ do not say which replica is wrong.
  Per URL, the latest answer of each replica within a window is kept; with answers from
  three or more replicas, one that differs from a majority that agrees is the outlier.
  With two replicas PIBL can only say that they differ.
* **Replay** (``ReplayRing``): requests whose answer two replicas agreed on are kept as
  URL + fingerprint (a bounded ring of fixed slots, so it can live in memory the workers
  share). A replica that comes back is asked those URLs again before it is given
  traffic; it returns only when its answers match.

Nothing here reads the clock, a socket or a random generator: the shell
(``pibl.proxy.shadow``) feeds values in and acts on what comes out.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import struct
from collections import OrderedDict
from collections.abc import Iterable, MutableSequence, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pibl.config import ConsistencyConfig

SHADOW_HEADER = b"PIBL-Shadow"
CREDENTIALS = (b"authorization", b"cookie")
# The replay ring: 64 slots of 2 KiB (128 KiB per node). An entry is a URL, the host, the
# fields that choose a representation and a fingerprint; a longer one is not kept.
REPLAY_SLOTS = 64
REPLAY_SLOT_BYTES = 2048
# Keys of divergences already logged (node-wide "once per URL and replica").
REPORTED_SLOTS = 1024
# Per-URL votes kept per worker (least recently seen dropped first).
VOTES_MAX_URLS = 4096
# Request fields that choose the representation a replica answers with: kept for replay.
REPLAY_FIELDS = (b"accept", b"accept-encoding", b"accept-language")
_TEXT = re.compile(rb"^(text/|application/(json|xml|javascript|[a-z.+-]*\+(json|xml))\b)")


@dataclass(frozen=True, slots=True)
class Rules:
    """What is shadowed and how answers are compared, built once per configuration."""

    sample: float = 0.0
    methods: frozenset[bytes] = frozenset({b"GET", b"HEAD"})
    credentials: bool = False
    fields: tuple[bytes, ...] | None = (b"content-type",)  # None: every field not ignored
    ignore: frozenset[bytes] = frozenset()
    skip_paths: tuple[bytes, ...] = ()
    ignore_body: re.Pattern[bytes] | None = None
    max_body: int = 1024 * 1024

    @classmethod
    def from_config(cls, cfg: ConsistencyConfig) -> Rules:
        ignore = frozenset(h.lower().encode() for h in cfg.ignore_headers)
        fields: tuple[bytes, ...] | None
        if "*" in cfg.headers:
            fields = None
        else:
            fields = tuple(h.lower().encode() for h in cfg.headers if h.lower().encode())
        return cls(
            sample=cfg.sample,
            methods=frozenset(m.encode() for m in cfg.methods),
            credentials=cfg.credentials,
            fields=fields,
            ignore=ignore,
            skip_paths=tuple(p.encode() for p in cfg.skip_paths),
            ignore_body=re.compile(cfg.ignore_body.encode()) if cfg.ignore_body else None,
            max_body=cfg.max_body,
        )


def eligible(
    rules: Rules, method: bytes, target: bytes, headers: Iterable[tuple[bytes, bytes]]
) -> bool:
    """Whether a request may be shadowed at all (method, credentials, skipped paths)."""
    if method not in rules.methods:
        return False
    if rules.skip_paths and target.startswith(rules.skip_paths):
        return False
    if not rules.credentials:
        for name, _ in headers:
            if name.lower() in CREDENTIALS:
                return False
    return True


def sampled(
    rules: Rules,
    draw: float,
    method: bytes,
    target: bytes,
    headers: Iterable[tuple[bytes, bytes]],
) -> bool:
    """The sampling decision for one request; ``draw`` is uniform in [0, 1)."""
    return draw < rules.sample and eligible(rules, method, target, headers)


def _field(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    values = [v.strip() for k, v in headers if k.lower() == name]
    return b", ".join(values) if values else None


def is_text(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """A body the ``ignore_body`` expression applies to: text, not content-coded."""
    if _field(headers, b"content-encoding") not in (None, b"identity"):
        return False
    ctype = (_field(headers, b"content-type") or b"").lower()
    return bool(_TEXT.match(ctype))


def normalise_body(rules: Rules, headers: Sequence[tuple[bytes, bytes]], body: bytes) -> bytes:
    """The body as compared: volatile parts removed from text bodies."""
    if rules.ignore_body is not None and body and is_text(headers):
        return rules.ignore_body.sub(b"", body)
    return body


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """What is compared of one answer; ``length`` and ``digest`` are of the normalised body."""

    status: int
    length: int
    digest: str
    fields: tuple[tuple[str, str], ...] = ()

    def same(self, other: Fingerprint) -> bool:
        return (
            self.status == other.status
            and self.digest == other.digest
            and self.fields == other.fields
        )

    def to_json(self) -> list[object]:
        return [self.status, self.length, self.digest, [list(f) for f in self.fields]]

    @classmethod
    def from_json(cls, data: list[object]) -> Fingerprint:
        status, length, digest, fields = data
        assert isinstance(status, int) and isinstance(length, int) and isinstance(digest, str)
        assert isinstance(fields, list)
        return cls(status, length, digest, tuple((str(k), str(v)) for k, v in fields))


def fingerprint(
    rules: Rules, status: int, headers: Sequence[tuple[bytes, bytes]], body: bytes
) -> Fingerprint:
    """The fingerprint of one answer (its body whole, as the backend sent it)."""
    normal = normalise_body(rules, headers, body)
    if rules.fields is None:
        names = sorted(
            {k.lower() for k, _ in headers} - rules.ignore - {b"content-length"},
        )
    else:
        names = [n for n in rules.fields if n not in rules.ignore]
    fields = []
    for name in names:
        value = _field(headers, name)
        fields.append((name.decode("latin-1"), "" if value is None else value.decode("latin-1")))
    return Fingerprint(
        status=status,
        length=len(normal),
        digest=hashlib.blake2b(normal, digest_size=16).hexdigest(),
        fields=tuple(fields),
    )


def difference(expected: Fingerprint, got: Fingerprint) -> str:
    """A short diff: status, length, digests and the first differing header field."""
    parts = [
        f"status {expected.status} vs {got.status}",
        f"length {expected.length} vs {got.length}",
        f"digest {expected.digest[:12]} vs {got.digest[:12]}",
    ]
    theirs = dict(got.fields)
    for name, value in expected.fields:
        if theirs.get(name) != value:
            parts.append(f"{name}: {value or '(none)'!r} vs {theirs.get(name) or '(none)'!r}")
            break
    else:
        for name, value in got.fields:
            if name not in dict(expected.fields):
                parts.append(f"{name}: (none) vs {value!r}")
                break
    return ", ".join(parts)


# -- the verdict ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the answers for one URL say now."""

    outliers: tuple[str, ...] = ()  # replicas that differ from an agreeing majority
    agreeing: tuple[str, ...] = ()  # the majority (or all, when they agree)
    expected: Fingerprint | None = None  # the majority's answer
    undecided: bool = False  # answers differ but no majority (two replicas, or a split)


def verdict(answers: dict[str, Fingerprint]) -> Outcome:
    """The majority vote over the latest answer of each replica for one URL."""
    groups: list[tuple[Fingerprint, list[str]]] = []
    for backend, fp in answers.items():
        for ref, members in groups:
            if ref.same(fp):
                members.append(backend)
                break
        else:
            groups.append((fp, [backend]))
    if len(groups) <= 1:
        members = groups[0][1] if groups else []
        return Outcome(agreeing=tuple(members), expected=groups[0][0] if groups else None)
    groups.sort(key=lambda g: len(g[1]), reverse=True)
    ref, majority = groups[0]
    if len(majority) >= 2 and len(majority) * 2 > len(answers):
        outliers = tuple(b for fp, members in groups[1:] for b in members)
        return Outcome(outliers=outliers, agreeing=tuple(majority), expected=ref)
    return Outcome(undecided=True)


@dataclass
class Votes:
    """Per URL, the latest answer of each replica within ``window`` seconds (bounded)."""

    window: float = 300.0
    max_urls: int = VOTES_MAX_URLS
    _urls: OrderedDict[str, dict[str, tuple[Fingerprint, float]]] = field(
        default_factory=OrderedDict
    )

    def record(self, url: str, backend: str, fp: Fingerprint, now: float) -> Outcome:
        answers = self._urls.pop(url, None) or {}
        self._urls[url] = answers  # most recently seen last
        answers[backend] = (fp, now)
        for name in [b for b, (_, t) in answers.items() if now - t > self.window]:
            del answers[name]
        while len(self._urls) > self.max_urls:
            self._urls.popitem(last=False)
        return verdict({b: f for b, (f, _) in answers.items()})

    def seen(self, url: str, now: float) -> set[str]:
        """Replicas with an answer for ``url`` still within the window."""
        answers = self._urls.get(url) or {}
        return {b for b, (_, t) in answers.items() if now - t <= self.window}

    def __len__(self) -> int:
        return len(self._urls)


def version_verdict(values: dict[str, str]) -> Outcome:
    """The version probe's verdict: the values read, compared as fingerprints."""
    return verdict({b: Fingerprint(200, len(v), v, ()) for b, v in values.items()})


# -- divergence reports ------------------------------------------------------------------


@dataclass
class Report:
    """One replica found different on one URL (one per URL and replica)."""

    backend: str
    pool: str
    url: str
    diff: str
    first_seen: float  # wall clock, for people
    last_seen: float
    count: int = 1

    def to_json(self) -> dict[str, object]:
        return {
            "backend": self.backend,
            "pool": self.pool,
            "url": self.url,
            "diff": self.diff,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "count": self.count,
        }


def merge_reports(lists: Iterable[Iterable[dict[str, object]]]) -> list[dict[str, object]]:
    """The reports of several workers as one list, one entry per URL and replica."""
    out: dict[tuple[object, object], dict[str, object]] = {}
    for reports in lists:
        for r in reports:
            key = (r["backend"], r["url"])
            seen = out.get(key)
            if seen is None:
                out[key] = dict(r)
                continue
            count = seen["count"]
            more = r["count"]
            assert isinstance(count, int) and isinstance(more, int)
            seen["count"] = count + more
            first, last = seen["first_seen"], seen["last_seen"]
            assert isinstance(first, float | int) and isinstance(last, float | int)
            r_first, r_last = r["first_seen"], r["last_seen"]
            assert isinstance(r_first, float | int) and isinstance(r_last, float | int)
            seen["first_seen"] = min(first, r_first)
            if r_last > last:
                seen["last_seen"] = r_last
                seen["diff"] = r["diff"]
    return sorted(out.values(), key=lambda r: (str(r["backend"]), str(r["url"])))


def report_key(backend: str, url: str) -> int:
    """A non-zero 63-bit key, the same in every process (unlike hash())."""
    digest = hashlib.blake2b(f"{backend}\0{url}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> 1) or 1


def first_report(table: MutableSequence[int], key: int) -> bool:
    """Record ``key`` in an open-addressing table; True the first time it is seen.

    When the table is full the oldest probed slot is reused (a divergence may then be
    logged again, which errs on the side of telling).
    """
    size = len(table)
    start = key % size
    for i in range(8):
        slot = (start + i) % size
        if table[slot] == key:
            return False
        if table[slot] == 0:
            table[slot] = key
            return True
    table[start] = key
    return True


def forget_report(table: MutableSequence[int], key: int) -> None:
    size = len(table)
    start = key % size
    for i in range(8):
        slot = (start + i) % size
        if table[slot] == key:
            table[slot] = 0
            return


# -- the replay ring ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplayEntry:
    """A request two replicas answered alike (or the majority's answer to a divergent one)."""

    pool: str
    method: str
    target: str
    host: str
    fields: tuple[tuple[str, str], ...]  # REPLAY_FIELDS the request had
    expected: Fingerprint
    hot: bool = False  # a replica was found different here: replayed first, kept longest

    @property
    def url(self) -> str:
        return self.target


_SLOT_HEAD = struct.Struct("!HQB")  # JSON length, entry key, hot flag


def entry_key(pool: str, method: str, target: str) -> int:
    """The slot key of an entry: one per (pool, method, target); never 0 (empty)."""
    digest = hashlib.blake2b(f"{pool}\0{method}\0{target}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") or 1


def encode_entry(entry: ReplayEntry) -> bytes | None:
    """A slot's bytes (length, key, hot flag, then JSON), or None when it does not fit."""
    data = json.dumps(
        [
            entry.pool,
            entry.method,
            entry.target,
            entry.host,
            [list(f) for f in entry.fields],
            entry.expected.to_json(),
            entry.hot,
        ],
        separators=(",", ":"),
    ).encode()
    if len(data) + _SLOT_HEAD.size > REPLAY_SLOT_BYTES:
        return None
    key = entry_key(entry.pool, entry.method, entry.target)
    return _SLOT_HEAD.pack(len(data), key, entry.hot) + data


def decode_entry(raw: bytes) -> ReplayEntry | None:
    if len(raw) < _SLOT_HEAD.size:
        return None
    n, _, _ = _SLOT_HEAD.unpack_from(raw)
    start = _SLOT_HEAD.size
    if n == 0 or start + n > len(raw):
        return None
    try:
        pool, method, target, host, fields, expected, hot = json.loads(raw[start : start + n])
        return ReplayEntry(
            str(pool),
            str(method),
            str(target),
            str(host),
            tuple((str(k), str(v)) for k, v in fields),
            Fingerprint.from_json(expected),
            bool(hot),
        )
    except (ValueError, TypeError, AssertionError):
        return None  # a slot being written by another process, or garbage


class ReplayRing:
    """Fixed slots in a byte buffer (``bytearray``, or shared memory of type ``c``).

    Slot 0 holds the write position. One entry per (pool, target, method): a newer answer
    replaces the older. Ordinary entries are overwritten oldest first; hot ones only when
    every slot is hot. Adding reads only the slots' small heads (key and hot flag), not
    their JSON: it runs for every agreeing comparison.
    """

    def __init__(self, buffer: MutableSequence[bytes] | bytearray | None = None) -> None:
        size = (REPLAY_SLOTS + 1) * REPLAY_SLOT_BYTES  # slot 0: the write position
        self.buffer: bytearray | MutableSequence[bytes] = (
            buffer if buffer is not None else bytearray(size)
        )
        self.slots = len(self.buffer) // REPLAY_SLOT_BYTES - 1

    def _read(self, slot: int) -> ReplayEntry | None:
        start = (slot + 1) * REPLAY_SLOT_BYTES
        raw = self.buffer[start : start + REPLAY_SLOT_BYTES]
        return decode_entry(bytes(raw))  # type: ignore[arg-type]

    def _head(self, slot: int) -> tuple[int, int, int]:
        start = (slot + 1) * REPLAY_SLOT_BYTES
        raw = bytes(self.buffer[start : start + _SLOT_HEAD.size])  # type: ignore[arg-type]
        n, key, hot = _SLOT_HEAD.unpack(raw)
        return int(n), int(key), int(hot)

    def _write(self, slot: int, data: bytes) -> None:
        start = (slot + 1) * REPLAY_SLOT_BYTES
        self.buffer[start : start + len(data)] = data  # type: ignore[assignment]

    def _position(self) -> int:
        raw = bytes(self.buffer[0:4])  # type: ignore[arg-type]
        return int(struct.unpack("!I", raw)[0]) % max(1, self.slots)

    def _set_position(self, pos: int) -> None:
        self.buffer[0:4] = struct.pack("!I", pos % max(1, self.slots))  # type: ignore[assignment]

    def add(self, entry: ReplayEntry) -> bool:
        """Keep ``entry``; False when it does not fit a slot."""
        data = encode_entry(entry)
        if data is None:
            return False
        key = entry_key(entry.pool, entry.method, entry.target)
        heads = [self._head(i) for i in range(self.slots)]
        for i, (n, k, hot) in enumerate(heads):
            if n and k == key:
                if hot and not entry.hot:
                    old = self._read(i)
                    if old is not None and old.expected.same(entry.expected):
                        return True  # keep the hot mark of a URL still answered the same
                self._write(i, data)
                return True
        pos = self._position()
        for step in range(self.slots):
            slot = (pos + step) % self.slots
            n, _, hot = heads[slot]
            if not n or not hot or step == self.slots - 1:
                self._write(slot, data)
                self._set_position(slot + 1)
                return True
        return False  # pragma: no cover (the loop always writes)

    def entries(self, pool: str) -> list[ReplayEntry]:
        """The pool's entries, hot ones first, then newest first."""
        pos = self._position()
        order = [(pos - 1 - i) % self.slots for i in range(self.slots)]
        found = [e for e in (self._read(i) for i in order) if e is not None and e.pool == pool]
        return [e for e in found if e.hot] + [e for e in found if not e.hot]

    def to_replay(self, pool: str, recent: int) -> list[ReplayEntry]:
        """What a returning replica is asked: every hot entry, and ``recent`` others."""
        found = self.entries(pool)
        hot = [e for e in found if e.hot]
        return hot + [e for e in found if not e.hot][:recent]


# -- holding a replica out of rotation -----------------------------------------------------

# hold[i]: why backend i is out of rotation for consistency
IN_ROTATION = 0
VERIFYING = 1  # it came back: recent requests are replayed before it is given traffic
DIVERGENT = 2  # its answers differ from the other replicas'


@dataclass
class Holds:
    """Per backend: held out or not, when, and which verification is under way.

    The sequences are shared memory when several workers run (the master makes them);
    every worker's balancer reads ``hold`` at each pick. Who verifies is settled by
    ``claim``: one worker at a time, a claim older than ``stale`` seconds may be taken
    over (its worker died or its requests hung).
    """

    hold: MutableSequence[int]
    since: MutableSequence[float]  # when the state last changed
    claimed: MutableSequence[float]  # when the running verification started (0: none)

    @classmethod
    def local(cls, n: int) -> Holds:
        return cls([0] * n, [0.0] * n, [0.0] * n)

    def begin(self, i: int, now: float, *, grace: float) -> bool:
        """A backend came back (health checks pass again): hold it for verification.

        True when this caller should verify it. A backend released less than ``grace``
        seconds ago was verified already (another worker's checks saw it come back
        first): it stays in rotation.
        """
        state = self.hold[i]
        if state == IN_ROTATION:
            if self.since[i] and now - self.since[i] < grace:
                return False
            self.hold[i] = VERIFYING
            self.since[i] = now
            self.claimed[i] = now
            return True
        return False  # held already: the worker verifying it (or the recheck) decides

    def claim(self, i: int, now: float, *, recheck: float, stale: float) -> bool:
        """Take a held backend's next verification, when it is due."""
        state = self.hold[i]
        if state == IN_ROTATION:
            return False
        claimed = self.claimed[i]
        if claimed and now - claimed < stale:
            return False  # under way elsewhere
        if state == DIVERGENT and now - self.since[i] < recheck:
            return False
        self.claimed[i] = now
        return True

    def release(self, i: int, now: float) -> None:
        """It matched: back in rotation."""
        self.hold[i] = IN_ROTATION
        self.since[i] = now
        self.claimed[i] = 0.0

    def diverged(self, i: int, now: float) -> None:
        """It differs: out of rotation until a verification matches."""
        self.hold[i] = DIVERGENT
        self.since[i] = now
        self.claimed[i] = 0.0

    def unclaim(self, i: int) -> None:
        """A verification that could not conclude (the backend did not answer)."""
        self.claimed[i] = 0.0

    def mark(self, i: int, now: float) -> None:
        """Added by a reload: verify before its first request."""
        self.hold[i] = VERIFYING
        self.since[i] = now
        self.claimed[i] = 0.0


def may_hold(available: Sequence[bool], index: int, panic_threshold: float) -> bool:
    """Whether taking backend ``index`` out still leaves the panic threshold's share of
    the pool's backends in rotation."""
    left = sum(1 for i, a in enumerate(available) if a and i != index)
    return left >= 1 and left >= panic_threshold * len(available)


@dataclass(frozen=True)
class SharedShadow:
    """Node-wide state in memory the workers share (made by the master before it forks,
    kept across reloads): the replay ring, the divergences logged already, the lock."""

    ring: MutableSequence[bytes]
    reported: MutableSequence[int]
    lock: AbstractContextManager[object]

    @classmethod
    def create(cls) -> SharedShadow:
        import multiprocessing

        ctx = multiprocessing.get_context("fork")
        return cls(
            ctx.RawArray("c", (REPLAY_SLOTS + 1) * REPLAY_SLOT_BYTES),
            ctx.RawArray("q", REPORTED_SLOTS),
            ctx.Lock(),
        )

    @classmethod
    def local(cls) -> SharedShadow:
        buffer: Any = bytearray((REPLAY_SLOTS + 1) * REPLAY_SLOT_BYTES)
        return cls(buffer, [0] * REPORTED_SLOTS, contextlib.nullcontext())
