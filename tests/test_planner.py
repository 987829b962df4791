"""The planner on a fake clock: the API's rules proven over simulated days, with exact counts."""

from __future__ import annotations

import itertools
import logging
import math
import random
from collections.abc import Callable

import pytest

from exporter.planner import DAY, Job, Planner, SavedPacing, plan_pace

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


def token_info_job(operation: str = "a", interval: float = 3_600.0) -> Job:
    return Job(operation, "token_info", "https://a", interval)


def test_a_token_refused_on_its_token_info_read_still_probes_its_reports():
    """After a token-wide pause the probe is the token's most overdue job: a token refused on its
    token_info read (auth) has its reports tried as they fall due, not token_info again and again."""
    jobs = reports("t", "a", ["stereo_rec"]) + reports("t", "b", ["stereo_rec"]) + [token_info_job()]
    planner, clock = make({"t": jobs})
    start = clock.now
    # The start-up burst: a, b, then token_info, which is refused; from then on every request is.
    starts = run(
        planner,
        clock,
        ["t"],
        start + 3_600,
        outcome=lambda job, now: "auth" if job.api == "token_info" or now > start + 3 else None,
    )
    for operation in ("a", "b"):
        times = starts[("t", operation, "stereo_rec")]
        assert times[0] == pytest.approx(start + (0 if operation == "a" else 1 + LATENCY))
        # Tried again once due (300 s after its answer), once the pause in progress then ended and the
        # other report had its probe: each pause at most one report interval (not token_info's hour).
        assert len(times) >= 2 and times[1] <= start + 3 * FIVE_MINUTES, times
    probes = sorted(t for times in starts.values() for t in times if t > start + 3)
    assert all(b - a >= 0.75 * 30 for a, b in itertools.pairwise(probes))  # one probe per pause
    assert len(starts[("t", "a", "token_info")]) >= 2  # and token_info takes its turn too


def test_token_limit_on_token_info_pauses_the_token_for_12_report_intervals_not_12_hours():
    planner, clock = make({"t": [*reports("t", "a", ["stereo_rec"]), token_info_job()]})
    for reason in (None, "token_limit"):  # stereo_rec answers, token_info is refused
        job, wait = planner.take("t")
        assert job is not None, wait
        planner.finished("t", job, reason)
        clock.now += 1.0
    job, wait = planner.take("t")
    assert job is None
    assert 0.9 * 12 * FIVE_MINUTES - 1 <= wait <= 12 * FIVE_MINUTES


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


# ----- time: the wall clock steps, saved state from a clock that was ahead, caps -------------------------

WALL = 1.7e9


class Clocks:
    """A fake monotonic clock and a wall clock that follows it, shifted by ``skew`` (a wall-clock step)."""

    def __init__(self) -> None:
        self.mono = FakeClock(1_000.0)
        self.skew = 0.0

    def wall(self) -> float:
        return self.mono.now + WALL + self.skew

    def planner(self, jobs: dict[str, list[Job]], limit: int = 1000, saved: SavedPacing | None = None):
        planner = Planner(clock=self.mono, wall=self.wall, rng=random.Random(3))
        if saved is not None:
            planner.restore(saved)
        planner.configure(jobs, limit)
        return planner


@pytest.mark.parametrize("skew", [2 * DAY, -25 * 3600.0])
def test_a_wall_clock_step_changes_no_due_time_only_what_is_shown(skew: float) -> None:
    clocks = Clocks()
    jobs = {"t": reports("t", "op", ["stereo_rec", "ivr_calls"])}
    planner = clocks.planner(jobs)
    run(planner, clocks.mono, ["t"], clocks.mono.now + 10)
    before = planner.take("t")[1]
    shown = planner.status()[("op", "stereo_rec")].next_due
    clocks.skew = skew
    assert planner.take("t")[1] == before  # due times run on the monotonic clock
    assert planner.status()[("op", "stereo_rec")].next_due == pytest.approx(shown + skew)
    starts = run(planner, clocks.mono, ["t"], clocks.mono.now + 3_600)
    assert all(len(times) == 12 for times in starts.values())  # an hour at the full pace, step or not


def test_a_state_saved_while_the_clock_was_ahead_is_capped_after_the_correction(caplog) -> None:
    clocks = Clocks()
    jobs = {"t": reports("t", "op", ["stereo_rec", "ivr_calls"])}
    clocks.skew = 2 * DAY  # the wall clock is two days ahead...
    planner = clocks.planner(jobs)
    run(planner, clocks.mono, ["t"], clocks.mono.now + 10, outcome=lambda job, now: "token_limit")
    saved = planner.save()
    assert saved.tokens["t"]["pause_intervals"] == 12
    clocks.skew = 0.0  # ...then corrected, and the exporter restarted
    clocks.mono.now += 5
    caplog.set_level(logging.WARNING, logger="exporter.planner")
    second = clocks.planner(jobs, saved=saved)
    job, wait = second.take("t")
    # The pause counts from when it was saved, not from two days "later": what was left of 12 intervals.
    assert job is None and 0.9 * 12 * FIVE_MINUTES - 20 <= wait <= 12 * FIVE_MINUTES
    due = second.status()[("op", "stereo_rec")].next_due
    assert due - clocks.wall() == pytest.approx(wait)  # shown on this clock, not two days ahead
    lines = [r.getMessage() for r in caplog.records if "restored pacing capped" in r.getMessage()]
    assert (
        len(lines) == 1 and "saved ahead of this clock" in lines[0] and "up to 2d too far ahead" in lines[0]
    ), lines
    # ...and the level saved ahead gets no refill for the two days it claims.
    assert second.save().tokens["t"]["level"] == pytest.approx(saved.tokens["t"]["level"], abs=0.01)


def edited(**token: float) -> SavedPacing:
    values = {"level": 0.0, "at": WALL + 1_000.0, "paused_until": 0.0} | token
    return SavedPacing(tokens={"t": values}, reports={"t": {"op/stereo_rec": WALL + 1_000.0 + 400 * DAY}})


@pytest.mark.parametrize(
    ("token", "longest"),
    [
        ({"paused_until": WALL + 30 * DAY}, 12 * FIVE_MINUTES),  # an older file: no rule saved
        ({"paused_until": WALL + 30 * DAY, "pause_intervals": 1.0}, FIVE_MINUTES),  # auth backoff
        ({"paused_until": math.inf}, 12 * FIVE_MINUTES),
        ({"paused_until": math.nan}, 12 * FIVE_MINUTES),
    ],
)
def test_a_far_future_pause_is_capped_at_its_rules_longest_and_logged_once(caplog, token, longest) -> None:
    clocks = Clocks()
    caplog.set_level(logging.WARNING, logger="exporter.planner")
    jobs = {"t": reports("t", "op", ["stereo_rec"])}
    planner = clocks.planner(jobs, saved=edited(level=1.0, **token))
    assert planner.take("t") == (None, pytest.approx(longest))
    planner.configure(jobs, 1000)  # a reload: nothing restored again, nothing logged again
    lines = [r for r in caplog.records if "restored pacing capped" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelname == "WARNING"
    assert "1 pause(s) longer than their rule allows" in lines[0].getMessage()
    clocks.mono.now += longest
    job, _ = planner.take("t")
    assert job is not None  # the token is not silenced


@pytest.mark.parametrize("level", [50.0, -1e9, math.nan])
def test_a_restored_level_stays_between_the_limits_debt_and_the_burst(caplog, level: float) -> None:
    clocks = Clocks()
    caplog.set_level(logging.WARNING, logger="exporter.planner")
    jobs = {"t": reports("t", "op", ["stereo_rec", "ivr_calls"])}
    planner = clocks.planner(jobs, limit=100, saved=edited(level=level, burst=2.0, limit=100.0))
    restored = planner.save().tokens["t"]["level"]
    assert -100 <= restored <= 2
    assert "budget level(s) beyond the burst or the limit" in caplog.text
    if level > 0:
        starts = run(planner, clocks.mono, ["t"], clocks.mono.now + DAY)
        assert max_in_window([t for times in starts.values() for t in times]) <= 100


def test_a_restored_due_time_is_at_most_one_interval_ahead() -> None:
    clocks = Clocks()
    planner = clocks.planner({"t": reports("t", "op", ["stereo_rec"])}, saved=edited(level=1.0))
    assert planner.take("t") == (None, pytest.approx(FIVE_MINUTES))


# ----- a first full picture under a tight budget -----------------------------------------------------------


def test_four_services_on_a_budget_of_ten_are_all_fetched_at_start() -> None:
    apis = ["stereo_rec", "ivr_minutes", "amd_ai", "ivr_calls"]
    pace = plan_pace([FIVE_MINUTES] * 4, 10)
    assert pace.burst == 4 and pace.refill_per_second * DAY == 6
    planner, clock = make({"t": reports("t", "op", apis)}, limit=10)
    start = clock.now
    starts = run(planner, clock, ["t"], start + DAY)
    assert sorted(times[0] - start for times in starts.values()) == pytest.approx([0.0, 1.25, 2.5, 3.75])
    assert max_in_window([t for times in starts.values() for t in times]) <= 10
    # Then 6 a day for 4 reports: each one about every 16 hours (the price of the larger burst).
    assert all(times[1] - times[0] == pytest.approx(4 * DAY / 6, abs=10) for times in starts.values())


def test_beyond_half_the_limit_half_of_it_comes_at_start_and_the_rest_spreads_out() -> None:
    apis = [f"api{i}" for i in range(7)]
    assert plan_pace([FIVE_MINUTES] * 7, 10).burst == 5
    planner, clock = make({"t": reports("t", "op", apis)}, limit=10)
    start = clock.now
    starts = run(planner, clock, ["t"], start + DAY)
    firsts = sorted(times[0] - start for times in starts.values())
    assert firsts[4] < 10 < DAY / 5 / 2 < firsts[5]  # five back to back, then one per 1/5 day


def reload_and_restart_churn(limit: int, counts: list[int], seed: int) -> list[float]:
    """One token over two days: every 3 hours a reload to the next number of reports (or a restart from
    what was saved), with failures now and then; returns the start time of every request."""
    clocks = Clocks()
    rng = random.Random(seed)

    def jobs(n: int) -> dict[str, list[Job]]:
        return {"t": reports("t", "op", [f"api{i}" for i in range(n)])}

    planner = clocks.planner(jobs(counts[0]), limit)
    starts: list[float] = []
    for step, n in enumerate(counts * 2):
        if step and rng.random() < 0.3:
            planner = clocks.planner(jobs(n), limit, saved=planner.save())  # a restart, a new planner
        else:
            planner.configure(jobs(n), limit)
        reason = rng.choice([None, "http_status", "timeout"])
        got = run(planner, clocks.mono, ["t"], clocks.mono.now + 3 * 3_600, lambda job, now, r=reason: r)
        starts += [t for times in got.values() for t in times]
    return starts


@pytest.mark.parametrize("limit", [1, 2, 3, 5, 10, 30, 100])
def test_no_24_hours_hold_more_than_the_limit_through_reloads_restarts_and_failures(limit: int) -> None:
    # Every number of reports from 1 to past the limit, changing every 3 hours in an order drawn per
    # seed: the bucket's burst grows and shrinks, restarts restore it, failures retry.
    for seed in range(4):
        counts = list(range(1, limit + 3))
        random.Random(seed).shuffle(counts)
        starts = reload_and_restart_churn(limit, counts[:8], seed)
        assert max_in_window(starts) <= limit, (seed, counts[:8])


def test_a_reload_that_shrinks_the_burst_charges_the_bucket() -> None:
    # 5 reports on a limit of 10 spend the burst of 5 at start; down to one report the refill would be 9
    # a day: without the charge for the smaller burst, that day would hold 14 requests.
    planner, clock = make({"t": reports("t", "op", [f"api{i}" for i in range(5)])}, limit=10)
    starts = run(planner, clock, ["t"], clock.now + 60)
    planner.configure({"t": reports("t", "op", ["api0"])}, 10)
    more = run(planner, clock, ["t"], clock.now + 2 * DAY)
    every = [t for times in [*starts.values(), *more.values()] for t in times]
    assert 9 <= max_in_window(every) <= 10


def test_no_24_hours_hold_more_than_the_limit_for_every_small_budget_and_number_of_reports() -> None:
    # Exhaustive over small budgets: every limit up to 24 and every number of reports up to past it, two
    # days each, every request answered at once (the fastest a token can spend) or failing and retried.
    for limit in range(1, 25):
        for count in range(1, limit + 3):
            for reason in (None, "http_status"):
                planner, clock = make({"t": reports("t", "op", [f"api{i}" for i in range(count)])}, limit)
                starts = run(planner, clock, ["t"], clock.now + 2 * DAY, lambda job, now, r=reason: r)
                every = [t for times in starts.values() for t in times]
                assert max_in_window(every) <= limit, (limit, count, reason)
                # The first full picture: every report at once while they are at most half the limit.
                if count <= limit // 2:
                    assert len(starts) == count and max(t[0] for t in starts.values()) < 1_000.0 + 60


def test_a_lower_limit_by_reload_waits_at_most_a_day_and_then_keeps_the_new_limit() -> None:
    planner, clock = make({"t": reports("t", "op", [f"api{i}" for i in range(14)])}, limit=1000)
    before = [t for times in run(planner, clock, ["t"], clock.now + 3_600).values() for t in times]
    changed = clock.now
    planner.configure({"t": reports("t", "op", [f"api{i}" for i in range(14)])}, 100)
    after = [t for times in run(planner, clock, ["t"], clock.now + 3 * DAY).values() for t in times]
    assert changed < min(after) <= changed + DAY  # charged for the smaller limit, but not forever
    assert max_in_window(after) <= 100
    assert max_in_window(before + after) <= max(100, max_in_window(before))
