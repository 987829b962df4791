"""Command line: flags in the Prometheus style, start-up, reload (SIGHUP, POST /-/reload), shutdown."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import signal
import sys
from collections.abc import Sequence

from aiohttp import web

from exporter import __version__
from exporter.config import Config, ConfigError, format_duration
from exporter.configproc import load_config_isolated
from exporter.fdlimit import raise_fd_limit
from exporter.logs import FORMATS, LEVELS, redact, setup_logging
from exporter.planner import plan_pace
from exporter.refresher import Refresher, plan_jobs, token_key
from exporter.statefile import StateFile, StateSaver
from exporter.store import OperationInfo, Publisher, Schedule, Store
from exporter.web import LimitedSite, WebApp, parse_listen_address
from exporter.webconfig import WebConfigError, load_web_config

log = logging.getLogger("exporter")

DEFAULT_PORT = 19726
SHUTDOWN_SECONDS = 3.0
# Idle keep-alive connections (and half-sent requests) are closed after this: a slow or stuck client
# holds one of --web.max-connections for at most this long. nginx's default.
KEEPALIVE_SECONDS = 75.0
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wolkvox-exporter",
        description="Prometheus exporter for wolkvox billing usage. Values are fetched in the background, "
        "within the API's limits, and served from a cache.",
    )
    parser.add_argument("--config.file", dest="config_file", default="config.yml", help="YAML configuration")
    parser.add_argument(
        "--config.check", dest="config_check", action="store_true", help="validate the config file and exit"
    )
    parser.add_argument(
        "--web.listen-address",
        dest="listen_address",
        default=f":{DEFAULT_PORT}",
        help=f"address to listen on, host:port (default :{DEFAULT_PORT}, all interfaces)",
    )
    parser.add_argument(
        "--web.telemetry-path", dest="telemetry_path", default="/metrics", help="path of the metrics page"
    )
    parser.add_argument(
        "--web.config.file",
        dest="web_config_file",
        default=None,
        help="TLS and basic-auth settings, in the exporter-toolkit format",
    )
    parser.add_argument(
        "--web.max-connections",
        dest="max_connections",
        type=int,
        default=512,
        help="open HTTP connections beyond this are closed at once (default 512)",
    )
    parser.add_argument("--log.level", dest="log_level", choices=list(LEVELS), default="info")
    parser.add_argument("--log.format", dest="log_format", choices=FORMATS, default="logfmt")
    parser.add_argument("--version", action="version", version=f"wolkvox-exporter {__version__}")
    return parser


def _infos(config: Config) -> list[OperationInfo]:
    return [
        OperationInfo(
            name=op.name,
            apis=op.apis,
            budget_minutes=op.budget_minutes,
            token_key=token_key(op.token),
            prices=op.prices,
            cost_budget=op.cost_budget,
            currency=config.currency,
        )
        for op in config.operations
    ]


def _schedule(config: Config) -> Schedule:
    paces = [
        plan_pace([job.interval for job in jobs], config.daily_request_limit)
        for jobs in plan_jobs(config).values()
    ]
    return Schedule(
        refresh_interval=config.refresh_interval,
        planned_requests_per_day=max((pace.demand_per_day for pace in paces), default=0.0),
        daily_request_limit=config.daily_request_limit,
        token_info_interval=config.token_info_interval,
    )


def _use_config(config: Config) -> None:
    redact.set(op.token.reveal() for op in config.operations)
    for warning in config.warnings:
        log.warning("%s", warning)


class Exporter:
    """Wires config, client, refresher, store and web together, and owns reload and shutdown."""

    def __init__(self, config: Config, args: argparse.Namespace) -> None:
        self.config = config
        self.args = args
        self.state_file = StateFile(config.state_file) if config.state_file else None
        saved = self.state_file.load() if self.state_file else None
        self.store = Store(_infos(config), max_age=config.max_age, schedule=_schedule(config))
        if saved is not None:
            self.store.restore_values(saved.values)
            self.store.restore_months(saved.months)
            self.store.render()  # so the very first scrape already shows the restored values
        self.refresher = Refresher(
            config,
            self.store.record,
            on_pace=self.store.set_pace,
            saved=saved.pacing if saved is not None else None,
        )
        self.publisher = Publisher(self.store)
        self.saver = (
            StateSaver(
                self.state_file,
                lambda: (self.store.values(), self.refresher.save(), self.store.month_state()),
            )
            if self.state_file
            else None
        )
        self._reload_lock = asyncio.Lock()

    async def reload(self) -> tuple[bool, str]:
        async with self._reload_lock:
            loop = asyncio.get_running_loop()
            try:
                config = await loop.run_in_executor(None, load_config_isolated, self.args.config_file)
            except ConfigError as error:
                self.store.set_reload_status(False)
                log.error("reload failed, keeping the running configuration: %s", error)
                return False, f"reload failed: {redact(str(error))}"
            _use_config(config)
            self.store.reconfigure(_infos(config), max_age=config.max_age, schedule=_schedule(config))
            self.refresher.reload(config)
            self.store.set_reload_status(True)
            self.config = config
            log.info("configuration reloaded: %d operation(s)", len(config.operations))
            return True, "OK"


async def serve(exporter: Exporter, web_config_file: str | None) -> int:
    args = exporter.args
    try:
        web_config = load_web_config(web_config_file)
        host, port = parse_listen_address(args.listen_address)
    except (WebConfigError, ValueError) as error:
        log.error("%s", error)
        return 1
    app = WebApp(
        exporter.store,
        telemetry_path=args.telemetry_path,
        reload=exporter.reload,
        web_config=web_config,
        operations_count=lambda: len(exporter.config.operations),
    ).build()
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=SHUTDOWN_SECONDS,
        keepalive_timeout=KEEPALIVE_SECONDS,
    )
    # Signals first, so a SIGTERM that arrives while starting still shuts down cleanly.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    reloads: set[asyncio.Task] = set()

    def on_sighup() -> None:
        task = loop.create_task(exporter.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    await runner.setup()
    site = LimitedSite(
        runner, host, port, ssl_context=web_config.ssl_context, max_connections=args.max_connections
    )
    try:
        await site.start()
    except OSError as error:
        log.error("cannot listen on %s: %s", args.listen_address, error.strerror or error)
        await runner.cleanup()
        return 1
    log.info(
        "listening on %s (version %s, %d operation(s), refresh every %s)",
        site.name,
        __version__,
        len(exporter.config.operations),
        format_duration(exporter.config.refresh_interval),
    )
    exporter.publisher.start()
    exporter.refresher.start()
    if exporter.saver is not None:
        exporter.saver.start()

    await stop.wait()
    log.info("shutting down")
    await runner.cleanup()
    await loop.run_in_executor(None, exporter.refresher.stop, SHUTDOWN_SECONDS)
    exporter.publisher.stop()
    if exporter.saver is not None:
        exporter.saver.stop()
    log.info("stopped")
    return 0


def _tune_malloc() -> None:
    """Serve big buffers (the page before compression: ~7 MB at 10,000 operations) from mmap, so
    freeing one gives the memory back to the OS. glibc otherwise raises its mmap threshold after the
    first such free, and every later page grows the heap instead. No-op where glibc is not the
    allocator."""
    try:
        # 1 MiB: above asyncio's 256 KiB read buffer (allocated per socket read), below the page.
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 1024 * 1024)
    except (OSError, AttributeError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    _tune_malloc()
    raise_fd_limit()
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    try:
        config = load_config_isolated(args.config_file)
    except ConfigError as error:
        log.error("%s", error)
        return 1
    _use_config(config)
    if args.config_check:
        print(f"{args.config_file}: OK, {len(config.operations)} operation(s)")
        return 0
    if args.max_connections < 1:
        log.error("--web.max-connections: must be at least 1")
        return 1
    exporter = Exporter(config, args)
    return asyncio.run(serve(exporter, args.web_config_file))


if __name__ == "__main__":
    sys.exit(main())
