"""The refresher: one request per token at a time, intervals, backoff, hanging upstreams, reload."""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections import defaultdict
from dataclasses import replace

import pytest
from conftest import wait_until

from exporter.client import FetchError
from exporter.config import Config, OperationConfig
from exporter.model import FetchResult
from exporter.scheduler import Refresher, retry_delay, token_key
from exporter.secret import Secret


def operation(name: str, token: str, apis: tuple[str, ...] = ("stereo_rec",)) -> OperationConfig:
    return OperationConfig(
        name=name,
        server=name,
        token=Secret(token),
        base_url=f"http://127.0.0.1:9/{name}",
        budget_minutes=None,
        apis=apis,
        ca_file=None,
    )


def config(*operations: OperationConfig, refresh: float = 0.2, workers: int = 4) -> Config:
    return Config(
        path="test.yml",
        refresh_interval=refresh,
        max_age=3600.0,
        fetch_workers=workers,
        connect_timeout=1.0,
        read_timeout=1.0,
        max_body_bytes=1 << 20,
        state_file=None,
        operations=tuple(operations),
        warnings=(),
    )


class Recorder:
    """A fake upstream: records every call per token, and checks one-at-a-time per token."""

    def __init__(self, latency: float = 0.02) -> None:
        self.latency = latency
        self.lock = threading.Lock()
        self.in_flight: dict[str, int] = defaultdict(int)
        self.max_in_flight: dict[str, int] = defaultdict(int)
        self.calls: dict[str, list[tuple[float, float]]] = defaultdict(list)  # token -> (start, end)
        self.by_operation: dict[str, int] = defaultdict(int)
        self.fail: dict[str, str] = {}  # operation -> reason
        self.block: dict[str, threading.Event] = {}  # operation -> released when set
        self.results: list[FetchResult] = []

    def fetch(self, op: OperationConfig, api: str) -> float:
        token = op.token.reveal()
        with self.lock:
            self.in_flight[token] += 1
            self.max_in_flight[token] = max(self.max_in_flight[token], self.in_flight[token])
        start = time.monotonic()
        try:
            if op.name in self.block:
                self.block[op.name].wait(timeout=10)
            time.sleep(self.latency)
            if op.name in self.fail:
                raise FetchError(self.fail[op.name], "injected")
            return 42.0
        finally:
            with self.lock:
                self.in_flight[token] -= 1
                self.calls[token].append((start, time.monotonic()))
                self.by_operation[op.name] += 1

    def record(self, result: FetchResult) -> None:
        with self.lock:
            self.results.append(result)


@pytest.fixture
def run():
    refreshers: list[Refresher] = []

    def start(cfg: Config, recorder: Recorder, **kwargs) -> Refresher:
        refresher = Refresher(cfg, recorder.fetch, recorder.record, rng=random.Random(1), **kwargs)
        refresher.start()
        refreshers.append(refresher)
        return refresher

    yield start
    for refresher in refreshers:
        refresher.stop(timeout=2)


def test_a_shared_token_is_never_used_twice_at_once(run) -> None:
    recorder = Recorder(latency=0.03)
    ops = [
        operation("a", "shared"),
        operation("b", "shared"),
        operation("c", "own-c"),
        operation("d", "own-d"),
    ]
    run(config(*ops, refresh=0.05, workers=4), recorder)
    wait_until(lambda: recorder.by_operation["a"] >= 3 and recorder.by_operation["b"] >= 3, timeout=10)
    assert recorder.max_in_flight["shared"] == 1
    assert all(count == 1 for count in recorder.max_in_flight.values())


def test_after_a_success_a_token_waits_a_full_refresh_interval(run) -> None:
    recorder = Recorder(latency=0.01)
    refresh = 0.3
    run(config(operation("a", "t1"), operation("b", "t1"), refresh=refresh), recorder)
    wait_until(lambda: len(recorder.calls["t1"]) >= 4, timeout=10)
    calls = sorted(recorder.calls["t1"])
    gaps = [next_start - end for (_, end), (next_start, _) in itertools.pairwise(calls)]
    assert min(gaps) >= refresh * 0.99, gaps
    # Two operations on one token take turns: each is refreshed every other interval.
    assert abs(recorder.by_operation["a"] - recorder.by_operation["b"]) <= 1


def test_a_hanging_operation_never_delays_the_others(run) -> None:
    recorder = Recorder(latency=0.01)
    recorder.block["stuck"] = threading.Event()
    ops = [operation("stuck", "t-stuck"), operation("x", "t-x"), operation("y", "t-y")]
    try:
        run(config(*ops, refresh=0.05, workers=2), recorder)
        wait_until(lambda: recorder.by_operation["x"] >= 5 and recorder.by_operation["y"] >= 5, timeout=10)
        assert recorder.by_operation["stuck"] == 0
    finally:
        recorder.block["stuck"].set()


def test_failing_upstreams_that_time_out_get_at_most_half_the_workers(run) -> None:
    recorder = Recorder(latency=0.05)
    bad = [operation(f"bad{i}", f"t-bad{i}") for i in range(8)]
    good = [operation(f"good{i}", f"t-good{i}") for i in range(4)]
    for op in bad:
        recorder.fail[op.name] = "timeout"
    concurrent_bad: list[int] = []
    original = recorder.fetch

    def fetch(op: OperationConfig, api: str) -> float:
        if op.name.startswith("bad") and recorder.by_operation[op.name] >= 1:
            with recorder.lock:
                concurrent_bad.append(sum(recorder.in_flight[f"t-{o.name}"] for o in bad) + 1)
        return original(op, api)

    recorder.fetch = fetch  # type: ignore[method-assign]
    run(config(*bad, *good, refresh=0.05, workers=4), recorder)
    wait_until(lambda: min(recorder.by_operation[f"bad{i}"] for i in range(8)) >= 3, timeout=15)
    # Once known to time out, at most workers // 2 = 2 of them run at the same time.
    assert concurrent_bad and max(concurrent_bad) <= 2


def test_failures_are_reported_with_their_reason_and_retried(run) -> None:
    recorder = Recorder()
    recorder.fail["a"] = "api_error"
    run(config(operation("a", "t"), refresh=0.05), recorder)
    wait_until(lambda: len(recorder.results) >= 2, timeout=10)
    assert {r.reason for r in recorder.results} == {"api_error"}
    del recorder.fail["a"]
    wait_until(lambda: any(r.ok and r.value == 42.0 for r in recorder.results), timeout=10)


@pytest.mark.parametrize(
    ("failures", "refresh", "low", "high"),
    [
        (1, 300, 22.5, 30),
        (2, 300, 45, 60),
        (4, 300, 180, 240),
        (5, 300, 225, 300),
        (30, 300, 225, 300),
        (1, 10, 7.5, 10),  # refresh shorter than 30 s: start at refresh_interval
    ],
)
def test_retry_delay_is_capped_exponential_with_jitter(failures, refresh, low, high) -> None:
    rng = random.Random(7)
    delays = [retry_delay(failures, refresh, "timeout", rng) for _ in range(200)]
    assert low <= min(delays) and max(delays) <= high
    assert len({round(d, 6) for d in delays}) > 100  # jittered, not fixed


def test_token_limit_waits_twelve_intervals() -> None:
    rng = random.Random(3)
    assert all(3240 <= retry_delay(1, 300, "token_limit", rng) <= 3600 for _ in range(50))
    assert all(10.8 <= retry_delay(3, 1, "token_limit", rng) <= 12 for _ in range(50))


def test_reload_adds_and_removes_operations(run) -> None:
    recorder = Recorder()
    first = config(operation("a", "t-a"), operation("b", "t-b"), refresh=0.05)
    refresher = run(first, recorder)
    wait_until(lambda: recorder.by_operation["b"] >= 1, timeout=10)
    refresher.reload(replace(first, operations=(operation("a", "t-a"), operation("c", "t-c"))))
    wait_until(lambda: recorder.by_operation["c"] >= 2, timeout=10)
    frozen = recorder.by_operation["b"]
    wait_until(lambda: recorder.by_operation["c"] >= 6, timeout=10)
    assert recorder.by_operation["b"] <= frozen + 1  # at most the request in flight at reload


def test_restart_respects_the_interval_of_a_recently_used_token(run) -> None:
    recorder = Recorder()
    ops = (operation("recent", "t-recent"), operation("old", "t-old"))
    now = time.time()
    last_used = {token_key(Secret("t-recent")): now, token_key(Secret("t-old")): now - 3600}
    run(config(*ops, refresh=60), recorder, last_used=last_used)
    wait_until(lambda: recorder.by_operation["old"] >= 1, timeout=10)
    # Both lanes were considered by then; the recent one is due a full interval after its last use.
    assert recorder.by_operation["recent"] == 0


def test_token_key_is_stable_and_hides_the_token() -> None:
    assert token_key(Secret("abc")) == token_key(Secret("abc"))
    assert token_key(Secret("abc")) != token_key(Secret("abd"))
    assert "abc" not in token_key(Secret("abc"))
