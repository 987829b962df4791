"""The flags of benchmarks/run.py and its ``main``: the parts in order, then results.json and the tables."""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from exporter.config import parse_duration

from .goals import goals
from .load import WRK
from .machine import background_load, describe_machine
from .metrics import active_size, metrics_size, steady_size
from .options import REFRESH_RUNS, Bench, Options
from .processes import BenchmarkError, Children
from .refresh import plan_runs, refresh_run
from .results import Results, Settings, to_json
from .servers import NGINX
from .tables import markdown

BENCHMARKS = Path(__file__).resolve().parent.parent
REPO = BENCHMARKS.parent
DURATIONS = (
    "duration",
    "refresh_latency",
    "window",
    "pace_window",
    "active_interval",
    "idle",
    "hang_timeout",
    "burst",
    "poll",
    "reference_max_seconds",
)
QUICK = {  # --quick: the defaults of the smoke run, for every flag left at its default
    "sizes": "1,10",
    "duration": "1s",
    "refresh_ops": 20,
    "refresh_latency": "50ms",
    "window": "20s",
    "pace_window": "5s",
    "pace_windows": 3,
    "active_size": 10,
    "active_interval": "2s",
    "idle": "3s",
    "burst": "1s",
    "poll": "0.5s",
    "reference_max_seconds": "5s",
    "max_minutes": 5.0,
}
STORE_SECONDS = 60.0  # of store_bench's idle and steady runs
# (the harness reports a timeout or a dead child as a failed test, pytest.fail: here a failed step)
STEP_FAILURES = (
    BenchmarkError,
    pytest.fail.Exception,
    requests.RequestException,
    subprocess.TimeoutExpired,
    OSError,
)


def parser(description: str) -> argparse.ArgumentParser:
    parse = argparse.ArgumentParser(description=description)
    flag = parse.add_argument
    flag("--sizes", default="1,100,1000,10000", help="operation counts (default 1,100,1000,10000)")
    flag("--duration", default="10s", help="each wrk run (default 10s)")
    flag("--connections", type=int, default=50, help="wrk connections (default 50)")
    flag("--threads", type=int, default=2, help="wrk threads (default 2)")
    flag(
        "--quick",
        action="store_true",
        help="smoke run: sizes 1,10, 1s wrk runs, refresh run of 20 operations at 50ms",
    )
    flag("--skip-refresh", action="store_true", help="skip part 2 (refresh capacity)")
    flag("--store", type=int, default=0, help="also run benchmarks/store_bench.py at this many operations")
    flag(
        "--steady",
        action="store_true",
        help="part 1 also measures the exporter with every operation answered (values on the page)",
    )
    flag("--skip-metrics", action="store_true", help="skip part 1 (/metrics under load)")
    flag("--out", default=str(BENCHMARKS / "results.json"), help="JSON results file")
    flag("--refresh-ops", type=int, default=None, help="operations of part 2 (default: largest size)")
    flag("--refresh-latency", default="250ms", help="simulated upstream latency of part 2")
    flag("--window", default="5m", help="refresh_interval, the window of part 2 (default 5m)")
    flag(
        "--hang-fraction", type=float, default=0.1, help="hanging share of the tokens in part 2 (default 0.1)"
    )
    flag(
        "--refresh-runs",
        default="healthy,hang,pace",
        help="runs of part 2 (default all three): healthy (no hanging token); hang (--hang-fraction of the "
        "tokens hang); pace (a quarter of the operations with 4 reports each, --pace-window)",
    )
    flag("--pace-window", default="60s", help="refresh_interval of the pace run (default 60s)")
    flag("--pace-windows", type=int, default=3, help="windows the pace run lasts (default 3)")
    flag(
        "--active-size",
        type=int,
        default=1000,
        help="operations of the refreshing /metrics row (default 1000)",
    )
    flag("--active-interval", default="10s", help="refresh_interval of the refreshing row (default 10s)")
    flag("--idle", default="60s", help="idle CPU window at the largest --steady size (default 60s; 0 = skip)")
    flag("--hang-timeout", default="60s", help="exporter read_timeout of part 1 (default 60s)")
    flag("--burst", default="3s", help="scrape bursts of part 2 (default 3s)")
    flag("--poll", default="2s", help="/metrics poll interval of part 2 (default 2s)")
    flag(
        "--reference-max-seconds",
        default="90s",
        help="cap of the stretched prometheus_client wrk run at large sizes (default 90s)",
    )
    flag(
        "--exporter-root",
        default=str(REPO),
        help="run the exporter and simulator of another checkout (to compare a change)",
    )
    flag("--max-minutes", type=float, default=40.0, help="hard deadline of the whole run")
    return parse


def parse_options(argv: list[str] | None, description: str = "") -> Options:
    parse = parser(description)
    args = parse.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if parse.get_default(key) == getattr(args, key):
                setattr(args, key, value)
    runs = frozenset(r.strip() for r in args.refresh_runs.split(",") if r.strip())
    unknown = runs - set(REFRESH_RUNS)
    if unknown:
        parse.error(f"--refresh-runs: unknown run(s) {', '.join(sorted(unknown))}")
    seconds = {key: parse_duration(str(getattr(args, key))) for key in DURATIONS}
    hang_timeout = f"{seconds.pop('hang_timeout'):g}s"
    sizes = tuple(int(s) for s in str(args.sizes).split(",") if s.strip())
    return Options(
        **seconds,
        hang_timeout=hang_timeout,
        sizes=sizes,
        connections=args.connections,
        threads=args.threads,
        quick=args.quick,
        steady=args.steady,
        skip_metrics=args.skip_metrics,
        skip_refresh=args.skip_refresh,
        store=args.store,
        out=Path(args.out),
        refresh_ops=args.refresh_ops if args.refresh_ops is not None else max(sizes),
        hang_fraction=args.hang_fraction,
        refresh_runs=runs,
        pace_windows=args.pace_windows,
        active_size=args.active_size,
        exporter_root=Path(args.exporter_root).resolve(),
        max_minutes=args.max_minutes,
    )


def settings(opts: Options) -> Settings:
    return Settings(
        sizes=list(opts.sizes),
        duration_s=opts.duration,
        connections=opts.connections,
        wrk_threads=opts.threads,
        quick=opts.quick,
        metrics_read_timeout=opts.hang_timeout,
        refresh_ops=opts.refresh_ops,
        refresh_latency_s=opts.refresh_latency,
        window_s=opts.window,
        hang_fraction=opts.hang_fraction,
        pace_window_s=opts.pace_window,
        pace_windows=opts.pace_windows,
        active_size=opts.active_size,
        active_interval_s=opts.active_interval,
        idle_s=opts.idle,
        exporter_root=str(opts.exporter_root),
    )


def part_one(bench: Bench, results: Results) -> None:
    """/metrics under load at every size (with --steady and the refresher-active rows where asked)."""
    opts = bench.options
    bench.log(f"part 1: /metrics with {opts.connections} connections, sizes {list(opts.sizes)}")
    for size in opts.sizes:
        bench.check_deadline(f"size {size}")
        part, rows = metrics_size(bench, size)
        if opts.steady:
            rows.append(steady_size(bench, size, idle=opts.idle > 0 and size == max(opts.sizes)))
        if size == opts.active_size:
            rows += active_size(bench, size)
        results.metrics += rows
        results.sizes.append(part)


def part_two(bench: Bench, results: Results) -> None:
    """Refresh capacity and pacing, run by run."""
    bench.log(f"part 2: refresh capacity and pacing at {bench.options.refresh_ops} operations")
    for plan in plan_runs(bench.options):
        bench.check_deadline(f"the {plan.label} refresh run")
        results.refresh.append(refresh_run(bench, plan))


def part_store(bench: Bench) -> dict[str, Any]:
    """The state store at scale: benchmarks/store_bench.py (runnable alone), its results as it writes them."""
    from store_bench import run  # benchmarks/, run.py's directory, is on the path

    result: dict[str, Any] = run(bench.options.store, STORE_SECONDS, bench.log)
    return result


def run_parts(bench: Bench, results: Results) -> None:
    results.background_before = background_load()
    bench.log(f"machine busy before the run (other processes): {to_json(results.background_before)}")
    if not bench.options.skip_metrics:
        part_one(bench, results)
    if not bench.options.skip_refresh:
        part_two(bench, results)
    if bench.options.store:
        results.store = part_store(bench)
    results.goals = goals(results)
    results.background_after = background_load()


def main(argv: list[str] | None = None, description: str = "") -> int:
    opts = parse_options(argv, description)
    missing = [name for name, path in (("wrk", WRK), ("nginx", NGINX)) if not path]
    if missing:
        print(
            f"benchmarks/run.py: {' and '.join(missing)} not found; on Debian: "
            "apt-get install -y wrk nginx-light",
            file=sys.stderr,
        )
        return 2
    began = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - began:7.1f}s] {message}", file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results = Results(machine=describe_machine(), settings=settings(opts))
    status = _run(opts, results, log, deadline=began + opts.max_minutes * 60)
    results.elapsed_s = round(time.monotonic() - began, 1)
    write_out(results, opts.out)
    return status


def _run(opts: Options, results: Results, log: Callable[[str], None], deadline: float) -> int:
    """Every part into ``results``; a failed step is logged and recorded (``error``), and status 1."""
    children: Children | None = None
    try:
        with tempfile.TemporaryDirectory(prefix="wolkvox-bench-") as tmp:
            children = Children(opts.exporter_root, Path(tmp))
            run_parts(Bench(opts, children, log, deadline), results)
    except STEP_FAILURES as error:
        log(f"FAILED: {error}")
        results.error = str(error)
        return 1
    finally:
        if children is not None:
            children.stop_all()
    return 0


def write_out(results: Results, out: Path) -> None:
    """results.json, then the tables and a line about the machine on stdout."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(to_json(results), indent=2) + "\n", encoding="utf-8")
    print(markdown(results))
    m = results.machine
    print(
        f"\nMachine: {m.cpu_model}, {m.cores} cores, Python {m.python}, {m.date_utc}; "
        f"run took {results.elapsed_s} s; JSON in {out}"
    )
