"""The simulator's model of the wolkvox API: its documented errors, its rules (``ApiRules``: one request
at a time per token, the rolling daily limit, the report interval) and month-to-date values that are
stable per (token, server) and grow through the month. No HTTP here: exporter/simulator/app.py serves
this model."""

from __future__ import annotations

import hashlib
import itertools
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from exporter.model import BILLING_APIS

SUCCESS_MSG = "Information found for the current month"
OVERSIZE_BYTES = 5 * 1024 * 1024
STOP_GRACE_SECONDS = 2.0
SWEEP_INTERVAL_SECONDS = 0.5
MAX_OFFSET = 500.0
ITEMS_FORMATS = ("int", "dot", "comma")

# The exporter's table of billing services (model.BILLING_APIS) is the simulator's too: its apis, kinds,
# row descriptions and growth rates.
KNOWN_APIS = tuple(BILLING_APIS)
LICENCE_APIS = frozenset(name for name, api in BILLING_APIS.items() if api.kind == "level")
DEFAULT_RATE = 0.1  # of an api the table does not know (a fault answers any api)

# (status, error, msg) of the documented error answers.
ERR_NO_TOKEN = (401, "UNAUTHORIZED", "PLEASE ENTER THE WOLKVOX-TOKEN")
ERR_MISSING = (400, "BAD REQUEST", "SOME PARAMETERS ARE REQUIRED")
ERR_UNKNOWN_API = (400, "BAD REQUEST", "THE API YOU WANT TO CONSULT DOES NOT EXIST")
ERR_LIMIT = (403, "FORBIDDEN", "TOKEN LIMIT EXCEEDED")
ERR_SIMULTANEOUS = (403, "FORBIDDEN", "EXCEEDS THE LIMIT OF SIMULTANEOUS REQUESTS PER TOKEN (2)")
ERR_INVALID_TOKEN = (403, "FORBIDDEN", "PLEASE VALIDATE TOKEN")
ERR_STOPPING = (503, "SERVICE UNAVAILABLE", "THE SIMULATOR IS STOPPING")
ERR_GONE = (503, "SERVICE UNAVAILABLE", "THE CLIENT WENT AWAY")
HTML_502 = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)

DAY_SECONDS = 86400.0


def document(code: int, error: str | None, msg: str, data: Any) -> dict[str, Any]:
    """An answer of the API: the same four members on success and error, ``code`` a string."""
    return {"code": str(code), "error": error, "msg": msg, "data": data}


# --------------------------------------------------------------------------- the API's rules


@dataclass
class ReportStats:
    """The requests for one (token, server, api) report and the shortest gap between two of them."""

    requests: int = 0
    last_tick: float = 0.0  # the rules' clock at the last request
    min_gap: float | None = None


@dataclass
class TokenStats:
    requests: int = 0
    window: deque[float] = field(default_factory=deque)  # each request in the last day-length, oldest first
    max_in_flight: int = 0
    violations: int = 0
    report_violations: int = 0
    apis: dict[str, int] = field(default_factory=dict)
    reports: dict[str, ReportStats] = field(default_factory=dict)
    last_request_unix: float = 0.0


class ApiRules:
    """The API's rules per token, kept and measured: one request at a time (a second one in flight is a
    *violation*, refused with the simultaneous-requests error), at most ``daily_limit`` requests in any
    ``day_length`` (a rolling window; 0 = no limit; every request counts, refused ones included), and
    each report (token, server, api) at most once per ``report_interval`` (a sooner one is a *report
    violation*, still answered: wolkvox documents no error for it; 0 = not checked).

    A request in flight is known by an ``alive`` callable: once it answers False (the client went away)
    the request no longer counts as in flight, whether or not ``leave`` was called."""

    def __init__(
        self,
        *,
        daily_limit: int = 0,
        day_length: float = DAY_SECONDS,
        report_interval: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.daily_limit = daily_limit
        self.day_length = day_length
        self.report_interval = report_interval
        self._clock = clock
        self._ids = itertools.count(1)
        self.stats: dict[str, TokenStats] = {}
        self.total_requests = 0
        self.total_violations = 0
        self.total_report_violations = 0
        self._flights: dict[str, dict[int, Callable[[], bool]]] = {}  # token -> {flight id: alive}

    def arrive(
        self, token: str, server: str, api: str, alive: Callable[[], bool], now_unix: float
    ) -> tuple[int, bool]:
        """Counts a request of ``token`` for the report (``server``, ``api``); returns its flight id (for
        ``leave``) and whether it breaks the one-request-at-a-time rule."""
        self.total_requests += 1
        if not token:
            return 0, False
        stats = self.stats.get(token)
        if stats is None:
            stats = self.stats[token] = TokenStats()
        tick = self._clock()
        stats.requests += 1
        self._prune(stats, tick)
        stats.window.append(tick)
        stats.apis[api] = stats.apis.get(api, 0) + 1
        stats.last_request_unix = now_unix
        self._count_report(stats, f"{server}/{api}", tick)
        concurrent = self.in_flight(token) + 1
        flight = next(self._ids)
        self._flights.setdefault(token, {})[flight] = alive
        stats.max_in_flight = max(stats.max_in_flight, concurrent)
        if concurrent > 1:
            stats.violations += 1
            self.total_violations += 1
            return flight, True
        return flight, False

    def leave(self, token: str, flight: int) -> None:
        flights = self._flights.get(token)
        if flights is not None:
            flights.pop(flight, None)
            if not flights:
                del self._flights[token]

    def in_flight(self, token: str) -> int:
        """Requests of ``token`` whose client is still there (forgets the others)."""
        flights = self._flights.get(token)
        if not flights:
            return 0
        for flight in [f for f, alive in flights.items() if not alive()]:
            del flights[flight]
        if not flights:
            del self._flights[token]
            return 0
        return len(flights)

    def over_daily_limit(self, token: str) -> bool:
        return bool(self.daily_limit) and self.requests_today(token) > self.daily_limit

    def requests_today(self, token: str) -> int:
        """Requests of ``token`` in the last day-length (a rolling window), the current one included."""
        stats = self.stats.get(token)
        if stats is None:
            return 0
        self._prune(stats, self._clock())
        return len(stats.window)

    def all_requests_today(self) -> int:
        return sum(self.requests_today(token) for token in self.stats)

    def _count_report(self, stats: TokenStats, key: str, tick: float) -> None:
        report = stats.reports.get(key)
        if report is None:
            report = stats.reports[key] = ReportStats()
        elif report.requests:
            gap = tick - report.last_tick
            report.min_gap = gap if report.min_gap is None else min(report.min_gap, gap)
            if gap < self.report_interval:
                stats.report_violations += 1
                self.total_report_violations += 1
        report.requests += 1
        report.last_tick = tick

    def _prune(self, stats: TokenStats, tick: float) -> None:
        """Forget requests older than one day-length."""
        window, start = stats.window, tick - self.day_length
        while window and window[0] <= start:
            window.popleft()

    def snapshot(self) -> dict[str, Any]:
        """What ``GET /-/stats`` answers."""
        tokens = {
            token: {
                "requests": s.requests,
                "requests_today": self.requests_today(token),
                "in_flight": self.in_flight(token),
                "max_in_flight": s.max_in_flight,
                "violations": s.violations,
                "report_violations": s.report_violations,
                "apis": dict(s.apis),
                "reports": {
                    key: {
                        "requests": r.requests,
                        "min_gap_seconds": None if r.min_gap is None else round(r.min_gap, 6),
                    }
                    for key, r in s.reports.items()
                },
                "last_request_unix": s.last_request_unix,
            }
            for token, s in self.stats.items()
        }
        return {
            "tokens": tokens,
            "total_requests": self.total_requests,
            "total_violations": self.total_violations,
            "total_report_violations": self.total_report_violations,
        }

    def reset(self) -> None:
        """Zero the counters; requests still in flight stay in flight."""
        self.stats = {}
        self.total_requests = 0
        self.total_violations = 0
        self.total_report_violations = 0
        for token in list(self._flights):
            live = self.in_flight(token)
            if live:
                self.stats[token] = TokenStats(max_in_flight=live)


# --------------------------------------------------------------------------- values


def stable_unit(*parts: str) -> float:
    """A number in [0, 1) derived from ``parts`` only: the same in every run, on every machine."""
    digest = hashlib.sha256("\x00".join(parts).encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def month_start(now_unix: float) -> datetime:
    now = datetime.fromtimestamp(now_unix, UTC)
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def hours_into_month(now_unix: float) -> float:
    """Hours since 00:00 UTC on the first day of the current month."""
    return max(0.0, (now_unix - month_start(now_unix).timestamp()) / 3600.0)


def usage_value(api: str, token: str, server: str, now_unix: float, minutes_per_hour: float) -> float:
    """Month-to-date value of ``api``: stable per (token, server), monotonic within a month."""
    if api in LICENCE_APIS:
        return float(1 + int(40 * stable_unit("licences", api, token, server)))
    if api == "stereo_rec":  # kept free of the api name: the documented formula
        offset = MAX_OFFSET * stable_unit("offset", token, server)
    else:
        offset = MAX_OFFSET * stable_unit("offset", api, token, server)
    known = BILLING_APIS.get(api)
    rate = minutes_per_hour * (known.simulated_rate if known is not None else DEFAULT_RATE)
    return offset + rate * hours_into_month(now_unix)


def format_items(value: float, items_format: str) -> str:
    """``int``: floor as an integer; ``dot``/``comma``: two decimals with that separator."""
    if items_format == "int":
        return str(math.floor(value))
    text = f"{value:.2f}"
    return text.replace(".", ",") if items_format == "comma" else text


def description(api: str) -> str:
    """The row description wolkvox sends for ``api`` (the api's name for one it does not know)."""
    known = BILLING_APIS.get(api)
    return known.description if known is not None else api


def utc_stamp(now_unix: float) -> str:
    return datetime.fromtimestamp(now_unix, UTC).strftime("%Y-%m-%d %H:%M:%S")


def parse_clock(body: Any) -> float | None:
    """Validates a ``POST /-/clock`` document: the Unix time to answer at, or None for the real clock."""
    if not isinstance(body, dict) or set(body) != {"at"}:
        raise ValueError('body must be a JSON object {"at": ISO 8601 time, Unix seconds or null}')
    at = body["at"]
    if at is None:
        return None
    if isinstance(at, str):
        try:
            moment = datetime.fromisoformat(at.strip())
        except ValueError:
            raise ValueError(f"at: {at!r} is not an ISO 8601 time") from None
        if moment.tzinfo is None:
            raise ValueError(f"at: {at!r} has no time zone (add Z or +00:00)")
        return moment.timestamp()
    if isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at) or at < 0:
        raise ValueError("at must be an ISO 8601 time, Unix seconds >= 0, or null")
    return float(at)
