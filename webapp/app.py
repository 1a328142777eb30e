"""Application factory: routes, error handlers, startup and the replica header.

:func:`create_app` returns a :class:`ReplicaApp`, a Starlette application
whose outermost layer is :class:`~webapp.replica.ReplicaHeaderMiddleware`,
so even responses produced by Starlette's own error handling (404, 405,
500) carry ``X-Replica``.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute
from starlette.types import ASGIApp

from webapp import __version__, api, guestbook, home, probes
from webapp.db import GuestbookStore
from webapp.helpers import NO_STORE, BadRequest
from webapp.replica import (
    ReplicaHeaderMiddleware,
    ReplicaInfo,
    validate_release,
    validate_replica_name,
)
from webapp.static import CachedStaticFiles

logger = logging.getLogger("webapp")


class ReplicaApp(Starlette):
    """Starlette application wrapped, outermost, in the replica header middleware."""

    def __init__(self, replica: ReplicaInfo, **kwargs: Any) -> None:
        self.replica = replica
        super().__init__(**kwargs)

    def build_middleware_stack(self) -> ASGIApp:
        return ReplicaHeaderMiddleware(super().build_middleware_stack(), self.replica)


def routes() -> Sequence[BaseRoute]:
    """All routes of the application."""
    return [
        Route("/", home.home, methods=["GET"]),
        Route("/headers", home.headers_text, methods=["GET"]),
        Route("/about", home.about, methods=["GET"]),
        Route("/version", api.version, methods=["GET"]),
        Route("/health", api.health, methods=["GET"]),
        Route("/api/info", api.info, methods=["GET"]),
        Route("/api/echo", api.echo, methods=["GET"]),
        Route("/api/cacheable", api.cacheable, methods=["GET"]),
        Route("/api/guestbook", guestbook.api_list, methods=["GET"]),
        Route("/api/guestbook", guestbook.api_create, methods=["POST"]),
        Route("/guestbook", guestbook.page, methods=["GET"]),
        Route("/guestbook", guestbook.submit_form, methods=["POST"]),
        Route("/slow", probes.slow, methods=["GET"]),
        Route("/download", probes.download, methods=["GET"]),
        Route("/upload", probes.upload, methods=["POST", "PUT"]),
        Route("/status/{code}", probes.status, methods=["GET", "POST"]),
        WebSocketRoute("/ws", probes.ws_echo),
        Mount("/static", app=CachedStaticFiles(), name="static"),
    ]


async def _bad_request(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": str(exc)}, status_code=400, headers=NO_STORE)


async def _database_error(request: Request, exc: Exception) -> Response:
    logger.error("database error on %s %s: %s", request.method, request.url.path, exc)
    return JSONResponse(
        {"error": "database unavailable", "detail": str(exc)}, status_code=503, headers=NO_STORE
    )


def create_app(name: str, db_path: str, *, release: str = __version__) -> Starlette:
    """Build the application for replica ``name`` using the SQLite file ``db_path``;
    ``release`` is the release it claims to run (``/version``, ``/about``)."""
    replica = ReplicaInfo(validate_replica_name(name), validate_release(release))
    store = GuestbookStore(db_path)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            await run_in_threadpool(store.initialize)
        except sqlite3.Error as exc:
            # Keep serving: /health reports 503 until the database is usable.
            logger.warning("replica %s: cannot open database %s: %s", name, db_path, exc)
        else:
            logger.info("replica %s: using database %s", name, db_path)
        yield

    app = ReplicaApp(
        replica,
        routes=routes(),
        exception_handlers={BadRequest: _bad_request, sqlite3.Error: _database_error},
        lifespan=lifespan,
    )
    app.state.replica = replica
    app.state.store = store
    return app
