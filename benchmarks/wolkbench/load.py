"""Load on /metrics with wrk: running it, parsing its ``--latency`` report, the CPU used meanwhile."""

from __future__ import annotations

import math
import re
import shutil
import subprocess

from harness import Process

from .processes import BenchmarkError, children_cpu_seconds, cpu_seconds, machine_busy_seconds
from .results import Measured, SocketErrors, WrkReport

WRK = shutil.which("wrk")
_PERCENTILE = re.compile(r"^\s*(50|75|90|99)%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)
_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


def parse_wrk(output: str, duration_s: int) -> WrkReport:
    """The numbers of a ``wrk --latency`` report (latencies in ms) of a ``duration_s`` run."""
    percentiles = {
        f"p{pct}_ms": round(float(number) * _UNIT_MS[unit], 3)
        for pct, number, unit in _PERCENTILE.findall(output)
    }
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    done = re.search(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h)", output, re.M)
    errors = _SOCKET_ERRORS.search(output)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return WrkReport(
        p50_ms=percentiles.get("p50_ms"),
        p75_ms=percentiles.get("p75_ms"),
        p90_ms=percentiles.get("p90_ms"),
        p99_ms=percentiles.get("p99_ms"),
        requests_per_second=float(rps.group(1)) if rps else 0.0,
        requests=int(done.group(1)) if done else 0,
        socket_errors=SocketErrors(*map(int, errors.groups())) if errors else SocketErrors(),
        non_2xx=int(non2xx.group(1)) if non2xx else 0,
        duration_s=duration_s,
    )


def run_wrk(url: str, seconds: float, connections: int, threads: int, timeout: float) -> WrkReport:
    """wrk against ``url``/metrics with ``Accept-Encoding: gzip`` for ``seconds`` (whole, at least 1)."""
    duration = max(1, round(seconds))
    argv = [
        WRK or "wrk",
        "-t",
        str(threads),
        "-c",
        str(connections),
        "-d",
        f"{duration}s",
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
    return parse_wrk(done.stdout, duration)


def measure(server: Process, seconds: float, connections: int, threads: int, timeout: float) -> Measured:
    """wrk against ``server``, with the CPU the server, wrk and every other process used."""
    cpu_before, busy_before, wrk_before = cpu_seconds(server), machine_busy_seconds(), children_cpu_seconds()
    report = run_wrk(server.url, seconds, connections, threads, timeout)
    cpu = cpu_seconds(server) - cpu_before
    wrk_cpu = children_cpu_seconds() - wrk_before
    other = machine_busy_seconds() - busy_before - cpu - wrk_cpu
    return Measured(
        wrk=report,
        server_cpu_seconds=round(cpu, 2),
        wrk_cpu_seconds=round(wrk_cpu, 2),
        other_cpu_cores=round(max(0.0, other) / report.duration_s, 2),
        server_cpu_ms_per_request=round(1000 * cpu / report.requests, 4) if report.requests else None,
    )
