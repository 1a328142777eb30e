"""Errors the event loop cannot hand to anyone end up in PIBL's log."""

from __future__ import annotations

import asyncio
import io

from pibl.observe.accesslog import AccessLog
from pibl.proxy.server import log_loop_error


def _log() -> tuple[AccessLog, io.StringIO]:
    stream = io.StringIO()
    return AccessLog(path=None, stream=stream, threaded=False), stream


def test_an_exception_is_logged_with_its_traceback() -> None:
    log, stream = _log()
    try:
        raise ValueError("boom")
    except ValueError as exc:
        log_loop_error(log, {"message": "Exception in callback", "exception": exc})
    text = stream.getvalue()
    assert "[error] Exception in callback" in text
    assert "Traceback" in text and "ValueError: boom" in text


def test_a_message_without_exception() -> None:
    log, stream = _log()
    log_loop_error(log, {})
    assert "[error] unexpected error in the event loop" in stream.getvalue()


def test_installed_handler_catches_a_failing_callback() -> None:
    log, stream = _log()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, context: log_loop_error(log, context))
        loop.call_soon(lambda: 1 / 0)
        await asyncio.sleep(0.01)

    asyncio.run(main())
    assert "ZeroDivisionError" in stream.getvalue()


def test_a_log_with_no_file_and_no_stdout_does_no_work() -> None:
    from pibl.observe.record import AccessRecord

    formatted: list[AccessRecord] = []
    log = AccessLog(path=None, stdout=False)
    log._format = lambda record: formatted.append(record) or "line"  # type: ignore[assignment,func-returns-value]
    log.access(AccessRecord(client="127.0.0.1", request_line="GET / HTTP/1.1", host="h"))
    log.event("warning", "nothing to write it to")
    assert formatted == []  # not even formatted
    assert log._queue.empty() and not log._writer.is_alive()  # no thread waking for it
    log.close()
    busy, stream = _log()  # one with a sink formats and writes
    busy.access(AccessRecord(client="127.0.0.1", request_line="GET / HTTP/1.1", host="h"))
    assert '"GET / HTTP/1.1"' in stream.getvalue()
