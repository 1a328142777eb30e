"""The access log and event log, written to stdout and a file without blocking the loop.

Every exchange produces exactly one ``AccessRecord`` (``pibl.observe.record``); the event
loop only appends it to a list. Every ``BATCH_DELAY`` the loop formats the records of that
list in one go and hands their lines, as one string, to a background thread that writes
them to standard output and to the log file. Writing never raises into the proxy: a full
disk or a removed directory counts dropped lines and retries opening the file later;
``reopen()`` (SIGUSR1) makes the thread close and reopen the file, for log rotation.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    import asyncio

    # (made by the workers; the master, which logs events only, never loads it)
    from pibl.observe.record import AccessRecord

BATCH_DELAY = 0.02  # seconds a line may wait to be written with others
MAX_PENDING = 512  # records formatted at once, at most
# a batch whose timer has not fired this long after it began is formatted by the next record
# (its loop was closed, or is blocked): records are never left waiting for ``close()``
OVERDUE = 1.0


def _quote(text: str) -> str:
    """A value inside double quotes on a log line (``pibl.observe.record`` has its own)."""
    return text.replace("\\", "\\\\").replace('"', '\\"')


class AccessLog:
    """Collects records on the loop, formats them in batches; a thread writes them.

    A request's share of its log line is one ``list.append`` of its record (finished by
    then and never changed again). The first record of a batch sets a timer; when it fires,
    ``BATCH_DELAY`` later, the loop formats the batch and queues its lines as one string
    for the writer thread, which only writes (the write releases the interpreter lock).
    Formatting on the writer thread cost more: every batch, the thread and the loop handed
    the interpreter lock to each other while it formatted. Event lines (``info``,
    ``warning``...) are queued already formatted; one logged on the loop's thread goes after
    the access lines before it.
    """

    def __init__(
        self,
        *,
        path: str | None,
        stdout: bool = True,
        fmt: str = "combined",
        stream: TextIO | None = None,
        threaded: bool = True,
    ) -> None:
        self.path = path
        self._stream = stream if stream is not None else (sys.stdout if stdout else None)
        self._json = fmt == "json"
        # the access line's format, from pibl.observe.record (imported at the first access
        # record: the master writes event lines only)
        self._format: Callable[[AccessRecord], str] | None = None
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        # records waiting on the loop for their batch to be formatted (see ``access``), and
        # the thread of that loop
        self._pending: list[AccessRecord] = []
        self._flush_handle: asyncio.TimerHandle | None = None
        self._loop_thread = 0
        self._batch_began = 0.0  # (monotonic)
        self._reopen = threading.Event()
        self._file: TextIO | None = None
        self._next_open = 0.0
        self.dropped = 0
        # names the process on event lines when several write to one log ("worker 1234")
        self.label = ""
        self._threaded = threaded
        # no file and no stdout: nothing is formatted, queued or written (a log that is off
        # costs nothing per request, as nginx's access_log off)
        self.silent = self._stream is None and path is None
        # (not "_thread": mypyc would name its C field "__thread", a C keyword)
        self._writer = threading.Thread(target=self._run, name="pibl-log", daemon=True)
        if threaded and not self.silent:
            self._writer.start()

    # -- loop side ----------------------------------------------------------------------

    def access(self, record: AccessRecord) -> None:
        if self.silent:
            return
        if not self._threaded:
            self._put(self._line(record))
            return
        pending = self._pending
        pending.append(record)
        if len(pending) == 1:
            import asyncio  # (once per batch; the master, which has no loop, never needs it)

            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # (no loop: formatted now)
                self.flush()
                return
            self._flush_handle = loop.call_later(BATCH_DELAY, self.flush)
            self._loop_thread = threading.get_ident()
            self._batch_began = time.monotonic()
        elif len(pending) >= MAX_PENDING or record.started - self._batch_began > OVERDUE:
            self.flush()  # (a record's start time is the clock read: no call per request)

    def flush(self) -> None:
        """Format the waiting records, in one go, and hand their lines to the writer."""
        handle, self._flush_handle = self._flush_handle, None
        if handle is not None:
            handle.cancel()
        pending = self._pending
        if not pending:
            return
        self._pending = []
        line = self._line
        self._queue.put("\n".join([line(r) for r in pending]))

    def _put(self, line: str) -> None:
        if self.silent:
            return
        if self._threaded:
            if self._pending and threading.get_ident() == self._loop_thread:
                self.flush()  # (the access lines before it stay before it)
            self._queue.put(line)
        else:  # a process that must not have threads (the master) writes directly
            if self._reopen.is_set():
                self._reopen.clear()
                self._close_file()
                self._next_open = 0.0
            self._write([line])

    def shadow(
        self,
        *,
        kind: str,
        rid: bytes,
        method: bytes,
        target: bytes,
        backend: str,
        primary: str,
        status: int,
        length: int,
        result: str,
        total: float,
    ) -> None:
        """A request PIBL sent on its own to compare replicas (a shadow of a client's
        request, or a replay): its own record type, never a client request's line."""
        fields = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "kind": kind,
            "rid": rid.decode("latin-1"),
            "request": f"{method.decode('latin-1')} {target.decode('latin-1')}",
            "backend": backend,
            "primary": primary,
            "status": status,
            "length": length,
            "total": round(total, 6),
            "result": result,
        }
        if self._json:
            self._put(json.dumps({"type": "shadow", **fields}, separators=(",", ":")))
            return
        self._put(
            f"{fields['time']} shadow {kind} rid={fields['rid']} "
            f'"{_quote(str(fields["request"]))}" backend={backend} primary={primary} '
            f'status={status} length={length} total={total:.3f} result="{_quote(result)}"'
        )

    def event(self, level: str, message: str) -> None:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if self._json:
            fields = {"time": when, "level": level, "message": message}
            if self.label:
                fields["worker"] = self.label
            line = json.dumps(fields)
        elif self.label:
            line = f"{when} [{level}] {self.label}: {message}"
        else:
            line = f"{when} [{level}] {message}"
        self._put(line)

    def info(self, message: str) -> None:
        self.event("info", message)

    def warning(self, message: str) -> None:
        self.event("warning", message)

    def error(self, message: str) -> None:
        self.event("error", message)

    def exception(self, message: str) -> None:
        self.event("error", f"{message}\n{traceback.format_exc().rstrip()}")

    def reopen(self) -> None:
        self._reopen.set()

    def close(self, timeout: float = 2.0) -> None:
        if not self._threaded or self.silent:
            self._close_file()
            return
        self.flush()
        self._queue.put(None)
        self._writer.join(timeout)

    # -- writer thread ------------------------------------------------------------------

    def _open(self) -> None:
        if self.path is None or self._file is not None or time.monotonic() < self._next_open:
            return
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            self._file = os.fdopen(fd, "a", encoding="utf-8", errors="replace")
        except OSError:
            self._next_open = time.monotonic() + 1.0

    def _close_file(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    def _line(self, item: AccessRecord) -> str:
        if self._format is None:
            from pibl.observe.record import format_combined, format_json

            self._format = format_json if self._json else format_combined
        try:
            return self._format(item)
        except Exception:  # a record no format expected: its line says so, the log goes on
            return f"unformattable access record {item!r}"

    def _run(self) -> None:
        q = self._queue
        running = True
        while running:
            batch: list[str] = []
            item = q.get()  # (access lines come batched: see ``access``)
            while True:
                if item is None:
                    running = False
                    break
                batch.append(item)
                if len(batch) >= 64:
                    break
                try:
                    item = q.get_nowait()
                except queue.Empty:
                    break
            if self._reopen.is_set():
                self._reopen.clear()
                self._close_file()
                self._next_open = 0.0
            if batch:
                self._write(batch)
        self._close_file()

    def _write(self, batch: list[str]) -> None:
        text = "\n".join(batch) + "\n"
        if self._stream is not None:
            try:
                self._stream.write(text)
                self._stream.flush()
            except (OSError, ValueError):
                pass
        self._open()
        if self._file is not None:
            try:
                self._file.write(text)
                self._file.flush()
            except OSError:
                self.dropped += len(batch)
                self._close_file()
                self._next_open = time.monotonic() + 1.0
        elif self.path is not None:
            self.dropped += len(batch)
