"""The admin listener: Prometheus metrics, live status, a dashboard and operator actions.

A deliberately small HTTP/1.1 server on asyncio, separate from the proxy's listeners and
meant for a loopback or management address. It reuses PIBL's request parser (so heads are
bounded by the same limits) and keeps connections alive between requests. Routes:

* ``GET /metrics``: the Prometheus text exposition;
* ``GET /api/status``: the merged live status as JSON;
* ``GET /``: the dashboard (one self-contained page that polls ``/api/status``);
* ``GET /health``: ``ok``;
* ``POST /api/backends/<name>/{drain,disable,enable}``: drain or disable take a backend out
  of service, enable returns it from either (``undrain`` is an older name of ``enable``);
* ``POST /api/cache/purge`` with ``{"url": "http://host/path"}`` or ``{"all": true}``.

Reading is open to whoever can reach the listener. Actions always need
``Authorization: Bearer <token>`` with the configured ``[admin] token``; without a
configured token they are refused with 403. A bearer header cannot be sent by a plain
cross-site form, and a cross-origin ``fetch`` carrying one needs a CORS preflight that this
server never grants, so a browser page elsewhere cannot trigger actions. Every response
carries ``Cache-Control: no-store``.

``format_status`` renders the same status as a terminal overview for ``pibl status``.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import importlib.resources
import json
import re
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, cast
from urllib.parse import unquote

from pibl.errors import ProtocolError
from pibl.http.forward import REASONS, simple_response
from pibl.http.framing import http_date
from pibl.http.message import RequestHead, get_header
from pibl.http.parse import Body, End, Event, Head, RequestParser, Upgrade

__all__ = ["AdminSource", "dashboard_page", "format_status", "hit_ratio", "start_admin"]

MAX_BODY = 64 * 1024  # action bodies are a few bytes of JSON
MAX_CONNECTIONS = 256  # per listener; the admin port is not a public service
IDLE_TIMEOUT = 60.0  # seconds a kept-alive connection may sit between requests
REQUEST_TIMEOUT = 15.0  # seconds from a request's first byte to its end
METRICS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
JSON_TYPE = b"application/json"
REALM = b'Bearer realm="pibl-admin"'
NO_TOKEN = "set [admin] token to enable actions"
BACKEND_ACTIONS = ("drain", "undrain", "enable", "disable")

_BACKEND_ROUTE = re.compile(r"^/api/backends/([^/]+)/([a-z]+)$")


class AdminSource(Protocol):
    """What the admin listener reads and changes (``pibl.observe.status.ProxyAdmin``)."""

    def status(self) -> dict[str, Any]: ...

    def metrics(self) -> bytes: ...

    def drain(self, backend: str, on: bool = True) -> bool: ...

    def set_enabled(self, backend: str, enabled: bool) -> bool: ...

    def purge(self, url: str | None) -> int: ...


# -- the dashboard page -----------------------------------------------------------------


@functools.cache
def dashboard_page() -> tuple[bytes, bytes]:
    """The page and its Content-Security-Policy (inline script and style pinned by hash)."""
    page = importlib.resources.files("pibl.observe").joinpath("dashboard.html").read_bytes()
    hashes: dict[str, list[str]] = {"script": [], "style": []}
    for tag in hashes:
        pattern = rf"<{tag}>(.*?)</{tag}>".encode()
        for match in re.finditer(pattern, page, re.DOTALL):
            digest = base64.b64encode(hashlib.sha256(match.group(1)).digest()).decode()
            hashes[tag].append(f"'sha256-{digest}'")
    policy = (
        "default-src 'none'; "
        f"script-src {' '.join(hashes['script']) or 'none'}; "
        f"style-src {' '.join(hashes['style']) or 'none'}; "
        "connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return page, policy.encode()


# -- responses --------------------------------------------------------------------------


class Reply:
    """One response, built by a route and serialized by the connection."""

    __slots__ = ("body", "content_type", "extra", "status")

    def __init__(
        self,
        status: int,
        body: bytes,
        content_type: bytes = b"text/plain; charset=utf-8",
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.extra = extra or []

    def encode(self, *, keep_alive: bool, head_only: bool) -> bytes:
        reason = REASONS.get(self.status, b"Unknown")
        out = [
            b"HTTP/1.1 %d %s\r\n" % (self.status, reason),
            b"Date: %s\r\n" % http_date(),
            b"Server: pibl-admin\r\n",
            b"Content-Type: %s\r\n" % self.content_type,
            b"Content-Length: %d\r\n" % len(self.body),
            b"Cache-Control: no-store\r\n",
            b"X-Content-Type-Options: nosniff\r\n",
        ]
        out.extend(b"%s: %s\r\n" % (name, value) for name, value in self.extra)
        out.append(
            b"Connection: keep-alive\r\n\r\n" if keep_alive else b"Connection: close\r\n\r\n"
        )
        if not head_only:
            out.append(self.body)
        return b"".join(out)


def json_reply(
    status: int, data: dict[str, Any], extra: list[tuple[bytes, bytes]] | None = None
) -> Reply:
    body = json.dumps(data, separators=(",", ":"), allow_nan=False).encode() + b"\n"
    return Reply(status, body, JSON_TYPE, extra)


def error_reply(status: int, message: str, extra: list[tuple[bytes, bytes]] | None = None) -> Reply:
    return json_reply(status, {"ok": False, "error": message}, extra)


# -- routing ----------------------------------------------------------------------------


class Router:
    """Maps one complete request to a ``Reply``; shared by the connections of a listener."""

    def __init__(self, source: AdminSource, token: str | None) -> None:
        self.source = source
        self.token = token.encode() if token else None
        self.reads: dict[str, Callable[[], Reply]] = {
            "/": self.dashboard,
            "/index.html": self.dashboard,
            "/metrics": self.metrics,
            "/api/status": self.status,
            "/health": self.health,
        }

    def handle(self, head: RequestHead, body: bytes) -> Reply:
        path = head.target.split(b"?", 1)[0].decode("latin-1")
        method = head.method
        if path.startswith("/api/backends/") or path == "/api/cache/purge":
            if method != b"POST":
                return error_reply(405, "use POST", [(b"Allow", b"POST")])
            refused = self.check_token(head)
            if refused is not None:
                return refused
            if path == "/api/cache/purge":
                return self.purge(body)
            match = _BACKEND_ROUTE.match(path)
            if match is None or match.group(2) not in BACKEND_ACTIONS:
                return error_reply(404, "no such action")
            return self.backend_action(unquote(match.group(1)), match.group(2))
        route = self.reads.get(path)
        if route is None:
            return error_reply(404, "not found")
        if method not in (b"GET", b"HEAD"):
            return error_reply(405, "use GET", [(b"Allow", b"GET, HEAD")])
        return route()

    # -- reads --------------------------------------------------------------------------

    def dashboard(self) -> Reply:
        page, policy = dashboard_page()
        return Reply(
            200,
            page,
            b"text/html; charset=utf-8",
            [
                (b"Content-Security-Policy", policy),
                (b"X-Frame-Options", b"DENY"),
                (b"Referrer-Policy", b"no-referrer"),
            ],
        )

    def metrics(self) -> Reply:
        return Reply(200, self.source.metrics(), METRICS_TYPE)

    def status(self) -> Reply:
        return json_reply(200, self.source.status())

    def health(self) -> Reply:
        return Reply(200, b"ok\n")

    # -- actions ------------------------------------------------------------------------

    def check_token(self, head: RequestHead) -> Reply | None:
        if self.token is None:
            return error_reply(403, NO_TOKEN)
        value = get_header(head.headers, b"authorization") or b""
        scheme, _, given = value.strip().partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.token):
            return error_reply(
                401, "a valid bearer token is required", [(b"WWW-Authenticate", REALM)]
            )
        return None

    def backend_action(self, name: str, action: str) -> Reply:
        if action in ("drain", "undrain"):
            found = self.source.drain(name, action == "drain")
        else:
            found = self.source.set_enabled(name, action == "enable")
        if not found:
            return error_reply(404, f"no backend named {name!r}")
        return json_reply(200, {"ok": True, "backend": name, "action": action})

    def purge(self, body: bytes) -> Reply:
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return error_reply(400, 'the body must be JSON: {"url": "..."} or {"all": true}')
        if isinstance(data, dict) and data.get("all") is True and "url" not in data:
            return json_reply(200, {"ok": True, "purged": self.source.purge(None)})
        if isinstance(data, dict) and isinstance(data.get("url"), str) and "all" not in data:
            try:
                purged = self.source.purge(data["url"])
            except ValueError as exc:
                return error_reply(400, str(exc))
            return json_reply(200, {"ok": True, "purged": purged, "url": data["url"]})
        return error_reply(400, 'expected {"url": "http://host/path"} or {"all": true}')


# -- the connection ---------------------------------------------------------------------


class AdminConnection(asyncio.Protocol):
    """One client connection: parse, route, answer in order, keep alive."""

    def __init__(self, router: Router, connections: set[AdminConnection]) -> None:
        self.router = router
        self.connections = connections
        self.parser = RequestParser(max_target_bytes=2048, max_headers=64, max_head_bytes=16384)
        self.transport: asyncio.Transport | None = None
        self.pending: deque[Event] = deque()  # parsed, not yet answered (writes paused)
        self.head: RequestHead | None = None
        self.body = bytearray()
        self.paused = False
        self.closing = False
        self.timer: asyncio.TimerHandle | None = None

    # -- asyncio callbacks --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop transports implement the interface without subclassing asyncio.Transport
        self.transport = cast(asyncio.Transport, transport)
        if len(self.connections) >= MAX_CONNECTIONS:
            self.transport.abort()
            return
        self.connections.add(self)
        self.set_timer(IDLE_TIMEOUT)

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        self.closing = True
        if self.timer is not None:
            self.timer.cancel()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        started = self.parser.in_message or self.head is not None
        try:
            events = self.parser.feed(data)
        except ProtocolError as exc:
            self.fail(exc.status, exc.reason)
            return
        if not started and (events or self.parser.in_message):
            self.set_timer(REQUEST_TIMEOUT)  # trickling bytes do not extend it
        self.pending.extend(events)
        self.process()

    def pause_writing(self) -> None:
        self.paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        self.process()
        if not self.paused and not self.closing and self.transport is not None:
            self.transport.resume_reading()

    # -- requests -----------------------------------------------------------------------

    def process(self) -> None:
        while self.pending and not self.paused and not self.closing:
            event = self.pending.popleft()
            if isinstance(event, Head):
                head = event.head
                assert isinstance(head, RequestHead)
                if head.content_length > MAX_BODY:
                    self.fail(413, f"bodies are limited to {MAX_BODY} bytes")
                    return
                self.head = head
                self.body.clear()
                if head.expect_continue and self.transport is not None:
                    self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            elif isinstance(event, Body):
                self.body += event.data
                if len(self.body) > MAX_BODY:
                    self.fail(413, f"bodies are limited to {MAX_BODY} bytes")
                    return
            elif isinstance(event, End):
                self.respond()
            elif isinstance(event, Upgrade):
                self.fail(400, "protocol upgrades are not supported")
                return
        if self.parser.error is not None and not self.pending and not self.closing:
            self.fail(self.parser.error.status, self.parser.error.reason)

    def respond(self) -> None:
        head, body = self.head, bytes(self.body)
        self.head = None
        self.body.clear()
        if head is None or self.transport is None:
            return
        try:
            reply = self.router.handle(head, body)
        except Exception as exc:  # a failing source must not take the listener down
            reply = error_reply(500, f"internal error: {type(exc).__name__}")
        keep_alive = head.keep_alive and not self.transport.is_closing()
        self.transport.write(reply.encode(keep_alive=keep_alive, head_only=head.method == b"HEAD"))
        if not keep_alive:
            self.close()
        elif not self.parser.in_message:
            self.set_timer(IDLE_TIMEOUT)

    def fail(self, status: int, reason: str) -> None:
        """Answer a refused request and close: the rest of the stream cannot be trusted."""
        if self.transport is not None and not self.closing:
            self.transport.write(simple_response(status, reason))
        self.close()

    def close(self) -> None:
        self.closing = True
        self.pending.clear()
        if self.timer is not None:
            self.timer.cancel()
        if self.transport is not None:
            self.transport.close()

    def set_timer(self, delay: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(delay, self.expire)

    def expire(self) -> None:
        if self.head is not None or self.parser.in_message:
            self.fail(408, "request not completed in time")
        else:
            self.close()


async def start_admin(
    source: AdminSource,
    *,
    host: str,
    port: int,
    token: str | None,
    sock: socket.socket | None = None,
    backlog: int = 100,
) -> asyncio.Server:
    """Serve the admin routes on ``sock`` (already bound and listening) or on host:port."""
    loop = asyncio.get_running_loop()
    router = Router(source, token)
    connections: set[AdminConnection] = set()

    def factory() -> AdminConnection:
        return AdminConnection(router, connections)

    if sock is not None:
        return await loop.create_server(factory, sock=sock, backlog=backlog)
    return await loop.create_server(
        factory, host=host, port=port, reuse_address=True, backlog=backlog
    )


# -- the terminal overview --------------------------------------------------------------


def hit_ratio(cache: dict[str, int]) -> float | None:
    """Share of cacheable requests answered from the cache (fresh or stale), or None."""
    hits = cache.get("HIT", 0) + cache.get("STALE", 0)
    cacheable = sum(v for k, v in cache.items() if k != "BYPASS")
    return hits / cacheable if cacheable else None


def _duration(seconds: float) -> str:
    s = max(0, int(seconds))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours:02d}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m {s:02d}s"
    if minutes:
        return f"{minutes}m {s:02d}s"
    return f"{s}s"


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def format_status(status: dict[str, Any]) -> str:
    """A plain-text overview of ``/api/status`` for a terminal (``pibl status``)."""
    now = float(status.get("time") or time.time())
    started = float(status.get("started") or now)
    pids = status.get("pids") or []
    workers = int(status.get("workers") or len(pids) or 1)
    lines = [
        f"PIBL  {workers} worker{'s' if workers != 1 else ''}"
        + (f" (pid {', '.join(str(p) for p in pids)})" if pids else ""),
        f"  uptime       {_duration(now - started)}",
        f"  connections  {status.get('connections', 0)} open, "
        f"{status.get('in_flight', 0)} in flight",
    ]
    by_class: dict[str, int] = status.get("by_class") or {}
    classes = ", ".join(f"{k} {v}" for k, v in sorted(by_class.items()))
    lines.append(
        f"  requests     {status.get('requests', 0)}" + (f"  ({classes})" if classes else "")
    )
    history = status.get("history") or []
    recent = history[-10:]
    if recent:
        span = max(1, len(recent))
        rate = sum(int(s.get("requests") or 0) for s in recent) / span
        lines.append(f"  rate         {rate:.1f} req/s (last {span} s)")
    cache: dict[str, int] = status.get("cache") or {}
    store = status.get("cache_store")
    ratio = hit_ratio(cache)
    if cache or store:
        text = f"hit ratio {ratio * 100:.1f}%" if ratio is not None else "hit ratio -"
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(cache.items()))
        if outcomes:
            text += f"  ({outcomes})"
        if store:
            text += f"; {store.get('entries', 0)} entries, {_size(int(store.get('bytes', 0)))}"
        lines.append(f"  cache        {text}")
    else:
        lines.append("  cache        off")
    routes = status.get("routes") or []
    if len(routes) > 1 or (routes and routes[0].get("name") != "default"):
        lines.append(
            "  routes       "
            + ", ".join(f"{r['name']} -> {r['target']} {r['requests']}" for r in routes)
        )
    pools = status.get("pools") or []
    if len(pools) > 1:
        lines.append(
            "  pools        "
            + ", ".join(
                f"{p['name']} ({p['backends']} backends"
                + (f", queued {p['queued']}, refused {p['rejected']}" if p.get("maxconn") else "")
                + ")"
                for p in pools
            )
        )
    if status.get("panic"):
        lines.append(
            "  balancer     PANIC: too few backends available; passive ejections are ignored"
        )
    backends = status.get("backends") or []
    if backends:
        header = ("BACKEND", "STATE", "WEIGHT", "REQUESTS", "ERRORS", "ACTIVE", "LATENCY", "URL")
        rows = [
            (
                str(b.get("name", "?")),
                str(b.get("state", "?")),
                str(b.get("weight", "")),
                str(b.get("requests", 0)),
                str(b.get("errors", 0)),
                str(b.get("active", 0)),
                f"{float(b.get('latency_ms') or 0):.1f} ms",
                str(b.get("url", "")),
            )
            for b in backends
        ]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        right = {2, 3, 4, 5, 6}  # numbers align right

        def fmt(row: tuple[str, ...]) -> str:
            cells = [
                cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
                for i, cell in enumerate(row)
            ]
            return "  " + "  ".join(cells).rstrip()

        lines.append("")
        lines.append(fmt(header))
        lines.extend(fmt(r) for r in rows)
    lines.extend(_consistency_lines(status.get("consistency")))
    return "\n".join(lines) + "\n"


def _consistency_lines(consistency: dict[str, Any] | None) -> list[str]:
    """The consistency checks' part of ``pibl status``: divergences first."""
    if not consistency:
        return []
    shadow: dict[str, int] = consistency.get("shadow") or {}
    counts = ", ".join(f"{k} {v}" for k, v in sorted(shadow.items()))
    lines = [
        "",
        f"  consistency  sample {float(consistency.get('sample') or 0):g}, "
        f"on divergence: {consistency.get('on_divergence')}" + (f"  ({counts})" if counts else ""),
    ]
    versions: dict[str, str] = consistency.get("versions") or {}
    if versions:
        lines.append("  versions     " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    divergences = consistency.get("divergences") or []
    if not divergences:
        lines.append("  divergences  none")
    for d in divergences:
        lines.append(
            f"  DIVERGENT    {d.get('backend')} on {d.get('url')} "
            f"(x{d.get('count', 1)}): {d.get('diff')}"
        )
    return lines
