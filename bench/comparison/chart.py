"""The PNG chart (matplotlib when importable), and drawing it again from a saved run."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from comparison.common import say
from comparison.report import add_ratios, logging_costs, sorted_results, table
from comparison.runs import Result

CHART_COLORS = {
    "pibl": "#d9534f",
    "pibl-pure": "#8c2d2a",
    "pibl-nolog": "#f0a8a6",
    "nginx": "#2e8b57",
    "nginx-nolog": "#9fd3b4",
    "haproxy": "#3a6fb0",
}
CHART_NAMES = {
    "pibl": "PIBL",
    "pibl-pure": "PIBL, PIBL_PURE_PYTHON=1",
    "pibl-nolog": "PIBL, no access log",
    "nginx": "nginx",
    "nginx-nolog": "nginx, no access log",
    "haproxy": "HAProxy",
}


def draw_chart(results: list[Result], path: Path, subtitle: str) -> bool:
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        say("matplotlib is not importable; chart skipped (install it to get one)")
        return False
    ok = [r for r in sorted_results(results) if r.ok and r.cpu_us_per_req is not None]
    if not ok:
        say("no successful rows; chart skipped")
        return False
    groups = list(dict.fromkeys((r.scenario, r.mode, r.size) for r in ok))
    by_group: dict[tuple[str, str, str], list[Result]] = {}
    for r in ok:
        by_group.setdefault((r.scenario, r.mode, r.size), []).append(r)
    # Every bar has the same width; a group is as wide as its bars, plus a gap.
    width, gap = 0.24, 0.4
    centers: list[float] = []
    left = 0.0
    for group in groups:
        span = width * len(by_group[group])
        centers.append(left + span / 2)
        left += span + gap
    top = max(r.cpu_us_per_req or 0 for r in ok)
    fig, ax = plt.subplots(figsize=(max(8.0, 1.05 * left + 1.5), 6.8))
    labelled: set[str] = set()
    for g, group in enumerate(groups):
        rows = by_group[group]
        for i, r in enumerate(rows):
            x = centers[g] + (i - (len(rows) - 1) / 2) * width
            y = r.cpu_us_per_req or 0
            name = CHART_NAMES.get(r.proxy, r.proxy)
            ax.bar(
                x,
                y,
                width * 0.94,
                color=CHART_COLORS.get(r.proxy, "grey"),
                label=None if r.proxy in labelled else name,
                edgecolor="black",
                linewidth=0.4,
            )
            labelled.add(r.proxy)
            text = f"{y:.0f}"
            if r.proxy.startswith("pibl") and r.cpu_ratio_vs_nginx is not None:
                ratio = f"{r.cpu_ratio_vs_nginx:.1f}\u00d7"
                if y > top * 0.12:  # inside the top of the bar, so neighbours never collide
                    ax.text(
                        x,
                        y - top * 0.015,
                        ratio,
                        ha="center",
                        va="top",
                        rotation=90,
                        fontsize=9,
                        fontweight="bold",
                        color="white" if r.proxy == "pibl" else "black",
                    )
                else:
                    text += f"\n{ratio}"
            ax.text(
                x,
                y + top * 0.01,
                text,
                ha="center",
                va="bottom",
                fontsize=8,
                fontweight="bold" if r.proxy.startswith("pibl") else "normal",
            )
    for g in range(1, len(groups)):
        if groups[g][0] != groups[g - 1][0]:
            ax.axvline(
                (centers[g - 1] + centers[g]) / 2, color="grey", linewidth=0.8, linestyle=":"
            )
    ax.set_xticks(centers)
    ax.set_xticklabels(
        [f"{s}\n/{size}\n{'keep-alive' if m == 'keepalive' else 'close'}" for s, m, size in groups],
        fontsize=9,
    )
    ax.set_xlim(-gap / 2 - 0.1, left - gap / 2 + 0.1)
    ax.set_ylim(0, top * 1.18)
    ax.set_ylabel("proxy CPU time per request (µs, lower is better)")
    ax.set_xlabel("scenario / response size / client connections")
    ax.set_title(
        "Proxy CPU time per request: PIBL vs nginx vs HAProxy, one worker each\n"
        "above the bars: µs per request; inside PIBL's bars: the ratio to nginx in the same "
        "group\n(PIBL without access log: ratio to nginx without access log)",
        fontsize=11,
        pad=22,
    )
    ax.grid(axis="y", linewidth=0.4, alpha=0.6)
    ax.set_axisbelow(True)
    handles, names = ax.get_legend_handles_labels()
    order = sorted(range(len(names)), key=lambda i: list(CHART_NAMES.values()).index(names[i]))
    ax.legend(
        [handles[i] for i in order],
        [names[i] for i in order],
        fontsize=8,
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
        ncols=len(order),
        frameon=False,
    )
    fig.text(0.01, 0.01, subtitle, fontsize=7, color="dimgrey", ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return True


def chart_subtitle(stamp: str, info: dict[str, Any], params: dict[str, Any]) -> str:
    haproxy = (info.get("haproxy") or "").split()
    repeat = params.get("repeat") or 1
    median = f" (median of {repeat} runs)" if repeat > 1 else ""
    return (
        f"{stamp} | {info.get('pibl_version')} (commit {str(info.get('git_commit'))[:8]}), "
        f"{(info.get('nginx') or '-').replace('nginx version: ', '')}, "
        f"HAProxy {haproxy[2] if len(haproxy) > 2 else '-'} | "
        f"wrk -t1 -c{params.get('connections')} -d{params.get('duration_s')}s"
        f"{median}"
        "\nproxy alone on "
        f"CPU {params.get('proxy_cpu')}, backends + wrk on CPU {params.get('loadgen_cpu')} | "
        f"{info.get('cpu_model')}"
    )


def replot(source: Path, chart: Path) -> int:
    """Table and chart again from a saved results file, without measuring."""
    try:
        payload = json.loads(source.read_text())
    except (OSError, ValueError) as exc:
        say(f"cannot read {source}: {exc}")
        return 2
    names = {f.name for f in fields(Result)}
    results = []
    for row in payload.get("results", []):
        row = {k: v for k, v in row.items() if k in names}
        row.setdefault("scenario", "proxy")  # files written before scenarios existed
        results.append(Result(**row))
    add_ratios(results)
    say(table(results))
    for line in logging_costs(results):
        say(line)
    subtitle = chart_subtitle(
        payload.get("timestamp", "?"), payload.get("machine", {}), payload.get("parameters", {})
    )
    if draw_chart(results, chart, subtitle):
        say(f"chart: {chart}")
        return 0
    return 1
