"""Constants, the variants and scenarios, errors and console output."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent  # bench/
REPO = HERE.parent
RESULTS_DIR = HERE / "results"

ALL_SCENARIOS = ("proxy", "cache", "tls", "logging")
ALL_PROXIES = ("pibl", "pibl-pure", "pibl-nolog", "nginx", "nginx-nolog", "haproxy")
# pibl-pure (the same checkout with PIBL_PURE_PYTHON=1) is worth a row only next to a
# compiled build (scripts/build_compiled.py): not run unless --proxies names it
DEFAULT_PROXIES = tuple(p for p in ALL_PROXIES if p != "pibl-pure")
SIZES = {"1k": 1024, "100k": 100 * 1024}
MODES = ("keepalive", "close")
# Offsets from --base-port: backends on BASE+1..3, proxies on BASE+80 upward (one or two
# ports for every proxy started, in order).
BACKEND_OFFSETS = (1, 2, 3)
PROXY_PORT_OFFSET = 80
CACHED_PREFIX = "/cached"  # backend location with cacheable responses (cache scenario)
CACHE_TTL = 600  # seconds: backends' max-age, PIBL's [cache] ttl, nginx proxy_cache_valid


@dataclass(frozen=True)
class Variant:
    """One proxy set up for one scenario; ``name`` is the row label in the table."""

    scenario: str
    name: str
    kind: str  # pibl | nginx | haproxy
    log: str  # none | file | file+stdout | stdout
    cache: bool = False
    tls: bool = False
    pure: bool = False  # PIBL from its Python source even if a compiled build is there

    @property
    def describe(self) -> str:
        parts = [
            {
                "none": "no access log",
                "file": "access log to a file",
                "file+stdout": "access log to a file and to stdout (redirected to a file)",
                "stdout": "access log to stdout (redirected to a file)",
            }[self.log]
        ]
        if self.cache:
            parts.append("response cache on")
        if self.tls:
            parts.append("HTTPS listener")
        if self.pure:
            parts.append("PIBL_PURE_PYTHON=1")
        return ", ".join(parts)


SCENARIOS: dict[str, tuple[Variant, ...]] = {
    "proxy": (
        Variant("proxy", "pibl", "pibl", "file"),
        Variant("proxy", "pibl-pure", "pibl", "file", pure=True),
        Variant("proxy", "nginx", "nginx", "file"),
        Variant("proxy", "haproxy", "haproxy", "none"),
    ),
    "cache": (
        Variant("cache", "pibl", "pibl", "file", cache=True),
        Variant("cache", "pibl-pure", "pibl", "file", cache=True, pure=True),
        Variant("cache", "nginx", "nginx", "file", cache=True),
        Variant("cache", "haproxy", "haproxy", "none", cache=True),
    ),
    "tls": (
        Variant("tls", "pibl", "pibl", "file", tls=True),
        Variant("tls", "pibl-pure", "pibl", "file", tls=True, pure=True),
        Variant("tls", "nginx", "nginx", "file", tls=True),
        Variant("tls", "haproxy", "haproxy", "none", tls=True),
    ),
    "logging": (
        Variant("logging", "pibl", "pibl", "file+stdout"),
        Variant("logging", "pibl-nolog", "pibl", "none"),
        Variant("logging", "nginx", "nginx", "file"),
        Variant("logging", "nginx-nolog", "nginx", "none"),
        Variant("logging", "haproxy", "haproxy", "stdout"),
    ),
}
SCENARIO_TEXT = {
    "proxy": "plain HTTP, every request proxied to a backend (no response cache)",
    "cache": "plain HTTP, cache hits (responses cacheable for 10 min, cache warmed first)",
    "tls": "HTTPS termination, plain HTTP to the backends (no response cache)",
    "logging": "plain HTTP proxied, access log on and off (no response cache)",
}

CLK_TCK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 20.0  # seconds for a process to start listening
STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL


class BenchError(Exception):
    """A failure with a message meant for the person running the benchmark."""


def say(message: str = "") -> None:
    print(message, flush=True)


# combined format (PIBL, nginx) or HAProxy's httplog format
_ACCESS_LINE = re.compile(r'^\S+ - \S+ \[[^]]*\] "|^\S+:\d+ \[[^]]*\] \S+ \S+/')


def log_tail(*paths: Path, lines: int = 25) -> str:
    """The last lines of each file, leaving out access-log lines (combined format)."""
    out = []
    for path in paths:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        tail = [line for line in text.splitlines() if not _ACCESS_LINE.match(line)][-lines:]
        if tail:
            out.append(f"--- last {len(tail)} lines of {path} (access lines left out) ---")
            out.extend(tail)
    return "\n".join(out) if out else "(no log output)"


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.0f}us"
    if value < 1000:
        return f"{value:.2f}ms"
    return f"{value / 1000:.2f}s"
