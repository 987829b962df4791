"""The Markdown tables of a run (printed at the end; benchmarks/README.md quotes them)."""

from __future__ import annotations

from .results import Goal, MetricsRow, RefreshResult, Results, SizeResult


def markdown(results: Results) -> str:
    lines = [*_metrics_table(results.metrics), "", *_sizes_table(results.sizes)]
    if results.refresh:
        lines += ["", *_refresh_table(results.refresh)]
    if results.goals:
        lines += ["", *_goals_table(results.goals)]
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1000:,.2f} s" if value >= 1000 else f"{value:.2f} ms"


def _or_dash(value: object) -> object:
    return "-" if value is None else value


def _metrics_table(rows: list[MetricsRow]) -> list[str]:
    lines = [
        "| operations | implementation | req/s | p50 | p99 | requests (s) | server CPU ms/req "
        "| other processes (cores) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        wrk = r.load.wrk
        lines.append(
            f"| {r.size:,} | {r.implementation} | {wrk.requests_per_second:,.1f} | "
            f"{_ms(wrk.p50_ms)} | {_ms(wrk.p99_ms)} | {wrk.requests:,} ({wrk.duration_s}) | "
            f"{_or_dash(r.load.server_cpu_ms_per_request)} | {r.load.other_cpu_cores} |"
        )
    return lines


def _sizes_table(sizes: list[SizeResult]) -> list[str]:
    lines = [
        "| operations | page plain / gzip | series | exporter RSS: page complete / after load |",
        "|---:|---:|---:|---:|",
    ]
    for s in sizes:
        lines.append(
            f"| {s.size:,} | {s.page_bytes_plain:,} B / {s.page_bytes_gzip:,} B | {s.series:,} | "
            f"{s.exporter_rss_mb_page_complete} MB / {s.exporter_rss_mb_after_load} MB |"
        )
    return lines


def _refresh_table(runs: list[RefreshResult]) -> list[str]:
    lines = [
        "| refresh run | ops x reports (hanging) | window (observed) | daily_request_limit | "
        "all healthy up at | upstream requests | max_in_flight | violations | healthy report "
        "violations | req per healthy report (allowed) | RSS all in / end |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        up = r.upstream
        assert up is not None
        per = up.healthy_requests_per_report
        at = (
            f"{r.all_healthy_refreshed_s} s"
            if r.all_healthy_refreshed_s is not None
            else f"not done: {r.refreshed_within_window:,}/{r.healthy:,} at {r.window_s:g} s "
            f"(projected {r.shortfall.projected_all_refreshed_s if r.shortfall else None} s)"
        )
        lines.append(
            f"| {r.label} | {r.operations:,} x {r.reports_per_operation} ({r.hanging:,}) | "
            f"{r.window_s:g} s ({r.observed_s:g} s) | {r.daily_request_limit} | {at} | "
            f"{up.total_requests:,} | {up.max_in_flight} | {up.total_violations} | "
            f"{up.healthy_report_violations} | {per.min}-{per.max} "
            f"({up.healthy_requests_allowed_per_report}) | "
            f"{_or_dash(r.exporter_rss_mb_all_in)} / {r.exporter_rss_mb} MB |"
        )
    return lines


def _goals_table(goals: list[Goal]) -> list[str]:
    lines = ["| goal | target | measured | met |", "|---|---|---|---|"]
    lines += [f"| {g.goal} | {g.target} | {g.measured} | {'yes' if g.met else '**no**'} |" for g in goals]
    return lines
