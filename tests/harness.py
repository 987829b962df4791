"""The one test harness: outside programs, free ports, condition waits, child processes, and the exporter
and the simulator, as real processes or inside the test process.

Every test and the benchmark start and stop things through here; conftest.py only wraps these in fixtures.

Outside programs (``require``): on PATH (or in /usr/sbin, /sbin) their path; else the test is skipped with
the reason, except under CI (``CI=true``), where a missing tool fails the test: CI must never pass by
skipping the checks it exists for. Tests never install anything: `.ci/run` does, with apt-get.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
_EXTRA_PATH = ("/usr/sbin", "/sbin", "/usr/local/sbin")

# --------------------------------------------------------------------------- outside programs


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
    """Path of ``binary``, else skip (fail under CI) naming the package that provides it."""
    found = which(binary)
    if found:
        return found
    if debian_package is None:
        missing(f"{binary} not found on PATH (see CONTRIBUTING.md, Tests)")
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


def repo_copy(dest: Path) -> None:
    """The tracked files of the repository (as the work tree has them) in ``dest``, as in a fresh clone:
    no .venv, no caches, no build leftovers such as the editable install's *.egg-info."""
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True, timeout=60
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():  # a tracked file deleted in the work tree is not copied
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


# --------------------------------------------------------------------------- ports and waits


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Call ``predicate`` until it returns something truthy, and return that; fail after ``timeout`` s.

    Exceptions from the predicate count as "not yet" (a server still starting), except a test failure
    (pytest.fail) raised inside it; the last exception is reported if the deadline passes.
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


def holds(predicate: Callable[[], Any], seconds: float, what: str = "", interval: float = 0.05) -> None:
    """Fail as soon as ``predicate`` is false during the next ``seconds`` (something must NOT happen in a
    window: the window is the test's claim, not a guess at how long something takes)."""
    deadline = time.monotonic() + seconds
    while True:
        if not predicate():
            pytest.fail(f"no longer true: {what or predicate}")
        if time.monotonic() >= deadline:
            return
        time.sleep(interval)


async def wait_until_async(predicate: Callable[[], Any], timeout: float = 5.0, what: str = "") -> Any:
    """``wait_until`` for a test running in an event loop: polls without blocking the loop."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what or predicate}")
        await asyncio.sleep(0.01)
    return value


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    """(what ``call`` returned, the seconds it took)."""
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


# --------------------------------------------------------------------------- child processes


def stop_process(
    proc: subprocess.Popen[Any], timeout: float = 10.0, group: bool = False, sig: int = signal.SIGTERM
) -> int:
    """``sig`` (to its whole process group with ``group``), wait up to ``timeout``, then SIGKILL;
    returns the exit status."""

    def send(sig: int) -> None:
        try:
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
        except ProcessLookupError:
            pass

    if proc.poll() is None:
        send(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            send(signal.SIGKILL)
            proc.wait(timeout=5)
    elif group:
        send(signal.SIGKILL)  # the leader is gone; its children may not be
    return proc.returncode


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the test run dies, so no child outlives it (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


_LISTENING = re.compile(r"listening on (https?://(?:127\.0\.0\.1|\[::1\]|localhost):\d+)")


@dataclass
class Process:
    """A child process whose stdout and stderr go to ``log_path``; ``url`` is where it serves, if it does.
    Always stop() it (the fixtures do)."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    name: str = "process"
    url: str = ""
    group: bool = False  # a session of its own: stop() ends its children too

    def log(self, tail: int | None = None) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return text[-tail:] if tail else text

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            pytest.fail(f"{self.name} exited with {self.proc.returncode}; its log ends:\n{self.log(4000)}")

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int:
        return stop_process(self.proc, timeout, group=self.group, sig=sig)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def wait_listening(self, timeout: float = 20.0) -> str:
        """Wait for its 'listening on URL' line; sets and returns ``url``."""

        def listening() -> str | None:
            self.check_alive()
            match = _LISTENING.search(self.log())
            return match.group(1) if match else None

        self.url = wait_until(listening, timeout=timeout, what=f"{self.name} to listen")
        return self.url

    def wait_answering(self, url: str, timeout: float = 20.0) -> None:
        """For a child that does not log its address: wait until ``url`` answers 200 (a /-/ready or
        /-/healthy page); sets ``url`` to its scheme, host and port."""
        self.url = "/".join(url.split("/")[:3])

        def answering() -> bool:
            self.check_alive()
            return requests.get(url, timeout=2).status_code == 200

        wait_until(answering, timeout=timeout, what=f"{self.name} to answer {url}")


def spawn(
    args: list[str],
    log_path: Path,
    *,
    name: str = "",
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    group: bool = False,
) -> Process:
    """Start ``args`` with its output in ``log_path`` (appended); it dies with the test run."""
    with log_path.open("ab") as handle:
        proc = subprocess.Popen(
            args,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd or REPO,
            env={**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"},
            preexec_fn=None if group else _die_with_parent,
            start_new_session=group,
        )
    return Process(proc, log_path, name=name or Path(args[0]).name, group=group)


def start_program(
    args: list[str],
    log_path: Path,
    *,
    ready: str | None = None,
    name: str = "",
    timeout: float = 20.0,
    cwd: Path | None = None,
) -> Process:
    """Start ``args`` (in ``cwd``, default the repository) and wait until it is ready: ``ready`` (a URL)
    answers 200, or, without one, it logs 'listening on URL'. One that never gets ready is stopped and
    fails the test."""
    process = spawn(args, log_path, name=name, cwd=cwd)
    try:
        if ready is None:
            process.wait_listening(timeout)
        else:
            process.wait_answering(ready, timeout)
    except BaseException:
        process.stop()
        raise
    return process


def start_python(
    args: list[str], log_path: Path, *, ready: str | None = None, timeout: float = 20.0
) -> Process:
    """``python ARGS`` (``-m module ...``) started as by ``start_program``."""
    return start_program(
        [sys.executable, *args], log_path, ready=ready, name=" ".join(args[:2]), timeout=timeout
    )


# --------------------------------------------------------------------------- /metrics

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_samples(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def labelled(samples: Samples, name: str, **labels: str) -> list[dict[str, str]]:
    """The label sets of every ``name`` sample that has (at least) these labels."""
    wanted = set(labels.items())
    return [dict(key) for (family, key) in samples if family == name and wanted <= key]


# --------------------------------------------------------------------------- the simulator


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

    def stop(self, timeout: float = 10.0) -> int:
        return self.process.stop(timeout)


def simulator_args(*flags: str) -> list[str]:
    """Arguments of ``python`` for the simulator on a free loopback port."""
    return ["-m", "exporter.simulator", "--web.listen-address", "127.0.0.1:0", *flags]


def start_simulator(log_path: Path, *flags: str) -> Simulator:
    """``python -m exporter.simulator`` on a free loopback port."""
    return Simulator(start_python(simulator_args(*flags), log_path))


# --------------------------------------------------------------------------- the exporter


class LoopThread:
    """An event loop on a thread of its own, for an exporter running inside the test process."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-exporter-loop", daemon=True)
        self.thread.start()

    def run(self, coroutine: Awaitable[Any], timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)  # type: ignore[arg-type]

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@dataclass
class InProcessSimulator:
    """The simulator inside the test process, on a free loopback port: real HTTP, no process start.
    ``sim`` is its state (``exporter.simulator.Simulator``); ``stop()`` ends it."""

    url: str
    sim: Any
    runner: Any
    loop: LoopThread

    def stop(self) -> None:
        self.loop.run(self.runner.cleanup())
        self.loop.close()


def start_simulator_in_process(**options: Any) -> InProcessSimulator:
    """The simulator with these ``SimulatorOptions`` (port 0 unless given), serving on its own loop thread."""
    from exporter.simulator import SIMULATOR_KEY, SimulatorOptions, start_server

    loop = LoopThread()
    try:
        runner, url = loop.run(start_server(SimulatorOptions(**{"port": 0, **options})))
    except BaseException:
        loop.close()
        raise
    return InProcessSimulator(url, runner.app[SIMULATOR_KEY], runner, loop)


@dataclass
class Exporter:
    """An exporter under test, in its own process (``process``) or in this one (``app``)."""

    process: Process | None
    config_path: Path
    config: dict[str, Any] = field(default_factory=dict)
    app: Any = None  # exporter.app.App when in-process
    app_url: str = ""
    loop: LoopThread | None = None  # the in-process app's event loop

    def stop(self, timeout: float = 15.0) -> int:
        """Stop it as SIGTERM would (the in-process one: App.stop, saving its state); the exit status."""
        if self.process is not None:
            return self.process.stop(timeout)
        if self.loop is not None:
            self.loop.run(self.app.stop(), timeout)
            self.loop.close()
            self.loop = None
        return 0

    @property
    def url(self) -> str:
        return self.process.url if self.process is not None else self.app_url

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.get(f"{self.url}{path}", timeout=kwargs.pop("timeout", 5), **kwargs)

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

        wait_until(check, timeout=timeout, what=what or "a /metrics condition")
        return found["s"]


def write_config_text(tmp_path: Path, text: str) -> Path:
    """A configuration file ``c.yml`` in ``tmp_path`` holding ``text`` as written (for YAML a test spells)."""
    path = tmp_path / "c.yml"
    path.write_text(text, encoding="utf-8")
    return path


def write_yaml(path: Path, document: object) -> Path:
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


def exporter_args(config_path: Path | None, *flags: str, listen: str = "127.0.0.1:0") -> list[str]:
    config = ["--config.file", str(config_path)] if config_path is not None else []
    return ["-m", "exporter.cli", *config, "--web.listen-address", listen, *flags]


def start_exporter_process(
    config: dict[str, Any],
    directory: Path,
    *flags: str,
    log_level: str | None = "debug",
    name: str = "exporter",
) -> Exporter:
    """The real exporter (``python -m exporter.cli``) with ``config`` and ``flags``, serving on loopback.

    It is ready once it logs 'listening on' or, at a level that does not log that line (``log_level``
    warn or error, or None with the level among ``flags``), once /-/healthy answers on a port chosen here.
    """
    config_path = write_yaml(directory / f"{name}.yml", config)
    level = ["--log.level", log_level] if log_level else []
    quiet = log_level in ("warn", "error") or any(f in ("warn", "error") for f in flags)
    log_path = directory / f"{name}.log"
    if not quiet:
        return Exporter(
            start_python(exporter_args(config_path, *level, *flags), log_path), config_path, config
        )
    port = free_port()
    args = exporter_args(config_path, *level, *flags, listen=f"127.0.0.1:{port}")
    process = start_python(args, log_path, ready=f"http://127.0.0.1:{port}/-/healthy")
    return Exporter(process, config_path, config)


def exporter_exit(log_path: Path, *flags: str, timeout: float = 30.0) -> tuple[int, str]:
    """Run the exporter with ``flags``; it must exit by itself, without ever serving. Returns
    (exit status, its output)."""
    process = spawn([sys.executable, *exporter_args(None, *flags)], log_path, name="exporter")
    wait_until(
        lambda: not process.alive() or "listening on" in process.log(),
        timeout=timeout,
        what="the exporter to exit",
    )
    process.stop()
    output = process.log()
    assert "listening on" not in output, f"the exporter started instead of refusing:\n{output}"
    return process.proc.returncode, output


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``python -m exporter.cli ARGS`` to completion (--config.check, --version, bad flags)."""
    return subprocess.run(
        [sys.executable, "-m", "exporter.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
    )


@dataclass
class InProcess:
    """Exporters run inside the test process; ``stop_all`` ends them (the run_exporter fixture does)."""

    directory: Path
    running: list[Exporter] = field(default_factory=list)

    def start(self, config: dict[str, Any], **web: Any) -> Exporter:
        """Run the exporter with ``config``; ``web`` are WebSettings fields (web_config_file=...,
        max_connections=...); it listens on a free loopback port."""
        from exporter.app import App, WebSettings, use_config
        from exporter.config import load_config

        config_path = write_yaml(self.directory / f"exporter-{len(self.running)}.yml", config)
        loaded = load_config(config_path)
        use_config(loaded)
        app = App(
            loaded,
            WebSettings(**{"listen_address": "127.0.0.1:0", **web}),
            load_config=lambda: load_config(config_path),
        )
        loop = LoopThread()
        exporter = Exporter(None, config_path, config, app=app, loop=loop)
        self.running.append(exporter)
        exporter.app_url = loop.run(app.start())
        return exporter

    def stop_all(self) -> None:
        for exporter in self.running:
            exporter.stop()
        self.running.clear()


# --------------------------------------------------------------------------- Alertmanager

AM_CONFIG = REPO / "alertmanager" / "alertmanager.yml"


class Webhooks:
    """A loopback HTTP server that records Alertmanager webhook deliveries by path."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with owner.lock:
                    owner.received.append((self.path, json.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def delivered(self, status: str = "firing") -> set[tuple[str, str, str]]:
        """{(receiver path, alertname, operation)} of every alert delivered so far with this status."""
        with self.lock:
            return {
                (path, alert["labels"]["alertname"], alert["labels"].get("operation", ""))
                for path, doc in self.received
                for alert in doc["alerts"]
                if alert["status"] == status
            }

    def alerts(self, status: str = "firing") -> list[tuple[str, dict[str, Any]]]:
        """(receiver path, alert) of every alert delivered so far with this status."""
        with self.lock:
            return [(path, a) for path, doc in self.received for a in doc["alerts"] if a["status"] == status]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_alertmanager(directory: Path, hooks: Webhooks) -> tuple[Process, str]:
    """The repository's Alertmanager config (same routes and inhibit rules) with every webhook pointed at
    ``hooks`` (path = receiver name) and groups flushed at once; returns the process and its URL."""
    config = yaml.safe_load(AM_CONFIG.read_text(encoding="utf-8"))
    config["route"].update(group_wait="0s", group_interval="1s")
    for receiver in config["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = f"http://127.0.0.1:{hooks.port}/{receiver['name']}"
    (directory / "am.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    child = start_program(
        [
            alertmanager(),
            f"--config.file={directory / 'am.yml'}",
            f"--storage.path={directory / 'am-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        directory / "alertmanager.log",
        ready=f"{url}/-/ready",
        timeout=30,
    )
    return child, url
