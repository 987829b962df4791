"""What is known per operation: the one owner of the exporter's snapshot.

The refresher hands each ``FetchResult`` to ``Store.record`` and the pace of each report to
``Store.set_pace``; that only updates the operation's state and marks it changed. The page thread asks
``Store.changes`` for what changed since its last visit (rendered under the lock by a function it passes
in, so the store knows nothing of the exposition format); the status page reads ``report_rows``; the
state store reads ``saved_report`` and hears of closed months (``on_month_closed``). One lock guards
everything, held for dictionary updates and the rendering of the operations that changed, never for I/O.

Time: the store holds wall times (fetched at, last success, next due) because they are shown, exported and
saved; ``clock.WallSteps`` tells it when the wall clock stepped, and every time it holds moves with the
step, so ages (``max_age``) stay monotonic ones and nothing exported lies ahead of the exporter's now. A
result stamped later than now and a restored value "fetched" after now are taken as of now.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from exporter.clock import WallSteps, about
from exporter.logs import fields
from exporter.model import STEREO_REC, TOKEN_INFO, TOKEN_WIDE, FetchResult, Reading, ReportStatus
from exporter.monthclose import SavedMonths, Seen, closed_month, kind_of

T = TypeVar("T")

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class OperationInfo:
    """The parts of an operation's configuration that the store needs."""

    name: str
    apis: tuple[str, ...] = (STEREO_REC,)
    budget_minutes: float | None = None
    token_key: str = ""  # operations with the same key share a token (and its token_info)
    prices: tuple[tuple[str, float], ...] = ()
    cost_budget: float | None = None
    currency: str = "USD"
    host: str = ""  # host[:port] of its base URL: named by wolkvox_last_error_info (never a secret)
    server: str = ""
    labels: tuple[tuple[str, str], ...] = ()  # the user's labels (config `labels:`), sorted by name


@dataclass(frozen=True)
class Schedule:
    """Global facts about request pacing, exported so alerts can compare them."""

    refresh_interval: float = 300.0
    planned_requests_per_day: float = 288.0
    daily_request_limit: int = 1000
    token_info_interval: float | None = None


@dataclass(frozen=True)
class GlobalFacts:
    """What the exporter says of itself on /metrics."""

    reload_ok: bool
    reload_time: float
    schedule: Schedule
    connections_rejected: int = 0  # closed at --web.max-connections since start
    state_write_errors: int | None = None  # None: no state store configured
    state_last_write: float | None = None


@dataclass(frozen=True)
class Changes(Generic[T]):
    """What ``Store.changes`` hands the page: the operations rendered since the last call, by name."""

    now: float
    rendered: dict[str, T]
    order: list[str]  # every operation, in configuration order
    removed: bool  # an operation left since the last call
    facts: GlobalFacts


@dataclass(frozen=True)
class ReportRow:
    """What the status page shows of one report (operation, api)."""

    operation: str
    api: str
    value: float | None
    last_success: float | None
    failing: bool  # its last request failed
    last_failure: tuple[str, float, str] | None  # (reason, when, detail) of its last failure
    next_due: float | None
    interval: float | None
    last_month: Seen | None = None  # the closing value of the report's last closed month
    failing_since: float | None = None  # the first failure since its last success (None: not failing)


@dataclass(frozen=True)
class ReloadStatus:
    """The last configuration reload, for the status page: None ``at`` means none since the start."""

    ok: bool
    at: float | None  # when it was attempted
    error: str  # its one-line error (empty on success); never a token (the caller redacts)
    loaded_at: float  # when the configuration in force was loaded (start or last good reload)


@dataclass(slots=True)
class ReportState:
    """What the store knows of one report (operation, api): one slotted object per report rather than a
    dict per field, the smallest form of this state (benchmarks/README.md, memory)."""

    tried: bool = False
    last_reason: str | None = None  # of its last request; None after a success
    value: tuple[float, float] | None = None  # (value, fetched at); dropped after max_age
    last_success: float | None = None
    last_failure: tuple[str, float, str] | None = None  # (reason, at, detail)
    pace: ReportStatus | None = None  # interval in use, next due
    seen: Seen | None = None  # last good reading (never expires)
    closed: Seen | None = None  # closing value of its last closed month
    failing_since: float | None = None  # first failure since the last success


@dataclass(slots=True)
class OperationState:
    info: OperationInfo
    reports: dict[str, ReportState] = field(default_factory=dict)  # api -> its state, once there is any
    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # reason -> count; absent is 0 (rendered as 0)
    last_success: float | None = None
    last_duration: float | None = None
    token_info: tuple[float | None, float | None, float] | None = None  # (limit, used today, read at)
    # The last token_info read of this operation, when it failed: (reason, at, detail), and since when.
    token_failure: tuple[str, float, str] | None = None
    token_failing_since: float | None = None
    restored: bool = False  # a value younger than max_age was restored from saved state (counts as ready)

    def report(self, api: str) -> ReportState:
        """The report's state, created on first use."""
        report = self.reports.get(api)
        if report is None:
            report = self.reports[api] = ReportState()
        return report

    def current(self) -> dict[str, float]:
        """api -> value, for the reports that have one (not older than max_age)."""
        return {api: r.value[0] for api, r in self.reports.items() if r.value is not None}

    @property
    def tried(self) -> bool:
        return any(r.tried for r in self.reports.values())

    @property
    def up(self) -> bool:
        # An api wolkvox does not know is a configuration mistake with its own alert; it does not make
        # the operation's other data less good. At least one api must have succeeded, though.
        reasons = [r.last_reason for r in self.reports.values() if r.tried]
        return any(r is None for r in reasons) and all(r in (None, "unknown_api") for r in reasons)


class Store:
    """Per-operation state. Every method is thread-safe."""

    def __init__(
        self,
        operations: Iterable[OperationInfo],
        *,
        max_age: float,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        schedule: Schedule | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._steps = WallSteps(wall, monotonic)
        self._max_age = max_age
        self._states: dict[str, OperationState] = {}
        self._by_token: dict[str, tuple[str, ...]] = {}
        self._dirty: set[str] = set()
        self._removed = False  # an operation left since the last changes() (the page must drop it)
        self._next_expiry = float("inf")
        self._reload_ok = 1
        self._reload_time = wall()
        self._reload_last: tuple[bool, float, str] | None = None  # (ok, at, error) of the last reload
        self._schedule = schedule or Schedule()
        self._connections_rejected = 0
        self._state_health: tuple[int | None, float | None] = (None, None)
        # Restored times after now (values, readings), until restored() logs them.
        self._ahead: tuple[list[float], list[float]] = ([], [])
        # Called (under the store's lock: keep it short) with (operation, api, closing value) when a
        # month closes: the state store keeps every closed month.
        self.on_month_closed: Callable[[str, str, Seen], None] | None = None
        self.changed = threading.Event()  # set whenever a re-render is wanted
        self.reconfigure(operations, max_age=max_age, schedule=schedule)

    # ----- updates (any thread) -------------------------------------------------------------

    def reconfigure(
        self, operations: Iterable[OperationInfo], *, max_age: float, schedule: Schedule | None = None
    ) -> None:
        """Take a new list of operations; state of operations that keep their name is kept."""
        with self._lock:
            self._max_age = max_age
            if schedule is not None:
                self._schedule = schedule
            states: dict[str, OperationState] = {}
            for info in operations:
                state = self._states.get(info.name) or OperationState(info)
                state.info = info
                for api in [api for api in state.reports if api not in info.apis]:
                    del state.reports[api]
                states[info.name] = state
            self._removed = self._removed or not self._states.keys() <= states.keys()
            self._states = states
            by_token: dict[str, list[str]] = {}  # token key -> the operations sharing it
            for name, state in states.items():
                by_token.setdefault(state.info.token_key, []).append(name)
            # Kept as tuples: a list grown by append holds spare slots (0.4 MB at 10,000 tokens).
            self._by_token = {key: tuple(names) for key, names in by_token.items()}
            self._dirty = set(states)
            self._next_expiry = 0.0
        self.changed.set()

    def record(self, result: FetchResult) -> None:
        with self._lock:
            at = min(result.finished_at, self._now())  # stamped before a step back: not in the future
            state = self._states.get(result.operation)
            if state is None:
                return  # the operation was removed by a reload while its request was in flight
            if result.api == TOKEN_INFO:
                self._record_token_info(state, result, at)
                return
            if result.api not in state.info.apis:
                return
            state.requests += 1
            state.last_duration = result.duration
            report = state.report(result.api)
            report.tried, report.last_reason = True, result.reason
            if result.ok and isinstance(result.value, Reading):
                report.value = (result.value.value, at)
                self._track_month(
                    self.on_month_closed,
                    state,
                    result.api,
                    report,
                    Seen(result.value.value, at, result.value.month),
                )
                report.last_success = at
                report.failing_since = None
                state.last_success = max(state.last_success or 0.0, at)
                self._next_expiry = min(self._next_expiry, at + self._max_age)
            elif result.reason is not None:
                state.errors[result.reason] = state.errors.get(result.reason, 0) + 1
                report.last_failure = (result.reason, at, result.detail)
                if report.failing_since is None:
                    report.failing_since = at
                if result.reason in TOKEN_WIDE:
                    self._fail_token(state, result, at)
            self._dirty.add(result.operation)
        self.changed.set()

    @staticmethod
    def _track_month(
        on_closed: Callable[[str, str, Seen], None] | None,
        state: OperationState,
        api: str,
        report: ReportState,
        new: Seen,
    ) -> None:
        """Keep the previous reading as the closing value when ``new`` is the first of a new month. A month
        closes once: a later drop near the same 1st (a correction) does not replace its value."""
        last, report.seen = report.seen, new
        if last is None:
            return
        month = closed_month(last, new, kind_of(api))
        kept = report.closed
        if month is None or (kept is not None and kept.month is not None and month <= kept.month):
            return
        report.closed = Seen(last.value, last.at, month)
        if on_closed is not None:
            on_closed(state.info.name, api, report.closed)
        log.info(
            "month %s closed",
            month,
            extra=fields(
                operation=state.info.name,
                api=api,
                month=month,
                final_value=last.value,
                fetched_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(last.at)),
            ),
        )

    def _record_token_info(self, state: OperationState, result: FetchResult, at: float) -> None:
        """A token_info read: counted as a request of the operation that made it; its answer is shown
        for every operation sharing the token. It does not change wolkvox_up."""
        state.requests += 1
        state.last_duration = result.duration
        self._dirty.add(state.info.name)
        if not result.ok:
            if result.reason is not None:
                state.errors[result.reason] = state.errors.get(result.reason, 0) + 1
                # Shown on the status page: a token refused on its token_info read pauses its reports too.
                state.token_failure = (result.reason, at, result.detail)
                if state.token_failing_since is None:
                    state.token_failing_since = at
                if result.reason in TOKEN_WIDE:
                    self._fail_token(state, result, at)
            return
        state.token_failure = state.token_failing_since = None
        info = result.value
        for other in self._states.values():
            if other.info.token_key == state.info.token_key:
                other.token_info = (info.limit, info.used_today, at)
                self._dirty.add(other.info.name)
        self._next_expiry = min(self._next_expiry, at + self._token_info_lifetime())

    def _fail_token(self, state: OperationState, result: FetchResult, at: float) -> None:
        """``auth`` and ``token_limit`` are failures of the token, whichever request met them: every report
        of every operation sharing it fails with that reason until its own next answer (the planner pauses
        the token and then asks one job per pause). Only the request that was made is counted."""
        reason = result.reason or ""
        detail = f"{result.detail} (the token was refused on {result.operation} {result.api})".strip()
        names = self._by_token.get(state.info.token_key, ()) if state.info.token_key else ()
        for other in [self._states[name] for name in names] or [state]:
            for api in other.info.apis:
                if other is state and api == result.api:
                    continue  # recorded as it is by the caller
                report = other.report(api)
                report.tried, report.last_reason = True, reason
                report.last_failure = (reason, at, detail)
                if report.failing_since is None:
                    report.failing_since = at
            self._dirty.add(other.info.name)

    def set_pace(self, statuses: dict[tuple[str, str], ReportStatus]) -> None:
        """The refresher's pace per (operation, api): shown on /metrics (interval) and the status page."""
        with self._lock:
            for (name, api), status in statuses.items():
                state = self._states.get(name)
                if state is None or api == TOKEN_INFO or api not in state.info.apis:
                    continue
                report = state.report(api)
                old, report.pace = report.pace, status
                if old is None or old.interval != status.interval:
                    self._dirty.add(name)  # next_due alone changes nothing on /metrics
        self.changed.set()

    def set_state_health(self, write_errors: int, last_write: float | None) -> None:
        """The state store's health, for /metrics."""
        with self._lock:
            self._state_health = (write_errors, last_write)
        self.changed.set()

    def saved_report(self, operation: str, api: str) -> tuple[tuple[float, float] | None, Seen | None]:
        """A report's (value, fetched at) and last reading: what the state store keeps of it."""
        with self._lock:
            state = self._states.get(operation)
            report = state.reports.get(api) if state is not None else None
            return (report.value, report.seen) if report is not None else (None, None)

    def connection_rejected(self) -> None:
        """The web server closed a connection at --web.max-connections. The page shows it within a
        second: a flood costs no more than a re-render of the small tail per second (the publisher's
        pace), as the operations did not change."""
        with self._lock:
            self._connections_rejected += 1
        self.changed.set()

    def set_reload_status(self, ok: bool, error: str = "") -> None:
        """The outcome of a reload; ``error`` is its one-line message, already free of tokens."""
        with self._lock:
            now = self._now()
            self._reload_ok = 1 if ok else 0
            if ok:
                self._reload_time = now
            self._reload_last = (ok, now, "" if ok else error)
        self.changed.set()

    def reload_status(self) -> ReloadStatus:
        with self._lock:
            if self._reload_last is None:
                return ReloadStatus(ok=True, at=None, error="", loaded_at=self._reload_time)
            ok, at, error = self._reload_last
            return ReloadStatus(ok=ok, at=at, error=error, loaded_at=self._reload_time)

    # ----- reads ------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True once every operation has been tried at least once, or has a value restored from saved state
        (a restored pause or due time must not hold a restarted exporter out of service)."""
        with self._lock:
            return all(state.tried or state.restored for state in self._states.values())

    def report_rows(self) -> list[ReportRow]:
        """One row per (operation, api), in configuration order: for the status page."""
        rows: list[ReportRow] = []
        with self._lock:
            for name, state in self._states.items():
                for api in state.info.apis:
                    report = state.reports.get(api) or ReportState()
                    value, pace = report.value, report.pace
                    rows.append(
                        ReportRow(
                            operation=name,
                            api=api,
                            value=value[0] if value is not None else None,
                            last_success=report.last_success
                            if report.last_success is not None
                            else (value[1] if value is not None else None),
                            failing=report.tried and report.last_reason is not None,
                            last_failure=report.last_failure,
                            next_due=pace.next_due if pace is not None else None,
                            interval=pace.interval if pace is not None else None,
                            last_month=report.closed,
                            failing_since=report.failing_since
                            if report.tried and report.last_reason is not None
                            else None,
                        )
                    )
                if state.token_failure is not None:  # a failing token_info read: a row of its own
                    rows.append(
                        ReportRow(
                            operation=name,
                            api=TOKEN_INFO,
                            value=None,
                            last_success=state.token_info[2] if state.token_info is not None else None,
                            failing=True,
                            last_failure=state.token_failure,
                            next_due=None,
                            interval=None,
                            failing_since=state.token_failing_since,
                        )
                    )
        return rows

    def values(self) -> dict[str, dict[str, tuple[float, float]]]:
        """Last good values per operation and api, (value, fetched at)."""
        with self._lock:
            return {
                name: {api: r.value for api, r in state.reports.items() if r.value is not None}
                for name, state in self._states.items()
            }

    def restore_values(self, saved: dict[str, dict[str, tuple[float, float]]]) -> None:
        """Put back values remembered from an earlier run (not counted as requests). A value "fetched" after
        now (the clock was ahead when it was saved, or the file was edited) is taken as fetched now."""
        ahead: list[float] = []
        with self._lock:
            now = self._now()
            for name, per_api in saved.items():
                state = self._states.get(name)
                if state is None:
                    continue
                for api, (value, fetched_at) in per_api.items():
                    if api not in state.info.apis:
                        continue
                    if not fetched_at <= now:  # NaN too
                        ahead.append(fetched_at - now)
                        fetched_at = now
                    report = state.report(api)
                    if report.value is None:
                        report.value = (value, fetched_at)
                        state.last_success = max(state.last_success or 0.0, fetched_at)
                        state.restored = state.restored or fetched_at + self._max_age > now
                self._dirty.add(name)
            self._next_expiry = 0.0
        self.changed.set()
        _log_ahead("value(s)", ahead)

    def restore_report(
        self, operation: str, api: str, value: tuple[float, float] | None, seen: Seen | None
    ) -> None:
        """Put back one report's value and last reading from the state store, row by row (a newer row
        replaces an older one; not counted as a request). Times after now are taken as now, as in
        ``restore_values``; ``restored`` logs them once."""
        with self._lock:
            state = self._states.get(operation)
            if state is None or api not in state.info.apis:
                return
            now = self._now()
            report = state.report(api)
            if value is not None:
                fetched_at = value[1]
                if not fetched_at <= now:  # NaN too
                    self._ahead[0].append(fetched_at - now)
                    fetched_at = now
                report.value = (value[0], fetched_at)
                state.last_success = max(state.last_success or 0.0, fetched_at)
                state.restored = state.restored or fetched_at + self._max_age > now
            if seen is not None:
                if not seen.at <= now:
                    self._ahead[1].append(seen.at - now)
                    seen = dataclasses.replace(seen, at=now)
                report.seen = seen
            self._dirty.add(operation)
            self._next_expiry = 0.0
        self.changed.set()

    def restore_closed(self, operation: str, api: str, closed: Seen) -> None:
        """Put back a closed month from the state store (the latest month is kept)."""
        with self._lock:
            state = self._states.get(operation)
            if state is None or api not in state.info.apis:
                return
            report = state.report(api)
            if report.closed is None or (report.closed.month or "") <= (closed.month or ""):
                report.closed = closed
            self._dirty.add(operation)
        self.changed.set()

    def restored(self) -> None:
        """The state store's rows are all in: one line for the times that lay after now."""
        with self._lock:
            (values, readings), self._ahead = self._ahead, ([], [])
        _log_ahead("value(s)", values)
        _log_ahead("month-close reading(s)", readings)

    def month_state(self) -> SavedMonths:
        """Last readings and closing values per operation and api."""
        with self._lock:
            saved = SavedMonths()
            for name, state in self._states.items():
                seen = {api: r.seen for api, r in state.reports.items() if r.seen is not None}
                closed = {api: r.closed for api, r in state.reports.items() if r.closed is not None}
                if seen:
                    saved.seen[name] = seen
                if closed:
                    saved.closed[name] = closed
            return saved

    def restore_months(self, saved: SavedMonths) -> None:
        """Put back the last readings and closing values of an earlier run (a restart on the 3rd keeps the
        month that closed on the 1st, and one on the 31st still notices the close)."""
        ahead: list[float] = []
        with self._lock:
            now = self._now()

            def capped(seen: Seen | None) -> Seen | None:
                if seen is None or seen.at <= now:
                    return seen
                ahead.append(seen.at - now)
                return dataclasses.replace(seen, at=now)

            for name, state in self._states.items():
                for api in state.info.apis:
                    seen, closed = saved.seen.get(name, {}).get(api), saved.closed.get(name, {}).get(api)
                    if seen is None and closed is None:
                        continue
                    report = state.report(api)
                    report.seen = report.seen or capped(seen)
                    report.closed = report.closed or capped(closed)
                self._dirty.add(name)
        self.changed.set()
        _log_ahead("month-close reading(s)", ahead)

    # ----- rendering (the page thread) -------------------------------------------------------

    def changes(self, render: Callable[[OperationState], T]) -> Changes[T]:
        """Under the lock: drop what is older than max_age, ``render`` every operation changed since the
        last call, and return those with the order of all operations and the global facts."""
        with self._lock:
            now = self._now()
            if now >= self._next_expiry:
                self._expire(now)
            rendered = {name: render(self._states[name]) for name in self._dirty}
            self._dirty.clear()
            removed, self._removed = self._removed, False
            facts = GlobalFacts(
                self._reload_ok == 1,
                self._reload_time,
                self._schedule,
                self._connections_rejected,
                *self._state_health,
            )
            return Changes(now, rendered, list(self._states), removed, facts)

    def _expire(self, now: float) -> None:
        """Drop values older than max_age, so a stale value is never shown as current."""
        next_expiry = float("inf")
        for name, state in self._states.items():
            for api, report in state.reports.items():
                if report.value is None:
                    continue
                expires = report.value[1] + self._max_age
                if expires <= now:
                    report.value = None
                    self._dirty.add(name)
                    log.warning("dropping a value older than max_age", extra=fields(operation=name, api=api))
                else:
                    next_expiry = min(next_expiry, expires)
            if state.token_info is not None:
                expires = state.token_info[2] + self._token_info_lifetime()
                if expires <= now:
                    # A failing token_info must not leave yesterday's count up (the token alert uses it).
                    state.token_info = None
                    self._dirty.add(name)
                else:
                    next_expiry = min(next_expiry, expires)
        self._next_expiry = next_expiry

    def _now(self) -> float:
        """The wall clock now (under the lock); after a step of it, every wall time held moves with it."""
        now, step = self._steps.read()
        if step:
            self._shift(step)
        return now

    def _shift(self, step: float) -> None:
        """Move every wall time held by ``step`` seconds: what happened 10 minutes ago still did, and a
        value fetched while the clock was ahead is as old as it is, not "from the future"."""

        def moved(seen: Seen | None) -> Seen | None:
            return dataclasses.replace(seen, at=seen.at + step) if seen is not None else None

        for state in self._states.values():
            if state.last_success is not None:
                state.last_success += step
            if state.token_info is not None:
                limit, used, at = state.token_info
                state.token_info = (limit, used, at + step)
            for report in state.reports.values():
                if report.value is not None:
                    report.value = (report.value[0], report.value[1] + step)
                if report.last_success is not None:
                    report.last_success += step
                if report.last_failure is not None:
                    reason, at, detail = report.last_failure
                    report.last_failure = (reason, at + step, detail)
                if report.pace is not None:
                    report.pace = dataclasses.replace(report.pace, next_due=report.pace.next_due + step)
                report.seen, report.closed = moved(report.seen), moved(report.closed)
        self._reload_time += step
        self._dirty = set(self._states)
        self._next_expiry = 0.0
        self.changed.set()

    def _token_info_lifetime(self) -> float:
        """token_info is read every token_info_interval: keep an answer for two reads or max_age."""
        return max(self._max_age, 2 * (self._schedule.token_info_interval or 0.0))


def _log_ahead(what: str, ahead: list[float]) -> None:
    """One line for the restored times that lay after now (taken as now)."""
    if ahead:
        furthest = max((a for a in ahead if math.isfinite(a)), default=0.0)
        log.warning(
            "%d restored %s lay up to %s ahead of this clock (it was ahead when they were saved, or is "
            "behind now, or the state was edited): taken as of now",
            len(ahead),
            what,
            about(furthest),
        )
