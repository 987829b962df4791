"""Fixtures over tests/harness.py: a simulator, exporters (real processes or in-process), a test PKI; and
the hook that lets a test module start slow background work once the tests are collected."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import REPO, Exporter, InProcess, Simulator, start_exporter_process, start_simulator

# Test processes start programs from several threads at once (the promtool pool, servers, the tests).
# CPython's vfork() path once failed there in CI with "OSError: [Errno 14] Bad address" on exec of
# /usr/bin/promtool; plain fork(), the documented fallback (Python docs, subprocess: "Disabling use of
# vfork()"), has no such race. Tests only: the exporter starts one program at a time (the config
# loader's child, exporter/configproc.py) and parses in-process if that start fails.
subprocess._USE_VFORK = False  # type: ignore[attr-defined]


def pytest_collection_finish(session: pytest.Session) -> None:
    """A module with a ``start_in_background()`` (test_rules: the promtool runs) gets it called when its
    tests are selected; what it returns is called at the end of the session."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return  # every worker collects every test: the module's own fixture starts them where they run
    modules = {item.module for item in session.items if isinstance(item, pytest.Function)}
    for module in sorted(modules, key=lambda m: m.__name__):
        start = getattr(module, "start_in_background", None)
        if start is not None:
            session.config.add_cleanup(start())


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throw-away PKI (CA, server and client certificates) made once per session by
    tests/fixtures/web/make_certs.sh; see that script for the files."""
    directory = tmp_path_factory.mktemp("pki")
    subprocess.run(
        ["sh", str(REPO / "tests" / "fixtures" / "web" / "make_certs.sh"), str(directory)],
        check=True,
        timeout=60,
    )
    return directory


@pytest.fixture
def simulator(tmp_path: Path) -> Iterator[Simulator]:
    sim = start_simulator(tmp_path / "simulator.log")
    yield sim
    sim.stop()


@pytest.fixture
def start_exporter(tmp_path: Path) -> Iterator[Callable[..., Exporter]]:
    """Factory: ``start_exporter(config_dict, *extra_flags, log_level=...)`` runs the real exporter on a
    loopback port: for tests of its command line, signals, log or restarts."""
    started: list[Exporter] = []

    def start(config: dict[str, Any], *flags: str, log_level: str | None = "debug") -> Exporter:
        exporter = start_exporter_process(
            config, tmp_path, *flags, log_level=log_level, name=f"exporter-{len(started)}"
        )
        started.append(exporter)
        return exporter

    yield start
    for exporter in started:
        assert exporter.process is not None
        exporter.process.stop()


@pytest.fixture
def run_exporter(tmp_path: Path) -> Iterator[Callable[..., Exporter]]:
    """Factory: ``run_exporter(config_dict, **web_settings)`` runs the exporter inside the test process on
    a loopback port (no process start, no flags): for tests of what it does, not of its command line or
    its log."""
    running = InProcess(tmp_path)
    yield running.start
    running.stop_all()
