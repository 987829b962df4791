"""What every run is handed: the parsed flags (``Options``) and the run's surroundings (``Bench``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .processes import BenchmarkError, Children

REFRESH_RUNS = ("healthy", "hang", "pace")


@dataclass(frozen=True)
class Options:
    """The flags of benchmarks/run.py, parsed (durations in seconds; see ``cli.parser``)."""

    sizes: tuple[int, ...]
    duration: float
    connections: int
    threads: int
    quick: bool
    steady: bool
    skip_metrics: bool
    skip_refresh: bool
    store: int  # operations of benchmarks/store_bench.py (0: not run)
    out: Path
    refresh_ops: int
    refresh_latency: float
    window: float
    hang_fraction: float
    refresh_runs: frozenset[str]
    pace_window: float
    pace_windows: int
    active_size: int
    active_interval: float
    idle: float
    hang_timeout: str  # the exporter's read_timeout of part 1, as written into its config ("60s")
    burst: float
    poll: float
    reference_max_seconds: float
    exporter_root: Path
    max_minutes: float

    @property
    def wrk_timeout(self) -> float:
        """wrk's --timeout of the /metrics rows."""
        return max(10.0, self.duration)


@dataclass(frozen=True)
class Bench:
    """The options, the children of this run (and their logs' directory), the log and the deadline."""

    options: Options
    children: Children
    log: Callable[[str], None]
    deadline: float  # time.monotonic() at which no new step starts

    @property
    def workdir(self) -> Path:
        return self.children.workdir

    def check_deadline(self, step: str) -> None:
        if time.monotonic() > self.deadline:
            raise BenchmarkError(f"--max-minutes {self.options.max_minutes:g} reached before {step}")
