"""The issue's goals against what a run measured (a goal is left out when its part did not run)."""

from __future__ import annotations

import math

from .results import Goal, MetricsRow, RefreshResult, Results

IMPLEMENTATIONS = ("exporter", "prometheus_client", "nginx")
_Rows = dict[tuple[int, str], MetricsRow]


def goals(results: Results) -> list[Goal]:
    rows = {(r.size, r.implementation): r for r in results.metrics}
    runs = results.refresh
    return [
        *_inside_window(runs),
        *_memory(results, rows),
        *_refresher_active(rows, results.settings.connections),
        *_idle(rows),
        *_api_rules(runs),
        *_every_window(runs),
        *_at_a_thousand(rows),
    ]


def _inside_window(runs: list[RefreshResult]) -> list[Goal]:
    found = []
    for run in runs:
        if run.observed_s != run.window_s:
            continue  # the pacing run is judged by its requests, below
        measured = (
            f"{run.all_healthy_refreshed_s} s"
            if run.all_healthy_refreshed_s is not None
            else f"{run.refreshed_within_window:,}/{run.healthy:,} at {run.window_s:g} s, "
            f"projected {run.shortfall.projected_all_refreshed_s if run.shortfall else None} s"
        )
        found.append(
            Goal(
                f"{run.healthy:,} healthy of {run.operations:,} operations ({run.hanging:,} hanging) "
                f"refreshed inside the window, default settings ({run.label})",
                f"<= {run.window_s:g} s",
                measured,
                bool(run.met),
            )
        )
    return found


def _memory(results: Results, rows: _Rows) -> list[Goal]:
    big = {s.size for s in results.sizes if s.size >= 10_000}
    large = [r for r in results.refresh if r.operations >= 10_000]
    rss: list[tuple[str, float | None]] = [
        (f"{r.label} run, all in", r.exporter_rss_mb_all_in) for r in large if r.exporter_rss_mb_all_in
    ]
    rss += [(f"{r.label} run, end", r.exporter_rss_mb) for r in large]
    for size in big:
        steady = rows.get((size, "exporter-steady"))
        if steady is not None:
            rss += [
                (f"steady {size:,}", steady.exporter_rss_mb_all_in),
                (f"steady {size:,}", steady.exporter_rss_mb),
            ]
    readings = [(where, value) for where, value in rss if value is not None]
    if not readings:
        return []
    worst = max(readings, key=lambda item: item[1])
    least = min(value for _, value in readings)
    return [
        Goal(
            "resident memory at 10,000 operations once every value is in",
            "< 100 MB (stretch < 80 MB)",
            f"{worst[1]} MB at worst ({worst[0]}; {len(readings)} readings, least {least} MB)",
            worst[1] < 100,
        )
    ]


def _refresher_active(rows: _Rows, connections: int) -> list[Goal]:
    found = []
    for (size, impl), row in rows.items():
        if impl != "exporter-refreshing" or (size, "nginx-refreshing") not in rows:
            continue
        ours, ngx = row.load.wrk, rows[(size, "nginx-refreshing")].load.wrk
        p99 = ours.p99_ms if ours.p99_ms is not None else math.inf
        found.append(
            Goal(
                f"/metrics p99 at {size:,} operations, {connections} clients, refresher active",
                "< 10 ms",
                f"{ours.p99_ms} ms ({row.upstream_requests_per_second} upstream answers/s meanwhile)",
                p99 < 10,
            )
        )
        rps, ngx_rps = ours.requests_per_second, ngx.requests_per_second
        ratio = rps / ngx_rps if ngx_rps else 0
        found.append(
            Goal(
                f"/metrics throughput vs nginx on the same bytes at {size:,}, refresher active",
                ">= 0.5x",
                f"{ratio:.2f}x ({rps:,.0f} vs {ngx_rps:,.0f} req/s)",
                ratio >= 0.5,
            )
        )
    return found


def _idle(rows: _Rows) -> list[Goal]:
    return [
        Goal(
            f"exporter CPU while nothing changes, {size:,} operations all fresh",
            "near zero (< 1 % of a core)",
            f"{idle.percent_of_a_core} % of a core ({idle.cpu_seconds} s over {idle.seconds} s, "
            f"{idle.scrapes} scrapes, {idle.upstream_requests} upstream requests)",
            idle.percent_of_a_core < 1.0 and idle.upstream_requests == 0,
        )
        for (size, impl), row in rows.items()
        if impl == "exporter-steady" and (idle := row.idle) is not None
    ]


def _api_rules(runs: list[RefreshResult]) -> list[Goal]:
    """One request at a time per token and each report at most once per window, in every run."""
    found = []
    for run in runs:
        up = run.upstream
        assert up is not None
        found.append(
            Goal(
                f"one request at a time per token ({run.label})",
                "max_in_flight 1, 0 violations",
                f"max_in_flight {up.max_in_flight}, {up.total_violations} violations",
                up.max_in_flight <= 1 and up.total_violations == 0,
            )
        )
        bursts = [b for b in (run.burst_during_window, run.burst_after_refresh) if b]
        moved = sum(b.upstream_requests_of_those_tokens_during_burst for b in bursts)
        scrapes = sum(b.scrapes for b in bursts)
        per = up.healthy_requests_per_report
        found.append(
            Goal(
                f"each report at most once per window ({run.label}: {run.observed_s:g} s observed, "
                f"window {run.window_s:g} s)",
                "0 report violations on healthy tokens; scrapes add no request",
                f"{up.healthy_report_violations} violations, smallest gap {up.healthy_min_gap_s} s; "
                f"requests per healthy report {per.min}-{per.max} "
                f"(allowed {up.healthy_requests_allowed_per_report})"
                + (f"; {scrapes:,} scrapes -> {moved} extra requests" if bursts else ""),
                up.healthy_report_violations == 0
                and up.healthy_reports_over_allowed == 0
                and up.hanging_tokens_over_allowed == 0
                and moved == 0,
            )
        )
    return found


def _every_window(runs: list[RefreshResult]) -> list[Goal]:
    """The pacing run: each healthy report fetched again in every window (not once and forgotten)."""
    found = []
    for run in runs:
        if run.observed_s == run.window_s or run.upstream is None:
            continue
        windows = int(run.observed_s // run.window_s)
        per = run.upstream.healthy_requests_per_report
        found.append(
            Goal(
                f"each healthy report refreshed every window ({run.label}: {run.observed_s:g} s observed, "
                f"window {run.window_s:g} s, {run.hanging:,} of {run.operations:,} tokens hanging)",
                f">= {windows} requests per healthy report",
                f"{per.min}-{per.max}, smallest gap {run.upstream.healthy_min_gap_s} s",
                per.min >= windows,
            )
        )
    return found


def _at_a_thousand(rows: _Rows) -> list[Goal]:
    if not all((1000, impl) in rows for impl in IMPLEMENTATIONS):
        return []
    ex, ref, _ = (rows[(1000, impl)].load.wrk for impl in IMPLEMENTATIONS)
    vs_ref = ex.requests_per_second / ref.requests_per_second if ref.requests_per_second else math.inf
    p99 = ex.p99_ms if ex.p99_ms is not None else math.inf
    return [
        Goal(
            "/metrics p99 at 1,000 operations, every upstream hanging", "< 10 ms", f"{ex.p99_ms} ms", p99 < 10
        ),
        Goal("throughput vs prometheus_client at 1,000", ">= 100x", f"{vs_ref:.0f}x", vs_ref >= 100),
    ]
