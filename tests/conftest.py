"""Shared test helpers: real processes (simulator, exporter) on loopback, and condition waits."""

from __future__ import annotations

import asyncio
import ctypes
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families
from tools import REPO, free_port, stop_process, wait_until  # noqa: F401 (free_port re-exported for the tests)

from exporter.app import App, WebSettings, use_config
from exporter.config import load_config

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_samples(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


@dataclass
class Process:
    """A child process whose stderr goes to a file; ``url`` is parsed from its 'listening on' line."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    url: str = ""

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self, timeout: float = 10.0) -> int:
        return stop_process(self.proc, timeout)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the test run dies, so no exporter or simulator outlives it (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


_LISTENING = re.compile(r"listening on (https?://(?:127\.0\.0\.1|\[::1\]|localhost):\d+)")


def start_process(args: list[str], log_path: Path, timeout: float = 20.0) -> Process:
    handle = log_path.open("wb")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, *args],
        stdout=handle,
        stderr=subprocess.STDOUT,
        cwd=REPO,
        env=env,
        preexec_fn=_die_with_parent,
    )
    handle.close()
    process = Process(proc, log_path)

    def listening() -> str | None:
        if proc.poll() is not None:
            pytest.fail(f"{args[:2]} exited with {proc.returncode}:\n{process.log()}")
        match = _LISTENING.search(process.log())
        return match.group(1) if match else None

    process.url = wait_until(listening, timeout=timeout, what=f"{args[:2]} to listen")
    return process


@dataclass
class Simulator:
    process: Process

    @property
    def url(self) -> str:
        return self.process.url

    def fault(self, mode: str, token: str = "*", **extra: Any) -> None:
        response = requests.post(
            f"{self.url}/-/faults", json={"mode": mode, "token": token, **extra}, timeout=5
        )
        response.raise_for_status()

    def clear_faults(self) -> None:
        requests.delete(f"{self.url}/-/faults", timeout=5).raise_for_status()

    def set_clock(self, at: str | float | None) -> None:
        """Answer as if it were ``at`` (ISO 8601 with a zone, or Unix seconds); None: the real clock."""
        requests.post(f"{self.url}/-/clock", json={"at": at}, timeout=5).raise_for_status()

    def stats(self) -> dict[str, Any]:
        return requests.get(f"{self.url}/-/stats", timeout=5).json()


@dataclass
class Exporter:
    """An exporter under test, in its own process (``process``) or in this one (``app``)."""

    process: Process | None
    config_path: Path
    config: dict[str, Any] = field(default_factory=dict)
    app: App | None = None
    app_url: str = ""

    @property
    def url(self) -> str:
        return self.process.url if self.process is not None else self.app_url

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.get(f"{self.url}{path}", timeout=5, **kwargs)

    def samples(self) -> Samples:
        response = self.get("/metrics")
        response.raise_for_status()
        return parse_samples(response.text)

    def wait_for(self, predicate: Callable[[Samples], Any], timeout: float = 15.0, what: str = "") -> Samples:
        """Wait until ``predicate(samples)`` holds on a scrape; returns those samples."""
        found: dict[str, Samples] = {}

        def check() -> bool:
            samples = self.samples()
            found["s"] = samples
            return bool(predicate(samples))

        wait_until(check, timeout=timeout, interval=0.1, what=what or "a /metrics condition")
        return found["s"]


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
    process = start_process(
        ["-m", "exporter.simulator", "--web.listen-address", "127.0.0.1:0"], tmp_path / "simulator.log"
    )
    yield Simulator(process)
    process.stop()


@pytest.fixture
def start_exporter(tmp_path: Path) -> Iterator[Callable[..., Exporter]]:
    """Factory: ``start_exporter(config_dict, *extra_flags)`` runs the real exporter on a loopback port."""
    started: list[Process] = []

    def start(config: dict[str, Any], *flags: str, log_level: str = "debug") -> Exporter:
        config_path = tmp_path / f"exporter-{len(started)}.yml"
        config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        process = start_process(
            [
                "-m",
                "exporter.cli",
                "--config.file",
                str(config_path),
                "--web.listen-address",
                "127.0.0.1:0",
                "--log.level",
                log_level,
                *flags,
            ],
            tmp_path / f"exporter-{len(started)}.log",
        )
        started.append(process)
        return Exporter(process, config_path, config)

    yield start
    for process in started:
        process.stop()


class _LoopThread:
    """An event loop on a thread of its own, for an exporter running inside the test process."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-exporter-loop", daemon=True)
        self.thread.start()

    def run(self, coroutine: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def run_exporter(tmp_path: Path) -> Iterator[Callable[..., Exporter]]:
    """Factory: ``run_exporter(config_dict)`` runs the exporter inside the test process on a loopback port
    (no process start, no flags): for tests of what it does, not of its command line or its log."""
    running: list[tuple[_LoopThread, App]] = []

    def start(config: dict[str, Any]) -> Exporter:
        config_path = tmp_path / f"exporter-{len(running)}.yml"
        config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        loaded = load_config(config_path)
        use_config(loaded)
        app = App(
            loaded, WebSettings(listen_address="127.0.0.1:0"), load_config=lambda: load_config(config_path)
        )
        loop = _LoopThread()
        running.append((loop, app))
        url = loop.run(app.start())
        return Exporter(None, config_path, config, app=app, app_url=url)

    yield start
    for loop, app in running:
        loop.run(app.stop())
        loop.close()
