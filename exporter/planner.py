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
* **Failures back off where they belong:** ``auth`` and ``token_limit`` pause the whole token; ``timeout``
  and ``connection`` pause every report sent to that server (``Job.server``); any other reason delays only
  the report that failed (an unknown api must not slow its token's other reports).

No threads, no I/O, no sleeping: the caller passes nothing but calls, the clock is injected, and
``take`` says either which job to run now or how long to wait. ``exporter/refresher.py`` carries it out.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from exporter.model import ReportStatus

DAY = 86_400.0
TOKEN_GAP = 1.0  # seconds between an answer and the next request on the same token
FIRST_RETRY = 30.0
TOKEN_LIMIT_PAUSE_INTERVALS = 12  # after TOKEN LIMIT EXCEEDED: 12 intervals, one hour at 5 m
BURST_SHARE = 10  # the start-up burst is at most a tenth of the daily budget

TOKEN_WIDE = frozenset({"auth", "token_limit"})
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


def plan_pace(intervals: Sequence[float], daily_limit: int) -> Pace:
    """The budget of one token serving jobs with these configured intervals."""
    burst = max(1, min(len(intervals), daily_limit // BURST_SHARE))
    refill = max(daily_limit - burst, 1) / DAY  # per second; a limit of 1 still refreshes once a day
    demand = sum(DAY / interval for interval in intervals)
    stretch = max(1.0, demand / (refill * DAY)) if demand > 0 else 1.0
    return Pace(burst=burst, refill_per_second=refill, demand_per_day=demand, stretch=stretch)


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
    # A list, not a dict by (operation, api): most tokens have one or a few reports, ``take`` reads them
    # all anyway, and a dict and a key tuple per token were ~2.5 MB at 10,000 tokens.
    reports: list[_Report]
    pace: Pace
    level: float  # requests left in the bucket
    updated: float  # when ``level`` was last refilled
    busy: bool = False
    free_at: float = 0.0
    paused_until: float = 0.0
    failures: int = 0  # token-wide failures (auth, token_limit) in a row


@dataclass(slots=True)
class _Server:
    failures: int = 0
    paused_until: float = 0.0


@dataclass
class SavedPacing:
    """What survives a restart (wall-clock times): per token its bucket and pause, per report its due
    time. Keys are token keys (never tokens) and ``operation/api``."""

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
        reload never re-fetches or refills); new ones are due now, or when the restored state says."""
        now = self._clock()
        tokens: dict[str, _Token] = {}
        paces: dict[str, Pace] = {}
        shared: dict[tuple[float, ...], Pace] = {}  # tokens with the same intervals share one Pace
        for key, jobs in jobs_by_token.items():
            intervals = tuple(job.interval for job in jobs)
            pace = shared.get(intervals) or shared.setdefault(intervals, plan_pace(intervals, daily_limit))
            paces[key] = pace
            old = self._tokens.get(key)
            if old is None and key in self._retired:
                old, since = self._retired.pop(key)
                if now - since >= DAY:
                    old = None
            if old is None:
                token = self._new_token(key, pace, now)
            else:
                token = old
                self._refill(token, now)
                token.pace = pace
                token.level = min(token.level, pace.burst)
            reports: list[_Report] = []
            kept = {(r.job.operation, r.job.api): r for r in token.reports}
            for job in jobs:
                interval = job.interval * pace.stretch
                previous = kept.get((job.operation, job.api))
                if previous is not None:
                    previous.job = job
                    previous.due = min(previous.due, now + interval)  # a shorter interval applies now
                    previous.interval = interval
                    reports.append(previous)
                else:
                    due = self._restored_due(key, job, now)
                    reports.append(_Report(job, interval, due=min(due, now + interval)))
            token.reports = reports
            tokens[key] = token
        for key, token in self._tokens.items():
            if key not in tokens:
                self._retired[key] = (token, now)
        self._retired = {key: kept for key, kept in self._retired.items() if now - kept[1] < DAY}
        self._tokens = tokens
        servers = {report.job.server for token in tokens.values() for report in token.reports}
        self._servers = {name: s for name, s in self._servers.items() if name in servers}
        return paces

    def restore(self, saved: SavedPacing) -> None:
        """Use pacing saved by an earlier run for the tokens and reports configured next."""
        self._saved = saved

    def _new_token(self, key: str, pace: Pace, now: float) -> _Token:
        token = _Token(reports=[], pace=pace, level=float(pace.burst), updated=now)
        saved = self._saved.tokens.get(key)
        if saved is not None:
            elapsed = max(0.0, self._wall() - saved.get("at", 0.0))
            token.level = min(
                float(pace.burst), max(0.0, saved.get("level", 0.0)) + elapsed * pace.refill_per_second
            )
            token.paused_until = now + max(0.0, saved.get("paused_until", 0.0) - self._wall())
        return token

    def _restored_due(self, key: str, job: Job, now: float) -> float:
        due_wall = self._saved.reports.get(key, {}).get(f"{job.operation}/{job.api}")
        if due_wall is None:
            return now
        return now + max(0.0, due_wall - self._wall())

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
            if reason == "token_limit":
                pause = TOKEN_LIMIT_PAUSE_INTERVALS * interval * self._rng.uniform(0.9, 1.0)
            else:
                pause = retry_delay(token.failures, interval, self._rng)
            token.paused_until = now + pause
            return  # the report stays due: it runs first when the pause ends
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

    def save(self, keys: Iterable[str] | None = None) -> SavedPacing:
        """The pacing state in wall-clock time, for the state store: of every token, or of ``keys``."""
        now, wall = self._clock(), self._wall()
        saved = SavedPacing()
        tokens = self._tokens
        chosen = tokens.items() if keys is None else ((k, tokens[k]) for k in keys if k in tokens)
        for key, token in chosen:
            self._refill(token, now)
            saved.tokens[key] = {
                "level": round(token.level, 6),
                "at": wall,
                "paused_until": wall + max(0.0, token.paused_until - now),
            }
            saved.reports[key] = {
                f"{report.job.operation}/{report.job.api}": wall + max(0.0, report.due - now)
                for report in token.reports
            }
        return saved


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
