#!/usr/bin/env python3
"""Speed, capacity, pacing and memory benchmark of the exporter, against the simulator, on loopback only.

    python benchmarks/run.py --steady         # the full run (about 15 minutes on 2 cores)
    python benchmarks/run.py --quick --steady # the smoke run of the test suite (about a minute)

Part 1, /metrics under load, for each size in ``--sizes`` (number of operations, distinct tokens):
  the simulator is told to hang every request (fault ``hang`` for token ``*``) and the exporter
  (read_timeout 60s) is started against it, so every upstream request it makes hangs until its
  timeout while /metrics is measured. Once the page lists every operation (``wolkvox_up``) and the
  upstream sockets are all held by hanging requests, ``wrk`` runs with ``--connections`` connections
  and ``Accept-Encoding: gzip`` against three servers of the same series, one at a time:
    exporter           the exporter's /metrics (aiohttp, pre-rendered page, pre-compressed gzip);
    prometheus_client  reference 1, the straightforward alternative: the same series as plain
                       prometheus_client Gauges served by ``prometheus_client.start_http_server``
                       (benchmarks/reference_server.py), which renders and gzips on every scrape;
    nginx              reference 2, the limit: Debian's nginx (one worker) serving the exporter's
                       exact bytes from a file, with ``gzip_static`` (pre-compressed, as the exporter).
  The exporter's resident memory (VmRSS) is read once the page is complete and again after wrk.
  With ``--steady`` the exporter is measured once more with every operation answered (values on the
  page, as between refreshes in production); at the largest size that exporter's CPU is also read
  over ``--idle`` seconds in which nothing changes (refresh_interval 1h, a scrape every 15 s).
  At ``--active-size`` (1,000) the exporter is measured while its refresher is busy (values arriving
  every second: refresh_interval ``--active-interval``, 250 ms upstream latency, a tenth of the tokens
  hanging) and nginx right after on the page it served (``exporter-refreshing`` / ``nginx-refreshing``).

Part 2, refresh capacity and pacing (skipped with ``--skip-refresh``), at ``--refresh-ops`` (the
  largest size) against a simulator answering after ``--refresh-latency`` (250ms), with the exporter's
  DEFAULT settings (only base_url, refresh_interval = the window, and daily_request_limit when the
  window needs more than the default budget). ``--refresh-runs``:
    healthy  every upstream answers;
    hang     ``--hang-fraction`` (0.1) of the tokens hang for ever (freed by the 60 s read timeout);
    pace     a quarter of the operations with 4 reports each, a tenth hanging, refresh_interval
             ``--pace-window`` (60s) for ``--pace-windows`` (3) windows: each report is fetched at most
             once per window (the simulator's ``--report-interval``), one request at a time per token.
  Healthy and hang poll /metrics every ~2 s until every healthy operation has ``wolkvox_up 1`` (or the
  window is over) and fire bursts of scrapes; every run reads the simulator's ``/-/stats``: requests
  per token and per report, ``max_in_flight`` per token, violations, the smallest gap per report.

Everything listens on 127.0.0.1, every load is bounded in count and time, every child process dies
with this script (PR_SET_PDEATHSIG) and the whole run has a deadline (``--max-minutes``).
Results go to ``--out`` (JSON) and, as Markdown tables, to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gzip
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # tests/harness.py: children, ports and waits, as the tests use

# Needs the paths above (E402). The harness reports a timeout or a dead child as a failed test
# (pytest.fail); main() turns that into the benchmark's own error, like BenchmarkError.
import pytest  # noqa: E402
from harness import (  # noqa: E402
    Process,
    exporter_args,
    free_port,
    simulator_args,
    start_program,
    wait_until,
)

# The exporter's own defaults, so the benchmark sets only what it must.
from exporter.client import default_max_connections  # noqa: E402
from exporter.config import (  # noqa: E402
    DEFAULT_DAILY_REQUEST_LIMIT,
    DEFAULT_READ_TIMEOUT,
    parse_duration,
)
from exporter.planner import DAY, plan_pace  # noqa: E402
from exporter.refresher import MAX_YOUNG, YOUNG_SECONDS  # noqa: E402
from exporter.simulator import stable_unit  # noqa: E402

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
WRK = shutil.which("wrk")
IMPLEMENTATIONS = ("exporter", "prometheus_client", "nginx")
PACE_APIS = ("stereo_rec", "ivr_minutes", "amd_ai", "ivr_calls")  # the one token, four services
EXPORTER_ROOT = REPO  # where `python -m exporter.cli` runs from (--exporter-root)
MB = 1_000_000  # memory is reported in MB of 10^6 bytes (stricter than MiB for the 100 MB goal)
_UP_LINE = re.compile(rb'^wolkvox_up\{operation="([^"]*)"\} (\S+)$', re.M)


class BenchmarkError(Exception):
    """A step could not be carried out (a child did not start, a page never became complete...)."""


# ----------------------------------------------------------------------------------- child processes

# Every child comes from tests/harness.py (spawn, PR_SET_PDEATHSIG, a log per child, stop); here they are
# only remembered, so that stop_all() ends whichever are still running when the script ends.
_CHILDREN: list[Process] = []


def start(
    name: str, argv: list[str], workdir: Path, *, ready: str | None = None, timeout: float = 60.0
) -> Process:
    """``argv`` run from the exporter's checkout, its output in ``workdir/name.log``; returns once it
    logs 'listening on' (or ``ready``, a URL, answers 200)."""
    process = start_program(
        argv, workdir / f"{name}.log", ready=ready, name=name, timeout=timeout, cwd=EXPORTER_ROOT
    )
    _CHILDREN.append(process)
    return process


def stop_all() -> None:
    for process in _CHILDREN:
        with contextlib.suppress(Exception):
            process.stop(timeout=5)
    _CHILDREN.clear()


def rss_bytes(process: Process) -> int:
    with open(f"/proc/{process.proc.pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise BenchmarkError(f"{process.name}: no VmRSS")


def cpu_seconds(process: Process) -> float:
    """User + system CPU time of the process so far (all its threads)."""
    with open(f"/proc/{process.proc.pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------------- the pieces


def start_simulator(workdir: Path, name: str, *extra: str) -> Process:
    return start(name, [sys.executable, *simulator_args("--log.level", "warning", *extra)], workdir)


def token_of(prefix: str, i: int) -> str:
    return f"{prefix}-token-{i:05d}"


def operation_of(i: int) -> str:
    return f"op-{i:05d}"


def write_exporter_config(
    path: Path, sim_url: str, n: int, prefix: str, apis: list[str] | None = None, **top: Any
) -> None:
    """One operation per token; ``top`` keys with the value None are left out (the exporter's default)."""
    operation: dict[str, Any] = {"apis": apis} if apis else {}
    config = {
        **{key: value for key, value in top.items() if value is not None},
        "operations": [
            {"server": operation_of(i), "token": token_of(prefix, i), "base_url": sim_url, **operation}
            for i in range(n)
        ],
    }
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    path.write_text(yaml.dump(config, Dumper=dumper, sort_keys=False), encoding="utf-8")


def daily_limit_for(reports_per_token: int, interval: float) -> int | None:
    """The ``daily_request_limit`` a token with these reports needs to keep ``interval`` unstretched;
    None when the exporter's default budget already does (then the benchmark leaves it out)."""
    intervals = [interval] * reports_per_token
    if plan_pace(intervals, DEFAULT_DAILY_REQUEST_LIMIT).stretch <= 1.0:
        return None
    limit = math.ceil(1.2 * reports_per_token * DAY / interval) + reports_per_token
    assert plan_pace(intervals, limit).stretch <= 1.0
    return limit


def exporter_max_connections() -> int:
    """The exporter's default cap on upstream sockets: it raises its soft fd limit to the hard one."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return default_max_connections(-1 if hard == resource.RLIM_INFINITY else hard)


def start_exporter(workdir: Path, name: str, config_path: Path) -> Process:
    argv = [sys.executable, *exporter_args(config_path, "--log.level", "info")]
    return start(name, argv, workdir, timeout=120.0)


def fetch_page(url: str, gzip_wanted: bool = True) -> tuple[bytes, bytes, dict[str, str]]:
    """GET /metrics as Prometheus does; returns (bytes on the wire, decoded page, headers)."""
    headers = {"Accept-Encoding": "gzip" if gzip_wanted else "identity"}
    with requests.get(f"{url}/metrics", headers=headers, stream=True, timeout=120) as response:
        response.raise_for_status()
        wire = response.raw.read(decode_content=False)
        got = dict(response.headers)
    plain = gzip.decompress(wire) if got.get("Content-Encoding") == "gzip" else wire
    return wire, plain, got


def up_values(page: bytes) -> dict[str, float]:
    return {op.decode(): float(v) for op, v in _UP_LINE.findall(page)}


def sim_stats(sim: Process) -> dict[str, Any]:
    response = requests.get(f"{sim.url}/-/stats", timeout=30)
    response.raise_for_status()
    return response.json()


def rss_mb(child: Process) -> float:
    return round(rss_bytes(child) / MB, 1)


# ----------------------------------------------------------------------------------- wrk


_WRK_PERCENTILE = re.compile(r"^\s*(50|75|90|99)%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)
_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def parse_wrk(output: str) -> dict[str, Any]:
    """The numbers of a ``wrk --latency`` report (latencies in ms)."""
    result: dict[str, Any] = {}
    for pct, number, unit in _WRK_PERCENTILE.findall(output):
        result[f"p{pct}_ms"] = round(float(number) * _UNIT_MS[unit], 3)
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    result["requests_per_second"] = float(rps.group(1)) if rps else 0.0
    done = re.search(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h)", output, re.M)
    result["requests"] = int(done.group(1)) if done else 0
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    result["socket_errors"] = (
        dict(zip(("connect", "read", "write", "timeout"), map(int, errors.groups()), strict=True))
        if errors
        else {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    )
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    result["non_2xx"] = int(non2xx.group(1)) if non2xx else 0
    return result


def run_wrk(url: str, seconds: float, connections: int, threads: int, timeout: float) -> dict[str, Any]:
    argv = [
        WRK or "wrk",
        "-t",
        str(threads),
        "-c",
        str(connections),
        "-d",
        f"{max(1, round(seconds))}s",
        "--timeout",
        f"{max(1, math.ceil(timeout))}s",
        "--latency",
        "-H",
        "Accept-Encoding: gzip",
        f"{url}/metrics",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + timeout + 30, check=False)
    if done.returncode != 0:
        raise BenchmarkError(f"wrk failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    result = parse_wrk(done.stdout)
    result["duration_s"] = max(1, round(seconds))
    result["wrk_output"] = done.stdout
    return result


def machine_busy_seconds() -> float:
    """CPU time spent by the whole machine (all cores, every process) since boot."""
    with open("/proc/stat", encoding="ascii") as stat:
        ticks = [int(v) for v in stat.readline().split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def own_cpu_seconds() -> float:
    """This script and its reaped children (wrk)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime + children_cpu_seconds()


def background_load(seconds: float = 3.0) -> dict[str, Any]:
    """How busy the machine is without us: other processes compete with every measurement."""
    busy = machine_busy_seconds()
    time.sleep(seconds)
    cores = (machine_busy_seconds() - busy) / seconds
    return {"busy_cores": round(cores, 2), "loadavg": Path("/proc/loadavg").read_text().split()[:3]}


def measure(
    server: Process, url: str, seconds: float, args: argparse.Namespace, timeout: float
) -> dict[str, Any]:
    cpu_before, busy_before, wrk_before = cpu_seconds(server), machine_busy_seconds(), children_cpu_seconds()
    result = run_wrk(url, seconds, args.connections, args.threads, timeout)
    cpu = cpu_seconds(server) - cpu_before
    wrk_cpu = children_cpu_seconds() - wrk_before
    result["server_cpu_seconds"] = round(cpu, 2)
    result["wrk_cpu_seconds"] = round(wrk_cpu, 2)
    # CPU used meanwhile by everything else on the machine (other processes: noise in the numbers).
    other = machine_busy_seconds() - busy_before - cpu - wrk_cpu
    result["other_cpu_cores"] = round(max(0.0, other) / result["duration_s"], 2)
    if result["requests"]:
        result["server_cpu_ms_per_request"] = round(1000 * cpu / result["requests"], 4)
    return result


# ----------------------------------------------------------------------------------- nginx


NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;  # as in Debian's default nginx.conf
    tcp_nopush on;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    types {{ }}
    default_type "text/plain; version=0.0.4; charset=utf-8";
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        root {prefix}/www;
        location = /metrics {{
            gzip_static on;
            gzip_vary on;
        }}
    }}
}}
"""


def start_nginx(workdir: Path, plain: bytes) -> Process:
    prefix = workdir / "nginx"
    for sub in ("www", "tmp"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    (prefix / "www" / "metrics").write_bytes(plain)
    # The exporter's own settings: level 6, mtime 0.
    (prefix / "www" / "metrics.gz").write_bytes(gzip.compress(plain, compresslevel=6, mtime=0))
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, port=port), encoding="utf-8")
    return start(
        "nginx",
        [NGINX or "nginx", "-e", str(prefix / "error.log"), "-p", str(prefix), "-c", str(conf)],
        workdir,
        ready=f"http://127.0.0.1:{port}/metrics",
        timeout=20.0,
    )


# ----------------------------------------------------------------------------------- part 1: /metrics


def steady_size(
    size: int, args: argparse.Namespace, workdir: Path, log: Callable[[str], None], idle: bool
) -> dict[str, Any]:
    """--steady: the exporter once every operation has a value (upstream answering at once), as in
    production between refreshes; the page is larger than with hanging upstreams (values, timestamps).
    With ``idle``, first its CPU over ``--idle`` seconds in which nothing changes (refresh_interval 1h:
    no request is due), scraped every 15 s as Prometheus would."""
    sim = start_simulator(workdir, f"simulator-steady-{size}", "--daily-limit", "0")
    try:
        config_path = workdir / f"steady-{size}.yml"
        write_exporter_config(config_path, sim.url, size, f"s{size}", refresh_interval="1h", max_age="2h")
        exporter = start_exporter(workdir, f"exporter-steady-{size}", config_path)
        try:

            def all_up() -> bool:
                ups = up_values(fetch_page(exporter.url)[1])
                return len(ups) == size and all(v == 1.0 for v in ups.values())

            wait_until(all_up, timeout=120, what=f"all {size} operations to be up", interval=1.0)
            time.sleep(2)  # the publisher coalesces results: let the last render land
            rss_all_in = rss_mb(exporter)
            quiet = idle_cpu(exporter, sim, args) if idle else None
            if quiet is not None:
                log(
                    f"  size {size}: idle {quiet['seconds']} s: exporter CPU {quiet['cpu_seconds']} s "
                    f"({quiet['percent_of_a_core']} % of a core), {quiet['upstream_requests']} upstream "
                    f"requests, {quiet['scrapes']} scrapes, load {quiet['loadavg']}"
                )
            wire, plain, _ = fetch_page(exporter.url)
            row = measure(exporter, exporter.url, args.duration, args, timeout=max(10.0, args.duration))
            row.update(
                page_bytes_plain=len(plain),
                page_bytes_gzip=len(wire),
                exporter_rss_mb_all_in=rss_all_in,
                exporter_rss_mb=rss_mb(exporter),
                upstream_requests=sim_stats(sim)["total_requests"],
            )
            if quiet is not None:
                row["idle"] = quiet
            log(_row_line(size, "exporter-steady", row))
            return {"implementation": "exporter-steady", **row}
        finally:
            exporter.stop()
    finally:
        sim.stop()


def idle_cpu(exporter: Process, sim: Process, args: argparse.Namespace) -> dict[str, Any]:
    """The exporter's CPU over ``--idle`` seconds with every value in and nothing due: what remains is
    the publisher's periodic render of its own metrics, and the scrapes (one every 15 s)."""
    requests_before = sim_stats(sim)["total_requests"]
    cpu_before, busy_before = cpu_seconds(exporter), machine_busy_seconds()
    started = time.monotonic()
    end = started + args.idle
    scrapes = 0
    while True:
        fetch_page(exporter.url)
        scrapes += 1
        if time.monotonic() + 15 > end:
            break
        time.sleep(15 - (time.monotonic() - started) % 15)
    time.sleep(max(0.0, end - time.monotonic()))
    seconds = time.monotonic() - started
    cpu = cpu_seconds(exporter) - cpu_before
    other = machine_busy_seconds() - busy_before - cpu
    return {
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu, 2),
        "percent_of_a_core": round(100 * cpu / seconds, 2),
        "scrapes": scrapes,
        "upstream_requests": sim_stats(sim)["total_requests"] - requests_before,
        "other_cpu_cores": round(max(0.0, other) / seconds, 2),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
    }


def active_size(
    size: int, args: argparse.Namespace, workdir: Path, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    """The exporter while its refresher is busy, then nginx on the page it served, in the same run.

    Every token is refreshed every ``--active-interval`` (with the daily budget that needs), the
    simulator answers after ``--refresh-latency`` and a tenth of the tokens hang until the 60 s read
    timeout: answers arrive all the time, so the page is rendered and compressed again every second
    while wrk runs. The upstream requests answered during wrk are recorded to show it."""
    prefix = f"a{size}"
    sim = start_simulator(
        workdir,
        f"simulator-active-{size}",
        "--daily-limit",
        "0",
        "--latency",
        f"{args.refresh_latency}s",
        "--hang-fraction",
        str(args.hang_fraction),
    )
    rows: list[dict[str, Any]] = []
    try:
        config_path = workdir / f"active-{size}.yml"
        write_exporter_config(
            config_path,
            sim.url,
            size,
            prefix,
            refresh_interval=f"{args.active_interval:g}s",
            daily_request_limit=daily_limit_for(1, args.active_interval),
        )
        exporter = start_exporter(workdir, f"exporter-active-{size}", config_path)
        try:
            healthy = {operation_of(i) for i in range(size)} - {
                operation_of(i) for i in hanging_tokens(prefix, size, args.hang_fraction)
            }

            def healthy_up() -> bool:
                ups = up_values(fetch_page(exporter.url)[1])
                return all(ups.get(op) == 1.0 for op in healthy)

            wait_until(
                healthy_up, timeout=60, what=f"the {len(healthy)} healthy operations to be up", interval=0.5
            )
            time.sleep(args.active_interval)  # into the steady refresh cycle
            before = sim_stats(sim)["total_requests"]
            row = measure(exporter, exporter.url, args.duration, args, timeout=max(10.0, args.duration))
            during = sim_stats(sim)["total_requests"] - before
            wire, saved, _ = fetch_page(exporter.url)
            row.update(
                page_bytes_plain=len(saved),
                page_bytes_gzip=len(wire),
                upstream_requests_during_wrk=during,
                upstream_requests_per_second=round(during / row["duration_s"], 1),
                refresh_interval_s=args.active_interval,
                exporter_rss_mb=rss_mb(exporter),
                loadavg=Path("/proc/loadavg").read_text().split()[:3],
            )
            rows.append({"implementation": "exporter-refreshing", **row})
            log(_row_line(size, "exporter-refreshing", row) + f", {during} upstream requests meanwhile")
        finally:
            exporter.stop()
    finally:
        sim.stop()
    nginx = start_nginx(workdir, saved)
    try:
        row = measure(nginx, nginx.url, args.duration, args, timeout=max(10.0, args.duration))
        row["page_bytes_gzip"] = len(fetch_page(nginx.url)[0])
        rows.append({"implementation": "nginx-refreshing", **row})
        log(_row_line(size, "nginx-refreshing", row))
    finally:
        nginx.stop()
    return rows


def metrics_size(
    size: int, args: argparse.Namespace, workdir: Path, log: Callable[[str], None]
) -> dict[str, Any]:
    """All three implementations at one size; returns {"rows": [...], "rss": {...}, ...}."""
    out: dict[str, Any] = {"size": size, "rows": []}
    sim = start_simulator(workdir, f"simulator-{size}")
    try:
        requests.post(
            f"{sim.url}/-/faults", json={"mode": "hang", "token": "*"}, timeout=5
        ).raise_for_status()
        config_path = workdir / f"metrics-{size}.yml"
        write_exporter_config(
            config_path,
            sim.url,
            size,
            f"m{size}",
            refresh_interval="5m",
            read_timeout=args.hang_timeout,
        )
        started = time.monotonic()
        exporter = start_exporter(workdir, f"exporter-{size}", config_path)
        try:
            out["exporter_startup_s"] = round(time.monotonic() - started, 2)

            def complete() -> bool:
                return len(up_values(fetch_page(exporter.url)[1])) == size

            wait_until(complete, timeout=60, what=f"/metrics to list all {size} operations", interval=0.2)
            hanging = min(size, exporter_max_connections())

            def all_hanging() -> bool:
                tokens = sim_stats(sim)["tokens"].values()
                return sum(t["in_flight"] for t in tokens) >= hanging

            # The refresher starts MAX_YOUNG requests per YOUNG_SECONDS while earlier ones hang.
            ramp = math.ceil(hanging / MAX_YOUNG) * YOUNG_SECONDS
            wait_until(
                all_hanging, timeout=30 + 2 * ramp, what=f"{hanging} upstream requests to hang", interval=0.1
            )
            out["upstream_in_flight_during_load"] = hanging
            out["exporter_rss_mb_page_complete"] = rss_mb(exporter)
            wire, plain, headers = fetch_page(exporter.url)
            if headers.get("Content-Encoding") != "gzip":
                raise BenchmarkError("the exporter did not gzip /metrics for Accept-Encoding: gzip")
            out["page_bytes_plain"], out["page_bytes_gzip"] = len(plain), len(wire)
            out["series"] = sum(1 for line in plain.splitlines() if line and not line.startswith(b"#"))
            log(
                f"  size {size}: page {len(plain):,} B plain, {len(wire):,} B gzip, "
                f"{out['series']:,} series, exporter RSS {out['exporter_rss_mb_page_complete']} MB"
            )
            row = measure(exporter, exporter.url, args.duration, args, timeout=max(10.0, args.duration))
            out["rows"].append({"implementation": "exporter", **row})
            log(_row_line(size, "exporter", row))
            out["exporter_rss_mb_after_load"] = rss_mb(exporter)
            _, saved, _ = fetch_page(exporter.url, gzip_wanted=False)
            out["upstream_requests_during_part"] = sim_stats(sim)["total_requests"]
        finally:
            exporter.stop()
    finally:
        sim.stop()
    page_path = workdir / f"page-{size}.txt"
    page_path.write_bytes(saved)

    # Reference 1: plain prometheus_client Gauges behind start_http_server.
    reference = start(
        f"reference-{size}",
        [
            sys.executable,
            str(REPO / "benchmarks" / "reference_server.py"),
            "--page",
            str(page_path),
            "--port",
            "0",
            "--max-seconds",
            "600",
        ],
        workdir,
        timeout=120.0,
    )
    try:
        started = time.monotonic()
        wire, plain, headers = fetch_page(reference.url)
        single = time.monotonic() - started
        if headers.get("Content-Encoding") != "gzip":
            raise BenchmarkError("prometheus_client did not gzip /metrics")
        if len(up_values(plain)) != size:
            raise BenchmarkError("the reference page does not list every operation")
        # With N connections a request waits for about N renders: give wrk time to see a few of them.
        seconds = min(max(args.duration, 2.5 * args.connections * single), args.reference_max_seconds)
        row = measure(reference, reference.url, seconds, args, timeout=seconds)
        row["single_request_ms"] = round(single * 1000, 1)
        row["page_bytes_gzip"] = len(wire)
        out["rows"].append({"implementation": "prometheus_client", **row})
        log(_row_line(size, "prometheus_client", row))
    finally:
        reference.stop()

    # Reference 2: nginx serving the exporter's bytes from a file.
    nginx = start_nginx(workdir, saved)
    try:
        wire, plain, headers = fetch_page(nginx.url)
        if headers.get("Content-Encoding") != "gzip" or plain != saved:
            raise BenchmarkError("nginx did not serve the saved page gzipped")
        row = measure(nginx, nginx.url, args.duration, args, timeout=max(10.0, args.duration))
        row["page_bytes_gzip"] = len(wire)
        out["rows"].append({"implementation": "nginx", **row})
        log(_row_line(size, "nginx", row))
    finally:
        nginx.stop()
    return out


def _row_line(size: int, name: str, row: dict[str, Any]) -> str:
    return (
        f"  size {size:>6} {name:<18} {row['requests_per_second']:>10.1f} req/s  "
        f"p50 {row.get('p50_ms', float('nan')):>9.3f} ms  p99 {row.get('p99_ms', float('nan')):>9.3f} ms  "
        f"({row['requests']} requests, {row['duration_s']} s, errors {row['socket_errors']}, "
        f"non-2xx {row['non_2xx']})"
    )


# ----------------------------------------------------------------------------------- part 2: refresh


def hanging_tokens(prefix: str, n: int, fraction: float) -> set[int]:
    """Indexes of the operations whose token the simulator hangs (its own rule: --hang-fraction)."""
    if fraction <= 0:
        return set()
    return {i for i in range(n) if stable_unit("hang", token_of(prefix, i)) < fraction}


def refresh_run(
    label: str,
    n: int,
    hang_fraction: float,
    window: float,
    apis: list[str] | None,
    observe: float | None,
    args: argparse.Namespace,
    workdir: Path,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """One refresh run with the exporter's default settings. ``observe`` None: until every healthy
    operation is up or the window is over, with scrape bursts; else for ``observe`` seconds (pacing)."""
    prefix = f"r{n}h{hang_fraction:g}"  # the same hanging tokens in every run with this fraction
    hang = hanging_tokens(prefix, n, hang_fraction)
    healthy = {operation_of(i) for i in range(n) if i not in hang}
    healthy_tokens = {token_of(prefix, i) for i in range(n) if i not in hang}
    reports_per_token = len(apis) if apis else 1
    sim_args = [
        "--latency",
        f"{args.refresh_latency}s",
        "--daily-limit",
        "0",
        "--report-interval",
        f"{window}s",
    ]
    if hang_fraction > 0:
        sim_args += ["--hang-fraction", str(hang_fraction)]
    sim = start_simulator(workdir, f"simulator-refresh-{label}", *sim_args)
    config_path = workdir / f"refresh-{label}.yml"
    daily_limit = daily_limit_for(reports_per_token, window)
    # Nothing else: fetch timeouts, max_age, connection caps are the exporter's defaults.
    write_exporter_config(
        config_path,
        sim.url,
        n,
        prefix,
        apis=apis,
        refresh_interval=f"{window:g}s",
        daily_request_limit=daily_limit,
    )
    end = observe if observe is not None else window
    result: dict[str, Any] = {
        "label": label,
        "operations": n,
        "reports_per_operation": reports_per_token,
        "hanging": len(hang),
        "healthy": len(healthy),
        "latency_s": args.refresh_latency,
        "read_timeout_s": DEFAULT_READ_TIMEOUT,
        "window_s": window,
        "observed_s": end,
        "daily_request_limit": daily_limit
        if daily_limit is not None
        else f"default ({DEFAULT_DAILY_REQUEST_LIMIT})",
        "loadavg_before": Path("/proc/loadavg").read_text().split()[:3],
    }
    log(
        f"refresh [{label}]: {n} operations x {reports_per_token} reports ({len(hang)} hanging), "
        f"latency {args.refresh_latency}s, window {window:g}s, observed {end:g}s, "
        f"daily_request_limit {result['daily_request_limit']}"
    )
    started = time.monotonic()
    busy_before, own_before = machine_busy_seconds(), own_cpu_seconds()
    exporter = start_exporter(workdir, f"exporter-refresh-{label}", config_path)
    t0 = time.monotonic()  # the refresher starts right after the 'listening' line
    result["exporter_startup_s"] = round(t0 - started, 2)
    timeline: list[tuple[float, int]] = []
    done_at: float | None = None
    try:
        while True:
            elapsed = time.monotonic() - t0
            _, page, _ = fetch_page(exporter.url)
            ups = up_values(page)
            refreshed = sum(1 for op in healthy if ups.get(op) == 1.0)
            timeline.append((round(elapsed, 1), refreshed))
            if refreshed == len(healthy) and done_at is None:
                done_at = elapsed
                time.sleep(2)  # the publisher coalesces results: let the last render land
                result["exporter_rss_mb_all_in"] = rss_mb(exporter)
            if (
                observe is None
                and "burst_during_window" not in result
                and (refreshed >= len(healthy) // 3 or elapsed > window / 3)
                and elapsed + args.burst + 5 < window
            ):
                result["burst_during_window"] = scrape_burst(exporter, sim, healthy_tokens, args, refreshed)
            if (observe is None and done_at is not None) or elapsed >= end:
                break
            time.sleep(max(0.0, min(args.poll, end - elapsed)))
        result["timeline"] = timeline
        result["all_healthy_refreshed_s"] = round(done_at, 1) if done_at is not None else None
        result["refreshed_within_window"] = max((c for t, c in timeline if t <= window), default=0)
        result["met"] = done_at is not None and done_at <= window
        if done_at is None:
            # How far off: the rate over the last third of the window, extrapolated.
            tail = [(t, c) for t, c in timeline if t >= window * 2 / 3] or timeline[-2:]
            (t1, c1), (t2, c2) = tail[0], tail[-1]
            rate = (c2 - c1) / (t2 - t1) if t2 > t1 else 0.0
            missing = len(healthy) - c2
            result["healthy_missing_at_window"] = missing
            result["rate_at_end_per_s"] = round(rate, 2)
            result["projected_all_refreshed_s"] = round(t2 + missing / rate, 0) if rate > 0 else None
        result["exporter_rss_mb"] = rss_mb(exporter)
        remaining = window - (time.monotonic() - t0)
        if observe is None and done_at is not None and remaining > args.burst + 5:
            result["burst_after_refresh"] = scrape_burst(exporter, sim, healthy_tokens, args, len(healthy))
        stats = sim_stats(sim)
        result["upstream"] = upstream_report(
            stats, prefix, n, hang, reports_per_token, time.monotonic() - t0, window
        )
        result["exporter_cpu_seconds"] = round(cpu_seconds(exporter), 1)
        result["simulator_cpu_seconds"] = round(cpu_seconds(sim), 1)
        ours = (
            result["exporter_cpu_seconds"] + result["simulator_cpu_seconds"] + own_cpu_seconds() - own_before
        )
        run_seconds = time.monotonic() - started
        result["other_cpu_cores"] = round(
            max(0.0, machine_busy_seconds() - busy_before - ours) / run_seconds, 2
        )
        result["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
    finally:
        exporter.stop()
        sim.stop()
    up = result["upstream"]
    log(
        f"refresh [{label}]: healthy refreshed "
        + (
            f"in {result['all_healthy_refreshed_s']} s"
            if done_at is not None
            else f"{result['refreshed_within_window']}/{len(healthy)} within the window "
            f"(projected {result.get('projected_all_refreshed_s')} s)"
        )
        + f"; max_in_flight {up['max_in_flight']}, violations {up['total_violations']}, "
        f"healthy report violations {up['healthy_report_violations']}, requests per healthy report "
        f"{up['healthy_requests_per_report']} (allowed {up['healthy_requests_allowed_per_report']}), "
        f"RSS {result.get('exporter_rss_mb_all_in')} / {result['exporter_rss_mb']} MB, "
        f"other processes {result['other_cpu_cores']} cores"
    )
    return result


def scrape_burst(
    exporter: Process, sim: Process, healthy_tokens: set[str], args: argparse.Namespace, refreshed: int
) -> dict[str, Any]:
    """wrk against /metrics for ``--burst`` seconds; upstream requests of the healthy tokens already
    answered, before and after: they must not move (a scrape never reaches upstream, and a success is
    followed by a full refresh_interval). Hanging tokens are left out: their backoff retries may fall
    inside the burst, as they are allowed to."""
    before = sim_stats(sim)
    row = run_wrk(exporter.url, args.burst, args.connections, args.threads, timeout=10)
    after = sim_stats(sim)
    # Tokens that had already been answered before the burst: their request count must stay put.
    answered_before = {
        t
        for t, s in before["tokens"].items()
        if t in healthy_tokens and s["requests"] >= 1 and s["in_flight"] == 0
    }
    moved = sum(after["tokens"][t]["requests"] - before["tokens"][t]["requests"] for t in answered_before)
    return {
        "scrapes": row["requests"],
        "scrapes_per_second": row["requests_per_second"],
        "p99_ms": row.get("p99_ms"),
        "healthy_refreshed_at_start": refreshed,
        "upstream_requests_total_before": before["total_requests"],
        "upstream_requests_total_after": after["total_requests"],
        "tokens_answered_before": len(answered_before),
        "upstream_requests_of_those_tokens_during_burst": moved,
    }


def upstream_report(
    stats: dict[str, Any],
    prefix: str,
    n: int,
    hang: set[int],
    reports_per_token: int,
    elapsed: float,
    window: float,
) -> dict[str, Any]:
    """What the simulator saw, against the rules: one request at a time per token (max_in_flight,
    violations) and each healthy report at most once per window (report_violations, requests)."""
    tokens = stats["tokens"]
    healthy_tokens = [token_of(prefix, i) for i in range(n) if i not in hang]
    hang_tokens = [token_of(prefix, i) for i in sorted(hang)]
    reports = [r for t in healthy_tokens for r in tokens.get(t, {}).get("reports", {}).values()]
    per_report = sorted(r["requests"] for r in reports)
    gaps = [r["min_gap_seconds"] for r in reports if r["min_gap_seconds"] is not None]
    per_hang = [tokens.get(t, {}).get("requests", 0) for t in hang_tokens]
    # A report is due a full window after its success: 1 + elapsed // window requests at most.
    allowed = 1 + int(elapsed // window)
    # A hanging token: each attempt lasts read_timeout; the timeout then pauses the server for at least
    # 0.75 x min(30 s, window) (the planner's backoff) before the token may send anything there again.
    hang_allowed = 1 + int(elapsed // (DEFAULT_READ_TIMEOUT + 0.75 * min(30.0, window)))
    return {
        "total_requests": stats["total_requests"],
        "total_violations": stats["total_violations"],
        "max_in_flight": max((s["max_in_flight"] for s in tokens.values()), default=0),
        "tokens_seen": len(tokens),
        "healthy_reports": len(healthy_tokens) * reports_per_token,
        "healthy_reports_never_asked": len(healthy_tokens) * reports_per_token
        - sum(1 for r in per_report if r >= 1),
        "healthy_requests_per_report": {
            "min": per_report[0] if per_report else 0,
            "median": per_report[len(per_report) // 2] if per_report else 0,
            "max": per_report[-1] if per_report else 0,
        },
        "healthy_requests_allowed_per_report": allowed,
        "healthy_reports_over_allowed": sum(1 for r in per_report if r > allowed),
        "healthy_min_gap_s": round(min(gaps), 2) if gaps else None,
        "healthy_report_violations": sum(
            tokens.get(t, {}).get("report_violations", 0) for t in healthy_tokens
        ),
        # Retries after a timeout come sooner than a window by design (backoff from 30 s).
        "hanging_report_retries_within_window": sum(
            tokens.get(t, {}).get("report_violations", 0) for t in hang_tokens
        ),
        "hanging_requests_max_per_token": max(per_hang, default=0),
        "hanging_requests_allowed_per_token": hang_allowed if hang_tokens else 0,
        "hanging_tokens_over_allowed": sum(1 for r in per_hang if r > hang_allowed),
    }


# ----------------------------------------------------------------------------------- report


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str] = {}
    with contextlib.suppress(Exception):
        versions["wrk"] = (
            subprocess.run(
                [WRK or "wrk", "--version"], capture_output=True, text=True, timeout=10, check=False
            )
            .stdout.splitlines()[0]
            .strip()
        )
    with contextlib.suppress(Exception):
        versions["nginx"] = subprocess.run(
            [NGINX or "nginx", "-v"], capture_output=True, text=True, timeout=10, check=False
        ).stderr.strip()
    from importlib.metadata import version

    for package in ("aiohttp", "prometheus_client", "requests"):
        with contextlib.suppress(Exception):
            versions[package] = version(package)
    mem_total = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_total = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0]) // 1024
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "memory_mib": mem_total,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": versions,
    }


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals against what this run measured (a goal is left out when its part did not run)."""
    found: list[dict[str, Any]] = []

    def add(goal: str, target: str, measured: str, met: bool) -> None:
        found.append({"goal": goal, "target": target, "measured": measured, "met": met})

    rows = {(r["size"], r["implementation"]): r for r in results["metrics"]}
    runs = {r["label"]: r for r in results["refresh"]}
    for label, run in runs.items():
        if run["observed_s"] != run["window_s"]:
            continue  # the pacing run is judged by its requests, below
        measured = (
            f"{run['all_healthy_refreshed_s']} s"
            if run["all_healthy_refreshed_s"] is not None
            else f"{run['refreshed_within_window']:,}/{run['healthy']:,} at {run['window_s']:g} s, "
            f"projected {run.get('projected_all_refreshed_s')} s"
        )
        add(
            f"{run['healthy']:,} healthy of {run['operations']:,} operations ({run['hanging']:,} hanging) "
            f"refreshed inside the window, default settings ({label})",
            f"<= {run['window_s']:g} s",
            measured,
            bool(run["met"]),
        )
    big = [s for s in results["sizes"] if s["size"] >= 10_000]
    rss = [
        (f"{r['label']} run, all in", r["exporter_rss_mb_all_in"])
        for r in runs.values()
        if r["operations"] >= 10_000 and r.get("exporter_rss_mb_all_in")
    ]
    rss += [
        (f"{r['label']} run, end", r["exporter_rss_mb"]) for r in runs.values() if r["operations"] >= 10_000
    ]
    rss += [
        (f"steady {size:,}", rows[(size, "exporter-steady")][key])
        for size in {s["size"] for s in big}
        if (size, "exporter-steady") in rows
        for key in ("exporter_rss_mb_all_in", "exporter_rss_mb")
    ]
    if rss:
        worst = max(rss, key=lambda item: item[1])
        add(
            "resident memory at 10,000 operations once every value is in",
            "< 100 MB (stretch < 80 MB)",
            f"{worst[1]} MB at worst ({worst[0]}; {len(rss)} readings, least {min(v for _, v in rss)} MB)",
            worst[1] < 100,
        )
    for (size, impl), row in rows.items():
        if impl != "exporter-refreshing" or (size, "nginx-refreshing") not in rows:
            continue
        ngx = rows[(size, "nginx-refreshing")]
        add(
            f"/metrics p99 at {size:,} operations, {results['settings']['connections']} clients, "
            "refresher active",
            "< 10 ms",
            f"{row.get('p99_ms')} ms ({row['upstream_requests_per_second']} upstream answers/s meanwhile)",
            row.get("p99_ms", math.inf) < 10,
        )
        ratio = row["requests_per_second"] / ngx["requests_per_second"] if ngx["requests_per_second"] else 0
        add(
            f"/metrics throughput vs nginx on the same bytes at {size:,}, refresher active",
            ">= 0.5x",
            f"{ratio:.2f}x ({row['requests_per_second']:,.0f} vs {ngx['requests_per_second']:,.0f} req/s)",
            ratio >= 0.5,
        )
    for (size, impl), row in rows.items():
        if impl == "exporter-steady" and "idle" in row:
            idle = row["idle"]
            add(
                f"exporter CPU while nothing changes, {size:,} operations all fresh",
                "near zero (< 1 % of a core)",
                f"{idle['percent_of_a_core']} % of a core ({idle['cpu_seconds']} s over {idle['seconds']} s, "
                f"{idle['scrapes']} scrapes, {idle['upstream_requests']} upstream requests)",
                idle["percent_of_a_core"] < 1.0 and idle["upstream_requests"] == 0,
            )
    for label, run in runs.items():
        up = run["upstream"]
        add(
            f"one request at a time per token ({label})",
            "max_in_flight 1, 0 violations",
            f"max_in_flight {up['max_in_flight']}, {up['total_violations']} violations",
            up["max_in_flight"] <= 1 and up["total_violations"] == 0,
        )
        bursts = [b for b in (run.get("burst_during_window"), run.get("burst_after_refresh")) if b]
        moved = sum(b["upstream_requests_of_those_tokens_during_burst"] for b in bursts)
        scrapes = sum(b["scrapes"] for b in bursts)
        per = up["healthy_requests_per_report"]
        add(
            f"each report at most once per window ({label}: {run['observed_s']:g} s observed, "
            f"window {run['window_s']:g} s)",
            "0 report violations on healthy tokens; scrapes add no request",
            f"{up['healthy_report_violations']} violations, smallest gap {up['healthy_min_gap_s']} s; "
            f"requests per healthy report {per['min']}-{per['max']} "
            f"(allowed {up['healthy_requests_allowed_per_report']})"
            + (f"; {scrapes:,} scrapes -> {moved} extra requests" if bursts else ""),
            up["healthy_report_violations"] == 0
            and up["healthy_reports_over_allowed"] == 0
            and up["hanging_tokens_over_allowed"] == 0
            and moved == 0,
        )
    for label, run in runs.items():
        if run["observed_s"] == run["window_s"]:
            continue
        windows = int(run["observed_s"] // run["window_s"])
        per = run["upstream"]["healthy_requests_per_report"]
        add(
            f"each healthy report refreshed every window ({label}: {run['observed_s']:g} s observed, "
            f"window {run['window_s']:g} s, {run['hanging']:,} of {run['operations']:,} tokens hanging)",
            f">= {windows} requests per healthy report",
            f"{per['min']}-{per['max']}, smallest gap {run['upstream']['healthy_min_gap_s']} s",
            per["min"] >= windows,
        )
    if all((1000, impl) in rows for impl in IMPLEMENTATIONS):
        ex, ref, ngx = (rows[(1000, impl)] for impl in IMPLEMENTATIONS)
        add(
            "/metrics p99 at 1,000 operations, every upstream hanging",
            "< 10 ms",
            f"{ex.get('p99_ms')} ms",
            ex.get("p99_ms", math.inf) < 10,
        )
        vs_ref = (
            ex["requests_per_second"] / ref["requests_per_second"] if ref["requests_per_second"] else math.inf
        )
        add("throughput vs prometheus_client at 1,000", ">= 100x", f"{vs_ref:.0f}x", vs_ref >= 100)
    return found


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "| operations | implementation | req/s | p50 | p99 | requests (s) | server CPU ms/req "
        "| other processes (cores) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["metrics"]:
        lines.append(
            f"| {r['size']:,} | {r['implementation']} | {r['requests_per_second']:,.1f} | "
            f"{_ms(r.get('p50_ms'))} | {_ms(r.get('p99_ms'))} | {r['requests']:,} ({r['duration_s']}) | "
            f"{r.get('server_cpu_ms_per_request', '-')} | {r.get('other_cpu_cores', '-')} |"
        )
    lines += [
        "",
        "| operations | page plain / gzip | series | exporter RSS: page complete / after load |",
        "|---:|---:|---:|---:|",
    ]
    for s in results["sizes"]:
        lines.append(
            f"| {s['size']:,} | {s['page_bytes_plain']:,} B / {s['page_bytes_gzip']:,} B | {s['series']:,} | "
            f"{s['exporter_rss_mb_page_complete']} MB / {s['exporter_rss_mb_after_load']} MB |"
        )
    if results["refresh"]:
        lines += [
            "",
            "| refresh run | ops x reports (hanging) | window (observed) | daily_request_limit | "
            "all healthy up at | upstream requests | max_in_flight | violations | healthy report "
            "violations | req per healthy report (allowed) | RSS all in / end |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in results["refresh"]:
            up = r["upstream"]
            per = up["healthy_requests_per_report"]
            at = (
                f"{r['all_healthy_refreshed_s']} s"
                if r["all_healthy_refreshed_s"] is not None
                else f"not done: {r['refreshed_within_window']:,}/{r['healthy']:,} at {r['window_s']:g} s "
                f"(projected {r.get('projected_all_refreshed_s')} s)"
            )
            lines.append(
                f"| {r['label']} | {r['operations']:,} x {r['reports_per_operation']} ({r['hanging']:,}) | "
                f"{r['window_s']:g} s ({r['observed_s']:g} s) | {r['daily_request_limit']} | {at} | "
                f"{up['total_requests']:,} | {up['max_in_flight']} | {up['total_violations']} | "
                f"{up['healthy_report_violations']} | {per['min']}-{per['max']} "
                f"({up['healthy_requests_allowed_per_report']}) | "
                f"{r.get('exporter_rss_mb_all_in', '-')} / {r['exporter_rss_mb']} MB |"
            )
    if results["goals"]:
        lines += ["", "| goal | target | measured | met |", "|---|---|---|---|"]
        lines += [
            f"| {g['goal']} | {g['target']} | {g['measured']} | {'yes' if g['met'] else '**no**'} |"
            for g in results["goals"]
        ]
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1000:,.2f} s" if value >= 1000 else f"{value:.2f} ms"


# ----------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", default="1,100,1000,10000", help="operation counts (default 1,100,1000,10000)"
    )
    parser.add_argument("--duration", default="10s", help="each wrk run (default 10s)")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: sizes 1,10, 1s wrk runs, refresh run of 20 operations at 50ms",
    )
    parser.add_argument("--skip-refresh", action="store_true", help="skip part 2 (refresh capacity)")
    parser.add_argument(
        "--store", type=int, default=0, help="also run benchmarks/store_bench.py at this many operations"
    )
    parser.add_argument(
        "--steady",
        action="store_true",
        help="part 1 also measures the exporter with every operation answered (values on the page)",
    )
    parser.add_argument("--skip-metrics", action="store_true", help="skip part 1 (/metrics under load)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results.json"), help="JSON results file")
    parser.add_argument(
        "--refresh-ops", type=int, default=None, help="operations of part 2 (default: largest size)"
    )
    parser.add_argument("--refresh-latency", default="250ms", help="simulated upstream latency of part 2")
    parser.add_argument("--window", default="5m", help="refresh_interval, the window of part 2 (default 5m)")
    parser.add_argument(
        "--hang-fraction", type=float, default=0.1, help="hanging share of the tokens in part 2 (default 0.1)"
    )
    parser.add_argument(
        "--refresh-runs",
        default="healthy,hang,pace",
        help="runs of part 2 (default all three): healthy (no hanging token); hang (--hang-fraction of the "
        "tokens hang); pace (a quarter of the operations with 4 reports each, --pace-window)",
    )
    parser.add_argument("--pace-window", default="60s", help="refresh_interval of the pace run (default 60s)")
    parser.add_argument("--pace-windows", type=int, default=3, help="windows the pace run lasts (default 3)")
    parser.add_argument(
        "--active-size",
        type=int,
        default=1000,
        help="operations of the refreshing /metrics row (default 1000)",
    )
    parser.add_argument(
        "--active-interval", default="10s", help="refresh_interval of the refreshing row (default 10s)"
    )
    parser.add_argument(
        "--idle", default="60s", help="idle CPU window at the largest --steady size (default 60s; 0 = skip)"
    )
    parser.add_argument("--hang-timeout", default="60s", help="exporter read_timeout of part 1 (default 60s)")
    parser.add_argument("--burst", default="3s", help="scrape bursts of part 2 (default 3s)")
    parser.add_argument("--poll", default="2s", help="/metrics poll interval of part 2 (default 2s)")
    parser.add_argument(
        "--reference-max-seconds",
        default="90s",
        help="cap of the stretched prometheus_client wrk run at large sizes (default 90s)",
    )
    parser.add_argument(
        "--exporter-root",
        default=str(REPO),
        help="run the exporter and simulator of another checkout (to compare a change)",
    )
    parser.add_argument("--max-minutes", type=float, default=40.0, help="hard deadline of the whole run")
    args = parser.parse_args(argv)
    if args.quick:
        defaults = {
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
        for key, value in defaults.items():
            if parser.get_default(key) == getattr(args, key):
                setattr(args, key, value)
    args.sizes = [int(s) for s in str(args.sizes).split(",") if s.strip()]
    args.refresh_runs = {r.strip() for r in args.refresh_runs.split(",") if r.strip()}
    unknown = args.refresh_runs - {"healthy", "hang", "pace"}
    if unknown:
        parser.error(f"--refresh-runs: unknown run(s) {', '.join(sorted(unknown))}")
    for key in (
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
    ):
        setattr(args, key, parse_duration(str(getattr(args, key))))
    args.hang_timeout = f"{args.hang_timeout:g}s"
    if args.refresh_ops is None:
        args.refresh_ops = max(args.sizes)
    return args


def main(argv: list[str] | None = None) -> int:
    global EXPORTER_ROOT
    args = parse_args(argv)
    EXPORTER_ROOT = Path(args.exporter_root).resolve()
    missing = [name for name, path in (("wrk", WRK), ("nginx", NGINX)) if not path]
    if missing:
        print(
            f"benchmarks/run.py: {' and '.join(missing)} not found; on Debian: "
            "apt-get install -y wrk nginx-light",
            file=sys.stderr,
        )
        return 2
    began = time.monotonic()
    deadline = began + args.max_minutes * 60

    def log(message: str) -> None:
        print(f"[{time.monotonic() - began:7.1f}s] {message}", file=sys.stderr, flush=True)

    def check_deadline(step: str) -> None:
        if time.monotonic() > deadline:
            raise BenchmarkError(f"--max-minutes {args.max_minutes:g} reached before {step}")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results: dict[str, Any] = {
        "machine": machine(),
        "settings": {
            "sizes": args.sizes,
            "duration_s": args.duration,
            "connections": args.connections,
            "wrk_threads": args.threads,
            "quick": args.quick,
            "metrics_read_timeout": args.hang_timeout,
            "refresh_ops": args.refresh_ops,
            "refresh_latency_s": args.refresh_latency,
            "window_s": args.window,
            "hang_fraction": args.hang_fraction,
            "pace_window_s": args.pace_window,
            "pace_windows": args.pace_windows,
            "active_size": args.active_size,
            "active_interval_s": args.active_interval,
            "idle_s": args.idle,
            "exporter_root": str(EXPORTER_ROOT),
        },
        "metrics": [],
        "sizes": [],
        "refresh": [],
        "goals": [],
    }
    status = 0
    try:
        with tempfile.TemporaryDirectory(prefix="wolkvox-bench-") as tmp:
            workdir = Path(tmp)
            results["background_before"] = background_load()
            log(f"machine busy before the run (other processes): {results['background_before']}")
            if not args.skip_metrics:
                log(f"part 1: /metrics with {args.connections} connections, sizes {args.sizes}")
                for size in args.sizes:
                    check_deadline(f"size {size}")
                    part = metrics_size(size, args, workdir, log)
                    if args.steady:
                        idle = args.idle > 0 and size == max(args.sizes)
                        part["rows"].append(steady_size(size, args, workdir, log, idle))
                    if size == args.active_size:
                        part["rows"] += active_size(size, args, workdir, log)
                    for row in part.pop("rows"):
                        row.pop("wrk_output", None)
                        results["metrics"].append({"size": size, **row})
                    results["sizes"].append(part)
            if not args.skip_refresh:
                n, fraction, window = args.refresh_ops, args.hang_fraction, args.window
                runs: list[tuple[str, int, float, float, list[str] | None, float | None]] = []
                if "healthy" in args.refresh_runs:
                    runs.append(("healthy", n, 0.0, window, None, None))
                if "hang" in args.refresh_runs and fraction > 0:
                    runs.append((f"hang-{fraction:g}", n, fraction, window, None, None))
                if "pace" in args.refresh_runs:
                    observe = args.pace_windows * args.pace_window
                    runs.append(
                        ("pace", max(1, n // 4), fraction, args.pace_window, list(PACE_APIS), observe)
                    )
                log(f"part 2: refresh capacity and pacing at {n} operations")
                for label, ops, hang_fraction, run_window, apis, observe in runs:
                    check_deadline(f"the {label} refresh run")
                    results["refresh"].append(
                        refresh_run(label, ops, hang_fraction, run_window, apis, observe, args, workdir, log)
                    )
            if args.store:  # the state store at scale: benchmarks/store_bench.py (runnable alone)
                from store_bench import run as store_run

                results["store"] = store_run(args.store, 60.0, log)
            results["goals"] = goals(results)
            results["background_after"] = background_load()
    except (
        BenchmarkError,
        pytest.fail.Exception,
        requests.RequestException,
        subprocess.TimeoutExpired,
        OSError,
    ) as error:
        log(f"FAILED: {error}")
        results["error"] = str(error)
        status = 1
    finally:
        stop_all()
    results["elapsed_s"] = round(time.monotonic() - began, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(markdown(results))
    m = results["machine"]
    print(
        f"\nMachine: {m['cpu_model']}, {m['cores']} cores, Python {m['python']}, {m['date_utc']}; "
        f"run took {results['elapsed_s']} s; JSON in {args.out}"
    )
    return status


if __name__ == "__main__":
    sys.exit(main())
