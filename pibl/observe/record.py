"""The access record, what one exchange leaves for the access log and the metrics, and
the access log's line formats.

Its own module so that the workers, which make a record per request and format its line,
get it compiled (see ``scripts/build_compiled.py``) while the master, which logs events
only, never loads it.
"""

from __future__ import annotations

import json
import time
from typing import Final

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

# an access record's attributes (its slots, and what its repr shows)
_FIELDS: Final = (
    "backend",
    "bytes_in",
    "bytes_out",
    "cache",
    "client",
    "continued",
    "detail",
    "host",
    "pool",
    "request_head",
    "request_id",
    "request_line",
    "response_head",
    "response_started",
    "retries",
    "route",
    "started",
    "status",
    "total",
    "upstream",
    "user_agent",
    "when",
)


class AccessRecord:
    """One request and its answer, filled in as the exchange goes (then never changed)."""

    __slots__ = _FIELDS

    def __init__(
        self,
        client: str,
        request_line: str,
        host: str,
        *,
        status: int = 0,
        user_agent: str = "-",
        request_id: bytes = b"-",
        detail: str = "",
    ) -> None:
        self.client = client
        self.request_line = request_line
        self.host = host
        self.status = status
        self.bytes_in = 0
        self.bytes_out = 0
        self.backend = ""
        self.upstream = -1.0  # seconds to the response head; -1: no backend answered
        self.total = 0.0
        self.cache = "-"
        self.route = "-"  # the [[routes]] entry it matched (its name)
        self.pool = "-"  # and the pool it goes to
        self.request_id = request_id
        self.user_agent = user_agent
        self.detail = detail
        self.response_started = False
        self.continued = False  # "100 Continue" already sent to the client
        self.retries = 0
        self.request_head = ""  # verbose mode: the head as received ...
        self.response_head = ""  # ... and as delivered
        self.started = time.monotonic()
        self.when = time.time()

    def __repr__(self) -> str:
        # (from the module's tuple: a compiled class has no ``__slots__`` to read back)
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in _FIELDS)
        return f"AccessRecord({fields})"


def _format_clf_time(second: int) -> str:
    t = time.gmtime(second)
    day = f"{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year}"
    return f"{day}:{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000"


_last_clf: tuple[int, str] = (-1, "")


def _clf_time(when: float) -> str:
    """The log's time field; formatted once per second (lines of one second share it)."""
    global _last_clf
    second = int(when)
    if _last_clf[0] != second:
        _last_clf = (second, _format_clf_time(second))
    return _last_clf[1]


def _quote(text: str) -> str:
    """A value inside double quotes on a log line (as ``pibl.observe.accesslog._quote``)."""
    return text.replace("\\", "\\\\").replace('"', '\\"')


def format_combined(r: AccessRecord) -> str:
    upstream = f"{r.upstream:.3f}" if r.upstream >= 0 else "-"
    line = (
        f'{r.client} - - [{_clf_time(r.when)}] "{_quote(r.request_line)}" {r.status} {r.bytes_out}'
        f' in={r.bytes_in} host="{_quote(r.host)}" backend={r.backend or "-"} up={upstream}'
        f" total={r.total:.3f} cache={r.cache} rid={r.request_id.decode('latin-1')}"
        f' ua="{_quote(r.user_agent)}"'
    )
    if r.detail:
        line += f' detail="{_quote(r.detail)}"'
    if r.request_head:
        line += "".join(f"\n  > {h}" for h in r.request_head.rstrip("\r\n").split("\r\n"))
    if r.response_head:
        line += "".join(f"\n  < {h}" for h in r.response_head.rstrip("\r\n").split("\r\n"))
    return line


def format_json(r: AccessRecord) -> str:
    return json.dumps(
        {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r.when)),
            "client": r.client,
            "request": r.request_line,
            "host": r.host,
            "status": r.status,
            "bytes_in": r.bytes_in,
            "bytes_out": r.bytes_out,
            "backend": r.backend or None,
            "upstream_time": round(r.upstream, 6) if r.upstream >= 0 else None,
            "total_time": round(r.total, 6),
            "cache": r.cache,
            "request_id": r.request_id.decode("latin-1"),
            "user_agent": r.user_agent,
            "detail": r.detail or None,
            **({"request_head": r.request_head} if r.request_head else {}),
            **({"response_head": r.response_head} if r.response_head else {}),
        },
        separators=(",", ":"),
    )
