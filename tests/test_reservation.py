"""Reservations (exporter/reservation.py) on a fake clock, with a real planner and a fake store that commits
when told: a request is sent only when the token's newest committed row restores, by the planner's own
restore (a new planner started from that row), at most the level the bucket has after the request; and
how few rows that takes."""

from __future__ import annotations

import concurrent.futures
import json
import math
import random
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from exporter.planner import DAY, Job, Planner, SavedPacing
from exporter.reservation import Reservations, margin_of, reserved

KEY = "0123456789abcdef"
WALL = 1_796_083_800.0  # 2026-12-01 00:50 UTC
JOBS = {KEY: [Job("a", "stereo_rec", "s", 60.0), Job("a", "ivr_minutes", "s", 60.0)]}  # a burst of 2


@dataclass
class FakeStore:
    """``StateStore.spend`` as reservations use it: rows are committed, in the order handed, by ``commit``."""

    handed: list[tuple[str, dict[str, float], concurrent.futures.Future[None]]] = field(default_factory=list)
    committed: dict[str, dict[str, float]] = field(default_factory=dict)  # each token's newest row
    rows: int = 0

    def spend(
        self, token: str, level: float, at: float, paused_until: float, extra: dict[str, float] | None = None
    ) -> concurrent.futures.Future[None]:
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        row = {**(extra or {}), "level": level, "at": at, "paused_until": paused_until}
        self.handed.append((token, row, future))
        self.rows += 1
        return future

    def put_token(
        self, token: str, level: float, at: float, paused_until: float, extra: dict[str, float] | None = None
    ) -> None:
        self.spend(token, level, at, paused_until, extra)  # no one learns when it is committed

    def commit(self, count: int | None = None) -> None:
        """Commit the rows handed (the first ``count`` of them: a transaction may begin before the next)."""
        count = len(self.handed) if count is None else count
        for token, row, future in self.handed[:count]:
            self.committed[token] = row
            future.set_result(None)
        del self.handed[:count]


class Token:
    """One token driven as the refresher drives it: a planner on a fake clock (its own), reservations over
    a fake store (shared with other tokens when ``shared`` is another Token). ``spend`` takes the next
    request, waiting for the bucket as needed."""

    def __init__(
        self, limit: int, saved: SavedPacing | None = None, *, key: str = KEY, shared: Token | None = None
    ) -> None:
        self.key = key
        self.jobs = {key: JOBS[KEY]}
        self.now = 0.0
        self.commit_after_answer = True  # a transaction between two requests (the store's is every second)
        self.limit = limit
        self.planner = Planner(clock=lambda: self.now, wall=self.wall, rng=random.Random(3), gap=1.0)
        self.store = shared.store if shared is not None else FakeStore()
        self.reservations = shared.reservations if shared is not None else Reservations(self.store)
        self.group: list[Token] = shared.group if shared is not None else []  # tokens of one exporter
        self.group.append(self)
        if saved is not None:
            self.planner.restore(saved)
            self.reservations.restore(saved.tokens)
        self.configure(limit)
        self.waits = 0  # spends whose request had to wait for a commit

    def wall(self) -> float:
        return WALL + self.now

    def configure(self, limit: int) -> None:
        self.limit = limit
        self.planner.configure(self.jobs, limit)
        self.reservations.paced({key: row for t in self.group for key, row in t.bucket_of_all().items()})

    def bucket_of_all(self) -> dict[str, dict[str, float]]:
        return self.planner.save(reports=False).tokens

    def bucket(self) -> dict[str, float]:
        return self.planner.save((self.key,), reports=False).tokens[self.key]

    def take(self) -> tuple[Job, concurrent.futures.Future[None] | None]:
        while True:
            job, wait = self.planner.take(self.key)
            if job is not None:
                return job, self.reservations.spend(self.key, self.bucket())
            assert math.isfinite(wait)
            self.now += wait

    def spend(
        self, reason: str | None = None, *, commit: bool = True
    ) -> concurrent.futures.Future[None] | None:
        """One request: taken, made durable (the store commits when ``commit``), checked, answered."""
        job, durable = self.take()
        if durable is not None:
            self.waits += 1
            if commit:
                self.store.commit()
                assert durable.done()
                self.check()
        else:
            self.check()
        self.answer(job, reason)
        return durable

    def answer(self, job: Job, reason: str | None) -> None:
        self.now += 0.25
        self.planner.finished(self.key, job, reason)
        if reason in ("token_limit", "auth"):
            self.reservations.pause(self.key, self.bucket())
        if self.commit_after_answer:
            self.store.commit()

    def restored(self, row: dict[str, float] | None = None) -> float:
        """What a restart now makes of ``row`` (the newest committed one): the planner's own restore."""
        row = row if row is not None else self.store.committed[self.key]
        planner = Planner(clock=lambda: 0.0, wall=self.wall)
        planner.restore(SavedPacing(tokens={self.key: row}))
        planner.configure(self.jobs, self.limit)
        return planner.save((self.key,), reports=False).tokens[self.key]["level"]

    def check(self) -> None:
        """The invariant, as a request is sent: a restart now would not find more budget than there is."""
        assert self.key in self.store.committed, "a request sent with nothing committed"
        true = self.bucket()["level"]
        assert self.restored() <= true + 1e-9, f"a restart would restore {self.restored()} > {true}"


def test_the_margin_is_one_percent_of_the_daily_limit() -> None:
    assert [margin_of(limit) for limit in (10, 99, 100, 1000, 1999)] == [0, 0, 1, 10, 19]
    assert reserved(3.7, WALL + 0.2, 10, 1000) == (-7.0, WALL + 1.0)  # whole numbers, down and up
    assert reserved(-995.5, WALL, 10, 1000) == (-999.0, WALL)  # never below -limit + 1...
    assert reserved(-1000.5, WALL, 10, 1000) == (-1001.0, WALL)  # ...unless the bucket itself is
    assert reserved(0.25, WALL + 0.2, 0, 10) == (0.25, WALL + 0.2)  # margin 0: the bucket itself


def test_a_lone_token_commits_ahead_and_waits_only_for_its_first_spend() -> None:
    token = Token(limit=1000)  # margin 10
    for _ in range(50):
        token.spend()
    # The first spend waits for its reservation; every later one finds the next committed ahead. Alone,
    # the token learns of an ahead row's commit only from an urgent row of its own (a quarter margin
    # before it needs it): at most a row per quarter margin of spends, never one per spend.
    assert token.waits == 1
    margin = margin_of(1000)
    assert 50 / (margin + 1) <= token.store.rows <= math.ceil(50 / (margin / 4)) + 1, token.store.rows


def test_many_tokens_commit_about_a_row_per_half_margin_of_spends() -> None:
    """With many tokens, the urgent rows of some make the ahead rows of all known committed."""
    first = Token(limit=1000, key="token-0")
    tokens = [first] + [Token(limit=1000, key=f"token-{i}", shared=first) for i in range(1, 20)]
    for _ in range(50):
        for token in tokens:
            token.spend()
    assert sum(token.waits for token in tokens) == len(tokens)  # each token's first spend only
    margin = margin_of(1000)
    per_token = first.store.rows / len(tokens)
    assert per_token <= math.ceil(50 / (margin / 2)) + 1, per_token


def test_a_restart_right_after_a_reservation_costs_at_most_its_margin() -> None:
    token = Token(limit=1000)
    token.spend()
    true = token.bucket()["level"]
    assert true - 10 - 1 <= token.restored() <= true  # floor(level - 10): at most 11 requests, whole ones


def test_below_a_limit_of_100_every_spend_is_committed_before_its_request() -> None:
    token = Token(limit=10)  # margin 0
    for _ in range(12):
        token.spend()
    assert token.waits == 12
    assert token.store.rows == 12
    assert token.restored() == pytest.approx(token.bucket()["level"], abs=1e-6)  # the bucket itself


def test_a_spend_covered_only_by_a_row_on_its_way_waits_for_it() -> None:
    token = Token(limit=1000)
    token.commit_after_answer = False  # nothing is committed unless a request waits for it
    token.spend()
    durable = None
    while durable is None:  # covered by the committed row, while rows are handed ahead
        rows = token.store.rows
        durable = token.spend(commit=False)
    assert token.store.rows == rows  # the request waits for a row on its way, not for another one
    assert durable is token.reservations.rows_of(KEY)[1][-1].done
    assert not durable.done()
    token.store.commit()
    token.check()


def test_a_row_handed_ahead_is_known_committed_once_a_later_urgent_row_is() -> None:
    a = Token(limit=1000, key="token-a")
    a.commit_after_answer = False
    a.spend()
    while not a.reservations.rows_of("token-a")[1]:
        a.spend()
    ahead = a.reservations.rows_of("token-a")[1][-1]
    assert ahead.done is None  # handed without urgency
    b = Token(limit=1000, key="token-b", shared=a)
    b.spend()  # its first spend is urgent: the store commits it, and the row handed before it
    a.spend()
    assert a.reservations.rows_of("token-a")[0] is ahead


def test_an_orderly_stop_writes_the_buckets_themselves() -> None:
    token = Token(limit=1000)
    for _ in range(3):
        token.spend()
    assert token.restored() <= token.bucket()["level"] - 5  # reserved
    token.reservations.release(token.bucket_of_all())
    token.store.commit()
    assert token.restored() == pytest.approx(token.bucket()["level"], abs=1e-6)  # nothing lost
    rows = token.store.rows
    token.reservations.release(token.bucket_of_all())  # nothing reserved any more: nothing written
    token.reservations.release({KEY: {"level": 0.0, "at": WALL}})  # restored, never run: not a bucket
    assert token.store.rows == rows


def test_a_spend_covered_by_a_row_handed_ahead_waits_for_another_tokens_urgent_row() -> None:
    a = Token(limit=1000, key="token-a")
    a.commit_after_answer = False
    a.spend()
    while not a.reservations.rows_of("token-a")[1]:
        a.spend()  # until a row is handed ahead, without urgency
    b = Token(limit=1000, key="token-b", shared=a)
    b.commit_after_answer = False
    urgent = b.spend(commit=False)  # b's first spend: urgent, not committed yet
    assert urgent is not None
    durable, rows = None, a.store.rows
    while durable is None:
        durable = a.spend(commit=False)
    assert durable is urgent  # its commit brings a's row ahead with it: no row of a's own
    assert a.store.rows == rows
    a.store.commit()
    a.check()


def test_after_a_failed_write_every_token_commits_again() -> None:
    token = Token(limit=1000)
    token.spend()
    assert token.spend() is None
    token.reservations.forget()
    assert token.spend() is not None


def test_a_pause_keeps_the_reservation() -> None:
    token = Token(limit=1000)
    for _ in range(3):
        token.spend()
    before = token.restored()
    true = token.bucket()["level"]
    token.spend("auth")  # covered by the reservation; the pause writes a row
    after = token.restored()
    assert after <= token.bucket()["level"] + 1e-9
    assert after <= before  # not the true level: the margin is kept (whole requests, rounded down)
    assert before - after <= 1.0 + 1e-9
    assert token.store.committed[KEY]["paused_until"] > token.wall()
    assert true - 1 > after  # the pause row did not give the margin away
    rows = token.store.rows
    assert token.spend() is None  # after the pause: still covered, nothing to commit or wait for
    assert token.store.rows == rows


def test_a_change_of_pace_hands_a_row_of_the_new_pace() -> None:
    token = Token(limit=1000)
    for _ in range(3):
        token.spend()
    token.configure(200)  # a reload: a smaller limit (a debt), a slower refill
    assert token.store.handed, "no row of the new pace"
    token.store.commit()
    assert token.store.committed[KEY]["limit"] == 200
    for hours in (0, 1, 6, 20):  # the old row would refill at its old pace, faster than the bucket now
        token.now += hours * 3600.0
        token.check()
    for _ in range(5):
        token.spend()


def test_a_restarted_exporter_commits_only_when_its_restored_row_no_longer_covers() -> None:
    first = Token(limit=1000)
    for _ in range(4):
        first.spend()
    saved = SavedPacing(tokens={KEY: first.store.committed[KEY]})
    second = Token(limit=1000, saved=saved)
    second.now = first.now
    assert second.store.rows == 0  # nothing written at start: the restored row is committed already
    second.spend()
    assert second.waits == 1  # the restored level is the row's: the first spend needs a new reservation
    for _ in range(8):
        second.spend()
    assert second.waits == 1


def test_a_token_removed_by_a_reload_commits_again_when_it_comes_back() -> None:
    token = Token(limit=1000)
    token.spend()
    token.planner.configure({}, 1000)
    token.reservations.paced({})
    assert token.reservations.rows_of(KEY) == (None, ())
    token.configure(1000)  # re-added: the planner kept its bucket
    assert token.spend() is not None  # nothing known of its rows: the first spend commits


@pytest.mark.parametrize("seed", range(8))
def test_random_commits_pauses_and_reloads_never_send_an_uncovered_request(seed: int) -> None:
    """Whatever the order of commits, pauses and changes of pace, every request is sent covered."""
    rng = random.Random(seed)
    token = Token(limit=1000)
    token.commit_after_answer = False  # rows handed may stay uncommitted for many requests
    for _ in range(300):
        roll = rng.random()
        if roll < 0.03:
            token.configure(rng.choice([10, 150, 300, 1000, 5000]))
        elif roll < 0.3:
            token.store.commit(rng.randint(0, len(token.store.handed)))
        elif roll < 0.35:
            token.now += rng.uniform(0, DAY / 4)
        reason = rng.choice([None] * 12 + ["token_limit", "auth", "timeout"])
        job, durable = token.take()
        if durable is not None:
            token.store.commit()  # the request waits for it
            assert durable.done()
        token.check()
        token.answer(job, reason)
    assert token.store.rows < 300


def test_the_benchmark_counts_fewer_budget_rows_than_requests() -> None:
    """benchmarks/reservation_bench.py at a small size, so that it keeps working."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "reservation_bench.py"
    done = subprocess.run(
        [sys.executable, str(script), "--tokens", "50", "--minutes", "40"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["waited"] == 50  # each token's first request after the start, and no other
    assert result["requests"] > 50 * 10
    assert result["budget_rows"] < result["requests"] / 3, result
