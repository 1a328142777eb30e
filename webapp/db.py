"""Guestbook storage in a SQLite database shared by all replicas.

Every replica process opens the same database file. The database runs in
WAL mode so readers never block the single writer, every connection sets a
``busy_timeout`` so concurrent writers wait for the lock instead of failing,
and each operation uses its own short-lived connection and a single
statement (or a short transaction), so locks are held only briefly.

The methods are blocking; call them through a thread pool from async code.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from webapp.replica import utc_now_iso

BUSY_TIMEOUT_MS = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    message TEXT NOT NULL,
    created TEXT NOT NULL,
    replica TEXT NOT NULL
)
"""


@dataclass(frozen=True)
class Entry:
    """One guestbook entry."""

    id: int
    name: str
    message: str
    created: str
    replica: str

    def to_json(self) -> dict[str, Any]:
        """Return the entry as a JSON-serialisable dict."""
        return asdict(self)


class GuestbookStore:
    """Blocking access to the guestbook table of one SQLite file."""

    def __init__(self, path: str, *, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> None:
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        self._schema_ready = False

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path,
            timeout=self.busy_timeout_ms / 1000,
            isolation_level=None,  # autocommit; transactions are explicit
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error:
            conn.close()
            raise
        return conn

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        # Switching to WAL needs an exclusive lock; when several replicas start
        # at the same moment this may report "locked" instead of waiting.
        deadline = time.monotonic() + self.busy_timeout_ms / 1000
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL").fetchone()
                conn.execute(_SCHEMA)
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self._schema_ready = True

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        with closing(self._connect()) as conn:
            if not self._schema_ready:
                self._create_schema(conn)
            yield conn

    def initialize(self) -> None:
        """Create the database file and schema if missing; enable WAL."""
        with self._connection():
            pass

    def ping(self) -> None:
        """Raise :class:`sqlite3.Error` if the database is not usable."""
        with self._connection() as conn:
            conn.execute("SELECT 1 FROM entries LIMIT 1").fetchall()

    def journal_mode(self) -> str:
        """Return the journal mode of the database (``"wal"`` once set up)."""
        with self._connection() as conn:
            row = conn.execute("PRAGMA journal_mode").fetchone()
        return str(row[0])

    def add(self, name: str, message: str, replica: str) -> Entry:
        """Store a new entry and return it."""
        created = utc_now_iso()
        with self._connection() as conn:
            cursor = conn.execute(
                "INSERT INTO entries (name, message, created, replica) VALUES (?, ?, ?, ?)",
                (name, message, created, replica),
            )
            entry_id = cursor.lastrowid
        if entry_id is None:  # pragma: no cover - sqlite always sets it
            raise sqlite3.DatabaseError("insert did not return a row id")
        return Entry(entry_id, name, message, created, replica)

    def recent(self, limit: int = 100) -> list[Entry]:
        """Return up to ``limit`` entries, newest first."""
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT id, name, message, created, replica FROM entries ORDER BY id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [Entry(int(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4])) for r in rows]

    def count(self) -> int:
        """Return the total number of entries."""
        with self._connection() as conn:
            row = conn.execute("SELECT count(*) FROM entries").fetchone()
        return int(row[0])
