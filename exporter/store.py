"""What is known per operation, and the /metrics page rendered from it.

The scheduler's worker threads hand each ``FetchResult`` to ``Store.record``; that only updates the
operation's state and marks it dirty. ``Store.render`` (called by the ``Publisher`` thread, at most
about once a second and at least every few seconds) re-renders the dirty operations' lines, joins the
cached lines of all operations family by family, and swaps in a new immutable ``RenderedPage`` holding
the plain and the gzip bytes. A scrape only reads ``Store.page``: it never waits for upstream and never
sees half an update.

Sample output::

    # HELP wolkvox_stereo_rec_minutes Month-to-date stereo-recording minutes ...
    # TYPE wolkvox_stereo_rec_minutes gauge
    wolkvox_stereo_rec_minutes{operation="bogota"} 1234.5
    # HELP wolkvox_up 1 if the last fetch for the operation succeeded, else 0.
    # TYPE wolkvox_up gauge
    wolkvox_up{operation="bogota"} 1
"""

from __future__ import annotations

import gzip
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from prometheus_client import REGISTRY, generate_latest

from exporter import __version__
from exporter.exposition import Family, GzipWithTail, sample
from exporter.model import BILLING_APIS, REASONS, STEREO_REC, TOKEN_INFO, FetchResult, Reading, ReportStatus
from exporter.monthclose import SavedMonths, Seen, closed_month, kind_of

log = logging.getLogger(__name__)

STEREO_REC_MINUTES = Family(
    "wolkvox_stereo_rec_minutes",
    "gauge",
    "Month-to-date stereo-recording minutes used by the operation (unit: minutes), as last fetched from "
    "the wolkvox billing API: a cached value, refreshed every refresh_interval, that drops at the start "
    "of each month. Absent when the last good value is older than max_age.",
)
BUDGET = Family(
    "wolkvox_stereo_rec_budget_minutes",
    "gauge",
    "Monthly stereo-recording budget of the operation in minutes, from the exporter's configuration.",
)
UP = Family("wolkvox_up", "gauge", "1 if the last fetch for the operation succeeded, else 0.")
LAST_ERROR = Family(
    "wolkvox_last_error_info",
    "gauge",
    "Reason of the last failed fetch for the operation; present (value 1) only while wolkvox_up is 0.",
)
ERRORS = Family(
    "wolkvox_scrape_errors_total",
    "counter",
    f"Failed requests to the wolkvox API for the operation, by reason ({', '.join(REASONS)}).",
)
REQUESTS = Family(
    "wolkvox_scrape_requests_total", "counter", "Requests made to the wolkvox API for the operation."
)
LAST_SUCCESS = Family(
    "wolkvox_last_success_timestamp_seconds",
    "gauge",
    "Unix time of the last successful fetch for the operation.",
)
DURATION = Family(
    "wolkvox_scrape_duration_seconds",
    "gauge",
    "Duration of the last request to the wolkvox API for the operation, in seconds.",
)
BILLING_USAGE = Family(
    "wolkvox_billing_usage",
    "gauge",
    "Month-to-date usage of a wolkvox billing service (api) by the operation, as last fetched (cached; "
    "drops at the start of each month). The unit depends on the api: "
    + "; ".join(f"{api.name}: {api.unit}" for api in BILLING_APIS.values())
    + ".",
)
_CLOSED = (
    "the last value fetched before the first answer of the next month, labelled with the month it "
    "closes (month, YYYY-MM, the vendor's month from the answers' date). Kept from that first answer until "
    "the next month closes, and across restarts when state_file is set; never expires."
)
STEREO_REC_PREVIOUS_MONTH = Family(
    "wolkvox_stereo_rec_minutes_previous_month",
    "gauge",
    "Stereo-recording minutes of the operation's last closed month (unit: minutes): " + _CLOSED,
)
BILLING_USAGE_PREVIOUS_MONTH = Family(
    "wolkvox_billing_usage_previous_month",
    "gauge",
    "Usage of a wolkvox billing service (api) by the operation in its last closed month, in the unit of "
    "wolkvox_billing_usage: " + _CLOSED,
)
UNIT_PRICE = Family(
    "wolkvox_billing_unit_price",
    "gauge",
    "Configured price of one unit of the api's usage, in the currency of the label.",
)
COST_BUDGET = Family(
    "wolkvox_billing_cost_budget",
    "gauge",
    "Configured monthly cost budget of the operation, in the currency of the label.",
)
TOKEN_LIMIT = Family(
    "wolkvox_token_limit",
    "gauge",
    "Daily request limit of the operation's token, as read from information.php?api=token_info.",
)
TOKEN_USED = Family(
    "wolkvox_token_used_today",
    "gauge",
    "Requests made today with the operation's token (by anyone), as read from token_info.",
)
REFRESH_INTERVAL = Family(
    "wolkvox_refresh_interval_seconds",
    "gauge",
    "Seconds between two fetches of the report (operation x api) in use: refresh_interval, stretched "
    "evenly when the token's reports would need more than its daily_request_limit.",
)
# Order in which families appear on the page; each operation caches one string per family.
OPERATION_FAMILIES: tuple[Family, ...] = (
    STEREO_REC_MINUTES,
    BILLING_USAGE,
    STEREO_REC_PREVIOUS_MONTH,
    BILLING_USAGE_PREVIOUS_MONTH,
    UNIT_PRICE,
    COST_BUDGET,
    TOKEN_LIMIT,
    TOKEN_USED,
    BUDGET,
    UP,
    LAST_ERROR,
    ERRORS,
    REQUESTS,
    LAST_SUCCESS,
    DURATION,
    REFRESH_INTERVAL,
)
_INDEX = {family: i for i, family in enumerate(OPERATION_FAMILIES)}

BUILD_INFO = Family(
    "wolkvox_exporter_build_info", "gauge", "Always 1; the version label says which exporter is running."
)
RELOAD_OK = Family(
    "wolkvox_config_last_reload_successful",
    "gauge",
    "1 if the last configuration (re)load succeeded, else 0.",
)
PLANNED_REQUESTS = Family(
    "wolkvox_token_planned_requests_per_day",
    "gauge",
    "Requests per day the configured intervals ask of the busiest token (one per report per "
    "refresh_interval, plus token_info reads); above daily_request_limit the intervals are stretched.",
)
DAILY_LIMIT = Family(
    "wolkvox_token_daily_request_limit",
    "gauge",
    "Configured daily request budget per token (daily_request_limit).",
)
RELOAD_TIME = Family(
    "wolkvox_config_last_reload_success_timestamp_seconds",
    "gauge",
    "Unix time of the last successful configuration load.",
)


@dataclass(frozen=True)
class OperationInfo:
    """The parts of an operation's configuration that the store needs."""

    name: str
    apis: tuple[str, ...] = (STEREO_REC,)
    budget_minutes: float | None = None
    token_key: str = ""  # operations with the same key share a token (and its token_info)
    prices: tuple[tuple[str, float], ...] = ()
    cost_budget: float | None = None
    currency: str = "USD"


@dataclass(frozen=True)
class Schedule:
    """Global facts about request pacing, exported so alerts can compare them."""

    refresh_interval: float = 300.0
    planned_requests_per_day: float = 288.0
    daily_request_limit: int = 1000
    token_info_interval: float | None = None


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


@dataclass
class _OperationState:
    info: OperationInfo
    values: dict[str, tuple[float, float]] = field(default_factory=dict)  # api -> (value, fetched at)
    last_reason: dict[str, str | None] = field(default_factory=dict)  # api -> reason of its last failure
    failures: dict[str, tuple[str, float, str]] = field(default_factory=dict)  # api -> (reason, at, detail)
    successes: dict[str, float] = field(default_factory=dict)  # api -> when it last succeeded
    pace: dict[str, ReportStatus] = field(default_factory=dict)  # api -> interval in use, next due
    requests: int = 0
    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    last_success: float | None = None
    last_duration: float | None = None
    last_error: str | None = None
    token_info: tuple[float | None, float | None, float] | None = None  # (limit, used today, read at)
    seen: dict[str, Seen] = field(default_factory=dict)  # api -> last good reading (never expires)
    closed: dict[str, Seen] = field(default_factory=dict)  # api -> closing value of its last closed month

    @property
    def tried(self) -> bool:
        return bool(self.last_reason)

    @property
    def up(self) -> bool:
        # An api wolkvox does not know is a configuration mistake with its own alert; it does not make
        # the operation's other data less good. At least one api must have succeeded, though.
        reasons = self.last_reason.values()
        return any(r is None for r in reasons) and all(r in (None, "unknown_api") for r in reasons)


@dataclass(frozen=True)
class RenderedPage:
    """One immutable /metrics page, kept gzip-compressed only: Prometheus always asks for gzip, and the
    plain text (~10 MB at 10,000 operations) is decompressed on demand for the rare client that does not."""

    gzipped: bytes
    rendered_at: float

    @property
    def plain(self) -> bytes:
        return gzip.decompress(self.gzipped)


class Store:
    """Per-operation state plus the latest rendered page. ``record`` is thread-safe."""

    def __init__(
        self,
        operations: Iterable[OperationInfo],
        *,
        max_age: float,
        wall: Callable[[], float] = time.time,
        include_process_metrics: bool = True,
        schedule: Schedule | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._wall = wall
        self._max_age = max_age
        self._include_process_metrics = include_process_metrics
        self._states: dict[str, _OperationState] = {}
        self._fragments: dict[str, list[bytes]] = {}
        self._dirty: set[str] = set()
        self._next_expiry = float("inf")
        self._reload_ok = 1
        self._reload_time = wall()
        self._schedule = schedule or Schedule()
        self.changed = threading.Event()  # set whenever a re-render is wanted
        self._head: GzipWithTail | None = None  # the operations' part, compressed (render() only)
        self.reconfigure(operations, max_age=max_age, schedule=schedule)
        self.page = RenderedPage(gzip.compress(b"", mtime=0), 0.0)
        self.render()

    # ----- updates (any thread) -------------------------------------------------------------

    def reconfigure(
        self, operations: Iterable[OperationInfo], *, max_age: float, schedule: Schedule | None = None
    ) -> None:
        """Take a new list of operations; state of operations that keep their name is kept."""
        with self._lock:
            self._max_age = max_age
            if schedule is not None:
                self._schedule = schedule
            states: dict[str, _OperationState] = {}
            for info in operations:
                state = self._states.get(info.name) or _OperationState(info)
                state.info = info
                for api in list(state.values):
                    if api not in info.apis:
                        del state.values[api]
                        state.last_reason.pop(api, None)
                for months in (state.seen, state.closed):
                    for api in [api for api in months if api not in info.apis]:
                        del months[api]
                states[info.name] = state
            self._states = states
            self._fragments = {name: self._fragments.get(name, []) for name in states}
            self._dirty = set(states)
            self._next_expiry = 0.0
        self.changed.set()

    def record(self, result: FetchResult) -> None:
        with self._lock:
            state = self._states.get(result.operation)
            if state is None:
                return  # the operation was removed by a reload while its request was in flight
            if result.api == TOKEN_INFO:
                self._record_token_info(state, result)
                return
            if result.api not in state.info.apis:
                return
            state.requests += 1
            state.last_duration = result.duration
            state.last_reason[result.api] = result.reason
            if result.ok and isinstance(result.value, Reading):
                state.values[result.api] = (result.value.value, result.finished_at)
                self._track_month(
                    state, result.api, Seen(result.value.value, result.finished_at, result.value.month)
                )
                state.successes[result.api] = result.finished_at
                state.last_success = max(state.last_success or 0.0, result.finished_at)
                self._next_expiry = min(self._next_expiry, result.finished_at + self._max_age)
            elif result.reason is not None:
                state.errors[result.reason] = state.errors.get(result.reason, 0) + 1
                state.last_error = result.reason
                state.failures[result.api] = (result.reason, result.finished_at, result.detail)
            self._dirty.add(result.operation)
        self.changed.set()

    @staticmethod
    def _track_month(state: _OperationState, api: str, new: Seen) -> None:
        """Keep the previous reading as the closing value when ``new`` is the first of a new month. A month
        closes once: a later drop near the same 1st (a correction) does not replace its value."""
        last = state.seen.get(api)
        state.seen[api] = new
        if last is None:
            return
        month = closed_month(last, new, kind_of(api))
        kept = state.closed.get(api)
        if month is None or (kept is not None and kept.month is not None and month <= kept.month):
            return
        state.closed[api] = Seen(last.value, last.at, month)
        log.info(
            "month %s closed: operation=%s api=%s final value=%s (fetched at %s)",
            month,
            state.info.name,
            api,
            last.value,
            time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(last.at)),
        )

    def _record_token_info(self, state: _OperationState, result: FetchResult) -> None:
        """A token_info read: counted as a request of the operation that made it; its answer is shown
        for every operation sharing the token. It does not change wolkvox_up."""
        state.requests += 1
        state.last_duration = result.duration
        self._dirty.add(state.info.name)
        if not result.ok:
            if result.reason is not None:
                state.errors[result.reason] = state.errors.get(result.reason, 0) + 1
            return
        info = result.value
        for other in self._states.values():
            if other.info.token_key == state.info.token_key:
                other.token_info = (info.limit, info.used_today, result.finished_at)
                self._dirty.add(other.info.name)
        self._next_expiry = min(self._next_expiry, result.finished_at + self._token_info_lifetime())

    def set_pace(self, statuses: dict[tuple[str, str], ReportStatus]) -> None:
        """The refresher's pace per (operation, api): shown on /metrics (interval) and the status page."""
        with self._lock:
            for (name, api), status in statuses.items():
                state = self._states.get(name)
                if state is None or api == TOKEN_INFO:
                    continue
                old = state.pace.get(api)
                state.pace[api] = status
                if old is None or old.interval != status.interval:
                    self._dirty.add(name)  # next_due alone changes nothing on /metrics
        self.changed.set()

    def set_reload_status(self, ok: bool) -> None:
        with self._lock:
            self._reload_ok = 1 if ok else 0
            if ok:
                self._reload_time = self._wall()
        self.changed.set()

    # ----- reads ------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True once every operation has been tried at least once."""
        with self._lock:
            return all(state.tried for state in self._states.values())

    def report_rows(self) -> list[ReportRow]:
        """One row per (operation, api), in configuration order: for the status page."""
        rows: list[ReportRow] = []
        with self._lock:
            for name, state in self._states.items():
                for api in state.info.apis:
                    value = state.values.get(api)
                    pace = state.pace.get(api)
                    reason = state.last_reason.get(api, "")
                    rows.append(
                        ReportRow(
                            operation=name,
                            api=api,
                            value=value[0] if value is not None else None,
                            last_success=state.successes.get(api, value[1] if value is not None else None),
                            failing=bool(reason),
                            last_failure=state.failures.get(api),
                            next_due=pace.next_due if pace is not None else None,
                            interval=pace.interval if pace is not None else None,
                            last_month=state.closed.get(api),
                        )
                    )
        return rows

    def values(self) -> dict[str, dict[str, tuple[float, float]]]:
        """Last good values per operation and api, (value, fetched at): for the state file."""
        with self._lock:
            return {name: dict(state.values) for name, state in self._states.items()}

    def restore_values(self, saved: dict[str, dict[str, tuple[float, float]]]) -> None:
        """Put back values remembered from an earlier run (not counted as requests)."""
        with self._lock:
            for name, per_api in saved.items():
                state = self._states.get(name)
                if state is None:
                    continue
                for api, (value, fetched_at) in per_api.items():
                    if api in state.info.apis and api not in state.values:
                        state.values[api] = (value, fetched_at)
                        state.last_success = max(state.last_success or 0.0, fetched_at)
                self._dirty.add(name)
            self._next_expiry = 0.0
        self.changed.set()

    def month_state(self) -> SavedMonths:
        """Last readings and closing values per operation and api: for the state file."""
        with self._lock:
            return SavedMonths(
                seen={name: dict(state.seen) for name, state in self._states.items() if state.seen},
                closed={name: dict(state.closed) for name, state in self._states.items() if state.closed},
            )

    def restore_months(self, saved: SavedMonths) -> None:
        """Put back the last readings and closing values of an earlier run (a restart on the 3rd keeps the
        month that closed on the 1st, and one on the 31st still notices the close)."""
        with self._lock:
            for name, state in self._states.items():
                pairs = ((state.seen, saved.seen.get(name, {})), (state.closed, saved.closed.get(name, {})))
                for kept, restored in pairs:
                    for api, seen in restored.items():
                        if api in state.info.apis and api not in kept:
                            kept[api] = seen
                self._dirty.add(name)
        self.changed.set()

    # ----- rendering (the publisher thread) ---------------------------------------------------

    def render(self) -> RenderedPage:
        """Re-render what changed and swap in a new page. The operations' part is compressed again only
        when an operation changed; the exporter's own lines and the process metrics every time."""
        now = self._wall()
        with self._lock:
            if now >= self._next_expiry:
                self._expire(now)
            changed = bool(self._dirty) or self._head is None
            for name in self._dirty:
                self._fragments[name] = self._render_operation(self._states[name])
            self._dirty.clear()
            fragments = list(self._fragments.values()) if changed else []
            global_lines = self._render_global()
        if changed:
            # One list of byte strings joined once: no intermediate copy of the page (it is ~7 MB at
            # 10,000 operations, and every copy made here would stay in the heap as fragmentation).
            parts: list[bytes] = []
            for i, family in enumerate(OPERATION_FAMILIES):
                start = len(parts)
                parts.append(family.header())
                parts.extend(fragment[i] for fragment in fragments if fragment[i])
                if len(parts) == start + 1:
                    parts.pop()  # no samples: no header either
            head = b"".join(parts)
            del parts, fragments
            self._head = GzipWithTail(head)
            del head
        tail = global_lines.encode()
        if self._include_process_metrics:
            tail += generate_latest(REGISTRY)
        assert self._head is not None
        page = RenderedPage(self._head.with_tail(tail), now)
        self.page = page
        return page

    def _expire(self, now: float) -> None:
        """Drop values older than max_age, so a stale value is never shown as current."""
        next_expiry = float("inf")
        for name, state in self._states.items():
            for api, (_, fetched_at) in list(state.values.items()):
                expires = fetched_at + self._max_age
                if expires <= now:
                    del state.values[api]
                    self._dirty.add(name)
                    log.warning("dropping %s value of operation %s: older than max_age", api, name)
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

    def _token_info_lifetime(self) -> float:
        """token_info is read every token_info_interval: keep an answer for two reads or max_age."""
        return max(self._max_age, 2 * (self._schedule.token_info_interval or 0.0))

    @staticmethod
    def _render_operation(state: _OperationState) -> list[bytes]:
        name = state.info.name
        op = {"operation": name}
        lines = [""] * len(OPERATION_FAMILIES)
        if STEREO_REC in state.values:
            lines[_INDEX[STEREO_REC_MINUTES]] = sample(
                STEREO_REC_MINUTES.name, op, state.values[STEREO_REC][0]
            )
        lines[_INDEX[BILLING_USAGE]] = "".join(
            sample(BILLING_USAGE.name, {"operation": name, "api": api}, state.values[api][0])
            for api in state.info.apis
            if api in state.values
        )
        closed = state.closed.get(STEREO_REC)
        if closed is not None and closed.month is not None:
            lines[_INDEX[STEREO_REC_PREVIOUS_MONTH]] = sample(
                STEREO_REC_PREVIOUS_MONTH.name, {"operation": name, "month": closed.month}, closed.value
            )
        lines[_INDEX[BILLING_USAGE_PREVIOUS_MONTH]] = "".join(
            sample(
                BILLING_USAGE_PREVIOUS_MONTH.name,
                {"operation": name, "api": api, "month": str(state.closed[api].month)},
                state.closed[api].value,
            )
            for api in state.info.apis
            if api in state.closed
        )
        currency = state.info.currency
        lines[_INDEX[UNIT_PRICE]] = "".join(
            sample(UNIT_PRICE.name, {"operation": name, "api": api, "currency": currency}, price)
            for api, price in state.info.prices
            if api in state.info.apis
        )
        if state.info.cost_budget is not None:
            lines[_INDEX[COST_BUDGET]] = sample(
                COST_BUDGET.name, {"operation": name, "currency": currency}, state.info.cost_budget
            )
        if state.token_info is not None:
            limit, used, _ = state.token_info
            if limit is not None:
                lines[_INDEX[TOKEN_LIMIT]] = sample(TOKEN_LIMIT.name, op, limit)
            if used is not None:
                lines[_INDEX[TOKEN_USED]] = sample(TOKEN_USED.name, op, used)
        if state.info.budget_minutes is not None:
            lines[_INDEX[BUDGET]] = sample(BUDGET.name, op, state.info.budget_minutes)
        lines[_INDEX[UP]] = sample(UP.name, op, 1 if state.up else 0)
        if not state.up and state.last_error is not None:
            lines[_INDEX[LAST_ERROR]] = sample(
                LAST_ERROR.name, {"operation": name, "reason": state.last_error}, 1
            )
        lines[_INDEX[ERRORS]] = "".join(
            sample(ERRORS.name, {"operation": name, "reason": reason}, count)
            for reason, count in state.errors.items()
        )
        lines[_INDEX[REQUESTS]] = sample(REQUESTS.name, op, state.requests)
        if state.last_success is not None:
            lines[_INDEX[LAST_SUCCESS]] = sample(LAST_SUCCESS.name, op, state.last_success)
        if state.last_duration is not None:
            lines[_INDEX[DURATION]] = sample(DURATION.name, op, state.last_duration)
        lines[_INDEX[REFRESH_INTERVAL]] = "".join(
            sample(REFRESH_INTERVAL.name, {"operation": name, "api": api}, state.pace[api].interval)
            for api in state.info.apis
            if api in state.pace
        )
        return [line.encode() for line in lines]

    def _render_global(self) -> str:
        return "".join(
            (
                BUILD_INFO.header().decode(),
                sample(BUILD_INFO.name, {"version": __version__}, 1),
                RELOAD_OK.header().decode(),
                sample(RELOAD_OK.name, {}, self._reload_ok),
                RELOAD_TIME.header().decode(),
                sample(RELOAD_TIME.name, {}, self._reload_time),
                PLANNED_REQUESTS.header().decode(),
                sample(PLANNED_REQUESTS.name, {}, self._schedule.planned_requests_per_day),
                DAILY_LIMIT.header().decode(),
                sample(DAILY_LIMIT.name, {}, self._schedule.daily_request_limit),
            )
        )


class Publisher:
    """A thread that re-renders the store's page when it changed (at most every ``min_interval``)
    and at least every ``max_interval`` (so process metrics and expiries stay current)."""

    def __init__(self, store: Store, *, min_interval: float = 1.0, max_interval: float = 5.0) -> None:
        self._store = store
        self._min_interval = min_interval
        self._max_interval = max_interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._store.changed.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._store.changed.wait(timeout=self._max_interval)
            if self._stop.is_set():
                return
            self._store.changed.clear()
            try:
                self._store.render()
            except Exception:  # never let a rendering bug stop the page from being served
                log.exception("rendering /metrics failed; serving the previous page")
            # Coalesce bursts of results (thousands at start-up) into one render per interval.
            self._stop.wait(self._min_interval)
