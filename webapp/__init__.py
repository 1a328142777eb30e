"""Demo web application served by several replicas behind the PIBL proxy.

Each replica is a small Starlette application that tags every response with
an ``X-Replica`` header, serves a home page showing the request it received,
a guestbook stored in a shared SQLite database, a JSON API and a handful of
endpoints useful to exercise a reverse proxy (slow responses, large streamed
downloads, streamed uploads, arbitrary status codes, WebSocket echo).

Run it with ``python -m webapp --name replica-1 --port 8001``; build it
in-process with :func:`webapp.app.create_app`.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
