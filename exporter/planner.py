"""The wolkvox API's rules as pure code: when each report is due and when each token may be used next.

The rules, as the vendor states them (``docs/wolkvox-api.md``), and how they are kept here:

* **One request at a time per token.** A token is *busy* from ``take`` until ``finished``; its next
  request may start ``gap`` seconds (1 s) after the previous one answered.
* **Each report at most once per ``refresh_interval``.** A report is one (operation, api) pair; after a
  success it is due again a full interval after the answer arrived.
* **A daily request budget per token** (``daily_request_limit``), a hard limit: a token bucket of
  ``burst`` requests refilled at ``(limit - burst) / day``, so that no window of 24 hours ever holds more
  than ``limit`` requests, whatever happens (failures and retries included). When the reports of a token
  would need more than the refill rate, every interval of the token is stretched by the same factor
  (``pace``): 14 reports at 1,000 a day are each refreshed about every 20 minutes.
* **A first full picture at start:** the burst is the token's number of reports while that is at most half
  its limit, so every report is fetched once at start (back to back); beyond half, the burst is half the
  limit and the remaining reports follow at the refill rate. A larger burst leaves a smaller refill, so a
  tight budget refreshes a little more slowly afterwards (10 a day and 4 reports: each about every 16 h
  instead of every 11 h with a burst of one).
* **A change of pace keeps the guarantee:** when a reload changes a token's burst or limit (or a restart
  finds a different one saved), the bucket's level drops by what the burst or the limit shrank (it may go
  below zero: a debt, paid by waiting, never longer than a day), so a window of 24 hours that spans the
  change holds no more than the new limit either (or than the old requests it already held).
* **Failures back off where they belong:** ``auth`` and ``token_limit`` pause the whole token, for a time
  counted in its reports' interval whichever job met them (token_info included); the job that failed is
  due again when the pause ends, behind those that fell due before, so the first request after the pause
  (the probe) is the token's most overdue job: a token refused on its token_info read still has each
  report tried as it falls due (one per pause). ``timeout`` and ``connection`` pause every report sent to
  that server (``Job.server``); any other reason delays only the report that failed (an unknown api must
  not slow its token's other reports).

Time: every due time, pause and bucket level runs on the injected monotonic ``clock``; the ``wall`` clock
(Unix time) is read only to show (``status``), save (``save``) and restore, so a step of the wall clock
changes neither a due time nor the budget. What is restored from saved state is capped to what the rules
could have produced: a report due at most one interval ahead, a token's pause at most its rule's longest
(12 intervals after ``token_limit``, one interval of backoff after ``auth``), a bucket level at most its
burst (and a debt at most the limit); a state saved "in the future" (the wall clock was ahead then, or is
behind now) gets no refill for the time between. Anything capped beyond its rule is logged once, in one
line.

No threads, no I/O but that line, no sleeping: the caller passes nothing but calls, the clock is injected,
and ``take`` says either which job to run now or how long to wait. ``exporter/refresher.py`` carries it out.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from exporter.clock import about
from exporter.model import TOKEN_WIDE, ReportStatus

log = logging.getLogger(__name__)

DAY = 86_400.0
TOKEN_GAP = 1.0  # seconds between an answer and the next request on the same token
FIRST_RETRY = 30.0
TOKEN_LIMIT_PAUSE_INTERVALS = 12  # after TOKEN LIMIT EXCEEDED: 12 intervals, one hour at 5 m
BURST_SHARE = 2  # the start-up burst: every report while they are at most half the daily budget
AHEAD_TOLERANCE = 1.0  # seconds a saved time may lie ahead of what its rule allows before it is "capped"

SERVER_WIDE = frozenset({"timeout", "connection"})


@dataclass(frozen=True, slots=True)
class Job:
    """One request to plan: a report (operation, api) or a token_info read; ``server`` is where it goes
    (the operation's base URL and wolkvox server), the scope of timeouts and refused connections."""

    operation: str
    api: str
    server: str
    interval: float  # the configured interval: refresh_interval, or token_info_interval


@dataclass(frozen=True, slots=True)
class Pace:
    """What the budget allows one token: ``stretch`` >= 1 multiplies every configured interval."""

    burst: int
    refill_per_second: float
    demand_per_day: float  # requests per day the configured intervals ask for
    stretch: float
    limit: int = 0  # the daily_request_limit it was planned for


def plan_pace(intervals: Sequence[float], daily_limit: int) -> Pace:
    """The budget of one token serving jobs with these configured intervals: a burst of every job while
    they are at most half the limit (a first full picture at start), else of half the limit."""
    burst = max(1, min(len(intervals), daily_limit // BURST_SHARE))
    refill = max(daily_limit - burst, 1) / DAY  # per second; a limit of 1 still refreshes once a day
    demand = sum(DAY / interval for interval in intervals)
    stretch = max(1.0, demand / (refill * DAY)) if demand > 0 else 1.0
    return Pace(
        burst=burst, refill_per_second=refill, demand_per_day=demand, stretch=stretch, limit=daily_limit
    )


def charged(level: float, old: Pace, new: Pace) -> float:
    """A token's bucket level when its pace changes from ``old`` to ``new``. A smaller burst means a faster
    refill from now on, a smaller limit a smaller allowance: either is paid for at once (the level drops
    by the difference), or a window of 24 hours spanning the change could hold more than the limit. The
    debt never asks for more than a day of waiting: after a day without a request, no window holds a
    request of the old pace, and the new bucket alone keeps the guarantee."""
    debt = min(0, new.burst - old.burst, new.limit - old.limit)
    return max(min(level + debt, float(new.burst)), 1.0 - new.refill_per_second * DAY)


def restored_level(level: float, at: float, burst: float, limit: float, wall: float, pace: Pace) -> float:
    """What a restart at wall time ``wall`` on ``pace`` makes of a bucket saved at ``at`` with ``level`` on
    the pace (``burst``, ``limit``): the level capped to [-limit, burst] (0 when it is not a number),
    refilled at that pace for the time since (none for a time "ahead"), then ``charged`` for the change to
    ``pace``. The one formula of a restore: the state store's reservations (``exporter/reservation.py``)
    ask it what a restart would make of a row they committed."""
    old = saved_pace(burst, limit)
    if not -old.limit <= level <= old.burst:  # NaN too
        level = min(max(level, -old.limit), old.burst) if math.isfinite(level) else 0.0
    level = min(float(old.burst), level + max(0.0, wall - at) * old.refill_per_second)
    return charged(level, old, pace)


def saved_pace(burst: float, limit: float) -> Pace:
    """The pace a saved bucket was sized by, from its saved ``burst`` and ``limit`` (whole numbers, at
    least 1, a limit at least the burst)."""
    whole = max(1, int(burst))
    most = max(whole, int(limit))
    return Pace(whole, max(most - whole, 1) / DAY, 0.0, 1.0, most)


def retry_delay(failures: int, interval: float, rng: random.Random) -> float:
    """Seconds to wait after the ``failures``-th failure in a row: 30 s doubling up to ``interval``,
    jittered downwards only so the cap always holds."""
    first = min(FIRST_RETRY, interval)
    delay = min(first * 2 ** min(failures - 1, 30), interval)
    return delay * rng.uniform(0.75, 1.0)


@dataclass(slots=True)
class _Report:
    job: Job
    interval: float  # in use: the configured one times the token's stretch
    due: float = 0.0
    failures: int = 0


@dataclass(slots=True)
class _Token:
    # A list, not a dict by (operation, api): most tokens have one or a few reports and ``take`` reads
    # them all anyway, so a dict and its key tuples would only cost memory.
    reports: list[_Report]
    pace: Pace
    level: float  # requests left in the bucket
    updated: float  # when ``level`` was last refilled
    busy: bool = False
    free_at: float = 0.0
    paused_until: float = 0.0
    pause_intervals: int = 0  # the longest pause, in intervals, the rule behind the current one sets
    failures: int = 0  # token-wide failures (auth, token_limit) in a row


@dataclass(slots=True)
class _Server:
    failures: int = 0
    paused_until: float = 0.0


@dataclass
class SavedPacing:
    """What survives a restart (wall-clock times): per token its bucket and pause, per report its due
    time. Keys are token keys (never tokens) and ``operation/api``.

    A token's entry: ``level`` (requests left, may be negative: a debt), ``at`` (when it was saved),
    ``paused_until``; and since this exporter caps what it restores, ``pause_intervals`` (the longest
    pause, in intervals, of the rule behind ``paused_until``: 12 for token_limit, 1 for backoff),
    ``burst`` and ``limit`` (the pace the level belongs to). Each of these three is optional: without
    it the pause is capped at 12 intervals and the level taken as of the current pace."""

    tokens: dict[str, dict[str, float]] = field(default_factory=dict)
    reports: dict[str, dict[str, float]] = field(default_factory=dict)


class Planner:
    """Every token's reports and budget. Not thread-safe: one event loop owns it."""

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        wall: Callable[[], float],
        rng: random.Random | None = None,
        gap: float = TOKEN_GAP,
    ) -> None:
        self._clock = clock
        self._wall = wall
        self._rng = rng or random.Random()
        self._gap = gap
        self._tokens: dict[str, _Token] = {}
        self._servers: dict[str, _Server] = {}
        self._saved = SavedPacing()
        # Tokens a reload removed, with when: re-added within a day, a token keeps its bucket and pause
        # (removing and re-adding an operation must not refill its budget).
        self._retired: dict[str, tuple[_Token, float]] = {}

    # ----- configuration ---------------------------------------------------------------------------

    def configure(self, jobs_by_token: Mapping[str, Sequence[Job]], daily_limit: int) -> dict[str, Pace]:
        """Take the jobs of every token (by token key). A token or report that stays keeps its state (a
        reload never re-fetches or refills; a change of pace is ``charged`` to the bucket); new ones
        are due now, or when the restored state says, capped to what the rules allow."""
        now = self._clock()
        capped = _Capped()
        tokens: dict[str, _Token] = {}
        paces: dict[str, Pace] = {}
        shared: dict[tuple[float, ...], Pace] = {}  # tokens with the same intervals share one Pace
        for key, jobs in jobs_by_token.items():
            intervals = tuple(job.interval for job in jobs)
            pace = shared.get(intervals) or shared.setdefault(intervals, plan_pace(intervals, daily_limit))
            paces[key] = pace
            old = self._tokens.get(key)
            if old is None and key in self._retired:  # removed by a reload less than a day ago
                old, since = self._retired.pop(key)
                if now - since >= DAY:
                    old = None
            kept = {(r.job.operation, r.job.api): r for r in old.reports} if old is not None else {}
            base = self._saved_base(key)
            reports: list[_Report] = []
            for job in jobs:
                interval = job.interval * pace.stretch
                previous = kept.get((job.operation, job.api))
                if previous is not None:
                    previous.job = job
                    previous.due = min(previous.due, now + interval)  # a shorter interval applies now
                    previous.interval = interval
                    reports.append(previous)
                else:
                    due = self._restored_due(key, job, now, base)
                    reports.append(_Report(job, interval, due=min(due, now + interval)))
            if old is None:
                token = self._new_token(key, pace, now, base, reports, capped)
            else:
                token = old
                self._refill(token, now)
                token.level = charged(token.level, token.pace, pace)
                token.pace = pace
                token.reports = reports
            tokens[key] = token
        for key, token in self._tokens.items():
            if key not in tokens:
                self._retired[key] = (token, now)
        self._retired = {key: kept for key, kept in self._retired.items() if now - kept[1] < DAY}
        self._tokens = tokens
        servers = {report.job.server for token in tokens.values() for report in token.reports}
        self._servers = {name: s for name, s in self._servers.items() if name in servers}
        capped.log()
        return paces

    def restore(self, saved: SavedPacing) -> None:
        """Use pacing saved by an earlier run for the tokens and reports configured next."""
        self._saved = saved

    def _saved_base(self, key: str) -> float:
        """The wall time that saved times of token ``key`` count from: now, or when they were saved if that
        lies ahead of now (the clock was ahead then: no time is taken to have passed since)."""
        wall = self._wall()
        saved = self._saved.tokens.get(key)
        return max(wall, _finite(saved, "at", wall)) if saved is not None else wall

    def _new_token(
        self, key: str, pace: Pace, now: float, base: float, reports: list[_Report], capped: _Capped
    ) -> _Token:
        token = _Token(reports=reports, pace=pace, level=float(pace.burst), updated=now)
        saved = self._saved.tokens.get(key)
        if saved is None:
            return token
        wall = self._wall()
        at = _finite(saved, "at", wall)
        if at > wall + AHEAD_TOLERANCE:
            capped.note("saved_ahead", at - wall, reports)  # no refill for the time "between"
        # The level as of the pace it was saved with (the current one when the file does not say).
        burst = _finite(saved, "burst", pace.burst)
        limit = _finite(saved, "limit", pace.limit)
        level = _finite(saved, "level", math.nan)
        old = saved_pace(burst, limit)
        if not -old.limit <= level <= old.burst:  # NaN too
            capped.note("level", 0.0, reports)
        token.level = restored_level(level, at, burst, limit, wall, pace)
        # A pause is at most its rule's longest: 12 intervals after token_limit, one after auth (backoff).
        until = saved.get("paused_until", 0.0)
        pause = max(0.0, until - base) if not math.isnan(until) else math.inf
        most = float(TOKEN_LIMIT_PAUSE_INTERVALS)
        rule = min(max(_finite(saved, "pause_intervals", most), 1.0), most)
        longest = rule * max((r.interval for r in reports), default=0.0)
        if pause > longest + AHEAD_TOLERANCE:
            capped.note("pause", pause - longest, reports)
            pause = longest
        token.paused_until = now + pause
        token.pause_intervals = int(rule) if pause > 0 else 0
        return token

    def _restored_due(self, key: str, job: Job, now: float, base: float) -> float:
        """The saved due time on this clock (the caller caps it at one interval ahead)."""
        due_wall = self._saved.reports.get(key, {}).get(f"{job.operation}/{job.api}")
        if due_wall is None:
            return now
        return now + max(0.0, due_wall - base) if not math.isnan(due_wall) else now

    # ----- carrying out ----------------------------------------------------------------------------

    def take(self, key: str) -> tuple[Job | None, float]:
        """The job token ``key`` should run now (it becomes busy and spends one request of its budget),
        else (None, seconds to wait); ``math.inf`` when only ``finished`` or ``configure`` can help."""
        token = self._tokens.get(key)
        if token is None or token.busy or not token.reports:
            return None, math.inf
        now = self._clock()
        self._refill(token, now)
        ready = max(token.free_at, token.paused_until)
        if token.level < 1.0:
            ready = max(ready, now + (1.0 - token.level) / token.pace.refill_per_second)
        best: _Report | None = None
        best_ready = math.inf
        for report in token.reports:
            server = self._servers.get(report.job.server)
            report_ready = max(report.due, server.paused_until if server else 0.0)
            if report_ready < best_ready:
                best, best_ready = report, report_ready
        if best is None:
            return None, math.inf
        ready = max(ready, best_ready)
        if ready > now:
            return None, ready - now
        token.busy = True
        token.level -= 1.0
        return best.job, 0.0

    def finished(self, key: str, job: Job, reason: str | None) -> None:
        """Record the answer to a job that ``take`` gave out (``reason`` None on success)."""
        now = self._clock()
        token = self._tokens.get(key)
        if token is None:  # the token was removed by a reload while its request was in flight
            retired = self._retired.get(key)
            if retired is not None:
                retired[0].busy = False
                retired[0].free_at = now + self._gap
            return
        token.busy = False
        token.free_at = now + self._gap
        report = _find(token, job.operation, job.api)
        interval = report.interval if report is not None else job.interval
        if reason is None:
            token.failures = 0
            self._servers.pop(job.server, None)  # a success ends the server's failures and pause
            if report is not None:
                report.failures = 0
                report.due = now + report.interval
            return
        if reason in TOKEN_WIDE:
            token.failures += 1
            # The token's pause counts in its reports' interval, whichever job met the failure: a refused
            # token_info read (read hourly) must not pause the token for 12 hours.
            interval = min((r.interval for r in token.reports), default=interval)
            if reason == "token_limit":
                pause = TOKEN_LIMIT_PAUSE_INTERVALS * interval * self._rng.uniform(0.9, 1.0)
                token.pause_intervals = TOKEN_LIMIT_PAUSE_INTERVALS
            else:
                pause = retry_delay(token.failures, interval, self._rng)
                token.pause_intervals = 1
            token.paused_until = now + pause
            if report is not None:
                # Due again when the pause ends, behind the jobs that fell due before: the probe after the
                # pause is the token's most overdue job, so a refused token_info read starves no report.
                report.due = max(report.due, token.paused_until)
            return
        if reason in SERVER_WIDE:
            server = self._servers.setdefault(job.server, _Server())  # only servers that fail have one
            server.failures += 1
            server.paused_until = now + retry_delay(server.failures, interval, self._rng)
        if report is not None:
            report.failures += 1
            report.due = now + retry_delay(report.failures, report.interval, self._rng)

    def _refill(self, token: _Token, now: float) -> None:
        elapsed = max(0.0, now - token.updated)
        token.level = min(float(token.pace.burst), token.level + elapsed * token.pace.refill_per_second)
        token.updated = now

    # ----- reading --------------------------------------------------------------------------------

    def status(self) -> dict[tuple[str, str], ReportStatus]:
        """Per (operation, api): the interval in use and the next due time (wall clock)."""
        now, wall = self._clock(), self._wall()
        return {
            (report.job.operation, report.job.api): self._status(token, report, now, wall)
            for token in self._tokens.values()
            for report in token.reports
        }

    def status_of(self, key: str, operation: str, api: str) -> ReportStatus | None:
        token = self._tokens.get(key)
        report = _find(token, operation, api) if token is not None else None
        if token is None or report is None:
            return None
        return self._status(token, report, self._clock(), self._wall())

    def _status(self, token: _Token, report: _Report, now: float, wall: float) -> ReportStatus:
        server = self._servers.get(report.job.server)
        # The report cannot run before its token's or its server's pause ends either.
        due = max(report.due, token.paused_until, server.paused_until if server else 0.0)
        return ReportStatus(report.interval, wall + max(0.0, due - now), report.failures)

    def save(self, keys: Iterable[str] | None = None, *, reports: bool = True) -> SavedPacing:
        """The pacing state in wall-clock time, for the state store: of every token, or of ``keys``; without
        the reports' due times when ``reports`` is False. A level is rounded down (to a millionth), never
        up: a restore from it never finds more budget than there was."""
        now, wall = self._clock(), self._wall()
        saved = SavedPacing()
        tokens = self._tokens
        chosen = tokens.items() if keys is None else ((k, tokens[k]) for k in keys if k in tokens)
        for key, token in chosen:
            self._refill(token, now)
            paused = token.paused_until > now
            saved.tokens[key] = {
                "level": math.floor(token.level * 1e6) / 1e6,
                "at": wall,
                "paused_until": wall + max(0.0, token.paused_until - now),
                "pause_intervals": float(token.pause_intervals if paused else 0),
                "burst": float(token.pace.burst),
                "limit": float(token.pace.limit),
            }
            if not reports:
                continue
            saved.reports[key] = {
                f"{report.job.operation}/{report.job.api}": wall + max(0.0, report.due - now)
                for report in token.reports
            }
        return saved


class _Capped:
    """What a ``configure`` capped of the restored state beyond its rule, logged in one line."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.furthest = 0.0
        self.operations: list[str] = []

    def note(self, what: str, ahead: float, reports: Sequence[_Report]) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1
        if math.isfinite(ahead):
            self.furthest = max(self.furthest, ahead)
        for name in dict.fromkeys(r.job.operation for r in reports):
            if len(self.operations) <= 5 and name not in self.operations:
                self.operations.append(name)

    def log(self) -> None:
        if not self.counts:
            return
        parts = {
            "saved_ahead": "token state(s) saved ahead of this clock (not refilled for that time)",
            "pause": "pause(s) longer than their rule allows",
            "level": "budget level(s) beyond the burst or the limit",
        }
        what = ", ".join(f"{count} {parts[name]}" for name, count in self.counts.items())
        ahead = f", up to {about(self.furthest)} too far ahead" if self.furthest >= 1 else ""
        more = " and more" if len(self.operations) > 5 else ""
        log.warning(
            "restored pacing capped to what the rules allow: %s%s (operations %s%s); the wall clock was "
            "ahead when it was saved, or is behind now, or the state was edited",
            what,
            ahead,
            ", ".join(self.operations[:5]),
            more,
        )


def _finite(saved: Mapping[str, float], name: str, default: float) -> float:
    """A saved number, or ``default`` when it is missing or not finite (a hand-edited file)."""
    value = saved.get(name, default)
    return value if math.isfinite(value) else default


def _find(token: _Token, operation: str, api: str) -> _Report | None:
    for report in token.reports:
        if report.job.api == api and report.job.operation == operation:
            return report
    return None


def jobs_for(
    operations: Iterable[tuple[str, str, str, Sequence[str]]],
    refresh_interval: float,
    token_info_interval: float | None,
    token_info_api: str,
) -> dict[str, list[Job]]:
    """Group reports by token key: ``operations`` yields (token key, operation, server, apis). A
    token_info read (when enabled) is one more job of each token, sent for its first operation."""
    jobs: dict[str, list[Job]] = {}
    first_operation: dict[str, tuple[str, str]] = {}
    for key, operation, server, apis in operations:
        first_operation.setdefault(key, (operation, server))
        jobs.setdefault(key, []).extend(Job(operation, api, server, refresh_interval) for api in apis)
    if token_info_interval:
        # Last in each token's list: at start-up the reports come first (ties go to the first job).
        for key, (operation, server) in first_operation.items():
            jobs[key].append(Job(operation, token_info_api, server, token_info_interval))
    return jobs
