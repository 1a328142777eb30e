"""Replica identity and the middleware that stamps it on every response.

:class:`ReplicaHeaderMiddleware` is a pure ASGI middleware (it never buffers
a body, so streamed downloads stay streamed). It adds ``X-Replica: <name>``
to HTTP responses, WebSocket handshake responses and WebSocket denial
responses, and counts the HTTP requests served.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from webapp import __version__

REPLICA_HEADER = b"x-replica"

_NAME_RE = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]{0,62}[\x21-\x7e])?")

_START_MESSAGES = frozenset(
    {"http.response.start", "websocket.accept", "websocket.http.response.start"}
)


def utc_now_iso() -> str:
    """Current UTC time as an ISO 8601 string with millisecond precision."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def validate_replica_name(name: str) -> str:
    """Return ``name`` if it is usable as a header value, else raise ValueError.

    Allowed: 1 to 64 printable ASCII characters, no leading/trailing space.
    """
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"invalid replica name {name!r}: use 1-64 printable ASCII characters")
    return name


def validate_release(release: str) -> str:
    """Return ``release`` if it is a usable release string (1-64 printable ASCII)."""
    if not _NAME_RE.fullmatch(release):
        raise ValueError(f"invalid release {release!r}: use 1-64 printable ASCII characters")
    return release


@dataclass
class ReplicaInfo:
    """Identity and counters of the running replica."""

    name: str
    release: str = __version__
    pid: int = field(default_factory=os.getpid)
    started: str = field(default_factory=utc_now_iso)
    requests_served: int = 0


def get_replica(conn: HTTPConnection) -> ReplicaInfo:
    """Return the :class:`ReplicaInfo` attached to the application."""
    info = conn.app.state.replica
    if not isinstance(info, ReplicaInfo):  # pragma: no cover - wiring error
        raise RuntimeError("application state has no replica info")
    return info


class ReplicaHeaderMiddleware:
    """Add ``X-Replica`` to every response and count HTTP requests."""

    def __init__(self, app: ASGIApp, info: ReplicaInfo) -> None:
        self.app = app
        self.info = info
        self.header = (REPLICA_HEADER, info.name.encode("ascii"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "http":
            self.info.requests_served += 1

        async def send_with_header(message: Message) -> None:
            if message["type"] in _START_MESSAGES:
                headers = [
                    (name, value)
                    for name, value in message.get("headers", [])
                    if name.lower() != REPLICA_HEADER
                ]
                headers.append(self.header)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_header)
