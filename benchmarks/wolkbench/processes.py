"""The benchmark's child processes and what /proc says about them and the machine.

Every child comes from tests/harness.py (spawn, PR_SET_PDEATHSIG, a log per child, stop); ``Children``
only remembers them, so that ``stop_all`` ends whichever are still running when the benchmark ends.
"""

from __future__ import annotations

import contextlib
import os
import resource
from pathlib import Path

from harness import Process, start_program

MB = 1_000_000  # memory is reported in MB of 10^6 bytes (stricter than MiB for the 100 MB goal)


class BenchmarkError(Exception):
    """A step could not be carried out (a child did not start, a page never became complete...)."""


class Children:
    """Starts children from the exporter's checkout ``root``, their logs in ``workdir``."""

    def __init__(self, root: Path, workdir: Path) -> None:
        self.root = root
        self.workdir = workdir
        self._running: list[Process] = []

    def start(
        self, name: str, argv: list[str], *, ready: str | None = None, timeout: float = 60.0
    ) -> Process:
        """``argv`` run from ``root``, its output in ``workdir/name.log``; returns once it logs
        'listening on' (or ``ready``, a URL, answers 200)."""
        process = start_program(
            argv, self.workdir / f"{name}.log", ready=ready, name=name, timeout=timeout, cwd=self.root
        )
        self._running.append(process)
        return process

    def stop_all(self) -> None:
        for process in self._running:
            with contextlib.suppress(Exception):
                process.stop(timeout=5)
        self._running.clear()


def rss_bytes(process: Process) -> int:
    with open(f"/proc/{process.proc.pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise BenchmarkError(f"{process.name}: no VmRSS")


def rss_mb(process: Process) -> float:
    return round(rss_bytes(process) / MB, 1)


def cpu_seconds(process: Process) -> float:
    """User + system CPU time of the process so far (all its threads)."""
    with open(f"/proc/{process.proc.pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU time spent by the whole machine (all cores, every process) since boot."""
    with open("/proc/stat", encoding="ascii") as stat:
        ticks = [int(v) for v in stat.readline().split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def children_cpu_seconds() -> float:
    """The reaped children of this script (wrk)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def own_cpu_seconds() -> float:
    """This script and its reaped children (wrk)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime + children_cpu_seconds()


def loadavg() -> list[str]:
    return Path("/proc/loadavg").read_text().split()[:3]
