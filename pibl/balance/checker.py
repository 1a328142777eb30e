"""Active health checks: one small task per backend probing it at an interval.

A probe opens its own connection (never a pooled one, so a check cannot disturb or be
disturbed by client traffic) and feeds the verdict to ``record`` (the balancer's, for that
backend). Without a configured path the probe is the connection itself (TCP, plus the TLS
handshake for https backends), as HAProxy's plain ``check``: any application is "up" once
it accepts connections, whatever its URLs are. With a path it sends ``GET <path>`` with
``Connection: close`` and reads the status line within the timeout.
Changes of state are logged; the probe's own failures are not, to keep the log readable.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable

from pibl.config import BackendConfig


async def probe_once(
    backend: BackendConfig,
    path: str | None,
    timeout: float,
    status_range: tuple[int, int],
    ssl_context: ssl.SSLContext | None = None,
) -> tuple[bool, str]:
    """One probe: (healthy, short reason)."""
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                backend.host,
                backend.port,
                ssl=ssl_context,
                server_hostname=(backend.server_name or backend.host) if ssl_context else None,
            )
            if path is None:
                return True, "connected"
            host = f"{backend.server_name or backend.host}:{backend.port}"
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: pibl-health\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            line = await reader.readline()
    except TimeoutError:
        return False, "timed out"
    except (OSError, ssl.SSLError) as exc:
        return False, getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    parts = line.split()
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        return False, "invalid response"
    status = int(parts[1])
    low, high = status_range
    if low <= status <= high:
        return True, f"status {status}"
    return False, f"status {status}"


async def run_checks(
    backend: BackendConfig,
    record: Callable[[bool, float], str | None],
    *,
    path: str | None,
    interval: float,
    timeout: float,
    status_range: tuple[int, int],
    log: Callable[[str], None],
    ssl_context: ssl.SSLContext | None = None,
    clock: Callable[[], float] = time.monotonic,
    fast: Callable[[float], bool] | None = None,
    fast_interval: float | None = None,
) -> None:
    """Probe forever (until cancelled), logging every change of state.

    While ``fast(now)`` says the backend is down, ejected or changing state, probes come
    every ``fast_interval`` seconds instead of ``interval`` (HAProxy's ``downinter``), so a
    restarted backend is back within about ``rise`` fast intervals.
    """
    what = f"GET {path}" if path is not None else "connect"
    while True:
        ok, reason = await probe_once(backend, path, timeout, status_range, ssl_context)
        change = record(ok, clock())
        if change == "down":
            log(f"backend {backend.label} is DOWN (health check {what}: {reason})")
        elif change == "up":
            log(f"backend {backend.label} is UP again (health check {what}: {reason})")
        quick = fast is not None and fast_interval is not None and fast(clock())
        await asyncio.sleep(min(interval, fast_interval) if quick and fast_interval else interval)
