"""Part 2, refresh capacity and pacing: the exporter with its DEFAULT settings (only base_url,
refresh_interval = the window, and daily_request_limit when the window needs more than the default
budget) against a simulator answering after ``--refresh-latency``; what the simulator saw is checked
against the API's rules (one request at a time per token, each report at most once per window)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from harness import Process

from exporter.config import DEFAULT_DAILY_REQUEST_LIMIT, DEFAULT_READ_TIMEOUT
from exporter.simulator import stable_unit

from .load import run_wrk
from .options import Bench, Options
from .processes import cpu_seconds, loadavg, machine_busy_seconds, own_cpu_seconds, rss_mb
from .results import Burst, PerReport, RefreshResult, Shortfall, Upstream, to_json
from .servers import (
    daily_limit_for,
    fetch_page,
    operation_of,
    sim_stats,
    start_exporter,
    start_simulator,
    token_of,
    up_values,
    write_exporter_config,
)

PACE_APIS = ("stereo_rec", "ivr_minutes", "amd_ai", "ivr_calls")  # the one token, four services


def hanging_tokens(prefix: str, n: int, fraction: float) -> set[int]:
    """Indexes of the operations whose token the simulator hangs (its own rule: --hang-fraction)."""
    if fraction <= 0:
        return set()
    return {i for i in range(n) if stable_unit("hang", token_of(prefix, i)) < fraction}


@dataclass(frozen=True)
class RefreshPlan:
    """One refresh run: ``n`` operations (one token each) with ``apis`` (None: the default one report),
    ``hang_fraction`` of the tokens hanging, refresh_interval ``window``. ``observe`` None: watched until
    every healthy operation is up or the window is over, with scrape bursts; else for ``observe`` s."""

    label: str
    n: int
    hang_fraction: float
    window: float
    apis: list[str] | None = None
    observe: float | None = None

    @property
    def prefix(self) -> str:
        """Of the tokens: the same hanging tokens in every run with this number and fraction."""
        return f"r{self.n}h{self.hang_fraction:g}"

    @cached_property
    def hang(self) -> frozenset[int]:
        return frozenset(hanging_tokens(self.prefix, self.n, self.hang_fraction))

    @cached_property
    def healthy(self) -> frozenset[str]:
        return frozenset(operation_of(i) for i in range(self.n) if i not in self.hang)

    @cached_property
    def healthy_tokens(self) -> frozenset[str]:
        return frozenset(token_of(self.prefix, i) for i in range(self.n) if i not in self.hang)

    @property
    def reports_per_token(self) -> int:
        return len(self.apis) if self.apis else 1

    @property
    def end(self) -> float:
        return self.observe if self.observe is not None else self.window


def plan_runs(opts: Options) -> list[RefreshPlan]:
    """The runs ``--refresh-runs`` asks for: healthy, hang (when ``--hang-fraction`` > 0), pace."""
    n, fraction, window = opts.refresh_ops, opts.hang_fraction, opts.window
    plans: list[RefreshPlan] = []
    if "healthy" in opts.refresh_runs:
        plans.append(RefreshPlan("healthy", n, 0.0, window))
    if "hang" in opts.refresh_runs and fraction > 0:
        plans.append(RefreshPlan(f"hang-{fraction:g}", n, fraction, window))
    if "pace" in opts.refresh_runs:
        observe = opts.pace_windows * opts.pace_window
        plans.append(
            RefreshPlan("pace", max(1, n // 4), fraction, opts.pace_window, list(PACE_APIS), observe)
        )
    return plans


@dataclass
class _Watch:
    """What watching /metrics during a run saw."""

    timeline: list[tuple[float, int]] = field(default_factory=list)  # (seconds, healthy operations up)
    done_at: float | None = None
    rss_all_in: float | None = None
    burst: Burst | None = None


def refresh_run(bench: Bench, plan: RefreshPlan) -> RefreshResult:
    """One refresh run with the exporter's default settings (see ``RefreshPlan``)."""
    sim, config_path, limit = _prepare(bench, plan)
    loadavg_before = loadavg()
    started = time.monotonic()
    busy_before, own_before = machine_busy_seconds(), own_cpu_seconds()
    exporter = start_exporter(bench.children, f"exporter-refresh-{plan.label}", config_path)
    t0 = time.monotonic()  # the refresher starts right after the 'listening' line
    try:
        watch = _watch(bench, plan, exporter, sim, t0)
        rss_end = rss_mb(exporter)
        after = None
        remaining = plan.window - (time.monotonic() - t0)
        if plan.observe is None and watch.done_at is not None and remaining > bench.options.burst + 5:
            after = scrape_burst(bench, exporter, sim, plan.healthy_tokens, len(plan.healthy))
        upstream = upstream_report(sim_stats(sim), plan, time.monotonic() - t0)
        exporter_cpu, sim_cpu = round(cpu_seconds(exporter), 1), round(cpu_seconds(sim), 1)
        ours = exporter_cpu + sim_cpu + own_cpu_seconds() - own_before
        other = max(0.0, machine_busy_seconds() - busy_before - ours) / (time.monotonic() - started)
        loadavg_after = loadavg()
    finally:
        exporter.stop()
        sim.stop()
    result = RefreshResult(
        label=plan.label,
        operations=plan.n,
        reports_per_operation=plan.reports_per_token,
        hanging=len(plan.hang),
        healthy=len(plan.healthy),
        latency_s=bench.options.refresh_latency,
        read_timeout_s=DEFAULT_READ_TIMEOUT,
        window_s=plan.window,
        observed_s=plan.end,
        daily_request_limit=limit,
        loadavg_before=loadavg_before,
        exporter_startup_s=round(t0 - started, 2),
        exporter_rss_mb_all_in=watch.rss_all_in,
        burst_during_window=watch.burst,
        timeline=watch.timeline,
        all_healthy_refreshed_s=round(watch.done_at, 1) if watch.done_at is not None else None,
        refreshed_within_window=max((c for t, c in watch.timeline if t <= plan.window), default=0),
        met=watch.done_at is not None and watch.done_at <= plan.window,
        shortfall=_shortfall(watch, plan) if watch.done_at is None else None,
        exporter_rss_mb=rss_end,
        burst_after_refresh=after,
        upstream=upstream,
        exporter_cpu_seconds=exporter_cpu,
        simulator_cpu_seconds=sim_cpu,
        other_cpu_cores=round(other, 2),
        loadavg_after=loadavg_after,
    )
    bench.log(_summary(result))
    return result


def _prepare(bench: Bench, plan: RefreshPlan) -> tuple[Process, Path, int | str]:
    """Starts the run's simulator and writes the exporter's config; returns both and the
    daily_request_limit as reported (a number, or "default (N)" when the config leaves it out)."""
    opts = bench.options
    sim_flags = ["--latency", f"{opts.refresh_latency}s", "--daily-limit", "0"]
    sim_flags += ["--report-interval", f"{plan.window}s"]
    if plan.hang_fraction > 0:
        sim_flags += ["--hang-fraction", str(plan.hang_fraction)]
    sim = start_simulator(bench.children, f"simulator-refresh-{plan.label}", *sim_flags)
    config_path = bench.workdir / f"refresh-{plan.label}.yml"
    daily_limit = daily_limit_for(plan.reports_per_token, plan.window)
    # Nothing else: fetch timeouts, max_age, connection caps are the exporter's defaults.
    write_exporter_config(
        config_path,
        sim.url,
        plan.n,
        plan.prefix,
        apis=plan.apis,
        refresh_interval=f"{plan.window:g}s",
        daily_request_limit=daily_limit,
    )
    limit = daily_limit if daily_limit is not None else f"default ({DEFAULT_DAILY_REQUEST_LIMIT})"
    bench.log(
        f"refresh [{plan.label}]: {plan.n} operations x {plan.reports_per_token} reports "
        f"({len(plan.hang)} hanging), latency {opts.refresh_latency}s, window {plan.window:g}s, "
        f"observed {plan.end:g}s, daily_request_limit {limit}"
    )
    return sim, config_path, limit


def _watch(bench: Bench, plan: RefreshPlan, exporter: Process, sim: Process, t0: float) -> _Watch:
    """Polls /metrics every ``--poll`` until every healthy operation is up (or the run's end), with a
    scrape burst once a third is up (or a third of the window is over) when there is time for one."""
    opts, healthy, seen = bench.options, plan.healthy, _Watch()
    while True:
        elapsed = time.monotonic() - t0
        ups = up_values(fetch_page(exporter.url)[1])
        refreshed = sum(1 for op in healthy if ups.get(op) == 1.0)
        seen.timeline.append((round(elapsed, 1), refreshed))
        if refreshed == len(healthy) and seen.done_at is None:
            seen.done_at = elapsed
            time.sleep(2)  # the publisher coalesces results: let the last render land
            seen.rss_all_in = rss_mb(exporter)
        if (
            plan.observe is None
            and seen.burst is None
            and (refreshed >= len(healthy) // 3 or elapsed > plan.window / 3)
            and elapsed + opts.burst + 5 < plan.window
        ):
            seen.burst = scrape_burst(bench, exporter, sim, plan.healthy_tokens, refreshed)
        if (plan.observe is None and seen.done_at is not None) or elapsed >= plan.end:
            return seen
        time.sleep(max(0.0, min(opts.poll, plan.end - elapsed)))


def _shortfall(watch: _Watch, plan: RefreshPlan) -> Shortfall:
    """How far off a run that did not finish was: the rate over the last third of the window, extrapolated."""
    tail = [(t, c) for t, c in watch.timeline if t >= plan.window * 2 / 3] or watch.timeline[-2:]
    (t1, c1), (t2, c2) = tail[0], tail[-1]
    rate = (c2 - c1) / (t2 - t1) if t2 > t1 else 0.0
    missing = len(plan.healthy) - c2
    return Shortfall(
        healthy_missing_at_window=missing,
        rate_at_end_per_s=round(rate, 2),
        projected_all_refreshed_s=round(t2 + missing / rate, 0) if rate > 0 else None,
    )


def _summary(run: RefreshResult) -> str:
    up = run.upstream
    assert up is not None
    done = (
        f"in {run.all_healthy_refreshed_s} s"
        if run.all_healthy_refreshed_s is not None
        else f"{run.refreshed_within_window}/{run.healthy} within the window "
        f"(projected {run.shortfall.projected_all_refreshed_s if run.shortfall else None} s)"
    )
    return (
        f"refresh [{run.label}]: healthy refreshed {done}; max_in_flight {up.max_in_flight}, "
        f"violations {up.total_violations}, healthy report violations {up.healthy_report_violations}, "
        f"requests per healthy report {to_json(up.healthy_requests_per_report)} "
        f"(allowed {up.healthy_requests_allowed_per_report}), "
        f"RSS {run.exporter_rss_mb_all_in} / {run.exporter_rss_mb} MB, "
        f"other processes {run.other_cpu_cores} cores"
    )


def scrape_burst(
    bench: Bench, exporter: Process, sim: Process, healthy_tokens: frozenset[str], refreshed: int
) -> Burst:
    """wrk against /metrics for ``--burst`` seconds; upstream requests of the healthy tokens already
    answered, before and after: they must not move (a scrape never reaches upstream, and a success is
    followed by a full refresh_interval). Hanging tokens are left out: their backoff retries may fall
    inside the burst, as they are allowed to."""
    opts = bench.options
    before = sim_stats(sim)
    report = run_wrk(exporter.url, opts.burst, opts.connections, opts.threads, timeout=10)
    after = sim_stats(sim)
    answered_before = {
        t
        for t, s in before["tokens"].items()
        if t in healthy_tokens and s["requests"] >= 1 and s["in_flight"] == 0
    }
    moved = sum(after["tokens"][t]["requests"] - before["tokens"][t]["requests"] for t in answered_before)
    return Burst(
        scrapes=report.requests,
        scrapes_per_second=report.requests_per_second,
        p99_ms=report.p99_ms,
        healthy_refreshed_at_start=refreshed,
        upstream_requests_total_before=before["total_requests"],
        upstream_requests_total_after=after["total_requests"],
        tokens_answered_before=len(answered_before),
        upstream_requests_of_those_tokens_during_burst=moved,
    )


def upstream_report(stats: dict[str, Any], plan: RefreshPlan, elapsed: float) -> Upstream:
    """What the simulator saw, against the rules: one request at a time per token (max_in_flight,
    violations) and each healthy report at most once per window (report_violations, requests)."""
    tokens = stats["tokens"]
    healthy_tokens = [token_of(plan.prefix, i) for i in range(plan.n) if i not in plan.hang]
    hang_tokens = [token_of(plan.prefix, i) for i in sorted(plan.hang)]
    reports = [r for t in healthy_tokens for r in tokens.get(t, {}).get("reports", {}).values()]
    per_report = sorted(r["requests"] for r in reports)
    gaps = [r["min_gap_seconds"] for r in reports if r["min_gap_seconds"] is not None]
    per_hang = [tokens.get(t, {}).get("requests", 0) for t in hang_tokens]
    # A report is due a full window after its success: 1 + elapsed // window requests at most.
    allowed = 1 + int(elapsed // plan.window)
    # A hanging token: each attempt lasts read_timeout; the timeout then pauses the server for at least
    # 0.75 x min(30 s, window) (the planner's backoff) before the token may send anything there again.
    hang_allowed = 1 + int(elapsed // (DEFAULT_READ_TIMEOUT + 0.75 * min(30.0, plan.window)))
    expected = len(healthy_tokens) * plan.reports_per_token
    return Upstream(
        total_requests=stats["total_requests"],
        total_violations=stats["total_violations"],
        max_in_flight=max((s["max_in_flight"] for s in tokens.values()), default=0),
        tokens_seen=len(tokens),
        healthy_reports=expected,
        healthy_reports_never_asked=expected - sum(1 for r in per_report if r >= 1),
        healthy_requests_per_report=PerReport(
            min=per_report[0] if per_report else 0,
            median=per_report[len(per_report) // 2] if per_report else 0,
            max=per_report[-1] if per_report else 0,
        ),
        healthy_requests_allowed_per_report=allowed,
        healthy_reports_over_allowed=sum(1 for r in per_report if r > allowed),
        healthy_min_gap_s=round(min(gaps), 2) if gaps else None,
        healthy_report_violations=sum(tokens.get(t, {}).get("report_violations", 0) for t in healthy_tokens),
        hanging_report_retries_within_window=sum(
            tokens.get(t, {}).get("report_violations", 0) for t in hang_tokens
        ),
        hanging_requests_max_per_token=max(per_hang, default=0),
        hanging_requests_allowed_per_token=hang_allowed if hang_tokens else 0,
        hanging_tokens_over_allowed=sum(1 for r in per_hang if r > hang_allowed),
    )
