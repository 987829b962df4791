"""The benchmark's pure parts, in-process: wrk's report parsed, results written in the shape of
benchmarks/results.json (the slow end-to-end run is tests/test_benchmark_smoke.py)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys

from harness import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
load = importlib.import_module("wolkbench.load")
results = importlib.import_module("wolkbench.results")

WRK_REPORT = """\
Running 10s test @ http://127.0.0.1:40000/metrics
  2 threads and 50 connections
  Latency Distribution
     50%  850.00us
     75%    1.20ms
     90%    2.50s
     99%    1.50m
  357199 requests in 10.00s, 1.20GB read
  Socket errors: connect 0, read 3, write 0, timeout 7
  Non-2xx or 3xx responses: 2
Requests/sec:  35711.89
"""


def test_wrk_report_parsed_in_milliseconds() -> None:
    report = load.parse_wrk(WRK_REPORT, 10)
    assert (report.p50_ms, report.p75_ms, report.p90_ms, report.p99_ms) == (0.85, 1.2, 2500.0, 90000.0)
    assert report.requests == 357199
    assert report.requests_per_second == 35711.89
    assert report.socket_errors == results.SocketErrors(connect=0, read=3, write=0, timeout=7)
    assert report.non_2xx == 2


def test_wrk_report_without_numbers() -> None:
    report = load.parse_wrk("unable to connect\n", 1)
    assert report.p99_ms is None and report.requests == 0 and report.requests_per_second == 0.0
    assert "p99_ms" not in results.to_json(report)  # a percentile wrk did not print is left out


def test_row_written_flat_without_missing_readings() -> None:
    wrk = load.parse_wrk(WRK_REPORT, 10)
    row = results.MetricsRow(1, "nginx", results.Measured(wrk, 1.5, 0.5, 0.1), page_bytes_gzip=100)
    written = results.to_json(row)
    assert list(written)[:3] == ["size", "implementation", "p50_ms"]  # the wrk numbers in place
    assert written["socket_errors"] == {"connect": 0, "read": 3, "write": 0, "timeout": 7}
    assert written["page_bytes_gzip"] == 100
    assert "idle" not in written and "server_cpu_ms_per_request" not in written


def required(record: type) -> set[str]:
    """The JSON keys every record of this type has (optional fields left out, flat ones expanded)."""
    keys: set[str] = set()
    for spec in dataclasses.fields(record):
        if spec.metadata.get("omit_none"):
            continue
        if spec.metadata.get("flatten"):
            keys |= required(spec.type if isinstance(spec.type, type) else getattr(results, spec.type))
        else:
            keys.add(spec.name)
    return keys


def test_checked_in_results_have_the_written_shape() -> None:
    stored = json.loads((REPO / "benchmarks" / "results.json").read_text(encoding="utf-8"))
    assert required(results.Results) <= set(stored)
    assert required(results.Settings) == set(stored["settings"])
    for section, record in (("metrics", results.MetricsRow), ("sizes", results.SizeResult)):
        for row in stored[section]:
            assert required(record) <= set(row), (section, required(record) - set(row))
    for run in stored["refresh"]:
        assert required(results.RefreshResult) <= set(run), required(results.RefreshResult) - set(run)
        assert required(results.Upstream) == set(run["upstream"])
