#!/usr/bin/env python3
"""The state store at scale: the real exporter with ``--ops`` operations (one token each) x 14 services
(every billing api), against the simulator, on loopback.

    python3 benchmarks/store_bench.py            # about 12 minutes on 2 cores
    python3 benchmarks/store_bench.py --ops 1000 --seconds 20 --settle 30 --journal-minutes 10  # a look

A store is written first as a running exporter leaves it (every value fresh, every report due within
its interval, every bucket as the budget allows), then:

  load     in a child process: ``StateStore.load`` of that store into the snapshot store, its time,
           and its peak RSS over a child that puts the same values in by hand (what the exporter holds
           anyway once its values are in): the extra memory of loading, compared with the store's size;
  idle     the real exporter with that store (refresh_interval 1h; every report due in 30 to 60
           minutes, so nothing is due during ``--seconds``; a hanging simulator, never reached): its
           start, RSS and peak RSS, idle CPU, and what it wrote (write_bytes of /proc/PID/io, the
           store's files);
  steady   the real exporter, every report due within its stretched interval (the default budget of
           1,000 a day stretches 14 reports at 5m to ~20m) and the simulator answering, measured for
           ``--seconds`` after ``--settle`` seconds (a token's first request after a start commits its
           reservation; the share of budget rows settles within minutes): requests per
           second, bytes written per minute (write_bytes: the store's WAL and its checkpoints), the
           budget rows written per request (the reservation), RSS;
  journal  ``--journal-minutes`` (default 50) of simulated time, in process: the real planner,
           reservations and StateStore (``reservation_bench.simulate``), the store committed on the
           writer thread's cadence: what ``--seconds`` of the real exporter is too short to hold (the
           reservations' steady share of budget rows; the journals' generations turning over, one
           round of 140,000 answers takes ~21 minutes); then the load of the store that leaves.

Results: JSON on stdout (``--out`` to a file too), one line per step on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

from harness import Process, exporter_args, simulator_args, start_program  # noqa: E402
from reservation_bench import simulate  # noqa: E402
from wolkbench.processes import MB, cpu_seconds, rss_mb  # noqa: E402

from exporter.model import BILLING_APIS  # noqa: E402
from exporter.monthclose import Seen, utc_month  # noqa: E402
from exporter.planner import plan_pace  # noqa: E402
from exporter.refresher import token_key  # noqa: E402
from exporter.secret import Secret  # noqa: E402
from exporter.statestore import StateStore  # noqa: E402

APIS = sorted(BILLING_APIS)[:14]
LIMIT = 1000  # the default daily_request_limit
_LOADED = re.compile(r"read (\d+) value\(s\) and (\d+) token\(s\) in ([\d.]+) s")


def proc_field(process: Process, name: str, field: str) -> int:
    with open(f"/proc/{process.proc.pid}/{name}", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/PID/{name}")


def peak_mb(process: Process) -> float:
    return round(proc_field(process, "status", "VmHWM:") * 1024 / MB, 1)


def written(process: Process) -> int:
    return proc_field(process, "io", "write_bytes:")


def write_config(path: Path, sim_url: str, ops: int, store: Path | None, refresh: str) -> None:
    config: dict[str, Any] = {"refresh_interval": refresh, "max_age": "2h", "daily_request_limit": LIMIT}
    if store is not None:
        config["state_store"] = str(store)
    config["operations"] = [
        {"server": f"op-{i:05d}", "token": f"store-token-{i:05d}", "base_url": sim_url, "apis": APIS}
        for i in range(ops)
    ]
    path.write_text(yaml.dump(config, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper)), encoding="utf-8")


def build_store(path: Path, ops: int, interval: float, not_before: float = 0.0) -> float:
    """A store as a running exporter leaves it: values fresh, reports due spread over the (stretched)
    ``interval`` (from ``not_before`` seconds on), buckets at a tenth of their burst. Its size in MB."""
    now = time.time()
    pace = plan_pace([interval] * len(APIS), LIMIT)
    stretched = interval * pace.stretch - not_before
    store = StateStore(path)
    store.load()
    month = utc_month(now)
    for i in range(ops):
        key = token_key(Secret(f"store-token-{i:05d}"))
        store.put_token(key, pace.burst / 10, now, 0.0)
        for j, api in enumerate(APIS):
            # A token's reports one after the other over the interval, tokens staggered: the steady
            # state of a token whose budget stretches its interval.
            due = now + not_before + stretched * (j + i / ops) / len(APIS)
            value = float(1000 + i + j)
            store.put_report(f"op-{i:05d}", api, key, due, (value, now), Seen(value, now, month))
    store.stop()
    return round(sum(p.stat().st_size for p in path.parent.glob(path.name + "*")) / MB, 2)


def start_exporter(workdir: Path, name: str, config: Path) -> Process:
    argv = [sys.executable, *exporter_args(config, "--log.level", "info")]
    return start_program(argv, workdir / f"{name}.log", name=name, timeout=300.0, cwd=REPO)


def start_simulator(workdir: Path, name: str, *flags: str) -> Process:
    argv = [sys.executable, *simulator_args("--log.level", "warning", *flags)]
    return start_program(argv, workdir / f"{name}.log", name=name, timeout=60.0, cwd=REPO)


_LOAD_CHILD = """
import json, sys, time
from exporter.model import BILLING_APIS
from exporter.monthclose import Seen
from exporter.statestore import StateStore
from exporter.store import OperationInfo, Store

def kb(field):
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1]) * 1024 / 1e6

path, ops, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
apis = tuple(sorted(BILLING_APIS)[:14])
store = Store([OperationInfo(f'op-{i:05d}', apis) for i in range(ops)], max_age=7200.0)
before = kb('VmRSS:')
started = time.monotonic()
if mode == 'load':
    state_store = StateStore(path)
    state_store.sink = store
    saved = state_store.load()
else:  # the same values and readings put in by hand: the memory the exporter holds anyway
    now = time.time()
    for i in range(ops):
        for j, api in enumerate(apis):
            v, at = float(1000 + i + j), now + i / 1e3 + j / 1e6  # distinct, as fetched
            store.restore_report(f'op-{i:05d}', api, (v, at), Seen(v, at, '2026-12'))
seconds = time.monotonic() - started
print(json.dumps({'seconds': round(seconds, 2), 'before_mb': round(before, 1),
                  'peak_mb': round(kb('VmHWM:'), 1), 'rss_mb': round(kb('VmRSS:'), 1)}))
"""


def load_run(store: Path, ops: int) -> dict[str, Any]:
    """``StateStore.load`` into the snapshot store in a fresh interpreter, and the same values put into it
    by hand in another: the load's time, and its peak memory over what the values cost anyway."""

    def child(mode: str) -> dict[str, Any]:
        done = subprocess.run(
            [sys.executable, "-c", _LOAD_CHILD, str(store), str(ops), mode],
            capture_output=True,
            text=True,
            cwd=REPO,
            check=True,
        )
        return dict(json.loads(done.stdout.strip().splitlines()[-1]))

    loaded, by_hand = child("load"), child("by-hand")
    return {
        "seconds": loaded["seconds"],
        "peak_over_empty_mb": round(loaded["peak_mb"] - loaded["before_mb"], 1),
        "values_by_hand_mb": round(by_hand["peak_mb"] - by_hand["before_mb"], 1),
        "extra_peak_mb": round(loaded["peak_mb"] - by_hand["peak_mb"], 1),
    }


def idle_run(workdir: Path, ops: int, store: Path, seconds: float) -> dict[str, Any]:
    """refresh_interval 1h against a hanging simulator: with the store nothing is due for the run."""
    sim = start_simulator(workdir, "sim-idle")
    try:
        requests.post(
            f"{sim.url}/-/faults", json={"mode": "hang", "token": "*"}, timeout=5
        ).raise_for_status()
        config = workdir / "idle.yml"
        write_config(config, sim.url, ops, store, "1h")
        started = time.monotonic()
        exporter = start_exporter(workdir, "idle", config)
        try:
            listening = time.monotonic() - started
            time.sleep(5)  # the first render and the refresher's start settle
            cpu, io = cpu_seconds(exporter), written(exporter)
            files = _files(store)
            time.sleep(seconds)
            row: dict[str, Any] = {
                "seconds_to_listen": round(listening, 2),
                "peak_rss_mb": peak_mb(exporter),
                "rss_mb": rss_mb(exporter),
                "idle_cpu_percent": round(100 * (cpu_seconds(exporter) - cpu) / seconds, 2),
                "idle_written_bytes": written(exporter) - io,
                "store_files_changed": _files(store) != files,
                "upstream_requests": _requests(sim),
            }
            loaded = _LOADED.search(exporter.log())
            if loaded:
                row["load_seconds_in_exporter"] = float(loaded.group(3))
            return row
        finally:
            exporter.stop(timeout=30)
    finally:
        sim.stop()


def budget_rows(store: Path) -> int:
    """The budget rows written so far (the tokens journal numbers its rows)."""
    with contextlib.closing(sqlite3.connect(f"{store.absolute().as_uri()}?mode=ro", uri=True)) as db:
        return int(db.execute("SELECT max(seq) FROM tokens").fetchone()[0] or 0)


def steady_run(workdir: Path, ops: int, store: Path, seconds: float, settle: float) -> dict[str, Any]:
    """Every report due within its (stretched) interval, the simulator answering: the write rate."""
    sim = start_simulator(workdir, "sim-steady")
    try:
        config = workdir / "steady.yml"
        write_config(config, sim.url, ops, store, "5m")
        exporter = start_exporter(workdir, "steady", config)
        try:
            # Past the start: each token's first request after a start commits its reservation (and
            # waits for it); the rows settle to their steady share within minutes.
            time.sleep(settle)
            io, before, rows = written(exporter), _requests(sim), budget_rows(store)
            time.sleep(seconds)
            requests_made = _requests(sim) - before
            io = written(exporter) - io
            rows = budget_rows(store) - rows
            return {
                "seconds": seconds,
                "after_seconds": settle,
                "requests_per_second": round(requests_made / seconds, 1),
                "written_mb_per_minute": round(io / MB * 60 / seconds, 2),
                "written_bytes_per_request": round(io / max(requests_made, 1)),
                "budget_rows_per_request": round(rows / max(requests_made, 1), 3),
                "rss_mb": rss_mb(exporter),
                "peak_rss_mb": peak_mb(exporter),
            }
        finally:
            exporter.stop(timeout=30)
    finally:
        sim.stop()


def journal_run(store: Path, ops: int, minutes: float) -> dict[str, Any]:
    """The real planner, reservations and StateStore over ``minutes`` of simulated time
    (``reservation_bench.simulate``: ~113 requests a second at 10,000 tokens, the store written on the
    writer thread's cadence): bytes written, the journals' turnovers included; then the load of the
    store it leaves."""
    store.parent.mkdir(parents=True, exist_ok=True)
    run = simulate(ops, minutes, str(store))
    size = round(sum(p.stat().st_size for p in store.parent.glob(store.name + "*")) / MB, 2)
    windows = [w["written_mb"] / 5 for w in run["windows"]]
    return {
        "simulated_minutes": minutes,
        "requests": run["requests"],
        "budget_rows_per_request": run["rows_per_request"],
        "transactions": run["transactions"],
        **run["state_store"],
        "worst_5_minutes_mb_per_minute": round(max(windows), 2) if windows else None,
        "store_mb_after": size,
        "load_after": load_run(store, ops),
    }


def _requests(sim: Process) -> int:
    return int(requests.get(f"{sim.url}/-/stats", timeout=10).json()["total_requests"])


def _files(store: Path | None) -> list[tuple[str, int, int]]:
    if store is None:
        return []
    return sorted(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for p in store.parent.glob(store.name + "*")
        if p.is_file()
    )


def run(
    ops: int, seconds: float, journal_minutes: float = 50.0, settle: float = 420.0, log: Any = None
) -> dict[str, Any]:
    say = log or (lambda message: print(message, file=sys.stderr, flush=True))
    with tempfile.TemporaryDirectory(prefix="wolkvox-store-bench-", dir=os.environ.get("BENCH_DIR")) as tmp:
        workdir = Path(tmp)
        store = workdir / "idle" / "state.db"
        # Idle: every report due in 30 to 60 minutes (refresh_interval 1h), so none during the run.
        size = build_store(store, ops, 3600.0, not_before=1800.0)
        say(f"store: {ops} operations x {len(APIS)} services, {size} MB")
        load = load_run(store, ops)
        say(f"load: {load}")
        idle = idle_run(workdir, ops, store, seconds)
        say(f"with the store, idle: {idle}")
        steady_store = workdir / "steady" / "state.db"
        build_store(steady_store, ops, 300.0)
        steady = steady_run(workdir, ops, steady_store, seconds, settle)
        say(f"with the store, steady refresh: {steady}")
        journal = journal_run(workdir / "journal" / "state.db", ops, journal_minutes)
        say(f"the journals over {journal_minutes} simulated minutes: {journal}")
    return {
        "operations": ops,
        "services": len(APIS),
        "store_mb": size,
        "load": load,
        "idle": idle,
        "steady": steady,
        "journal": journal,
        "goals": {
            "no write while nothing is due": idle["idle_written_bytes"] == 0
            and not idle["store_files_changed"],
            "<= 1 MB written a minute in steady refresh": max(
                steady["written_mb_per_minute"], journal["written_mb_per_minute"]
            )
            <= 1.0,
            "load < 2 s": max(load["seconds"], journal["load_after"]["seconds"]) < 2.0,
            "extra memory < 2x the store": load["extra_peak_mb"] < 2 * size
            and journal["load_after"]["extra_peak_mb"] < 2 * journal["store_mb_after"],
            "RSS inside 256Mi": max(idle["peak_rss_mb"], steady["peak_rss_mb"]) < 256 * 1.048576,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ops", type=int, default=10_000, help="operations, one token each (default 10000)")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each measure (default 60)")
    parser.add_argument(
        "--journal-minutes",
        type=float,
        default=50.0,
        help="simulated minutes of the journal step (default 50)",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=420.0,
        help="seconds of steady refresh before its measure (default 420: the reservations settle)",
    )
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    result = run(args.ops, args.seconds, args.journal_minutes, args.settle)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0 if all(result["goals"].values()) else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
