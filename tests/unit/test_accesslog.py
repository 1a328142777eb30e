"""The access log's batching: records formatted on the loop, a batch at a time, in order."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from pibl.observe import accesslog
from pibl.observe.accesslog import AccessLog
from pibl.observe.record import AccessRecord, format_combined


def record(n: int) -> AccessRecord:
    r = AccessRecord("127.0.0.1", f"GET /{n} HTTP/1.1", "example.test", status=200)
    r.request_id = b"%032x" % n
    return r


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_records_are_formatted_on_the_loop_in_one_batch(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(path=str(path), stdout=False)
    threads: list[int] = []

    def traced(r: AccessRecord) -> str:
        threads.append(threading.get_ident())
        return format_combined(r)

    log._format = traced
    writes: list[list[str]] = []
    write = log._write
    log._write = lambda batch: (writes.append(list(batch)), write(batch))[1]  # type: ignore[method-assign]

    async def main() -> int:
        for n in range(5):
            log.access(record(n))
        assert threads == []  # nothing formatted during the requests
        await asyncio.sleep(accesslog.BATCH_DELAY * 3)
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    log.close()
    assert threads == [loop_thread] * 5  # formatted on the loop, not by the writer thread
    assert len(writes) == 1 and len(writes[0]) == 1  # the batch, one string, one write
    assert [line.split('"')[1] for line in lines(path)] == [f"GET /{n} HTTP/1.1" for n in range(5)]


def test_an_event_line_stays_after_the_access_lines_before_it(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(path=str(path), stdout=False)

    async def main() -> None:
        log.access(record(1))
        log.warning("between")
        log.access(record(2))
        await asyncio.sleep(accesslog.BATCH_DELAY * 3)

    asyncio.run(main())
    log.close()
    got = lines(path)
    assert len(got) == 3
    assert "GET /1 " in got[0] and got[1].endswith("[warning] between") and "GET /2 " in got[2]


def test_close_writes_the_records_still_waiting(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(path=str(path), stdout=False)

    async def main() -> None:
        for n in range(3):
            log.access(record(n))  # the loop ends before the batch's timer fires

    asyncio.run(main())
    log.close()
    assert len(lines(path)) == 3


def test_without_a_loop_a_record_is_formatted_at_once(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(path=str(path), stdout=False)
    log.access(record(7))
    assert log._pending == []
    log.close()
    assert "GET /7 " in lines(path)[0]


def test_a_full_batch_is_formatted_before_its_timer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(accesslog, "MAX_PENDING", 10)
    path = tmp_path / "access.log"
    log = AccessLog(path=str(path), stdout=False)

    async def main() -> int:
        for n in range(25):
            log.access(record(n))
        return len(log._pending)

    assert asyncio.run(main()) == 5
    log.close()
    assert len(lines(path)) == 25


def test_a_batch_whose_loop_ended_is_written_by_the_next_record(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(path=str(path), stdout=False)

    async def first() -> None:
        log.access(record(1))  # its loop ends before the batch's timer fires

    async def second() -> None:
        late = record(2)
        late.started += accesslog.OVERDUE * 2  # a request that began after the batch was due
        log.access(late)
        assert log._pending == []

    asyncio.run(first())
    asyncio.run(second())
    deadline = time.monotonic() + 5
    while len(lines(path)) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ["GET /1 " in lines(path)[0], "GET /2 " in lines(path)[1]] == [True, True]
    log.close()


def test_a_record_no_format_expected_gets_a_line_saying_so(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(path=str(path), stdout=False)

    def broken(r: AccessRecord) -> str:
        raise ValueError("no")

    log._format = broken
    log.access(record(3))  # (no loop: formatted at once)
    log.close()
    (line,) = lines(path)
    assert line.startswith("unformattable access record AccessRecord(")
    assert "request_line='GET /3 HTTP/1.1'" in line and "status=200" in line
