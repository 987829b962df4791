"""The whole exporter built from a ``Config``: store, refresher, publisher, state store and web server,
with reload and an orderly stop. It runs in any event loop, so tests start it in-process on a free port;
``cli.py`` adds only flags, logging and signals.

Threads: the serving event loop (the caller's), the refresher's own event loop thread, the publisher
thread (renders /metrics), the state store's writer thread. Data flows one way: refresher -> store ->
publisher -> page -> web.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from aiohttp import web

from exporter import __version__
from exporter.config import Config, ConfigError, format_duration, parse_listen_address
from exporter.logs import redact
from exporter.model import TOKEN_INFO
from exporter.monthclose import Seen
from exporter.page import Pages, Publisher
from exporter.planner import TOKEN_WIDE, Job, SavedPacing, plan_pace
from exporter.refresher import Refresher, plan_jobs
from exporter.reservation import Reservations
from exporter.secret import token_key
from exporter.statuspage import DEFAULT_RUNBOOK_URL
from exporter.store import OperationInfo, Schedule, Store
from exporter.web import LimitedSite, WebApp
from exporter.webconfig import WebConfigError
from exporter.weblive import load_web_config

if TYPE_CHECKING:  # imported where used: SQLite, decimal and csv are ~2.5 MB resident (benchmarks/README.md)
    from exporter.statement import MonthTotalLike, Statement
    from exporter.statestore import Health, StateStore

log = logging.getLogger("exporter")

DEFAULT_PORT = 19726
SHUTDOWN_SECONDS = 3.0
# Idle keep-alive connections (and half-sent requests) are closed after this: a slow or stuck client
# holds one of --web.max-connections for at most this long. nginx's default.
KEEPALIVE_SECONDS = 75.0


class StartError(Exception):
    """The exporter cannot start (bad web config, address in use): a one-line message for the user."""


@dataclass(frozen=True)
class WebSettings:
    listen_address: str = f":{DEFAULT_PORT}"
    telemetry_path: str = "/metrics"
    web_config_file: str | None = None
    max_connections: int = 512
    runbook_url: str = DEFAULT_RUNBOOK_URL


def operation_infos(config: Config) -> list[OperationInfo]:
    return [
        OperationInfo(
            name=op.name,
            apis=op.apis,
            budget_minutes=op.budget_minutes,
            token_key=token_key(op.token),
            prices=op.prices,
            cost_budget=op.cost_budget,
            currency=config.currency,
            host=urlsplit(op.base_url).netloc,
            server=op.server,
            labels=op.labels,
        )
        for op in config.operations
    ]


def schedule_of(config: Config) -> Schedule:
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


def use_config(config: Config) -> None:
    """What every (re)loaded config does to the process: its tokens are scrubbed from every log line, its
    warnings are logged."""
    redact.set(op.token.reveal() for op in config.operations)
    for warning in config.warnings:
        log.warning("%s", warning)


class Persist:
    """The refresher's ledger over the state store: a request is sent only once a committed row covers its
    spend (``reservation.py``: mostly one committed ahead, so the request does not wait); each answer's
    report row (value, next due time, last reading) is written after the store took it."""

    def __init__(self, state: StateStore, store: Store) -> None:
        self._state = state
        self._store = store
        self._reservations = Reservations(state)
        self._write_errors = 0
        store.on_month_closed = self.month_closed

    def restored(self, saved: SavedPacing) -> None:
        """The buckets read from the store at start: committed already."""
        self._reservations.restore(saved.tokens)

    def spend(self, key: str, saved: SavedPacing) -> concurrent.futures.Future[None] | None:
        token = saved.tokens.get(key)
        if token is None:
            return None
        return self._reservations.spend(key, token)

    def paced(self, saved: SavedPacing) -> None:
        self._reservations.paced(saved.tokens)

    def release(self, saved: SavedPacing) -> None:
        """The refresher stopped (``saved``: its last pacing): the buckets themselves, reservations
        released, so an orderly restart costs no budget."""
        self._reservations.release(saved.tokens)

    def finished(self, key: str, job: Job, reason: str | None, saved: SavedPacing) -> None:
        token = saved.tokens.get(key)
        if token is not None and reason in TOKEN_WIDE:  # the token's pause changed
            self._reservations.pause(key, token)
        if job.api == TOKEN_INFO:
            return
        due = saved.reports.get(key, {}).get(f"{job.operation}/{job.api}")
        value, seen = self._store.saved_report(job.operation, job.api)
        self._state.put_report(job.operation, job.api, key, due, value, seen)

    def month_closed(self, operation: str, api: str, closed: Seen) -> None:
        self._state.put_month(operation, api, closed)

    def health(self, health: Health) -> None:
        if health.write_errors > self._write_errors:  # a row handed may be lost: commit anew
            self._write_errors = health.write_errors
            self._reservations.forget()
        self._store.set_state_health(health.write_errors, health.last_write)


class App:
    """One exporter. ``load_config`` re-reads the configuration for a reload (SIGHUP, POST /-/reload).
    Raises StartError for a state_store path that cannot be a store (a directory, a FIFO)."""

    def __init__(
        self,
        config: Config,
        settings: WebSettings | None = None,
        *,
        load_config: Callable[[], Config] | None = None,
    ) -> None:
        self.config = config
        self.settings = settings or WebSettings()
        self._load_config = load_config
        self.store = Store(operation_infos(config), max_age=config.max_age, schedule=schedule_of(config))
        self.state: StateStore | None = None
        self._persist: Persist | None = None
        persist: Persist | None = None
        saved = None
        if config.state_store:
            from exporter.statestore import StateStore, StoreError

            legacy = config.state_file if config.state_file != config.state_store else None
            self.state = StateStore(config.state_store, legacy_json=legacy)
            persist = Persist(self.state, self.store)
            self.state.on_health = persist.health
            self.state.sink = self.store  # values and months go straight into the store, row by row
            try:
                saved = self.state.load()
            except StoreError as error:
                raise StartError(str(error)) from None
            persist.restored(saved.pacing)
            self._persist = persist
            self.store.restore_values(saved.values)
            self.store.restore_months(saved.months)
            self.store.restored()
        self.pages = Pages(self.store)  # rendered now: the very first scrape shows restored values
        self.refresher = Refresher(
            config,
            self.store.record,
            on_pace=self.store.set_pace,
            saved=saved.pacing if saved is not None else None,
            ledger=persist,
        )
        self.publisher = Publisher(self.pages, self.store)
        self._reload_lock = asyncio.Lock()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> str:
        """Listen, then start refreshing. Returns the URL it listens on; raises StartError."""
        settings = self.settings
        try:
            web_config = load_web_config(settings.web_config_file)
            host, port = parse_listen_address(settings.listen_address)
        except (WebConfigError, ValueError) as error:
            raise StartError(str(error)) from None
        app = WebApp(
            self.store,
            self.pages,
            telemetry_path=settings.telemetry_path,
            reload=self.reload if self._load_config is not None else None,
            web_config=web_config,
            operations_count=lambda: len(self.config.operations),
            statement=self.statement,
            runbook_url=settings.runbook_url,
        ).build()
        runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=SHUTDOWN_SECONDS,
            keepalive_timeout=KEEPALIVE_SECONDS,
        )
        await runner.setup()
        site = LimitedSite(
            runner,
            host,
            port,
            ssl_context=web_config.ssl_context,
            max_connections=settings.max_connections,
            on_reject=self.store.connection_rejected,
        )
        try:
            await site.start()
        except OSError as error:
            await runner.cleanup()
            raise StartError(
                f"cannot listen on {settings.listen_address}: {error.strerror or error}"
            ) from None
        self._runner = runner
        self.url = site.name
        log.info(
            "listening on %s (version %s, %d operation(s), refresh every %s)",
            site.name,
            __version__,
            len(self.config.operations),
            format_duration(self.config.refresh_interval),
        )
        self.publisher.start()
        if self.state is not None:
            self.state.start()  # before the refresher: its first requests wait for their spends
        self.refresher.start()
        return self.url

    async def stop(self) -> None:
        """Stop serving, let in-flight upstream requests finish (up to a few seconds), save the state."""
        # The refresher stops taking jobs first: no request starts while the server winds down.
        refresher_stopped = asyncio.get_running_loop().run_in_executor(
            None, self.refresher.stop, SHUTDOWN_SECONDS
        )
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await refresher_stopped
        self.publisher.stop()
        if self._persist is not None and not self.refresher.running:
            self._persist.release(self.refresher.save())  # no request is sent any more
        if self.state is not None:
            self.state.stop()

    def month_totals(self, month: str) -> list[MonthTotalLike]:
        """The figures of the statement: the one place they come from. Today, what this exporter holds in
        memory: each report's latest reading (its month to date) and its last closed month (restored
        from the state store after a restart); an older month from the state store (closed months are
        kept 25 months there)."""
        from exporter.statement import totals_in_memory
        from exporter.statestore import StoreError, read_month_totals

        totals: list[MonthTotalLike] = list(totals_in_memory(self.store.month_state(), month))
        if not totals and self.state is not None and self.config.state_store:
            try:
                totals = list(read_month_totals(self.config.state_store, month))
            except StoreError as error:
                log.warning("statement of %s: %s", month, error)
        return totals

    def statement(self, month: str, group: str | None) -> Statement:
        """/statement: the month's figures with the running configuration's prices and labels."""
        from exporter.statement import build, terms_of

        return build(self.month_totals(month), terms_of(self.config), month, group)

    async def reload(self) -> tuple[bool, str]:
        """Re-read the configuration; on an error keep the running one. (ok, one-line message)."""
        if self._load_config is None:
            return False, "reload is not available"
        async with self._reload_lock:
            loop = asyncio.get_running_loop()
            try:
                config = await loop.run_in_executor(None, self._load_config)
            except ConfigError as error:
                self.store.set_reload_status(False, redact(str(error)))
                for line in error.lines():
                    log.error("reload failed, keeping the running configuration: %s", line)
                return False, f"reload failed: {redact(str(error))}"
            use_config(config)
            self.store.reconfigure(
                operation_infos(config), max_age=config.max_age, schedule=schedule_of(config)
            )
            self.refresher.reload(config)
            self.store.set_reload_status(True)
            self.config = config
            log.info("configuration reloaded: %d operation(s)", len(config.operations))
            return True, "OK"
