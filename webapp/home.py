"""Home page: shows which replica answered and the request it received."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse

from webapp.helpers import NO_STORE, client_address, header_pairs, target
from webapp.pages import render_about, render_home
from webapp.replica import get_replica, utc_now_iso


async def home(request: Request) -> HTMLResponse:
    """``GET /``: dynamic HTML page (never cached)."""
    info = get_replica(request)
    request_info = {
        "Method": request.method,
        "Target": target(request),
        "HTTP version": f"HTTP/{request.scope.get('http_version', '1.1')}",
        "Scheme": request.url.scheme,
        "Client address": client_address(request),
        "Replica PID": str(info.pid),
        "Served at": utc_now_iso(),
    }
    page = render_home(info.name, request_info, header_pairs(request))
    return HTMLResponse(page, headers=NO_STORE)


async def about(request: Request) -> HTMLResponse:
    """``GET /about``: the release this replica runs, and when the page was rendered.

    The same on every replica of one release but for the time (a volatile part, as
    PIBL's ``[consistency] ignore_body`` is made for); on another release
    (``--release``) the page says what that release changed.
    """
    page = render_about(get_replica(request).release, utc_now_iso())
    return HTMLResponse(page, headers=NO_STORE)


async def headers_text(request: Request) -> PlainTextResponse:
    """``GET /headers``: request headers as text, one ``name: value`` per line."""
    lines = "".join(f"{name}: {value}\n" for name, value in header_pairs(request))
    return PlainTextResponse(lines, headers=NO_STORE)
