"""The machine a run took place on, and how busy it was without the benchmark."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import subprocess
import time
from importlib.metadata import version
from pathlib import Path

from .load import WRK
from .processes import loadavg, machine_busy_seconds
from .results import Background, Machine
from .servers import NGINX


def _version_of(argv: list[str], *, on_stderr: bool = False) -> str:
    """The version line a program prints (nginx prints it on stderr)."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    return done.stderr.strip() if on_stderr else done.stdout.splitlines()[0].strip()


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def describe_machine() -> Machine:
    versions: dict[str, str] = {}
    with contextlib.suppress(Exception):
        versions["wrk"] = _version_of([WRK or "wrk", "--version"])
    with contextlib.suppress(Exception):
        versions["nginx"] = _version_of([NGINX or "nginx", "-v"], on_stderr=True)
    for package in ("aiohttp", "prometheus_client", "requests"):
        with contextlib.suppress(Exception):
            versions[package] = version(package)
    mem_total = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_total = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0]) // 1024
    return Machine(
        cpu_model=_cpu_model(),
        cores=os.cpu_count(),
        memory_mib=mem_total,
        python=platform.python_version(),
        kernel=platform.release(),
        date_utc=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        versions=versions,
    )


def background_load(seconds: float = 3.0) -> Background:
    """How busy the machine is without us: other processes compete with every measurement."""
    busy = machine_busy_seconds()
    time.sleep(seconds)
    cores = (machine_busy_seconds() - busy) / seconds
    return Background(busy_cores=round(cores, 2), loadavg=loadavg())
