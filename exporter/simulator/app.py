"""The simulator's HTTP application: the API endpoints, the control endpoints, stats and faults."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from exporter.model import BILLING_PATH, INFORMATION_PATH
from exporter.secret import token_key
from exporter.simulator.api import (
    DAY_SECONDS,
    ERR_GONE,
    ERR_LIMIT,
    ERR_MISSING,
    ERR_NO_TOKEN,
    ERR_SIMULTANEOUS,
    ERR_STOPPING,
    ERR_UNKNOWN_API,
    HTML_502,
    ITEMS_FORMATS,
    KNOWN_APIS,
    OVERSIZE_BYTES,
    STOP_GRACE_SECONDS,
    SUCCESS_MSG,
    SWEEP_INTERVAL_SECONDS,
    description,
    format_items,
    parse_clock,
    stable_unit,
    usage_value,
    utc_stamp,
)
from exporter.simulator.faults import DEFAULT_SLOW_SECONDS, ERROR_FAULTS, WILDCARD, Fault, parse_fault

logger = logging.getLogger("exporter.simulator")

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
                    token_key(token) if token else "-",
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
            if api not in KNOWN_APIS:
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
                "description": description(api),
                "items": format_items(value, self.options.items_format),
                "date": utc_stamp(now),
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
            fault.token if fault.token == WILDCARD else token_key(fault.token),
            fault.count,
            fault.seconds,
        )
        return _json_response(200, self._faults_doc())


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


def url_of(host: str, port: int) -> str:
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
    return runner, url_of(options.host or bound_host, bound_port)
