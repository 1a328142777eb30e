"""Endpoints that exercise a reverse proxy.

* ``GET /slow?seconds=S``: answer after ``S`` seconds (at most 60).
* ``GET /download?size=N[&chunked=1]``: stream ``N`` bytes of the
  :mod:`webapp.data` pattern, with ``Content-Length`` unless chunked.
* ``POST /upload``: hash a streamed request body.
* ``GET|POST /status/{code}``: answer with an arbitrary status code.
* ``GET /ws``: WebSocket echo (text and binary).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from http import HTTPStatus

import anyio
import anyio.lowlevel
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.websockets import WebSocket

from webapp.data import pattern_bytes
from webapp.helpers import NO_STORE, BadRequest, bool_param, float_param, int_param
from webapp.replica import get_replica

MAX_SLOW_SECONDS = 60.0
MAX_DOWNLOAD = 10 * 1024**3  # 10 GiB
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})


async def slow(request: Request) -> JSONResponse:
    """``GET /slow?seconds=S``: sleep, then answer."""
    seconds = float_param(request, "seconds", 1.0, 0.0, MAX_SLOW_SECONDS)
    await anyio.sleep(seconds)
    return JSONResponse({"replica": get_replica(request).name, "slept": seconds}, headers=NO_STORE)


async def _pattern_stream(size: int) -> AsyncIterator[bytes]:
    for block in pattern_bytes(size):
        yield block
        # Let other requests run even when the socket never pushes back.
        await anyio.lowlevel.checkpoint()


async def download(request: Request) -> Response:
    """``GET /download?size=N[&chunked=1]``: deterministic bytes, constant memory."""
    size = int_param(request, "size", 1024 * 1024, 0, MAX_DOWNLOAD)
    chunked = bool_param(request, "chunked")
    headers = {
        **NO_STORE,
        "Content-Disposition": f'attachment; filename="pattern-{size}.bin"',
    }
    if not chunked:
        headers["Content-Length"] = str(size)
    if request.method == "HEAD":
        return Response(b"", headers=headers, media_type="application/octet-stream")
    return StreamingResponse(
        _pattern_stream(size), headers=headers, media_type="application/octet-stream"
    )


async def upload(request: Request) -> JSONResponse:
    """``POST /upload``: count and hash the body while it streams in."""
    digest = hashlib.sha256()
    total = 0
    async for chunk in request.stream():
        digest.update(chunk)
        total += len(chunk)
    return JSONResponse(
        {"replica": get_replica(request).name, "bytes": total, "sha256": digest.hexdigest()},
        headers=NO_STORE,
    )


def _reason(code: int) -> str:
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return "Unknown Status"


async def status(request: Request) -> Response:
    """``GET|POST /status/{code}``: answer with that status (200-599)."""
    raw = request.path_params["code"]
    if not (isinstance(raw, str) and raw.isdigit() and 200 <= int(raw) <= 599):
        raise BadRequest("status code must be an integer between 200 and 599")
    code = int(raw)
    if request.method == "POST":
        async for _ in request.stream():  # drain the body
            pass
    headers = dict(NO_STORE)
    if code in REDIRECT_CODES:
        headers["Location"] = "/"
    if code in (204, 304):
        return Response(status_code=code, headers=headers)
    return PlainTextResponse(f"{code} {_reason(code)}\n", status_code=code, headers=headers)


async def ws_echo(websocket: WebSocket) -> None:
    """``/ws``: echo every text or binary message back until the peer closes."""
    await websocket.accept()
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("text") is not None:
            await websocket.send_text(message["text"])
        elif message.get("bytes") is not None:
            await websocket.send_bytes(message["bytes"])
