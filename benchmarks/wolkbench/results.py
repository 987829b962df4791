"""The benchmark's results as typed records, and their JSON form (the shape of benchmarks/results.json).

Every record is a dataclass; ``to_json`` turns one into plain JSON values, field by field in the order
declared. Two field metadata keep the file's shape: ``OPTIONAL`` fields are left out while None (a part
that did not run, a reading that was not taken), ``FLAT`` fields have their own fields written in place
(a metrics row is its wrk numbers plus what the implementation adds).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

OPTIONAL = {"omit_none": True}  # metadata: left out of the JSON while None
FLAT = {"flatten": True}  # metadata: the record's own fields written in place of the field
FLAT_OPTIONAL = {**FLAT, **OPTIONAL}


def to_json(value: Any) -> Any:
    """Plain JSON values (dicts, lists, numbers, strings) of a record, a list of them or a plain value."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for spec in dataclasses.fields(value):
            item = getattr(value, spec.name)
            if item is None and spec.metadata.get("omit_none"):
                continue
            if spec.metadata.get("flatten"):
                out.update(to_json(item))
            else:
                out[spec.name] = to_json(item)
        return out
    if isinstance(value, list | tuple):
        return [to_json(item) for item in value]
    if isinstance(value, dict):
        return {key: to_json(item) for key, item in value.items()}
    return value


# ----------------------------------------------------------------------------------- load (wrk)


@dataclass(frozen=True)
class SocketErrors:
    connect: int = 0
    read: int = 0
    write: int = 0
    timeout: int = 0


@dataclass(frozen=True)
class WrkReport:
    """The numbers of one ``wrk --latency`` run (latencies in ms; a percentile wrk did not print is None)."""

    p50_ms: float | None = field(default=None, metadata=OPTIONAL)
    p75_ms: float | None = field(default=None, metadata=OPTIONAL)
    p90_ms: float | None = field(default=None, metadata=OPTIONAL)
    p99_ms: float | None = field(default=None, metadata=OPTIONAL)
    requests_per_second: float = 0.0
    requests: int = 0
    socket_errors: SocketErrors = SocketErrors()
    non_2xx: int = 0
    duration_s: int = 0


@dataclass(frozen=True)
class Measured:
    """A wrk run against one server, with the CPU the server, wrk and everything else used meanwhile."""

    wrk: WrkReport = field(metadata=FLAT)
    server_cpu_seconds: float = 0.0
    wrk_cpu_seconds: float = 0.0
    other_cpu_cores: float = 0.0  # other processes on the machine: noise in the numbers
    server_cpu_ms_per_request: float | None = field(default=None, metadata=OPTIONAL)


# ----------------------------------------------------------------------------------- part 1: /metrics


@dataclass(frozen=True)
class Idle:
    """The exporter's CPU over a window in which nothing changes (every value in, nothing due)."""

    seconds: float
    cpu_seconds: float
    percent_of_a_core: float
    scrapes: int
    upstream_requests: int
    other_cpu_cores: float
    loadavg: list[str]


@dataclass(frozen=True)
class MetricsRow:
    """One implementation at one size under wrk; the fields after ``load`` are what that run adds."""

    size: int
    implementation: str
    load: Measured = field(metadata=FLAT)
    single_request_ms: float | None = field(
        default=None, metadata=OPTIONAL
    )  # prometheus_client: one scrape alone
    page_bytes_plain: int | None = field(default=None, metadata=OPTIONAL)
    page_bytes_gzip: int | None = field(default=None, metadata=OPTIONAL)
    exporter_rss_mb_all_in: float | None = field(default=None, metadata=OPTIONAL)
    exporter_rss_mb: float | None = field(default=None, metadata=OPTIONAL)
    upstream_requests: int | None = field(default=None, metadata=OPTIONAL)
    upstream_requests_during_wrk: int | None = field(default=None, metadata=OPTIONAL)
    upstream_requests_per_second: float | None = field(default=None, metadata=OPTIONAL)
    refresh_interval_s: float | None = field(default=None, metadata=OPTIONAL)
    loadavg: list[str] | None = field(default=None, metadata=OPTIONAL)
    idle: Idle | None = field(default=None, metadata=OPTIONAL)


@dataclass(frozen=True)
class SizeResult:
    """The exporter's page and memory at one size, every upstream hanging."""

    size: int
    exporter_startup_s: float
    upstream_in_flight_during_load: int
    exporter_rss_mb_page_complete: float
    page_bytes_plain: int
    page_bytes_gzip: int
    series: int
    exporter_rss_mb_after_load: float
    upstream_requests_during_part: int


# ----------------------------------------------------------------------------------- part 2: refresh


@dataclass(frozen=True)
class Burst:
    """wrk against /metrics during a refresh run: the healthy tokens already answered must not move."""

    scrapes: int
    scrapes_per_second: float
    p99_ms: float | None
    healthy_refreshed_at_start: int
    upstream_requests_total_before: int
    upstream_requests_total_after: int
    tokens_answered_before: int
    upstream_requests_of_those_tokens_during_burst: int


@dataclass(frozen=True)
class PerReport:
    min: int
    median: int
    max: int


@dataclass(frozen=True)
class Upstream:
    """What the simulator saw in a refresh run, against the API's rules."""

    total_requests: int
    total_violations: int
    max_in_flight: int
    tokens_seen: int
    healthy_reports: int
    healthy_reports_never_asked: int
    healthy_requests_per_report: PerReport
    healthy_requests_allowed_per_report: int
    healthy_reports_over_allowed: int
    healthy_min_gap_s: float | None
    healthy_report_violations: int
    hanging_report_retries_within_window: int  # retries after a timeout come sooner than a window
    hanging_requests_max_per_token: int
    hanging_requests_allowed_per_token: int
    hanging_tokens_over_allowed: int


@dataclass(frozen=True)
class Shortfall:
    """How far a refresh run was from done at the end of its window, extrapolated from its last third."""

    healthy_missing_at_window: int
    rate_at_end_per_s: float
    projected_all_refreshed_s: float | None


@dataclass(frozen=True)
class RefreshResult:
    label: str
    operations: int
    reports_per_operation: int
    hanging: int
    healthy: int
    latency_s: float
    read_timeout_s: float
    window_s: float
    observed_s: float
    daily_request_limit: int | str  # a number, or "default (N)" when the benchmark left it out
    loadavg_before: list[str]
    exporter_startup_s: float
    exporter_rss_mb_all_in: float | None = field(default=None, metadata=OPTIONAL)
    burst_during_window: Burst | None = field(default=None, metadata=OPTIONAL)
    timeline: list[tuple[float, int]] = field(default_factory=list)
    all_healthy_refreshed_s: float | None = None
    refreshed_within_window: int = 0
    met: bool = False
    shortfall: Shortfall | None = field(default=None, metadata=FLAT_OPTIONAL)
    exporter_rss_mb: float = 0.0
    burst_after_refresh: Burst | None = field(default=None, metadata=OPTIONAL)
    upstream: Upstream | None = None
    exporter_cpu_seconds: float = 0.0
    simulator_cpu_seconds: float = 0.0
    other_cpu_cores: float = 0.0
    loadavg_after: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------- the whole run


@dataclass(frozen=True)
class Goal:
    goal: str
    target: str
    measured: str
    met: bool


@dataclass(frozen=True)
class Machine:
    cpu_model: str
    cores: int | None
    memory_mib: int
    python: str
    kernel: str
    date_utc: str
    versions: dict[str, str]


@dataclass(frozen=True)
class Background:
    """How busy the machine was without the benchmark (other processes compete with every measurement)."""

    busy_cores: float
    loadavg: list[str]


@dataclass(frozen=True)
class Settings:
    sizes: list[int]
    duration_s: float
    connections: int
    wrk_threads: int
    quick: bool
    metrics_read_timeout: str
    refresh_ops: int
    refresh_latency_s: float
    window_s: float
    hang_fraction: float
    pace_window_s: float
    pace_windows: int
    active_size: int
    active_interval_s: float
    idle_s: float
    exporter_root: str


@dataclass
class Results:
    """The whole run, filled in part by part (benchmarks/results.json)."""

    machine: Machine
    settings: Settings
    metrics: list[MetricsRow] = field(default_factory=list)
    sizes: list[SizeResult] = field(default_factory=list)
    refresh: list[RefreshResult] = field(default_factory=list)
    goals: list[Goal] = field(default_factory=list)
    background_before: Background | None = field(default=None, metadata=OPTIONAL)
    store: dict[str, Any] | None = field(default=None, metadata=OPTIONAL)  # store_bench.py's own JSON
    background_after: Background | None = field(default=None, metadata=OPTIONAL)
    error: str | None = field(default=None, metadata=OPTIONAL)
    elapsed_s: float | None = field(default=None, metadata=OPTIONAL)
