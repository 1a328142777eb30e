"""JSON API: replica info, request echo, cacheable payloads and health."""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import time
from email.utils import formatdate

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from webapp.helpers import NO_STORE, client_address, get_store, header_pairs, int_param
from webapp.replica import get_replica, utc_now_iso

MAX_TTL = 86_400


async def info(request: Request) -> JSONResponse:
    """``GET /api/info``: identity and counters of this replica."""
    replica = get_replica(request)
    return JSONResponse(
        {
            "replica": replica.name,
            "pid": replica.pid,
            "started": replica.started,
            "requests_served": replica.requests_served,
            "time": utc_now_iso(),
        },
        headers=NO_STORE,
    )


async def echo(request: Request) -> JSONResponse:
    """``GET /api/echo``: the request as this replica received it."""
    return JSONResponse(
        {
            "replica": get_replica(request).name,
            "method": request.method,
            "path": request.url.path,
            "query": request.scope.get("query_string", b"").decode("latin-1"),
            "query_params": [[k, v] for k, v in request.query_params.multi_items()],
            "http_version": request.scope.get("http_version", "1.1"),
            "headers": [[k, v] for k, v in header_pairs(request)],
            "client": client_address(request),
        },
        headers=NO_STORE,
    )


async def cacheable(request: Request) -> Response:
    """``GET /api/cacheable?ttl=N``: fresh payload that caches may keep N s."""
    ttl = int_param(request, "ttl", 60, 0, MAX_TTL)
    now = time.time()
    payload = {
        "replica": get_replica(request).name,
        "generated": utc_now_iso(),
        "timestamp": now,
        "nonce": secrets.token_hex(8),
        "ttl": ttl,
    }
    body = json.dumps(payload, separators=(",", ":")).encode()
    headers = {
        "Cache-Control": f"public, max-age={ttl}",
        "ETag": '"' + hashlib.sha256(body).hexdigest()[:32] + '"',
        "Last-Modified": formatdate(now, usegmt=True),
    }
    return Response(body, headers=headers, media_type="application/json")


async def version(request: Request) -> PlainTextResponse:
    """``GET /version``: the release this replica runs (the same on every replica of a
    release: PIBL's ``[consistency] version_path`` compares it)."""
    return PlainTextResponse(get_replica(request).release + "\n", headers=NO_STORE)


async def health(request: Request) -> JSONResponse:
    """``GET /health``: 200 when the database is usable, 503 otherwise."""
    name = get_replica(request).name
    try:
        await run_in_threadpool(get_store(request).ping)
    except sqlite3.Error as exc:
        return JSONResponse(
            {"status": "unavailable", "replica": name, "error": f"database: {exc}"},
            status_code=503,
            headers=NO_STORE,
        )
    return JSONResponse({"status": "ok", "replica": name}, headers=NO_STORE)
