"""HTML rendering for the home and guestbook pages.

Pages are built from small string templates; every piece of data coming
from the request or the database goes through :func:`esc` first.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping, Sequence

from webapp.db import Entry

NAV_LINKS = (
    ("/", "Home"),
    ("/guestbook", "Guestbook"),
    ("/api/info", "API: info"),
    ("/api/echo", "API: echo"),
    ("/health", "Health"),
)


def esc(value: object) -> str:
    """Escape a value for use in HTML text or a quoted attribute."""
    return html.escape(str(value), quote=True)


def layout(title: str, replica: str, body: str) -> str:
    """Wrap ``body`` in the common page skeleton."""
    nav = "\n".join(f'      <a href="{href}">{esc(label)}</a>' for href, label in NAV_LINKS)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>{esc(title)} · {esc(replica)}</title>
  <link rel="stylesheet" href="/static/style.css">
  <link rel="icon" href="/static/logo.svg" type="image/svg+xml">
  <script src="/static/app.js" defer></script>
</head>
<body data-replica="{esc(replica)}">
  <header class="site-header">
    <a class="brand" href="/">
      <img src="/static/logo.svg" alt="PIBL demo logo" width="48" height="48">
      <span>PIBL demo app</span>
    </a>
    <nav>
{nav}
    </nav>
    <span class="badge" title="replica that served this page">{esc(replica)}</span>
  </header>
  <main>
{body}
  </main>
  <footer>
    <p>Served by <strong>{esc(replica)}</strong>.
       <span id="js-status">script not loaded</span>
       · <span id="live-info"></span></p>
  </footer>
</body>
</html>
"""


def _rows(pairs: Iterable[tuple[str, str]]) -> str:
    return "\n".join(
        f'        <tr><th scope="row">{esc(k)}</th><td>{esc(v)}</td></tr>' for k, v in pairs
    )


def render_home(
    replica: str, request_info: Mapping[str, str], headers: Sequence[tuple[str, str]]
) -> str:
    """Home page: which replica answered and the request it received."""
    body = f"""    <section class="hero">
      <p class="hero-label">This page was served by</p>
      <h1><strong id="replica">{esc(replica)}</strong></h1>
      <p>A load balancer in round robin hands every request, not every page, to the next
        replica. Loading this page makes two requests through it, answered in turn:</p>
      <ol id="page-requests" class="requests">
        <li data-replica="{esc(replica)}"><code>GET /</code> (this page)
          &rarr; <strong>{esc(replica)}</strong></li>
        <li id="api-request"><code>GET /api/info</code> (sent by this page's script)
          &rarr; <strong class="who">waiting&hellip;</strong></li>
      </ol>
      <p>so each reload moves on by two replicas: replica-1 and replica-2 answer one load,
        replica-3 and replica-1 the next. (The first load also fetches the stylesheet, the
        script and the logo, which the browser then keeps.)</p>
    </section>
    <section>
      <h2>Request received</h2>
      <table id="request-info" class="kv">
{_rows(request_info.items())}
      </table>
    </section>
    <section>
      <h2>Request headers <small>({len(headers)}, in the order received)</small></h2>
      <table id="request-headers" class="kv">
        <thead><tr><th scope="col">Name</th><th scope="col">Value</th></tr></thead>
        <tbody>
{_rows(headers)}
        </tbody>
      </table>
    </section>
    <section>
      <h2>Try it</h2>
      <ul class="links">
        <li><a href="/guestbook">Guestbook</a> (shared by all replicas)</li>
        <li><a href="/api/info">/api/info</a> · <a href="/api/echo">/api/echo</a>
            · <a href="/api/cacheable?ttl=30">/api/cacheable?ttl=30</a></li>
        <li><a href="/headers">/headers</a> · <a href="/health">/health</a>
            · <a href="/slow?seconds=2">/slow?seconds=2</a>
            · <a href="/download?size=1048576">/download?size=1048576</a>
            · <a href="/status/418">/status/418</a></li>
      </ul>
    </section>"""
    return layout("Home", replica, body)


def _entry_html(entry: Entry) -> str:
    return f"""      <li class="entry" id="entry-{entry.id}">
        <p class="entry-meta"><strong class="entry-name">{esc(entry.name)}</strong>
          <time datetime="{esc(entry.created)}">{esc(entry.created)}</time>
          <span class="entry-replica">via {esc(entry.replica)}</span></p>
        <p class="entry-message">{esc(entry.message)}</p>
      </li>"""


def render_guestbook(
    replica: str,
    entries: Sequence[Entry],
    *,
    errors: Sequence[str] = (),
    name: str = "",
    message: str = "",
) -> str:
    """Guestbook page: the entry form followed by entries, newest first."""
    error_html = ""
    if errors:
        items = "\n".join(f"        <li>{esc(e)}</li>" for e in errors)
        error_html = f'      <ul class="errors" role="alert">\n{items}\n      </ul>\n'
    if entries:
        listing = "\n".join(_entry_html(e) for e in entries)
    else:
        listing = '      <li class="empty">No entries yet. Be the first!</li>'
    body = f"""    <h1>Guestbook</h1>
    <p>Entries are stored in a database shared by every replica.</p>
    <section class="card">
      <h2>Sign the guestbook</h2>
{error_html}      <form method="post" action="/guestbook">
        <label>Name <input name="name" maxlength="80" required value="{esc(name)}"></label>
        <label>Message
          <textarea name="message" maxlength="1000" rows="4" required>{esc(message)}</textarea>
        </label>
        <button type="submit">Sign</button>
      </form>
    </section>
    <section>
      <h2>Entries</h2>
      <ol id="entries" class="entries">
{listing}
      </ol>
    </section>"""
    return layout("Guestbook", replica, body)


def render_about(release: str, rendered_at: str) -> str:
    """The ``/about`` page: the same on every replica of a release (no replica name)."""
    from webapp import __version__

    changes = (
        ""
        if release == __version__
        else f"""
  <section class="release-notes">
    <h2>What is new in release {esc(release)}</h2>
    <p>The guestbook lists newest entries last.</p>
  </section>"""
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>About the PIBL demo app</title>
  <link rel="stylesheet" href="/static/style.css">
</head>
<body>
  <main>
  <h1>About the PIBL demo app</h1>
  <p>Release <strong class="release">{esc(release)}</strong>.</p>{changes}
  <p>Rendered at <time>{esc(rendered_at)}</time>.</p>
  </main>
</body>
</html>
"""
