"""The results as a table, ratios to nginx, and what describes a run (machine, versions,
commits)."""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from comparison.common import ALL_PROXIES, ALL_SCENARIOS, CLK_TCK, MODES, REPO, SIZES, fmt, fmt_ms
from comparison.peers import pibl_env
from comparison.procs import tool_version
from comparison.runs import Result

# -- output ---------------------------------------------------------------------------------


def reference_proxy(proxy: str) -> str:
    """The nginx row a row is compared with: ``*-nolog`` rows with nginx-nolog."""
    return "nginx-nolog" if proxy.endswith("-nolog") else "nginx"


def add_ratios(results: list[Result]) -> None:
    base = {
        (r.scenario, r.proxy, r.mode, r.size): r.cpu_us_per_req
        for r in results
        if r.proxy in ("nginx", "nginx-nolog") and r.ok
    }
    for r in results:
        ref = base.get((r.scenario, reference_proxy(r.proxy), r.mode, r.size))
        if ref is None:
            ref = base.get((r.scenario, "nginx", r.mode, r.size))
        if r.ok and ref and r.cpu_us_per_req is not None:
            r.cpu_ratio_vs_nginx = round(r.cpu_us_per_req / ref, 2)


def _order(values: Sequence[str], value: str) -> int:
    return values.index(value) if value in values else len(values)


def sorted_results(results: list[Result]) -> list[Result]:
    """Grouped by scenario, mode and size, proxies in a fixed order within a group."""
    return sorted(
        results,
        key=lambda r: (
            _order(ALL_SCENARIOS, r.scenario),
            _order(MODES, r.mode),
            _order(tuple(SIZES), r.size),
            _order(ALL_PROXIES, r.proxy),
        ),
    )


def table(results: list[Result]) -> str:
    head = (
        "scenario",
        "proxy",
        "mode",
        "size",
        "req/s",
        "CPU us/req",
        "vs nginx",
        "proxy CPU%",
        "load CPU%",
        "softirq%",
        "others CPU%",
        "p50",
        "p99",
        "peak RSS MB",
        "errors",
    )
    rows: list[tuple[str, ...] | None] = []
    previous = None
    for r in sorted_results(results):
        group = (r.scenario, r.mode, r.size)
        if previous is not None and group != previous:
            rows.append(None)  # a blank line between groups
        previous = group
        errors = r.non2xx + sum(r.socket_errors.values())
        rows.append(
            (
                r.scenario,
                r.proxy,
                r.mode,
                r.size,
                f"{r.rps:.0f}" if r.ok else "FAILED",
                fmt(r.cpu_us_per_req),
                "-" if r.cpu_ratio_vs_nginx is None else f"{r.cpu_ratio_vs_nginx:.2f}x",
                fmt(r.proxy_cpu_pct, 0),
                fmt(r.loadgen_cpu_pct, 0),
                fmt(r.irq_on_proxy_cpu_pct, 0),
                fmt(r.others_on_proxy_cpu_pct, 0),
                fmt_ms(r.p50_ms),
                fmt_ms(r.p99_ms),
                fmt(r.peak_rss_mb),
                str(errors),
            )
        )
    filled = [row for row in rows if row is not None]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *filled, strict=True)]
    lines = []
    for i, row in enumerate([head, *rows]):
        if row is None:
            lines.append("")
            continue
        cells = [
            str(c).ljust(w) if j < 4 else str(c).rjust(w)
            for j, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def logging_costs(results: list[Result]) -> list[str]:
    """CPU per request added by the access log, PIBL and nginx, from the logging scenario."""
    value = {
        (r.proxy, r.mode, r.size): r.cpu_us_per_req
        for r in results
        if r.scenario == "logging" and r.ok and r.cpu_us_per_req is not None
    }
    out = []
    for mode in MODES:
        for size in SIZES:
            parts = []
            for proxy in ("pibl", "nginx"):
                on, off = value.get((proxy, mode, size)), value.get((f"{proxy}-nolog", mode, size))
                if on is not None and off is not None:
                    parts.append(f"{proxy} {on - off:+.1f} us ({100 * (on - off) / off:+.0f}%)")
            if parts:
                out.append(f"access log cost, {mode} /{size}: " + ", ".join(parts))
    return out


def pibl_tree_digest() -> str:
    """Size and mtime of every file under pibl/, to notice the code changing during a run."""
    entries = []
    for path in sorted((REPO / "pibl").rglob("*.py")):
        try:
            st = path.stat()
        except OSError:
            continue
        entries.append(f"{path.relative_to(REPO)}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


def pibl_differs(commit_a: str, commit_b: str) -> bool:
    """Whether pibl/ differs between two commits (read-only ``git diff``); commits made
    during a run that touch other directories do not matter here."""
    if commit_a == commit_b:
        return False
    try:
        result = subprocess.run(
            ["git", "-C", str(REPO), "diff", "--quiet", commit_a, commit_b, "--", "pibl"],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return True
    return result.returncode != 0


def git_status_pibl() -> list[str] | None:
    """Uncommitted changes under pibl/ (read-only ``git status``), None if git failed."""
    try:
        result = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "pibl"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.splitlines() if result.returncode == 0 else None


def machine_info(args: argparse.Namespace, tools: dict[str, str]) -> dict[str, Any]:
    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = tool_version(["git", "-C", str(REPO), "rev-parse", "HEAD"])
    return {
        "kernel": platform.release(),
        "cpu_model": cpu_model,
        "cpus_online": os.cpu_count(),
        "clk_tck": CLK_TCK,
        "python_for_pibl": args.python,
        "pibl_version": tool_version(
            [args.python, "-m", "pibl", "--version"], need_success=True, env=pibl_env()
        ),
        "git_commit": commit,
        "git_status_pibl": git_status_pibl(),
        "nginx": tool_version([tools["nginx"], "-v"]) if "nginx" in tools else None,
        "haproxy": tool_version([tools["haproxy"], "-v"]) if "haproxy" in tools else None,
        "wrk": tool_version([tools["wrk"], "-v"]),
    }
