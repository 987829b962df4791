"""Part 1, /metrics under load: the exporter and both references at one size (every upstream hanging),
the exporter with every value in (``--steady``, with its idle CPU at the largest size) and the exporter
while its refresher is busy, then nginx on the page it served (``--active-size``)."""

from __future__ import annotations

import math
import time
from pathlib import Path

from harness import Process, wait_until

from exporter.refresher import MAX_YOUNG, YOUNG_SECONDS

from .load import measure
from .options import Bench
from .processes import BenchmarkError, cpu_seconds, loadavg, machine_busy_seconds, rss_mb
from .refresh import hanging_tokens
from .results import Idle, Measured, MetricsRow, SizeResult, to_json
from .servers import (
    daily_limit_for,
    exporter_max_connections,
    fetch_page,
    hang_everything,
    operation_of,
    sim_requests,
    sim_stats,
    start_exporter,
    start_nginx,
    start_reference,
    start_simulator,
    up_values,
    write_exporter_config,
)

SCRAPE_INTERVAL = 15.0  # of the idle window, as Prometheus scrapes


def _load(bench: Bench, server: Process, seconds: float | None = None) -> Measured:
    """wrk against ``server`` with the run's connections and threads (``--duration`` by default)."""
    opts = bench.options
    if seconds is None:
        return measure(server, opts.duration, opts.connections, opts.threads, opts.wrk_timeout)
    return measure(server, seconds, opts.connections, opts.threads, timeout=seconds)


def _row_line(row: MetricsRow) -> str:
    wrk = row.load.wrk
    nan = float("nan")
    return (
        f"  size {row.size:>6} {row.implementation:<18} {wrk.requests_per_second:>10.1f} req/s  "
        f"p50 {wrk.p50_ms if wrk.p50_ms is not None else nan:>9.3f} ms  "
        f"p99 {wrk.p99_ms if wrk.p99_ms is not None else nan:>9.3f} ms  "
        f"({wrk.requests} requests, {wrk.duration_s} s, errors {to_json(wrk.socket_errors)}, "
        f"non-2xx {wrk.non_2xx})"
    )


def metrics_size(bench: Bench, size: int) -> tuple[SizeResult, list[MetricsRow]]:
    """All three implementations at one size: the exporter, then both references on its page."""
    part, exporter_row, saved = _hanging_exporter(bench, size)
    page_path = bench.workdir / f"page-{size}.txt"
    page_path.write_bytes(saved)
    rows = [exporter_row, _reference_row(bench, size, page_path), _nginx_row(bench, size, saved, "nginx")]
    return part, rows


def _hanging_exporter(bench: Bench, size: int) -> tuple[SizeResult, MetricsRow, bytes]:
    """The exporter with every upstream request hanging (read_timeout ``--hang-timeout``), measured once
    its page lists every operation and its upstream sockets are all held; returns its page too."""
    sim = start_simulator(bench.children, f"simulator-{size}")
    try:
        hang_everything(sim)
        config_path = bench.workdir / f"metrics-{size}.yml"
        write_exporter_config(
            config_path,
            sim.url,
            size,
            f"m{size}",
            refresh_interval="5m",
            read_timeout=bench.options.hang_timeout,
        )
        started = time.monotonic()
        exporter = start_exporter(bench.children, f"exporter-{size}", config_path)
        try:
            startup = round(time.monotonic() - started, 2)
            hanging = _wait_all_hanging(exporter, sim, size)
            rss_complete = rss_mb(exporter)
            wire, plain, headers = fetch_page(exporter.url)
            if headers.get("Content-Encoding") != "gzip":
                raise BenchmarkError("the exporter did not gzip /metrics for Accept-Encoding: gzip")
            series = sum(1 for line in plain.splitlines() if line and not line.startswith(b"#"))
            bench.log(
                f"  size {size}: page {len(plain):,} B plain, {len(wire):,} B gzip, "
                f"{series:,} series, exporter RSS {rss_complete} MB"
            )
            row = MetricsRow(size, "exporter", _load(bench, exporter))
            bench.log(_row_line(row))
            rss_after = rss_mb(exporter)
            _, saved, _ = fetch_page(exporter.url, gzip_wanted=False)
            upstream = sim_requests(sim)
        finally:
            exporter.stop()
    finally:
        sim.stop()
    part = SizeResult(
        size, startup, hanging, rss_complete, len(plain), len(wire), series, rss_after, upstream
    )
    return part, row, saved


def _wait_all_hanging(exporter: Process, sim: Process, size: int) -> int:
    """Waits for the page to list every operation and for the exporter's upstream sockets to be all
    held by hanging requests; returns how many hang."""

    def complete() -> bool:
        return len(up_values(fetch_page(exporter.url)[1])) == size

    wait_until(complete, timeout=60, what=f"/metrics to list all {size} operations", interval=0.2)
    hanging = min(size, exporter_max_connections())

    def all_hanging() -> bool:
        tokens = sim_stats(sim)["tokens"].values()
        return sum(int(t["in_flight"]) for t in tokens) >= hanging

    # The refresher starts MAX_YOUNG requests per YOUNG_SECONDS while earlier ones hang.
    ramp = math.ceil(hanging / MAX_YOUNG) * YOUNG_SECONDS
    wait_until(all_hanging, timeout=30 + 2 * ramp, what=f"{hanging} upstream requests to hang", interval=0.1)
    return hanging


def _reference_row(bench: Bench, size: int, page_path: Path) -> MetricsRow:
    """Reference 1: plain prometheus_client Gauges behind start_http_server, on the exporter's page."""
    reference = start_reference(bench.children, f"reference-{size}", page_path)
    try:
        started = time.monotonic()
        wire, plain, headers = fetch_page(reference.url)
        single = time.monotonic() - started
        if headers.get("Content-Encoding") != "gzip":
            raise BenchmarkError("prometheus_client did not gzip /metrics")
        if len(up_values(plain)) != size:
            raise BenchmarkError("the reference page does not list every operation")
        # With N connections a request waits for about N renders: give wrk time to see a few of them.
        opts = bench.options
        seconds = min(max(opts.duration, 2.5 * opts.connections * single), opts.reference_max_seconds)
        row = MetricsRow(
            size,
            "prometheus_client",
            _load(bench, reference, seconds),
            single_request_ms=round(single * 1000, 1),
            page_bytes_gzip=len(wire),
        )
        bench.log(_row_line(row))
    finally:
        reference.stop()
    return row


def _nginx_row(bench: Bench, size: int, saved: bytes, implementation: str) -> MetricsRow:
    """Reference 2: nginx serving the exporter's bytes ``saved`` from a file, with gzip_static."""
    nginx = start_nginx(bench.children, saved)
    try:
        wire, plain, headers = fetch_page(nginx.url)
        if headers.get("Content-Encoding") != "gzip" or plain != saved:
            raise BenchmarkError("nginx did not serve the saved page gzipped")
        row = MetricsRow(size, implementation, _load(bench, nginx), page_bytes_gzip=len(wire))
        bench.log(_row_line(row))
    finally:
        nginx.stop()
    return row


def steady_size(bench: Bench, size: int, idle: bool) -> MetricsRow:
    """--steady: the exporter once every operation has a value (upstream answering at once), as in
    production between refreshes; the page is larger than with hanging upstreams (values, timestamps).
    With ``idle``, first its CPU over ``--idle`` seconds in which nothing changes (refresh_interval 1h:
    no request is due), scraped every 15 s as Prometheus would."""
    sim = start_simulator(bench.children, f"simulator-steady-{size}", "--daily-limit", "0")
    try:
        config_path = bench.workdir / f"steady-{size}.yml"
        write_exporter_config(config_path, sim.url, size, f"s{size}", refresh_interval="1h", max_age="2h")
        exporter = start_exporter(bench.children, f"exporter-steady-{size}", config_path)
        try:

            def all_up() -> bool:
                ups = up_values(fetch_page(exporter.url)[1])
                return len(ups) == size and all(v == 1.0 for v in ups.values())

            wait_until(all_up, timeout=120, what=f"all {size} operations to be up", interval=1.0)
            time.sleep(2)  # the publisher coalesces results: let the last render land
            rss_all_in = rss_mb(exporter)
            quiet = idle_cpu(bench, exporter, sim) if idle else None
            wire, plain, _ = fetch_page(exporter.url)
            load = _load(bench, exporter)
            row = MetricsRow(
                size,
                "exporter-steady",
                load,
                page_bytes_plain=len(plain),
                page_bytes_gzip=len(wire),
                exporter_rss_mb_all_in=rss_all_in,
                exporter_rss_mb=rss_mb(exporter),
                upstream_requests=sim_requests(sim),
                idle=quiet,
            )
            bench.log(_row_line(row))
            return row
        finally:
            exporter.stop()
    finally:
        sim.stop()


def idle_cpu(bench: Bench, exporter: Process, sim: Process) -> Idle:
    """The exporter's CPU over ``--idle`` seconds with every value in and nothing due: what remains is
    the publisher's periodic render of its own metrics, and the scrapes (one every 15 s)."""
    requests_before = sim_requests(sim)
    cpu_before, busy_before = cpu_seconds(exporter), machine_busy_seconds()
    started = time.monotonic()
    end = started + bench.options.idle
    scrapes = 0
    while True:
        fetch_page(exporter.url)
        scrapes += 1
        if time.monotonic() + SCRAPE_INTERVAL > end:
            break
        time.sleep(SCRAPE_INTERVAL - (time.monotonic() - started) % SCRAPE_INTERVAL)
    time.sleep(max(0.0, end - time.monotonic()))
    seconds = time.monotonic() - started
    cpu = cpu_seconds(exporter) - cpu_before
    other = machine_busy_seconds() - busy_before - cpu
    quiet = Idle(
        seconds=round(seconds, 1),
        cpu_seconds=round(cpu, 2),
        percent_of_a_core=round(100 * cpu / seconds, 2),
        scrapes=scrapes,
        upstream_requests=sim_requests(sim) - requests_before,
        other_cpu_cores=round(max(0.0, other) / seconds, 2),
        loadavg=loadavg(),
    )
    bench.log(
        f"  idle {quiet.seconds} s: exporter CPU {quiet.cpu_seconds} s ({quiet.percent_of_a_core} % of "
        f"a core), {quiet.upstream_requests} upstream requests, {quiet.scrapes} scrapes, load {quiet.loadavg}"
    )
    return quiet


def active_size(bench: Bench, size: int) -> list[MetricsRow]:
    """The exporter while its refresher is busy, then nginx on the page it served, in the same run."""
    row, saved = _refreshing_exporter(bench, size)
    return [row, _nginx_row(bench, size, saved, "nginx-refreshing")]


def _refreshing_exporter(bench: Bench, size: int) -> tuple[MetricsRow, bytes]:
    """Every token is refreshed every ``--active-interval`` (with the daily budget that needs), the
    simulator answers after ``--refresh-latency`` and ``--hang-fraction`` of the tokens hang until the
    60 s read timeout: answers arrive all the time, so the page is rendered and compressed again every
    second while wrk runs. The upstream requests answered during wrk are recorded to show it."""
    opts, prefix = bench.options, f"a{size}"
    sim = start_simulator(
        bench.children,
        f"simulator-active-{size}",
        *("--daily-limit", "0", "--latency", f"{opts.refresh_latency}s"),
        *("--hang-fraction", str(opts.hang_fraction)),
    )
    try:
        config_path = bench.workdir / f"active-{size}.yml"
        write_exporter_config(
            config_path,
            sim.url,
            size,
            prefix,
            refresh_interval=f"{opts.active_interval:g}s",
            daily_request_limit=daily_limit_for(1, opts.active_interval),
        )
        exporter = start_exporter(bench.children, f"exporter-active-{size}", config_path)
        try:
            hang = hanging_tokens(prefix, size, opts.hang_fraction)
            healthy = {operation_of(i) for i in range(size) if i not in hang}

            def healthy_up() -> bool:
                ups = up_values(fetch_page(exporter.url)[1])
                return all(ups.get(op) == 1.0 for op in healthy)

            wait_until(
                healthy_up, timeout=60, what=f"the {len(healthy)} healthy operations to be up", interval=0.5
            )
            time.sleep(opts.active_interval)  # into the steady refresh cycle
            before = sim_requests(sim)
            load = _load(bench, exporter)
            during = sim_requests(sim) - before
            wire, saved, _ = fetch_page(exporter.url)
            row = MetricsRow(
                size,
                "exporter-refreshing",
                load,
                page_bytes_plain=len(saved),
                page_bytes_gzip=len(wire),
                upstream_requests_during_wrk=during,
                upstream_requests_per_second=round(during / load.wrk.duration_s, 1),
                refresh_interval_s=opts.active_interval,
                exporter_rss_mb=rss_mb(exporter),
                loadavg=loadavg(),
            )
            bench.log(_row_line(row) + f", {during} upstream requests meanwhile")
        finally:
            exporter.stop()
    finally:
        sim.stop()
    return row, saved
