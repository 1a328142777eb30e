"""The command line: options, checks, and the run from start to end."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from comparison.chart import chart_subtitle, draw_chart, replot
from comparison.common import (
    ALL_PROXIES,
    ALL_SCENARIOS,
    DEFAULT_PROXIES,
    MODES,
    REPO,
    RESULTS_DIR,
    SIZES,
    BenchError,
    say,
)
from comparison.procs import ensure_tools, tool_version
from comparison.report import (
    add_ratios,
    git_status_pibl,
    logging_costs,
    machine_info,
    pibl_differs,
    pibl_tree_digest,
    sorted_results,
    table,
)
from comparison.runs import Bench, build_plan

# -- command line ---------------------------------------------------------------------------


def _list(choices: Sequence[str], *, allow_none: bool = False) -> Any:
    def parse(text: str) -> list[str]:
        if allow_none and text.strip() in ("", "none"):
            return []
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {', '.join(choices)}"
                + (" (or none)" if allow_none else "")
            )
        return list(dict.fromkeys(items))

    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    default_python = REPO / ".venv" / "bin" / "python"
    p = argparse.ArgumentParser(
        description="CPU cost per request of PIBL vs nginx vs HAProxy (loopback, pinned CPUs)."
    )
    p.add_argument(
        "--scenarios",
        type=_list(ALL_SCENARIOS),
        default=list(ALL_SCENARIOS),
        help=f"comma-separated subset of {','.join(ALL_SCENARIOS)} (default: all)",
    )
    p.add_argument(
        "--proxies",
        type=_list(ALL_PROXIES),
        default=list(DEFAULT_PROXIES),
        help=f"comma-separated subset of {','.join(ALL_PROXIES)} (default: all but "
        "pibl-pure); the -nolog variants exist in the logging scenario only, pibl-pure (PIBL "
        "with PIBL_PURE_PYTHON=1, to compare with a compiled build) in the others",
    )
    p.add_argument(
        "--sizes",
        type=_list(tuple(SIZES)),
        default=list(SIZES),
        help="comma-separated subset of 1k,100k (default: both)",
    )
    p.add_argument(
        "--mode",
        choices=(*MODES, "both"),
        default=None,
        help="client connections for every scenario: keep-alive, 'Connection: close' on "
        "every request, or both passes (default: both for the --close-scenarios, keep-alive "
        "for the others)",
    )
    p.add_argument(
        "--close-scenarios",
        type=_list(ALL_SCENARIOS, allow_none=True),
        default=["proxy"],
        help="without --mode: scenarios that get a 'Connection: close' pass after the "
        "keep-alive one (default: proxy; 'none' for none)",
    )
    p.add_argument("--duration", type=int, default=None, help="seconds per measured run (10)")
    p.add_argument("--warmup", type=int, default=None, help="seconds of warm-up per run (2)")
    p.add_argument("--connections", type=int, default=16, help="wrk connections (16)")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="measured runs per row (one warm-up); the row is the run with the median CPU "
        "per request (1)",
    )
    p.add_argument("--quick", action="store_true", help="3 s runs with 1 s warm-up")
    p.add_argument("--loadgen-cpu", type=int, default=0, help="CPU for backends and wrk (0)")
    p.add_argument("--proxy-cpu", type=int, default=1, help="CPU for the proxy under test (1)")
    p.add_argument(
        "--base-port",
        type=int,
        default=18000,
        help="backends listen on BASE+1..3, proxies on BASE+80 upward (18000)",
    )
    p.add_argument(
        "--python",
        default=str(default_python if default_python.exists() else Path(sys.executable)),
        help="interpreter that runs PIBL (default: the project's .venv)",
    )
    p.add_argument(
        "--chart",
        type=Path,
        default=REPO / "docs" / "bench.png",
        help="where to write the PNG chart when matplotlib is available (docs/bench.png)",
    )
    p.add_argument("--no-chart", action="store_true", help="do not draw the chart")
    p.add_argument(
        "--replot",
        type=Path,
        metavar="JSON",
        help="print the table and draw the chart from a saved results file, then exit",
    )
    p.add_argument(
        "--keep-tmp", action="store_true", help="keep the temporary directory with configs and logs"
    )
    args = p.parse_args(argv)
    args.duration = args.duration or (3 if args.quick else 10)
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    args.modes_for = {
        scenario: (
            list(MODES)
            if args.mode == "both" or (args.mode is None and scenario in args.close_scenarios)
            else [args.mode or "keepalive"]
        )
        for scenario in args.scenarios
    }
    args.modes = [m for m in MODES if any(m in ms for ms in args.modes_for.values())]
    if args.duration < 1 or args.warmup < 0 or args.connections < 1 or args.repeat < 1:
        p.error("--duration, --connections, --repeat must be positive, --warmup not negative")
    if not 1024 < args.base_port < 65000:
        p.error("--base-port must be between 1025 and 64999")
    if not build_plan(args):
        p.error(
            f"no proxy of --proxies {','.join(args.proxies)} runs in --scenarios "
            f"{','.join(args.scenarios)} (the -nolog variants exist in the logging scenario only)"
        )
    return args


def _on_signal(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot is not None:
        return replot(args.replot, args.chart.resolve())
    if not sys.platform.startswith("linux"):
        say("this benchmark reads /proc and needs Linux")
        return 2
    allowed = os.sched_getaffinity(0)
    for cpu in (args.loadgen_cpu, args.proxy_cpu):
        if cpu not in allowed:
            say(
                f"CPU {cpu} is not available here (usable CPUs: {sorted(allowed)}); "
                "use --loadgen-cpu / --proxy-cpu"
            )
            return 2
    if args.loadgen_cpu == args.proxy_cpu:
        say(
            "warning: proxy and load generator share one CPU; CPU per request is still "
            "measured, req/s and latency are not meaningful"
        )
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)

    plan = build_plan(args)
    unused = [p for p in args.proxies if p not in {v.name for v, _ in plan}]
    if unused and args.proxies != list(DEFAULT_PROXIES):
        say(f"note: {', '.join(unused)} not part of the chosen scenarios; not run")
    needed = ["nginx", "wrk"] + (["haproxy"] if any(v.kind == "haproxy" for v, _ in plan) else [])
    try:
        tools = ensure_tools(needed)
    except BenchError as exc:
        say(f"error: {exc}")
        return 2
    # This script's own sampling stays on the load-generator CPU, away from the proxy.
    os.sched_setaffinity(0, {args.loadgen_cpu})

    stamp = time.strftime("%Y%m%d-%H%M%S")
    tmp = Path(tempfile.mkdtemp(prefix="pibl-bench-"))
    tmp.chmod(0o755)  # nginx workers run as an unprivileged user and read files in it
    say(f"temporary directory: {tmp}")
    info = machine_info(args, tools)
    code_before = pibl_tree_digest()
    say(
        f"{info['pibl_version']} | {info['nginx']} | {info['haproxy'] or 'haproxy not used'}"
        f" | {info['wrk']}"
    )
    say(
        "scenarios: "
        + ", ".join(f"{s} ({'+'.join(args.modes_for[s])})" for s in args.scenarios)
        + f"; sizes: {', '.join(args.sizes)}"
    )
    bench = Bench(args, tools, tmp)
    interrupted = False
    try:
        bench.run()
    except BenchError as exc:
        bench.fail("-", "-", "-", "-", str(exc))
    except KeyboardInterrupt:
        interrupted = True
        say("\ninterrupted; stopping processes")
    finally:
        bench.pm.stop_all()

    add_ratios(bench.results)
    commit_after = tool_version(["git", "-C", str(REPO), "rev-parse", "HEAD"])
    code_changed = (
        pibl_tree_digest() != code_before
        or git_status_pibl() != info["git_status_pibl"]
        or pibl_differs(info["git_commit"], commit_after)
    )
    say()
    say(
        f"wrk -t1 -c{args.connections} -d{args.duration}s --latency, warm-up {args.warmup} s"
        + (f", median of {args.repeat} runs per row" if args.repeat > 1 else "")
        + "; "
        f"proxy on CPU {args.proxy_cpu}, backends + wrk on CPU {args.loadgen_cpu}; "
        "PIBL --workers 1 (worker + master), nginx worker_processes 1 (worker + master), "
        "HAProxy nbthread 1"
    )
    say(
        "CPU us/req = (utime+stime of the proxy process tree) / requests completed; "
        "'vs nginx' = CPU us/req / nginx's in the same scenario, mode and size (-nolog rows: "
        "nginx-nolog's); 'load CPU%' = backends + wrk on the load CPU; "
        "'softirq%' = interrupt time on the proxy CPU (network stack, charged to no "
        "process); 'others CPU%' = time on the proxy CPU used by other processes"
    )
    say(table(bench.results))
    for line in logging_costs(bench.results):
        say(line)
    for r in sorted_results(bench.results):
        if r.non2xx or any(r.socket_errors.values()):
            say(f"errors in {r.label}: wrk reported " + "; ".join(r.notes))
            say(f"--- wrk output ({r.wrk_command}) ---\n{r.wrk_output.rstrip()}")
            if r.proxy_log_tail:
                say(r.proxy_log_tail)
        elif r.notes:
            say(f"notes for {r.label}: " + "; ".join(r.notes))
    disturbed = [r for r in bench.results if r.ok and (r.others_on_proxy_cpu_pct or 0) >= 5]
    if disturbed:
        say(
            f"note: other processes used >= 5% of CPU {args.proxy_cpu} during "
            + ", ".join(r.label for r in disturbed)
            + "; those rows may be disturbed, run again on a quiet machine"
        )
    saturated = [r for r in bench.results if r.ok and (r.loadgen_cpu_pct or 0) >= 90]
    if saturated:
        say(
            "note: the load CPU was >= 90% busy in "
            + ", ".join(r.label for r in saturated)
            + "; req/s there is limited by wrk + backends, not by the proxy"
        )
    had_errors = any(r.non2xx or any(r.socket_errors.values()) for r in bench.results)
    keep = args.keep_tmp or bool(bench.failures) or had_errors
    kept = "" if keep else " (removed at exit; --keep-tmp keeps it)"
    for key, log in bench.logs_info.items():
        for f in log.get("access_logs", []):
            say(
                f"{key} access log {f['path']}: {f['lines']} lines "
                f"({f['lines_before_stop']} before SIGTERM), {f['bytes'] / 1e6:.1f} MB, for "
                f"{log['requests_completed_by_wrk']} requests completed by wrk{kept}"
            )
    for key, log in bench.logs_info.items():
        normal = (0, None, -signal.SIGTERM)
        if log.get("exit_status") not in normal or (log.get("stop_seconds") or 0) > 3:
            say(
                f"{key}: exit status {log.get('exit_status')} "
                f"{log.get('stop_seconds')} s after SIGTERM"
            )
    if code_changed:
        say(
            "warning: the files under pibl/ changed while the benchmark ran; PIBL rows may "
            "come from different versions of the code"
        )
    for item in bench.skipped:
        say(f"SKIPPED {item['scenario']}/{item['proxy']}: {item['reason'].splitlines()[0]}")
    for failure in bench.failures:
        say(
            f"FAILED {failure['scenario']} {failure['proxy']} {failure['mode']} "
            f"{failure['size']}: {failure['error'].splitlines()[0] if failure['error'] else ''}"
        )

    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"{stamp}.json"
    chart = None if args.no_chart else args.chart.resolve()
    payload: dict[str, Any] = {
        "timestamp": stamp,
        "parameters": {
            "scenarios": args.scenarios,
            "proxies": args.proxies,
            "sizes": args.sizes,
            "modes": args.modes,
            "modes_per_scenario": args.modes_for,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "connections": args.connections,
            "repeat": args.repeat,
            "wrk_threads": 1,
            "pibl_workers": 1,
            "loadgen_cpu": args.loadgen_cpu,
            "proxy_cpu": args.proxy_cpu,
            "base_port": args.base_port,
            "chart": str(chart) if chart else None,
        },
        "machine": info,
        "results": [asdict(r) for r in bench.results],
        "failures": bench.failures,
        "skipped": bench.skipped,
        "setups": bench.setups,
        "access_logs": bench.logs_info,
        "pibl_effective_config": bench.pibl_configs,
        "interrupted": interrupted,
        "pibl_code_changed_during_run": code_changed,
    }
    out.write_text(json.dumps(payload, indent=2) + "\n")
    say(f"results: {out}")
    if chart is not None and draw_chart(
        bench.results, chart, chart_subtitle(stamp, info, payload["parameters"])
    ):
        say(f"chart: {chart}")
    if keep:
        say(f"kept {tmp} (configs and logs)")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    if interrupted:
        return 130
    return 1 if bench.failures or not bench.results else 0


if __name__ == "__main__":
    sys.exit(main())
