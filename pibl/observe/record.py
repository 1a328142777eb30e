"""The access record: what one exchange leaves for the access log and the metrics.

Its own module so that the workers, which make one per request, get it compiled (see
``scripts/build_compiled.py``) while the master, which logs events only, never loads it.
"""

from __future__ import annotations

import time


class AccessRecord:
    """One request and its answer, filled in as the exchange goes (then never changed)."""

    __slots__ = (
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
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"AccessRecord({fields})"
