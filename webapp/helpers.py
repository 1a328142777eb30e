"""Small helpers shared by the endpoints: headers, client address, parameters."""

from __future__ import annotations

import math

from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse

from webapp.db import GuestbookStore

NO_STORE = {"Cache-Control": "no-store"}


class BadRequest(ValueError):
    """Invalid client input; turned into a ``400`` JSON response."""


def bad_request_response(message: str, status_code: int = 400) -> JSONResponse:
    """JSON error body used for invalid input."""
    return JSONResponse({"error": message}, status_code=status_code, headers=NO_STORE)


def get_store(conn: HTTPConnection) -> GuestbookStore:
    """Return the guestbook store attached to the application."""
    store = conn.app.state.store
    if not isinstance(store, GuestbookStore):  # pragma: no cover - wiring error
        raise RuntimeError("application state has no store")
    return store


def header_pairs(conn: HTTPConnection) -> list[tuple[str, str]]:
    """Request headers as ``(name, value)`` pairs, in order, repeats kept."""
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in conn.scope["headers"]]


def client_address(conn: HTTPConnection) -> str:
    """``host:port`` of the peer that connected to this replica."""
    client = conn.scope.get("client")
    if not client:
        return "unknown"
    host, port = client[0], client[1]
    if ":" in str(host):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def target(conn: HTTPConnection) -> str:
    """Request target (path plus query string) as received."""
    path: str = conn.scope.get("raw_path", b"").decode("latin-1") or conn.url.path
    query: bytes = conn.scope.get("query_string", b"")
    return f"{path}?{query.decode('latin-1')}" if query else path


def int_param(conn: HTTPConnection, name: str, default: int, low: int, high: int) -> int:
    """Integer query parameter within ``[low, high]``."""
    raw = conn.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be an integer") from None
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low} and {high}")
    return value


def float_param(conn: HTTPConnection, name: str, default: float, low: float, high: float) -> float:
    """Finite float query parameter within ``[low, high]``."""
    raw = conn.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest(f"{name} must be a number") from None
    if not math.isfinite(value) or not low <= value <= high:
        raise BadRequest(f"{name} must be between {low:g} and {high:g}")
    return value


def bool_param(conn: HTTPConnection, name: str) -> bool:
    """Boolean flag query parameter: ``1``, ``true``, ``yes`` or ``on``."""
    return conn.query_params.get(name, "").lower() in ("1", "true", "yes", "on")
