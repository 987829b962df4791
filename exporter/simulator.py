"""A fake wolkvox billing API, for tests, benchmarks, the demo and newcomers without a token.

Run it with ``python -m exporter.simulator`` and point an operation's ``base_url`` at it
(``base_url: http://127.0.0.1:19727``); any token works. It answers like the real API as far as
it is documented: same URLs, same JSON documents, same errors, with the HTTP status equal to the
body ``code``. It is built on asyncio (aiohttp), so it holds tens of thousands
of hanging connections cheaply.

Flags
-----
``--web.listen-address HOST:PORT``
    Where to listen (default ``127.0.0.1:19727``). Port 0 picks a free port; ``:PORT`` listens on
    every interface. Once bound it writes exactly one line to stderr,
    ``simulator listening on http://HOST:PORT``, with the real port.
``--latency DURATION``
    Added to every API answer (``250ms``, ``2s``, ``1m``, ``0``; default ``0``). Not to ``/-/`` endpoints.
``--minutes-per-hour N``
    Growth rate of ``stereo_rec`` minutes (default 600, so a demo sees it move). The other counters
    grow at a fixed fraction of it; ``0`` freezes every value.
``--daily-limit N``
    Requests per token per ``--day-length`` before ``403 TOKEN LIMIT EXCEEDED`` (default 0 = no limit,
    so a demo never runs into a limit it does not model; wolkvox's is about 1000 a day).
``--day-length DURATION``
    The window the daily count is taken over (default ``1d``; e.g. ``10s`` to test a whole "day"
    quickly). It is a ROLLING window: a request counts until one day-length after it was made, so a
    client that keeps to N requests in any day-length never sees the limit, and one that does not is
    caught wherever its burst falls (stricter than the calendar day the vendor most likely counts).
    Every request that reaches the simulator counts, refused ones included.
``--report-interval DURATION``
    A report (token, ``wolkvox_server``, api) requested again sooner than this counts in
    ``report_violations`` (default ``0``: not checked). It is still answered normally: the vendor's
    "a consumption every 5 minutes" comes with no documented error.
``--hang-fraction F``
    0..1: tokens whose stable hash falls in this fraction hang on every request until the client
    goes away (for the benchmark; default 0).
``--items-format {int,dot,comma}``
    How ``items`` is written: ``1234``, ``1234.56`` or ``1234,56`` (default ``int``).
``--log.level {debug,info,warning,error}``
    Default ``info``. No access log; ``debug`` logs one line per request, with a short hash of the
    token, never the token.

API endpoints
-------------
``GET /api/v2/billing.php?api=NAME`` with header ``wolkvox-token``, checked in this order:

1. no or empty token: 401 ``PLEASE ENTER THE WOLKVOX-TOKEN``;
2. another request of the same token still in flight: 403
   ``EXCEEDS THE LIMIT OF SIMULTANEOUS REQUESTS PER TOKEN (2)``, counted as a *violation*;
3. a fault set for the token (or for ``*``), see below;
4. a token in ``--hang-fraction``: no answer, ever;
5. more than ``--daily-limit`` requests by the token in the last ``--day-length``: 403
   ``TOKEN LIMIT EXCEEDED``;
6. no ``api``: 400 ``SOME PARAMETERS ARE REQUIRED``; unknown api: 400
   ``THE API YOU WANT TO CONSULT DOES NOT EXIST``;
7. 200 ``{"code": "200", "error": null, "msg": "Information found for the current month",
   "data": [{"operation", "description", "items", "date"}]}``, every field a string.

The operation is the ``wolkvox_server`` header (or ``wolkvox-server``), else the first label of the
Host header (the whole address when Host is an IP address). Values are month-to-date (UTC) and
stable across restarts: ``stereo_rec`` is ``offset(token, server) + minutes_per_hour * hours since the
start of the month``, with ``offset`` a hash-derived number in [0, 500); licence apis are a stable
small integer; the other counters grow at a stable per-api rate. Known apis: agent_script,
intelligent_dial, ivr_minutes, amazon_s3, rsync_s3_mp3, rec_screen, interactions, chat_licenses,
interaction_licenses, ivr_calls, amd_ai, stereo_rec, wp_connectors, wp_connectors_official.

``GET /api/v2/information.php?api=token_info``: same rules (and it counts as a request); answers
``data: [{"token_limit", "token_use_today", "all_token_today"}]`` (``token_limit`` is ``"0"`` when
there is no limit; "today" is the last ``--day-length``).

Control endpoints
-----------------
``POST /-/faults`` with JSON ``{"mode": M, "token": T, "count": N, "seconds": S, "location": URL}``
    Sets the fault of token ``T`` (``*`` = every token; a token's own fault wins over ``*``).
    ``count`` (optional): apply to the next N requests, then clear. ``seconds``: for ``slow``
    (default 1) and ``hang``. ``location``: for ``redirect`` (required). Faulted requests still
    count in the stats and the daily budget.
``GET /-/faults`` lists the faults; ``DELETE /-/faults`` clears them (``?token=T``: only that one).
``GET /-/stats``
    ``{"tokens": {T: {"requests", "requests_today", "in_flight", "max_in_flight", "violations",
    "report_violations", "apis": {api: n}, "reports": {"SERVER/API": {"requests", "min_gap_seconds"}},
    "last_request_unix"}}, "total_requests", "total_violations", "total_report_violations"}``.
    ``requests_today`` is the count in the last ``--day-length``. A report is one (token, server,
    api); ``min_gap_seconds`` is the shortest time between the arrivals of two of its requests (null
    until there are two). Reading the stats is not a request.
``POST /-/stats/reset`` zeroes the counters (requests still in flight stay in flight).
``GET /-/healthy`` answers 200 ``OK``.
``POST /-/clock`` with JSON ``{"at": T}``
    Answers as if it were T from now on, to play a month change without waiting for one: the
    month-to-date values and the rows' ``date`` are computed at T, which stands still until set again.
    T is an ISO 8601 time with a zone (``2026-11-30T23:55:00Z``) or Unix seconds; ``{"at": null}`` or
    ``DELETE /-/clock`` goes back to the real clock. The daily limit, the stats and the report gaps keep
    the real clock. ``GET /-/clock`` answers ``{"at": ISO time or null}``.

Fault modes
-----------
``none``          answer normally (use it to exempt one token from a ``*`` fault)
``hang``          never answer, until the client disconnects; with ``seconds``, close the
                  connection without an answer after that long
``slow``          answer normally after ``seconds``
``reset``         send the status line, headers with a Content-Length larger than the body, part
                  of the body, then abort the connection
``http_500``      500 with a plain-text body
``html``          502 with an HTML error page (a proxy in the way)
``badjson``       200, body ``{"code": "200", "data": [``
``wrongshape``    200, valid JSON of the wrong shape (a list holding the document)
``oversize``      200, a valid JSON document of exactly 5 MiB (padded)
``garbage_items`` 200 with ``"items": "n/a"``
``multi_rows``    200 with two rows, items ``"100"`` and ``"23"``
``empty_data``    200 with ``"data": []``
``token_limit``   403 ``TOKEN LIMIT EXCEEDED``
``invalid_token`` 403 ``PLEASE VALIDATE TOKEN``
``busy``          403 ``EXCEEDS THE LIMIT OF SIMULTANEOUS REQUESTS PER TOKEN (2)`` (not a violation)
``unknown_api``   400 ``THE API YOU WANT TO CONSULT DOES NOT EXIST``
``maintenance``   403 with an empty body
``no_token``      401 as if the token header were missing
``redirect``      302 to ``location`` (to check that a client does not forward the token)
``correction``    200 with ``items`` at half the month-to-date value, same ``date``: the vendor correcting
                  a value within the month (which is not a month change)
``no_date``       200 with rows that have no ``date`` field

SIGTERM and SIGINT stop it within a second or two, even with hanging connections (they get a 503).
In-process: ``build_app(SimulatorOptions(...))`` or ``await start_server(options)``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import math
import re
import signal
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from exporter.fdlimit import raise_fd_limit

logger = logging.getLogger("exporter.simulator")  # not "__main__" under -m

BILLING_PATH = "/api/v2/billing.php"
INFORMATION_PATH = "/api/v2/information.php"
SUCCESS_MSG = "Information found for the current month"
OVERSIZE_BYTES = 5 * 1024 * 1024
STOP_GRACE_SECONDS = 2.0
SWEEP_INTERVAL_SECONDS = 0.5
MAX_OFFSET = 500.0
ITEMS_FORMATS = ("int", "dot", "comma")

DESCRIPTIONS: dict[str, str] = {
    "agent_script": "Active Agent Script licenses",
    "intelligent_dial": "Active intelligent dialing licenses",
    "ivr_minutes": "IVR minutes used",
    "amazon_s3": "Licenses enabled for external storage",
    "rsync_s3_mp3": "Audio files copied to external storage",
    "rec_screen": "Screen recording minutes",
    "interactions": "Omnichannel interactions (mail, social networks)",
    "chat_licenses": "Chat licenses",
    "interaction_licenses": "Interaction licenses",
    "ivr_calls": "IVR calls",
    "amd_ai": "AI answering machine detections",
    "stereo_rec": "Stereo recording minutes",
    "wp_connectors": "WhatsApp connectors",
    "wp_connectors_official": "Official WhatsApp connectors",
}
KNOWN_APIS = tuple(DESCRIPTIONS)
LICENCE_APIS = frozenset(
    {
        "agent_script",
        "intelligent_dial",
        "amazon_s3",
        "chat_licenses",
        "interaction_licenses",
        "wp_connectors",
        "wp_connectors_official",
    }
)
# Growth of the other counters, as a fraction of --minutes-per-hour.
COUNTER_RATES: dict[str, float] = {
    "stereo_rec": 1.0,
    "ivr_minutes": 0.4,
    "ivr_calls": 0.25,
    "rsync_s3_mp3": 0.2,
    "rec_screen": 0.15,
    "amd_ai": 0.125,
    "interactions": 0.1,
}

FAULT_MODES = (
    "none",
    "hang",
    "slow",
    "reset",
    "http_500",
    "html",
    "badjson",
    "wrongshape",
    "oversize",
    "garbage_items",
    "multi_rows",
    "empty_data",
    "token_limit",
    "invalid_token",
    "busy",
    "unknown_api",
    "maintenance",
    "no_token",
    "redirect",
    "correction",
    "no_date",
)
WILDCARD = "*"
DEFAULT_SLOW_SECONDS = 1.0

# (status, error, msg) of the documented error answers.
ERR_NO_TOKEN = (401, "UNAUTHORIZED", "PLEASE ENTER THE WOLKVOX-TOKEN")
ERR_MISSING = (400, "BAD REQUEST", "SOME PARAMETERS ARE REQUIRED")
ERR_UNKNOWN_API = (400, "BAD REQUEST", "THE API YOU WANT TO CONSULT DOES NOT EXIST")
ERR_LIMIT = (403, "FORBIDDEN", "TOKEN LIMIT EXCEEDED")
ERR_SIMULTANEOUS = (403, "FORBIDDEN", "EXCEEDS THE LIMIT OF SIMULTANEOUS REQUESTS PER TOKEN (2)")
ERR_INVALID_TOKEN = (403, "FORBIDDEN", "PLEASE VALIDATE TOKEN")
ERR_STOPPING = (503, "SERVICE UNAVAILABLE", "THE SIMULATOR IS STOPPING")
ERR_GONE = (503, "SERVICE UNAVAILABLE", "THE CLIENT WENT AWAY")
ERROR_FAULTS = {
    "token_limit": ERR_LIMIT,
    "invalid_token": ERR_INVALID_TOKEN,
    "busy": ERR_SIMULTANEOUS,
    "unknown_api": ERR_UNKNOWN_API,
    "no_token": ERR_NO_TOKEN,
}

HTML_502 = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
DAY_SECONDS = 86400.0


# --------------------------------------------------------------------------- pure helpers


def parse_duration(text: str) -> float:
    """``250ms``, ``2s``, ``1m30s``, ``1h``, ``1d``, ``0`` or a bare number of seconds -> seconds (>= 0)."""
    value = text.strip()
    try:
        seconds = float(value)
    except ValueError:
        if not value or _DURATION_PART.sub("", value):
            raise ValueError(f"invalid duration {text!r} (use e.g. 250ms, 2s, 1m, 0)") from None
        seconds = sum(float(n) * _DURATION_UNITS[unit] for n, unit in _DURATION_PART.findall(value))
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"invalid duration {text!r}: must be a finite number >= 0")
    return seconds


def parse_listen_address(text: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``:port`` -> (host, port); host ``""`` means every interface."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"invalid listen address {text!r} (want host:port)")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"invalid listen address {text!r}: port out of range")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port


def stable_unit(*parts: str) -> float:
    """A number in [0, 1) derived from ``parts`` only: the same in every run, on every machine."""
    digest = hashlib.sha256("\x00".join(parts).encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def token_hash(token: str) -> str:
    """A short, stable, non-reversible name for a token, for logs."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()[:8]


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
    rate = minutes_per_hour * COUNTER_RATES.get(api, 0.1)
    return offset + rate * hours_into_month(now_unix)


def format_items(value: float, items_format: str) -> str:
    """``int``: floor as an integer; ``dot``/``comma``: two decimals with that separator."""
    if items_format == "int":
        return str(math.floor(value))
    text = f"{value:.2f}"
    return text.replace(".", ",") if items_format == "comma" else text


def _utc_stamp(now_unix: float) -> str:
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


# --------------------------------------------------------------------------- options and state


@dataclass(frozen=True)
class SimulatorOptions:
    host: str = "127.0.0.1"
    port: int = 19727
    latency: float = 0.0
    minutes_per_hour: float = 600.0
    daily_limit: int = 0
    hang_fraction: float = 0.0
    items_format: str = "int"
    day_length: float = DAY_SECONDS
    report_interval: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port out of range: {self.port}")
        if not (math.isfinite(self.latency) and self.latency >= 0):
            raise ValueError("latency must be >= 0")
        if not (math.isfinite(self.minutes_per_hour) and self.minutes_per_hour >= 0):
            raise ValueError("minutes_per_hour must be >= 0")
        if self.daily_limit < 0:
            raise ValueError("daily_limit must be >= 0 (0 = no limit)")
        if not 0.0 <= self.hang_fraction <= 1.0:
            raise ValueError("hang_fraction must be within 0..1")
        if self.items_format not in ITEMS_FORMATS:
            raise ValueError(f"items_format must be one of {', '.join(ITEMS_FORMATS)}")
        if not (math.isfinite(self.day_length) and self.day_length > 0):
            raise ValueError("day_length must be > 0")
        if not (math.isfinite(self.report_interval) and self.report_interval >= 0):
            raise ValueError("report_interval must be >= 0 (0 = not enforced)")


@dataclass
class Fault:
    mode: str
    token: str
    count: int | None = None
    seconds: float | None = None
    location: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "token": self.token,
            "count": self.count,
            "seconds": self.seconds,
            "location": self.location,
        }


@dataclass
class ReportStats:
    """The requests for one (token, server, api) report and the shortest gap between two of them."""

    requests: int = 0
    last_tick: float = 0.0  # time.monotonic() of the last request
    min_gap: float | None = None


@dataclass
class TokenStats:
    requests: int = 0
    # time.monotonic() of each request in the last --day-length, oldest first
    window: deque[float] = field(default_factory=deque)
    max_in_flight: int = 0
    violations: int = 0
    report_violations: int = 0
    apis: dict[str, int] = field(default_factory=dict)
    reports: dict[str, ReportStats] = field(default_factory=dict)
    last_request_unix: float = 0.0


class _Interrupted(Exception):
    """A wait ended early: the client went away or the simulator is stopping."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _alive(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is not None and not transport.is_closing()


def _doc(code: int, error: str | None, msg: str, data: Any) -> dict[str, Any]:
    return {"code": str(code), "error": error, "msg": msg, "data": data}


def _json_response(status: int, doc: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=json.dumps(doc).encode(), content_type="application/json", headers=headers
    )


def _error(err: tuple[int, str, str]) -> web.Response:
    status, error, msg = err
    return _json_response(status, _doc(status, error, msg, None))


def _bad_control(message: str) -> web.Response:
    return _json_response(400, {"error": message})


class Simulator:
    """State and handlers of one simulator instance (one per application)."""

    def __init__(self, options: SimulatorOptions) -> None:
        self.options = options
        self.stats: dict[str, TokenStats] = {}
        self.total_requests = 0
        self.total_violations = 0
        self.total_report_violations = 0
        self.faults: dict[str, Fault] = {}
        self.clock: float | None = None  # POST /-/clock: the Unix time answers are computed at
        self.stopping = False
        # token -> {id(request): request}: requests are not hashable
        self._flights: dict[str, dict[int, web.BaseRequest]] = {}
        self._waiters: dict[asyncio.Future[str], web.BaseRequest] = {}

    # ----------------------------------------------------------------- bookkeeping

    def now(self) -> float:
        """The time values and dates are computed at: the real clock unless ``/-/clock`` set one."""
        return time.time() if self.clock is None else self.clock

    def in_flight(self, token: str) -> int:
        """Requests of ``token`` being handled whose client is still connected (prunes the rest)."""
        flights = self._flights.get(token)
        if not flights:
            return 0
        for key in [k for k, r in flights.items() if not _alive(r)]:
            del flights[key]
        if not flights:
            del self._flights[token]
            return 0
        return len(flights)

    def _arrive(self, request: web.BaseRequest, token: str, api_key: str, now: float) -> bool:
        """Counts a request; returns True if it is a concurrency violation."""
        self.total_requests += 1
        if not token:
            return False
        stats = self.stats.get(token)
        if stats is None:
            stats = self.stats[token] = TokenStats()
        tick = time.monotonic()
        stats.requests += 1
        self._prune(stats, tick)
        stats.window.append(tick)
        stats.apis[api_key] = stats.apis.get(api_key, 0) + 1
        stats.last_request_unix = now
        self._count_report(stats, f"{_server_name(request)}/{api_key}", tick)
        concurrent = self.in_flight(token) + 1
        self._flights.setdefault(token, {})[id(request)] = request
        stats.max_in_flight = max(stats.max_in_flight, concurrent)
        if concurrent > 1:
            stats.violations += 1
            self.total_violations += 1
            return True
        return False

    def _leave(self, request: web.BaseRequest, token: str) -> None:
        flights = self._flights.get(token)
        if flights is not None:
            flights.pop(id(request), None)
            if not flights:
                del self._flights[token]

    def _count_report(self, stats: TokenStats, key: str, tick: float) -> None:
        report = stats.reports.get(key)
        if report is None:
            report = stats.reports[key] = ReportStats()
        elif report.requests:
            gap = tick - report.last_tick
            report.min_gap = gap if report.min_gap is None else min(report.min_gap, gap)
            if gap < self.options.report_interval:
                stats.report_violations += 1
                self.total_report_violations += 1
        report.requests += 1
        report.last_tick = tick

    def _prune(self, stats: TokenStats, tick: float) -> None:
        """Forget requests older than one --day-length."""
        window, start = stats.window, tick - self.options.day_length
        while window and window[0] <= start:
            window.popleft()

    def requests_today(self, token: str) -> int:
        """Requests of ``token`` in the last --day-length (a rolling window), this one included."""
        stats = self.stats.get(token)
        if stats is None:
            return 0
        self._prune(stats, time.monotonic())
        return len(stats.window)

    def all_requests_today(self) -> int:
        return sum(self.requests_today(token) for token in self.stats)

    def snapshot(self) -> dict[str, Any]:
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

    def reset_stats(self) -> None:
        self.stats = {}
        self.total_requests = 0
        self.total_violations = 0
        self.total_report_violations = 0
        for token in list(self._flights):
            live = self.in_flight(token)
            if live:
                self.stats[token] = TokenStats(max_in_flight=live)

    def hangs(self, token: str) -> bool:
        fraction = self.options.hang_fraction
        return fraction > 0 and stable_unit("hang", token) < fraction

    def take_fault(self, token: str) -> Fault | None:
        key = token if token in self.faults else WILDCARD
        fault = self.faults.get(key)
        if fault is None:
            return None
        if fault.count is not None:
            fault.count -= 1
            if fault.count <= 0:
                del self.faults[key]
        return fault

    # ----------------------------------------------------------------- waiting

    async def pause(self, request: web.BaseRequest, seconds: float | None) -> None:
        """Waits ``seconds`` (None: for ever); raises _Interrupted if the client goes or we stop."""
        if self.stopping:
            raise _Interrupted("stopping")
        if not _alive(request):
            raise _Interrupted("gone")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[str] = loop.create_future()
        timer = None
        if seconds is not None:
            timer = loop.call_later(seconds, _settle, waiter, "elapsed")
        self._waiters[waiter] = request
        try:
            outcome = await waiter
        finally:
            self._waiters.pop(waiter, None)
            if timer is not None:
                timer.cancel()
        if outcome != "elapsed":
            raise _Interrupted(outcome)

    async def sweep(self) -> None:
        """Wakes waiters whose client went away (when handler cancellation is off)."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_SECONDS)
            for waiter, request in list(self._waiters.items()):
                if not _alive(request):
                    _settle(waiter, "gone")

    def stop(self) -> None:
        self.stopping = True
        for waiter in list(self._waiters):
            _settle(waiter, "stopping")

    # ----------------------------------------------------------------- API endpoints

    async def handle_billing(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "billing")

    async def handle_information(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "information")

    async def _handle(self, request: web.Request, kind: str) -> web.StreamResponse:
        started = time.monotonic()
        now = time.time()
        token = request.headers.get("wolkvox-token", "").strip()
        api = request.query.get("api")
        valid = KNOWN_APIS if kind == "billing" else ("token_info",)
        api_key = "(missing)" if not api else api if api in valid else "(unknown)"
        violation = self._arrive(request, token, api_key, now)
        outcome = "answered"
        status = 0
        try:
            response = await self._answer(request, kind, token, api, violation)
            status = response.status
            return response
        except _Interrupted as exc:
            outcome = exc.reason
            status = 503
            return _error(ERR_STOPPING if exc.reason == "stopping" else ERR_GONE)
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            if token:
                self._leave(request, token)
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug(
                    "%s %s api=%s token=%s status=%d outcome=%s violation=%s elapsed=%.3fs",
                    request.method,
                    request.path,
                    api_key,
                    token_hash(token) if token else "-",
                    status,
                    outcome,
                    violation,
                    time.monotonic() - started,
                )

    async def _answer(
        self, request: web.Request, kind: str, token: str, api: str | None, violation: bool
    ) -> web.StreamResponse:
        if self.options.latency > 0:
            await self.pause(request, self.options.latency)
        if not token:
            return _error(ERR_NO_TOKEN)
        if violation:
            return _error(ERR_SIMULTANEOUS)
        fault = self.take_fault(token)
        if fault is not None and fault.mode not in ("none", "slow"):
            return await self._faulted(request, fault, kind, token, api)
        if fault is not None and fault.mode == "slow":
            await self.pause(request, DEFAULT_SLOW_SECONDS if fault.seconds is None else fault.seconds)
        if self.hangs(token):
            await self.pause(request, None)
        now = self.now()
        limit = self.options.daily_limit
        if limit and self.requests_today(token) > limit:
            return _error(ERR_LIMIT)
        if not api:
            return _error(ERR_MISSING)
        if kind == "billing":
            if api not in DESCRIPTIONS:
                return _error(ERR_UNKNOWN_API)
        elif api != "token_info":
            return _error(ERR_UNKNOWN_API)
        return _json_response(200, self._success(request, kind, token, api, now))

    def _rows(
        self, request: web.Request, kind: str, token: str, api: str, now: float, scale: float = 1.0
    ) -> list[dict[str, str]]:
        if kind == "information":
            return [
                {
                    "token_limit": str(self.options.daily_limit),
                    "token_use_today": str(self.requests_today(token)),
                    "all_token_today": str(self.all_requests_today()),
                }
            ]
        server = _server_name(request)
        value = scale * usage_value(api, token, server, now, self.options.minutes_per_hour)
        return [
            {
                "operation": server,
                "description": DESCRIPTIONS.get(api, api),
                "items": format_items(value, self.options.items_format),
                "date": _utc_stamp(now),
            }
        ]

    def _success(
        self, request: web.Request, kind: str, token: str, api: str, now: float, scale: float = 1.0
    ) -> dict[str, Any]:
        msg = SUCCESS_MSG if kind == "billing" else "Token information found"
        return _doc(200, None, msg, self._rows(request, kind, token, api, now, scale))

    async def _faulted(
        self, request: web.Request, fault: Fault, kind: str, token: str, api: str | None
    ) -> web.StreamResponse:
        mode = fault.mode
        if mode in ERROR_FAULTS:
            return _error(ERROR_FAULTS[mode])
        if mode == "hang":
            await self.pause(request, fault.seconds)
            _close(request)  # `seconds` passed: hang up without an answer
            raise _Interrupted("closed")
        if mode == "http_500":
            return web.Response(status=500, text="Internal Server Error\n")
        if mode == "html":
            return web.Response(status=502, text=HTML_502, content_type="text/html")
        if mode == "badjson":
            return web.Response(
                status=200, body=b'{"code": "200", "data": [', content_type="application/json"
            )
        if mode == "maintenance":
            return web.Response(status=403, body=b"", content_type="text/html")
        if mode == "redirect":
            return web.Response(status=302, headers={"Location": fault.location or "/"})
        now = self.now()
        api_name = api if api else "stereo_rec"
        doc = self._success(request, kind, token, api_name, now, scale=0.5 if mode == "correction" else 1.0)
        if mode == "wrongshape":
            return _json_response(200, [doc])
        if mode == "empty_data":
            doc["data"] = []
        elif mode == "garbage_items":
            doc["data"] = [
                {k: ("n/a" if k not in ("operation", "description", "date") else v) for k, v in row.items()}
                for row in doc["data"]
            ]
        elif mode == "no_date":
            doc["data"] = [{k: v for k, v in row.items() if k != "date"} for row in doc["data"]]
        elif mode == "multi_rows":
            row = doc["data"][0]
            if kind == "billing":
                doc["data"] = [{**row, "items": "100"}, {**row, "items": "23"}]
            else:
                doc["data"] = [row, dict(row)]
        elif mode == "oversize":
            return web.Response(
                status=200, body=_padded(doc, OVERSIZE_BYTES), content_type="application/json"
            )
        elif mode == "reset":
            return await self._reset(request, doc)
        return _json_response(200, doc)

    async def _reset(self, request: web.Request, doc: dict[str, Any]) -> web.StreamResponse:
        body = json.dumps(doc).encode()
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        response.content_length = len(body) + 1024
        await response.prepare(request)
        await response.write(body[: len(body) // 2])
        transport = request.transport
        if transport is not None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 1.0
            while transport.get_write_buffer_size() and loop.time() < deadline:
                await asyncio.sleep(0.005)
            transport.abort()
        return response

    # ----------------------------------------------------------------- control endpoints

    async def handle_healthy(self, request: web.Request) -> web.Response:
        return web.Response(text="OK")

    async def handle_stats(self, request: web.Request) -> web.Response:
        return _json_response(200, self.snapshot())

    async def handle_stats_reset(self, request: web.Request) -> web.Response:
        self.reset_stats()
        return _json_response(200, self.snapshot())

    def _clock_doc(self) -> dict[str, Any]:
        at = None if self.clock is None else datetime.fromtimestamp(self.clock, UTC).isoformat()
        return {"at": at}

    async def handle_clock_get(self, request: web.Request) -> web.Response:
        return _json_response(200, self._clock_doc())

    async def handle_clock_post(self, request: web.Request) -> web.Response:
        try:
            self.clock = parse_clock(await request.json())
        except ValueError as exc:
            return _bad_control(str(exc))
        logger.info("clock set: %s", self._clock_doc()["at"] or "real time")
        return _json_response(200, self._clock_doc())

    async def handle_clock_delete(self, request: web.Request) -> web.Response:
        self.clock = None
        return _json_response(200, self._clock_doc())

    def _faults_doc(self) -> dict[str, Any]:
        return {"faults": [f.as_dict() for f in self.faults.values()]}

    async def handle_faults_get(self, request: web.Request) -> web.Response:
        return _json_response(200, self._faults_doc())

    async def handle_faults_delete(self, request: web.Request) -> web.Response:
        token = request.query.get("token")
        if token is None:
            self.faults.clear()
        else:
            self.faults.pop(token, None)
        return _json_response(200, self._faults_doc())

    async def handle_faults_post(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError as exc:
            return _bad_control(f"body is not JSON: {exc}")
        try:
            fault = parse_fault(body)
        except ValueError as exc:
            return _bad_control(str(exc))
        self.faults[fault.token] = fault
        logger.info(
            "fault set: mode=%s token=%s count=%s seconds=%s",
            fault.mode,
            fault.token if fault.token == WILDCARD else token_hash(fault.token),
            fault.count,
            fault.seconds,
        )
        return _json_response(200, self._faults_doc())


def parse_fault(body: Any) -> Fault:
    """Validates a ``POST /-/faults`` document; raises ValueError with a one-line message."""
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    unknown = set(body) - {"mode", "token", "count", "seconds", "location"}
    if unknown:
        raise ValueError(f"unknown keys: {', '.join(sorted(unknown))}")
    mode = body.get("mode")
    if mode not in FAULT_MODES:
        raise ValueError(f"mode must be one of: {', '.join(FAULT_MODES)}")
    token = body.get("token")
    if not isinstance(token, str) or not token.strip():
        raise ValueError("token must be a non-empty string ('*' for every token)")
    count = body.get("count")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ValueError("count must be an integer >= 1")
    seconds = body.get("seconds")
    if seconds is not None:
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            raise ValueError("seconds must be a number")
        seconds = float(seconds)
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError("seconds must be a finite number >= 0")
    location = body.get("location")
    if mode == "redirect":
        if not isinstance(location, str) or not re.match(r"^https?://", location):
            raise ValueError("redirect needs a location (http or https URL)")
    elif location is not None:
        raise ValueError("location is only for mode redirect")
    return Fault(mode=mode, token=token.strip(), count=count, seconds=seconds, location=location)


def _settle(waiter: asyncio.Future[str], outcome: str) -> None:
    if not waiter.done():
        waiter.set_result(outcome)


def _close(request: web.BaseRequest) -> None:
    transport = request.transport
    if transport is not None:
        transport.close()


def _padded(doc: dict[str, Any], size: int) -> bytes:
    """``doc`` as JSON with a ``padding`` string member making it exactly ``size`` bytes."""
    base = json.dumps({**doc, "padding": ""}).encode()
    return base[:-2] + b"x" * max(0, size - len(base)) + b'"}'


def _server_name(request: web.BaseRequest) -> str:
    for header in ("wolkvox_server", "wolkvox-server"):
        value = request.headers.get(header, "").strip()
        if value:
            return value
    host = request.host
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return name.split(".", 1)[0]
    return name


# --------------------------------------------------------------------------- application

SIMULATOR_KEY = web.AppKey("simulator", Simulator)


def build_app(options: SimulatorOptions | None = None) -> web.Application:
    """The simulator as an aiohttp application (access log off, handlers cancelled on disconnect).

    ``app[SIMULATOR_KEY]`` is its :class:`Simulator` (stats, faults) for in-process use.
    """
    sim = Simulator(options or SimulatorOptions())
    app = web.Application(handler_args={"handler_cancellation": True, "access_log": None})
    app[SIMULATOR_KEY] = sim

    async def background(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(sim.sweep())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def on_shutdown(app: web.Application) -> None:
        sim.stop()

    app.cleanup_ctx.append(background)
    app.on_shutdown.append(on_shutdown)
    app.router.add_get(BILLING_PATH, sim.handle_billing, allow_head=False)
    app.router.add_get(INFORMATION_PATH, sim.handle_information, allow_head=False)
    app.router.add_get("/-/healthy", sim.handle_healthy, allow_head=False)
    app.router.add_get("/-/stats", sim.handle_stats, allow_head=False)
    app.router.add_post("/-/stats/reset", sim.handle_stats_reset)
    app.router.add_get("/-/faults", sim.handle_faults_get, allow_head=False)
    app.router.add_post("/-/faults", sim.handle_faults_post)
    app.router.add_delete("/-/faults", sim.handle_faults_delete)
    app.router.add_get("/-/clock", sim.handle_clock_get, allow_head=False)
    app.router.add_post("/-/clock", sim.handle_clock_post)
    app.router.add_delete("/-/clock", sim.handle_clock_delete)
    return app


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def start_server(options: SimulatorOptions) -> tuple[web.AppRunner, str]:
    """Starts the simulator in the running loop; returns the runner (``await runner.cleanup()``
    stops it) and the base URL with the real bound port."""
    runner = web.AppRunner(build_app(options), shutdown_timeout=STOP_GRACE_SECONDS)
    await runner.setup()
    try:
        site = web.TCPSite(runner, options.host or None, options.port, backlog=4096, reuse_address=True)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    addresses = runner.addresses
    if not addresses:  # pragma: no cover - a started TCPSite always has a socket
        raise OSError("the simulator is not bound to any address")
    bound_host, bound_port = addresses[0][0], addresses[0][1]
    return runner, _url(options.host or bound_host, bound_port)


# --------------------------------------------------------------------------- command line


def _arg(convert: Any, what: str) -> Any:
    def parse(text: str) -> Any:
        try:
            return convert(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{what}: {exc}") from None

    return parse


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError("must be within 0..1")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be >= 0")
    return value


def _positive_duration(text: str) -> float:
    value = parse_duration(text)
    if value <= 0:
        raise ValueError("must be > 0")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError("must be a finite number >= 0")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m exporter.simulator",
        description="A fake wolkvox billing API (see the module docstring for faults and /-/ endpoints).",
    )
    parser.add_argument(
        "--web.listen-address",
        dest="listen",
        default="127.0.0.1:19727",
        type=_arg(parse_listen_address, "listen address"),
        help="host:port to listen on; port 0 picks a free port (default %(default)s)",
    )
    parser.add_argument(
        "--latency",
        default="0",
        type=_arg(parse_duration, "latency"),
        help="added to every API answer, e.g. 250ms, 2s (default %(default)s)",
    )
    parser.add_argument(
        "--minutes-per-hour",
        default=600.0,
        type=_arg(_non_negative_float, "minutes per hour"),
        help="growth rate of stereo_rec minutes (default %(default)s)",
    )
    parser.add_argument(
        "--daily-limit",
        default=0,
        type=_arg(_non_negative_int, "daily limit"),
        help="requests per token per --day-length before 403 TOKEN LIMIT EXCEEDED; 0 = none "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--day-length",
        default="1d",
        type=_arg(_positive_duration, "day length"),
        help="the rolling window --daily-limit counts over, e.g. 1d, 10s (default %(default)s)",
    )
    parser.add_argument(
        "--report-interval",
        default="0",
        type=_arg(parse_duration, "report interval"),
        help="a report (token, server, api) fetched again sooner counts in report_violations; "
        "0 = not checked (default %(default)s)",
    )
    parser.add_argument(
        "--hang-fraction",
        default=0.0,
        type=_arg(_fraction, "hang fraction"),
        help="fraction (0..1) of tokens, by stable hash, that hang on every request (default %(default)s)",
    )
    parser.add_argument(
        "--items-format",
        default="int",
        choices=ITEMS_FORMATS,
        help="how items is written (default %(default)s)",
    )
    parser.add_argument(
        "--log.level",
        dest="log_level",
        default="info",
        choices=("debug", "info", "warn", "warning", "error"),
        help="log level (default %(default)s)",
    )
    return parser


def _announce(url: str) -> None:
    """The one line a test, a benchmark or a human waits for; printed whatever --log.level says."""
    announcer = logging.getLogger(f"{logger.name}.listen")
    if not announcer.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        announcer.addHandler(handler)
        announcer.propagate = False
        announcer.setLevel(logging.INFO)
    announcer.info("simulator listening on %s", url)  # StreamHandler flushes after every record


async def _serve(options: SimulatorOptions) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    try:
        runner, url = await start_server(options)
    except OSError as exc:
        logger.error("cannot listen on %s: %s", _url(options.host or "0.0.0.0", options.port), exc)
        return 1
    _announce(url)
    await stop.wait()
    logger.info("stopping")
    await runner.cleanup()
    logger.info("stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a bad flag (argparse printed why)
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    host, port = args.listen
    options = SimulatorOptions(
        host=host,
        port=port,
        latency=args.latency,
        minutes_per_hour=args.minutes_per_hour,
        daily_limit=args.daily_limit,
        hang_fraction=args.hang_fraction,
        items_format=args.items_format,
        day_length=args.day_length,
        report_interval=args.report_interval,
    )
    raise_fd_limit()  # lets one process hold 10,000+ connections (the soft limit is often 1024)
    try:
        return asyncio.run(_serve(options))
    except KeyboardInterrupt:  # a second Ctrl-C while stopping
        return 130


if __name__ == "__main__":
    sys.exit(main())
