"""Helpers for the monitoring-stack tests: external binaries, free ports, bounded waits, child processes.

``find_or_install(binary, debian_package)`` gives the path of a tool such as ``promtool``:
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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
APT_TIMEOUT = 600.0  # seconds, for one apt-get run
_EXTRA_PATH = ("/usr/sbin", "/sbin", "/usr/local/sbin")
_failed: dict[str, str] = {}  # binary -> why it could not be found or installed (tried once per run)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def missing(reason: str) -> None:
    """Skip the test with ``reason``, or fail it under CI."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: a missing tool is a failure, not a skip)", pytrace=False)
    pytest.skip(reason)


def which(binary: str) -> str | None:
    """Path of ``binary`` on PATH or in the sbin directories, else None (never installs anything)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), *_EXTRA_PATH])
    return shutil.which(binary, path=path)


def _apt_get(*args: str) -> tuple[bool, str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "-q", "-y", *args]
    try:
        done = subprocess.run(
            command, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=APT_TIMEOUT
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"{' '.join(command)}: {exc}"
    tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
    return done.returncode == 0, f"{' '.join(command)} exited {done.returncode}: {' | '.join(tail)}"


def find_or_install(binary: str, debian_package: str | None) -> str:
    """Path of ``binary``; installs ``debian_package`` with apt-get as root if needed; else skip/fail."""
    found = which(binary)
    if found:
        return found
    if binary in _failed:
        missing(_failed[binary])
    if debian_package is None:
        reason = f"{binary} not found on PATH (no Debian package provides it; see the README)"
    elif not hasattr(os, "geteuid") or os.geteuid() != 0:
        reason = f"{binary} not found; install it with: apt-get install {debian_package}"
    elif shutil.which("apt-get") is None:
        reason = f"{binary} not found and apt-get is not available to install {debian_package}"
    else:
        ok, detail = _apt_get("install", "--no-install-recommends", debian_package)
        if not ok:
            _apt_get("update")
            ok, detail = _apt_get("install", "--no-install-recommends", debian_package)
        found = which(binary)
        if found:
            return found
        reason = f"{binary} not found after installing {debian_package}: {detail}"
    _failed[binary] = reason
    missing(reason)
    raise AssertionError("unreachable")  # missing() always raises


def promtool() -> str:
    return find_or_install("promtool", "prometheus")


def prometheus() -> str:
    return find_or_install("prometheus", "prometheus")


def amtool() -> str:
    return find_or_install("amtool", "prometheus-alertmanager")


def alertmanager() -> str:
    """The Alertmanager server: ``alertmanager`` upstream, ``prometheus-alertmanager`` in Debian."""
    return which("alertmanager") or find_or_install("prometheus-alertmanager", "prometheus-alertmanager")


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
