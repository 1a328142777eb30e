"""Guestbook endpoints: HTML page with a form, and a JSON API.

``POST /guestbook`` takes an ``application/x-www-form-urlencoded`` body and
answers ``303 See Other`` (post/redirect/get); ``POST /api/guestbook`` takes
JSON and answers ``201 Created``. Both validate the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from urllib.parse import parse_qsl

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from webapp.helpers import NO_STORE, get_store, int_param
from webapp.pages import render_guestbook
from webapp.replica import get_replica

MAX_NAME = 80
MAX_MESSAGE = 1000
MAX_BODY = 64 * 1024
PAGE_SIZE = 100
FORM_TYPE = "application/x-www-form-urlencoded"


class BodyTooLarge(Exception):
    """The request body exceeds :data:`MAX_BODY`."""


@dataclass(frozen=True)
class Submission:
    """A validated guestbook submission."""

    name: str
    message: str


def validate(name: object, message: object) -> tuple[Submission | None, dict[str, str]]:
    """Normalise and check the fields; return the submission or field errors."""
    errors: dict[str, str] = {}
    values: dict[str, str] = {}
    for field, value, limit in (("name", name, MAX_NAME), ("message", message, MAX_MESSAGE)):
        if value is None:
            errors[field] = f"{field} is required"
            continue
        if not isinstance(value, str):
            errors[field] = f"{field} must be a string"
            continue
        text = value.replace("\r\n", "\n").strip()
        if not text:
            errors[field] = f"{field} must not be empty"
        elif len(text) > limit:
            errors[field] = f"{field} must be at most {limit} characters (got {len(text)})"
        elif "\x00" in text:
            errors[field] = f"{field} must not contain NUL characters"
        values[field] = text
    if errors:
        return None, errors
    return Submission(values["name"], values["message"]), {}


async def read_limited_body(request: Request) -> bytes:
    """Read the request body, refusing more than :data:`MAX_BODY` bytes."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def page(request: Request) -> HTMLResponse:
    """``GET /guestbook``: the form and the latest entries."""
    entries = await run_in_threadpool(get_store(request).recent, PAGE_SIZE)
    return HTMLResponse(render_guestbook(get_replica(request).name, entries), headers=NO_STORE)


async def submit_form(request: Request) -> Response:
    """``POST /guestbook``: store a form submission, then redirect to the page."""
    replica = get_replica(request).name
    if _media_type(request) != FORM_TYPE:
        return HTMLResponse(
            f"<p>Unsupported media type: send {FORM_TYPE}.</p>", status_code=415, headers=NO_STORE
        )
    try:
        fields = dict(
            parse_qsl(
                (await read_limited_body(request)).decode(),
                keep_blank_values=True,
                max_num_fields=20,
            )
        )
    except BodyTooLarge:
        return HTMLResponse("<p>Request body too large.</p>", status_code=413, headers=NO_STORE)
    except ValueError:  # invalid UTF-8 or too many fields
        return HTMLResponse("<p>Malformed form body.</p>", status_code=400, headers=NO_STORE)
    submission, errors = validate(fields.get("name"), fields.get("message"))
    if submission is None:
        entries = await run_in_threadpool(get_store(request).recent, PAGE_SIZE)
        html = render_guestbook(
            replica,
            entries,
            errors=list(errors.values()),
            name=fields.get("name", ""),
            message=fields.get("message", ""),
        )
        return HTMLResponse(html, status_code=400, headers=NO_STORE)
    await run_in_threadpool(get_store(request).add, submission.name, submission.message, replica)
    return RedirectResponse("/guestbook", status_code=303, headers=NO_STORE)


async def api_list(request: Request) -> JSONResponse:
    """``GET /api/guestbook?limit=N``: entries as JSON, newest first."""
    limit = int_param(request, "limit", PAGE_SIZE, 1, 1000)
    entries = await run_in_threadpool(get_store(request).recent, limit)
    return JSONResponse([e.to_json() for e in entries], headers=NO_STORE)


async def api_create(request: Request) -> JSONResponse:
    """``POST /api/guestbook``: JSON ``{"name", "message"}`` -> 201 and the entry."""
    try:
        data = json.loads(await read_limited_body(request))
    except BodyTooLarge:
        return JSONResponse({"error": "request body too large"}, status_code=413)
    except ValueError:  # includes JSONDecodeError and UnicodeDecodeError
        return JSONResponse({"error": "request body must be valid JSON"}, status_code=400)
    if not isinstance(data, dict):
        return JSONResponse(
            {"error": 'request body must be a JSON object {"name": ..., "message": ...}'},
            status_code=400,
        )
    submission, errors = validate(data.get("name"), data.get("message"))
    if submission is None:
        return JSONResponse({"error": "invalid entry", "fields": errors}, status_code=422)
    entry = await run_in_threadpool(
        get_store(request).add, submission.name, submission.message, get_replica(request).name
    )
    return JSONResponse(entry.to_json(), status_code=201, headers=NO_STORE)
