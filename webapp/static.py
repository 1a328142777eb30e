"""Static asset serving with explicit caching headers.

Starlette's :class:`~starlette.staticfiles.StaticFiles` already answers
conditional requests. This subclass replaces its ETag (derived from mtime
and size) with a strong ETag computed from the file content and adds a
``Cache-Control`` header, on both 200 and 304 responses.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from starlette.datastructures import Headers
from starlette.responses import FileResponse, Response
from starlette.staticfiles import NotModifiedResponse, PathLike, StaticFiles
from starlette.types import Scope

STATIC_DIR = Path(__file__).resolve().parent / "static"
DEFAULT_MAX_AGE = 3600


def content_etag(data: bytes) -> str:
    """Strong ETag (quoted) for a file content."""
    return '"' + hashlib.sha256(data).hexdigest()[:32] + '"'


class CachedStaticFiles(StaticFiles):
    """StaticFiles with content-hash ETags and ``Cache-Control``."""

    def __init__(self, *, directory: PathLike = STATIC_DIR, max_age: int = DEFAULT_MAX_AGE) -> None:
        super().__init__(directory=directory)
        self.cache_control = f"public, max-age={max_age}"
        # path -> (mtime_ns, size, etag); recomputed when the file changes.
        self._etags: dict[str, tuple[int, int, str]] = {}

    def _etag(self, full_path: PathLike, stat_result: os.stat_result) -> str:
        key = os.fspath(full_path)
        cached = self._etags.get(key)
        if cached and cached[:2] == (stat_result.st_mtime_ns, stat_result.st_size):
            return cached[2]
        # Assets are small and the result is cached, so reading here is cheap.
        etag = content_etag(Path(key).read_bytes())
        self._etags[key] = (stat_result.st_mtime_ns, stat_result.st_size, etag)
        return etag

    def file_response(
        self,
        full_path: PathLike,
        stat_result: os.stat_result,
        scope: Scope,
        status_code: int = 200,
    ) -> Response:
        headers = {
            "cache-control": self.cache_control,
            "etag": self._etag(full_path, stat_result),
        }
        response = FileResponse(
            full_path, status_code=status_code, headers=headers, stat_result=stat_result
        )
        if self.is_not_modified(response.headers, Headers(scope=scope)):
            return NotModifiedResponse(response.headers)
        return response
