"""Helpers for the monitoring-stack tests: external binaries, free ports, bounded waits, child processes.

``require(binary, debian_package)`` gives the path of a tool such as ``promtool``:
- on PATH (or in /usr/sbin, /sbin): its path;
- else, when running as root with apt-get: ``apt-get install -y --no-install-recommends PACKAGE``
  (non-interactive, bounded in time, ``apt-get update`` once if the first try fails), then its path;
- else the test is skipped with the reason, except under CI (``CI=true``), where a missing tool
  FAILS the test: CI must never pass by skipping the checks it exists for.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
_EXTRA_PATH = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def missing(reason: str) -> None:
    """Skip the test with ``reason``, or fail it under CI."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: a missing tool is a failure, not a skip)", pytrace=False)
    pytest.skip(reason)


def which(binary: str) -> str | None:
    # The interpreter's own bin directory first: tools from the test extras (hadolint) live in the
    # virtual environment, which the README's test command does not put on PATH.
    venv_bin = os.path.dirname(sys.executable)
    path = os.pathsep.join([venv_bin, os.environ.get("PATH", ""), *_EXTRA_PATH])
    return shutil.which(binary, path=path)


def require(binary: str, debian_package: str | None) -> str:
    """Path of ``binary``, else skip (fail under CI) naming the package that provides it. Tests never
    install anything: `.ci/run` does, with apt-get."""
    found = which(binary)
    if found:
        return found
    if debian_package is None:
        missing(f"{binary} not found on PATH (see the README's Tests section)")
    missing(f"{binary} not found on PATH; install it with: apt-get install {debian_package}")
    raise AssertionError("unreachable")  # missing() always raises


def promtool() -> str:
    return require("promtool", "prometheus")


def prometheus() -> str:
    return require("prometheus", "prometheus")


def amtool() -> str:
    return require("amtool", "prometheus-alertmanager")


def alertmanager() -> str:
    """The Alertmanager server: ``alertmanager`` upstream, ``prometheus-alertmanager`` in Debian."""
    return which("alertmanager") or require("prometheus-alertmanager", "prometheus-alertmanager")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.1, what: str = ""
) -> Any:
    """Call ``predicate`` until it returns something truthy, and return that; fail after ``timeout`` s.

    Exceptions from the predicate count as "not yet" (a server still starting); the last one is
    reported if the deadline passes.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            value = predicate()
        except Exception as exc:  # reported below if it never succeeds
            value, last = None, exc
        else:
            if value:
                return value
            last = value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what or predicate}; last: {last!r}")
        time.sleep(interval)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """SIGTERM, wait up to ``timeout``, then SIGKILL; returns the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    return proc.returncode


class Child:
    """A child process whose stdout and stderr go to a log file; always stop() it in a finally/teardown."""

    def __init__(self, name: str, args: list[str], log_path: Path, cwd: Path | None = None) -> None:
        self.name = name
        self.args = args
        self.log_path = log_path
        handle = log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                args,
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=cwd or REPO,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        finally:
            handle.close()

    def log(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-tail:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            pytest.fail(f"{self.name} exited with {self.proc.returncode}; its log ends:\n{self.log()}")

    def stop(self, timeout: float = 10.0) -> int:
        return stop_process(self.proc, timeout)


# --------------------------------------------------------------------------- Grafana dashboards

DASHBOARD_DIR = REPO / "grafana" / "dashboards"
RULES_FILE = REPO / "prometheus" / "rules" / "wolkvox.rules.yml"


def dashboard_files() -> list[Path]:
    return sorted(DASHBOARD_DIR.glob("*.json"))


def iter_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows included, and the panels inside collapsed rows."""
    out: list[dict[str, Any]] = []
    for panel in dashboard.get("panels", []):
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def panel_targets(dashboard: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(panel, target) for every query target of every panel."""
    return [(panel, target) for panel in iter_panels(dashboard) for target in panel.get("targets", [])]


def expand_grafana_vars(
    expr: str,
    operation_regex: str = ".+",
    rate_interval: str = "2m",
    interval: str = "1m",
    range_: str = "1h",
) -> str:
    """The PromQL Grafana would send: dashboard variables replaced by concrete values."""
    replacements = {
        "${operation:regex}": operation_regex,
        "${operation}": operation_regex,
        "$operation": operation_regex,
        "${__rate_interval}": rate_interval,
        "$__rate_interval": rate_interval,
        "${__interval}": interval,
        "$__interval": interval,
        "${__range}": range_,
        "$__range": range_,
    }
    for name, value in replacements.items():
        expr = expr.replace(name, value)
    return expr
