"""Soak: rotating upstream faults under continuous scrapes, for a bounded time.

20 operations refreshed every 0.5 s against the simulator, whose fault for every token changes every
half second (hang, reset, http_500, html, badjson, oversize, token_limit, busy, none); four threads scrape
/metrics without pause (two plain, two gzip). The exporter must never crash, every scrape must be a 200
that parses, counters must never go down, threads, open files and memory must stay flat after warm-up,
and the simulator must never see two requests of one token at once.

Runs WOLKVOX_SOAK_SECONDS seconds (default 24: the rotation about four times after the warm-up), plus a
few seconds of set-up and recovery.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from harness import Exporter, Simulator, value, wait_until
from prometheus_client.parser import text_string_to_metric_families

# The default runs the whole fault rotation about four times after the warm-up (longer: set the variable).
SOAK_SECONDS = float(os.environ.get("WOLKVOX_SOAK_SECONDS", "24"))
WARM_UP_SECONDS = min(6.0, SOAK_SECONDS / 4)
FAULT_SECONDS = 0.5  # each fault of the rotation lasts about one refresh interval
# token_limit pauses a token for 12 intervals: applied to 3 requests only, so the other tokens keep
# meeting the rest of the rotation.
ROTATION: tuple[tuple[str, dict[str, int]], ...] = (
    ("hang", {}),
    ("reset", {}),
    ("http_500", {}),
    ("html", {}),
    ("badjson", {}),
    ("oversize", {}),
    ("token_limit", {"count": 3}),
    ("busy", {}),
    ("none", {}),
)
OPERATIONS = 20
THREAD_MARGIN = 2
# Files the exporter may open beyond its warm-up count: one upstream connection per token (in flight, or
# kept alive by the client's pool for reuse; never two, a token makes one request at a time) and a few
# more. A leak of a few percent of the ~900 requests of the soak is well above this.
FD_MARGIN = OPERATIONS + 8
RSS_GROWTH_KB = 15 * 1024


def proc_status(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("Threads", "VmRSS"):
            fields[name] = int(rest.split()[0])
    fields["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return fields


@dataclass
class Scraper:
    """Scrapes /metrics in a loop; remembers the last value of every counter series it has seen."""

    url: str
    gzip: bool
    stop: threading.Event
    scrapes: int = 0
    problems: list[str] = field(default_factory=list)
    last: dict[tuple[str, frozenset[tuple[str, str]]], float] = field(default_factory=dict)

    def run(self) -> None:
        encoding = "gzip" if self.gzip else "identity"
        with requests.Session() as session:
            while not self.stop.is_set() and len(self.problems) < 10:
                try:
                    response = session.get(self.url, headers={"Accept-Encoding": encoding}, timeout=5)
                except requests.RequestException as error:
                    self.problems.append(f"scrape failed: {error!r}")
                    continue
                if response.status_code != 200:
                    self.problems.append(f"HTTP {response.status_code}")
                    continue
                if self.gzip and response.headers.get("Content-Encoding") != "gzip":
                    self.problems.append(
                        "asked for gzip, got " + repr(response.headers.get("Content-Encoding"))
                    )
                self.check(response.text)
                self.scrapes += 1

    def check(self, text: str) -> None:
        try:
            families = list(text_string_to_metric_families(text))
        except Exception as error:  # reported, not raised: the thread must keep going
            self.problems.append(f"page does not parse: {error!r}")
            return
        for family in families:
            if family.type != "counter":
                continue
            for sample in family.samples:
                if not sample.name.endswith("_total"):
                    continue
                key = (sample.name, frozenset(sample.labels.items()))
                previous = self.last.get(key)
                if previous is not None and sample.value < previous:
                    self.problems.append(
                        f"{sample.name}{sample.labels} went down: {previous} -> {sample.value}"
                    )
                self.last[key] = sample.value


def rotate_faults(sim: Simulator, stop: threading.Event, problems: list[str]) -> None:
    i = 0
    while not stop.is_set():
        try:
            mode, extra = ROTATION[i % len(ROTATION)]
            sim.fault(mode, **extra)  # replaces the previous "*" fault
        except requests.RequestException as error:
            problems.append(f"setting a fault failed: {error!r}")
            return
        i += 1
        stop.wait(FAULT_SECONDS)


@pytest.mark.slow
def test_soak_rotating_faults_under_continuous_scrapes(
    simulator: Simulator, start_exporter: Callable[..., Exporter]
) -> None:
    names = [f"soak-{i:02d}" for i in range(OPERATIONS)]
    config = {
        "refresh_interval": "0.5s",
        "connect_timeout": "0.5s",
        "read_timeout": "0.5s",
        "max_body_bytes": 65536,
        "daily_request_limit": 10_000_000,  # every report twice a second
        "operations": [
            {"name": n, "server": f"wv{i:04d}", "token": f"tok-soak-{i:02d}", "base_url": simulator.url}
            for i, n in enumerate(names)
        ],
    }
    # info, not debug: a debug log of a minute of failures is large and not what this test is about.
    exporter = start_exporter(config, log_level="info")
    proc = exporter.process.proc
    exporter.wait_for(lambda s: all(value(s, "wolkvox_up", operation=n) == 1 for n in names), what="all up")

    stop = threading.Event()
    rotation_problems: list[str] = []
    scrapers = [Scraper(f"{exporter.url}/metrics", gzip=i % 2 == 1, stop=stop) for i in range(4)]
    threads = [threading.Thread(target=s.run, name=f"scraper-{i}") for i, s in enumerate(scrapers)]
    threads.append(threading.Thread(target=rotate_faults, args=(simulator, stop, rotation_problems)))
    started = time.monotonic()
    for thread in threads:
        thread.start()
    try:
        warm: dict[str, int] | None = None
        peak: dict[str, int] = {}
        while time.monotonic() - started < SOAK_SECONDS:
            assert proc.poll() is None, f"the exporter died:\n{exporter.process.log()[-3000:]}"
            if warm is None and time.monotonic() - started >= WARM_UP_SECONDS:
                warm = proc_status(proc.pid)
            if warm is not None:
                for key, number in proc_status(proc.pid).items():
                    peak[key] = max(peak.get(key, 0), number)
            if any(s.problems for s in scrapers) or rotation_problems:
                break
            stop.wait(0.5)
        end = proc_status(proc.pid)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=15)

    print(
        f"soak {SOAK_SECONDS:g}s: warm-up {warm}, end {end}, peak {peak}, "
        f"scrapes {[s.scrapes for s in scrapers]}"
    )
    assert all(not thread.is_alive() for thread in threads)
    assert not rotation_problems, rotation_problems
    for scraper in scrapers:
        assert not scraper.problems, scraper.problems
        assert scraper.scrapes >= SOAK_SECONDS, "a scraper made less than one scrape per second"
    assert proc.poll() is None
    assert warm is not None
    assert end["Threads"] <= warm["Threads"] + THREAD_MARGIN, (warm, end, peak)
    assert end["fds"] <= warm["fds"] + FD_MARGIN, (warm, end, peak)
    assert end["VmRSS"] - warm["VmRSS"] < RSS_GROWTH_KB, (warm, end, peak)

    stats = simulator.stats()
    assert stats["total_violations"] == 0
    assert stats["total_requests"] >= OPERATIONS * 2

    # Every kind of fault was met and counted.
    samples = exporter.samples()
    reasons = {"timeout", "connection", "http_status", "invalid_response", "token_limit", "api_error"}
    for reason in reasons:
        total = sum(
            value(samples, "wolkvox_scrape_errors_total", operation=n, reason=reason) or 0 for n in names
        )
        assert total > 0, reason

    # And it recovers: with the faults gone, every operation comes back (token_limit waits 6 s here).
    simulator.clear_faults()
    exporter.wait_for(
        lambda s: all(value(s, "wolkvox_up", operation=n) == 1 for n in names), timeout=30, what="recovery"
    )
    log = exporter.process.log()
    assert "Traceback" not in log and "unexpected error" not in log
    wait_until(lambda: exporter.process.stop(timeout=15) == 0, timeout=20, what="a clean stop")
