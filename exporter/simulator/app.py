"""The simulator's HTTP application: the API endpoints, the control endpoints, stats and faults."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from exporter.model import BILLING_PATH, INFORMATION_PATH, TOKEN_INFO
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
    ITEMS_FORMATS,
    KNOWN_APIS,
    STOP_GRACE_SECONDS,
    SUCCESS_MSG,
    SWEEP_INTERVAL_SECONDS,
    ApiRules,
    description,
    document,
    format_items,
    parse_clock,
    stable_unit,
    usage_value,
    utc_stamp,
)
from exporter.simulator.faults import (
    FAULTS,
    WILDCARD,
    Fault,
    Interrupted,
    Play,
    error_response,
    json_response,
    parse_fault,
)

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


def _alive(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is not None and not transport.is_closing()


def _bad_control(message: str) -> web.Response:
    return json_response(400, {"error": message})


class Simulator:
    """State and handlers of one simulator instance (one per application)."""

    def __init__(self, options: SimulatorOptions) -> None:
        self.options = options
        self.rules = ApiRules(
            daily_limit=options.daily_limit,
            day_length=options.day_length,
            report_interval=options.report_interval,
        )
        self.faults: dict[str, Fault] = {}
        self.clock: float | None = None  # POST /-/clock: the Unix time answers are computed at
        self.stopping = False
        self._waiters: dict[asyncio.Future[str], web.BaseRequest] = {}

    # ----------------------------------------------------------------- bookkeeping

    def now(self) -> float:
        """The time values and dates are computed at: the real clock unless ``/-/clock`` set one."""
        return time.time() if self.clock is None else self.clock

    def snapshot(self) -> dict[str, Any]:
        return self.rules.snapshot()

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
        """Waits ``seconds`` (None: for ever); raises Interrupted if the client goes or we stop."""
        if self.stopping:
            raise Interrupted("stopping")
        if not _alive(request):
            raise Interrupted("gone")
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
            raise Interrupted(outcome)

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
        token = request.headers.get("wolkvox-token", "").strip()
        api = request.query.get("api")
        valid = KNOWN_APIS if kind == "billing" else (TOKEN_INFO,)
        api_key = "(missing)" if not api else api if api in valid else "(unknown)"
        flight, violation = self.rules.arrive(
            token, _server_name(request), api_key, lambda: _alive(request), time.time()
        )
        outcome = "answered"
        status = 0
        try:
            response = await self._answer(request, kind, token, api, violation)
            status = response.status
            return response
        except Interrupted as exc:
            outcome = exc.reason
            status = 503
            return error_response(ERR_STOPPING if exc.reason == "stopping" else ERR_GONE)
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            if token:
                self.rules.leave(token, flight)
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
        """The checks in the order the module docstring lists them."""
        if self.options.latency > 0:
            await self.pause(request, self.options.latency)
        if not token:
            return error_response(ERR_NO_TOKEN)
        if violation:
            return error_response(ERR_SIMULTANEOUS)
        fault = self.take_fault(token)
        if fault is not None:
            now = self.now()

            def answer(factor: float) -> dict[str, Any]:
                return self._success(request, kind, token, api or "stereo_rec", now, factor)

            async def pause(seconds: float | None) -> None:
                await self.pause(request, seconds)

            faulted = await FAULTS[fault.mode].play(Play(request, fault, kind == "billing", answer, pause))
            if faulted is not None:
                return faulted
        if self.hangs(token):
            await self.pause(request, None)
        now = self.now()
        if self.rules.over_daily_limit(token):
            return error_response(ERR_LIMIT)
        if not api:
            return error_response(ERR_MISSING)
        if api not in (KNOWN_APIS if kind == "billing" else (TOKEN_INFO,)):
            return error_response(ERR_UNKNOWN_API)
        return json_response(200, self._success(request, kind, token, api, now))

    def _rows(
        self, request: web.Request, kind: str, token: str, api: str, now: float, scale: float = 1.0
    ) -> list[dict[str, str]]:
        if kind == "information":
            return [
                {
                    "token_limit": str(self.options.daily_limit),
                    "token_use_today": str(self.rules.requests_today(token)),
                    "all_token_today": str(self.rules.all_requests_today()),
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
        return document(200, None, msg, self._rows(request, kind, token, api, now, scale))

    # ----------------------------------------------------------------- control endpoints

    async def handle_healthy(self, request: web.Request) -> web.Response:
        return web.Response(text="OK")

    async def handle_stats(self, request: web.Request) -> web.Response:
        return json_response(200, self.snapshot())

    async def handle_stats_reset(self, request: web.Request) -> web.Response:
        self.rules.reset()
        return json_response(200, self.snapshot())

    def _clock_doc(self) -> dict[str, Any]:
        at = None if self.clock is None else datetime.fromtimestamp(self.clock, UTC).isoformat()
        return {"at": at}

    async def handle_clock_get(self, request: web.Request) -> web.Response:
        return json_response(200, self._clock_doc())

    async def handle_clock_post(self, request: web.Request) -> web.Response:
        try:
            self.clock = parse_clock(await request.json())
        except ValueError as exc:
            return _bad_control(str(exc))
        logger.info("clock set: %s", self._clock_doc()["at"] or "real time")
        return json_response(200, self._clock_doc())

    async def handle_clock_delete(self, request: web.Request) -> web.Response:
        self.clock = None
        return json_response(200, self._clock_doc())

    def _faults_doc(self) -> dict[str, Any]:
        return {"faults": [f.as_dict() for f in self.faults.values()]}

    async def handle_faults_get(self, request: web.Request) -> web.Response:
        return json_response(200, self._faults_doc())

    async def handle_faults_delete(self, request: web.Request) -> web.Response:
        token = request.query.get("token")
        if token is None:
            self.faults.clear()
        else:
            self.faults.pop(token, None)
        return json_response(200, self._faults_doc())

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
        return json_response(200, self._faults_doc())


def _settle(waiter: asyncio.Future[str], outcome: str) -> None:
    if not waiter.done():
        waiter.set_result(outcome)


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
