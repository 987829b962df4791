"""The planner on a fake clock: the API's rules proven over simulated days, with exact counts."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable

import pytest

from exporter.planner import DAY, Job, Planner, plan_pace

FIVE_MINUTES = 300.0
LATENCY = 0.25


class FakeClock:
    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def make(jobs: dict[str, list[Job]], limit: int = 1000, start: float = 1_000.0) -> tuple[Planner, FakeClock]:
    clock = FakeClock(start)
    # The wall clock is the fake clock shifted, so saved wall times differ from monotonic ones.
    planner = Planner(clock=clock, wall=lambda: clock.now + 1.7e9, rng=random.Random(7))
    planner.configure(jobs, limit)
    return planner, clock


def reports(token: str, operation: str, apis: list[str], server: str = "https://a", interval: float = 300.0):
    return [Job(operation, api, server, interval) for api in apis]


Outcome = Callable[[Job, float], str | None]


def run(planner: Planner, clock: FakeClock, tokens: list[str], until: float, outcome: Outcome | None = None):
    """Drive the planner as the lanes would (each request answers after LATENCY); returns the start
    times of every request per (token, operation, api), and checks one request per token at a time."""
    starts: dict[tuple[str, str, str], list[float]] = {}
    in_flight: dict[str, tuple[Job, float]] = {}  # token -> (job, answer time)
    while clock.now < until:
        waits = []
        for token in tokens:
            if token in in_flight:
                assert planner.take(token) == (None, math.inf), "a busy token got a second job"
                waits.append(in_flight[token][1] - clock.now)
                continue
            job, wait = planner.take(token)
            if job is None:
                waits.append(wait)
                continue
            starts.setdefault((token, job.operation, job.api), []).append(clock.now)
            in_flight[token] = (job, clock.now + LATENCY)
            waits.append(LATENCY)
        step = min(waits)
        assert step < math.inf
        clock.now = min(clock.now + max(step, 0.0), until)  # never past the end of the run
        for token, (job, answer_at) in list(in_flight.items()):
            if answer_at <= clock.now:
                del in_flight[token]
                planner.finished(token, job, outcome(job, clock.now) if outcome else None)
    return starts


def max_in_window(times: list[float], window: float = DAY) -> int:
    times = sorted(times)
    best, left = 0, 0
    for right, t in enumerate(times):
        while times[left] <= t - window:
            left += 1
        best = max(best, right - left + 1)
    return best


def test_four_services_on_one_token_all_fetched_at_start_then_each_every_interval():
    apis = ["stereo_rec", "ivr_minutes", "amd_ai", "ivr_calls"]
    # 4 reports every 5 minutes are 1,152 requests a day: this token's licence allows 2,000.
    planner, clock = make({"t": reports("t", "bogota", apis)}, limit=2000)
    start = clock.now
    starts = run(planner, clock, ["t"], start + DAY)
    firsts = sorted(times[0] - start for times in starts.values())
    # Back to back: each answer (0.25 s) plus the 1 s gap before the next request of the token.
    assert firsts == pytest.approx([0.0, 1.25, 2.5, 3.75])
    for times in starts.values():
        gaps = [b - a for a, b in itertools.pairwise(times)]
        # Due a full interval after the answer: starts are exactly interval + latency apart.
        assert gaps == pytest.approx([FIVE_MINUTES + LATENCY] * len(gaps))
        assert len(times) == math.floor((start + DAY - times[0]) / (FIVE_MINUTES + LATENCY)) + 1


def test_two_operations_sharing_a_token_keep_every_report_fresh():
    jobs = reports("t", "bogota", ["stereo_rec", "ivr_minutes"]) + reports("t", "lima", ["stereo_rec"])
    planner, clock = make({"t": jobs})
    starts = run(planner, clock, ["t"], clock.now + 3_600)
    assert set(starts) == {
        ("t", "bogota", "stereo_rec"),
        ("t", "bogota", "ivr_minutes"),
        ("t", "lima", "stereo_rec"),
    }
    for times in starts.values():
        assert len(times) == 12  # an hour of 5-minute refreshes, each one after its answer
        assert min(b - a for a, b in itertools.pairwise(times)) >= FIVE_MINUTES


def test_a_token_past_its_budget_is_stretched_evenly_and_never_exceeds_it():
    apis = [f"api{i}" for i in range(14)]
    planner, clock = make({"t": reports("t", "op", apis)}, limit=1000)
    pace = plan_pace([FIVE_MINUTES] * 14, 1000)
    assert pace.burst == 14
    assert FIVE_MINUTES * pace.stretch == pytest.approx(14 * DAY / 986)  # ~20 minutes per report
    starts = run(planner, clock, ["t"], clock.now + 3 * DAY)
    every = [t for times in starts.values() for t in times]
    assert max_in_window(every) <= 1000
    assert max_in_window(every) >= 990  # the budget is used, not wasted
    for times in starts.values():
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert min(gaps) >= FIVE_MINUTES * pace.stretch


def test_failures_and_retries_stay_inside_the_budget():
    planner, clock = make({"t": reports("t", "op", ["stereo_rec", "ivr_calls"])}, limit=100)
    starts = run(planner, clock, ["t"], clock.now + 2 * DAY, outcome=lambda job, now: "http_status")
    every = [t for times in starts.values() for t in times]
    assert 98 <= max_in_window(every) <= 100  # burst 2, then 98 a day


def test_unknown_api_does_not_slow_the_other_reports_of_its_token():
    jobs = reports("t", "op", ["stereo_rec", "no_such_api", "ivr_calls"])
    planner, clock = make({"t": jobs})
    starts = run(
        planner,
        clock,
        ["t"],
        clock.now + 3_600,
        outcome=lambda job, now: "unknown_api" if job.api == "no_such_api" else None,
    )
    assert len(starts[("t", "op", "stereo_rec")]) == 12
    assert len(starts[("t", "op", "ivr_calls")]) == 12
    retries = starts[("t", "op", "no_such_api")]
    assert 12 < len(retries) < 30  # backs off from 30 s to the interval


def test_token_limit_pauses_the_whole_token():
    planner, clock = make({"t": reports("t", "op", ["stereo_rec", "ivr_calls"])})
    job, _ = planner.take("t")
    assert job is not None
    planner.finished("t", job, "token_limit")
    clock.now += 5.0
    job, wait = planner.take("t")
    assert job is None
    assert 0.9 * 12 * FIVE_MINUTES - 5 <= wait <= 12 * FIVE_MINUTES


def test_a_timeout_pauses_reports_to_that_server_only():
    jobs = reports("t", "a", ["stereo_rec"], server="https://hangs") + reports(
        "t", "b", ["stereo_rec"], server="https://ok"
    )
    planner, clock = make({"t": jobs})
    starts = run(
        planner,
        clock,
        ["t"],
        clock.now + 3_600,
        outcome=lambda job, now: "timeout" if job.server == "https://hangs" else None,
    )
    assert len(starts[("t", "b", "stereo_rec")]) == 12
    assert len(starts[("t", "a", "stereo_rec")]) < 30


def test_tokens_are_independent_and_each_serves_one_request_at_a_time():
    jobs = {f"t{i}": reports(f"t{i}", f"op{i}", ["stereo_rec", "ivr_calls"]) for i in range(50)}
    planner, clock = make(jobs)
    starts = run(planner, clock, list(jobs), clock.now + 1_000)
    # Every token got its two reports in at start-up, side by side with the others.
    assert all(
        starts[(f"t{i}", f"op{i}", "ivr_calls")][0] - 1_000.0 == pytest.approx(1.25) for i in range(50)
    )


def test_a_restart_with_saved_pacing_neither_refetches_nor_refills():
    jobs = {"t": reports("t", "op", ["stereo_rec", "ivr_calls"])}
    planner, clock = make(jobs, limit=1000)
    run(planner, clock, ["t"], clock.now + 10)
    saved = planner.save()
    clock.now += 60  # down for a minute
    second = Planner(clock=clock, wall=lambda: clock.now + 1.7e9)
    second.restore(saved)
    second.configure(jobs, 1000)
    job, wait = second.take("t")
    assert job is None
    assert FIVE_MINUTES - 70 < wait <= FIVE_MINUTES - 60 + LATENCY
    # Both requests of the burst were spent; ten seconds of refill at 998 a day are left.
    assert saved.tokens["t"]["level"] == pytest.approx(10 * 998 / DAY, abs=1e-3)


def test_a_reload_keeps_the_pacing_of_what_stays():
    jobs = {"t": reports("t", "op", ["stereo_rec"])}
    planner, clock = make(jobs)
    run(planner, clock, ["t"], clock.now + 5)
    planner.configure({"t": reports("t", "op", ["stereo_rec", "ivr_calls"])}, 1000)
    job, wait = planner.take("t")
    assert job is None and wait < 100  # the budget's one-request burst is spent; it refills in ~86 s
    clock.now += wait
    job, _ = planner.take("t")
    assert job is not None and job.api == "ivr_calls"  # the new report is due, the old one is not
