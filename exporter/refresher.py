"""Carries out the planner in an event loop of its own thread: one scheduler task and one task per
request in flight.

The scheduler keeps a heap of the times at which tokens may have a job (the planner says how long to
wait). When a token's time comes it asks the planner for the token's job and starts a task that sends
it with the asynchronous client, hands the outcome to ``on_result`` (the store) and puts the token back
on the heap. A token with nothing due costs a heap entry, not a task, an event or a timer. A hanging
upstream costs a socket and a timer, never a thread, so no pool has to be sized.

At most ``MAX_YOUNG`` requests that started less than ``YOUNG_SECONDS`` ago are in flight at once: at
start-up every report of every token is due, and thousands of requests in flight together leave
request objects whose freed memory the allocator keeps for good. A request that has waited that long
for its answer gives its place up (it is likely hanging until its read timeout), so hanging upstreams
never hold back healthy ones, and no pool has to be sized either.

The loop runs in a background thread so that bursts of upstream answers (10,000 at start-up) never sit
between a scrape and its answer on the serving loop.

Knows nothing of HTTP serving or metrics: results go to ``on_result``, pacing to ``on_pace``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import heapq
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from exporter.client import WolkvoxClient
from exporter.config import Config, OperationConfig, format_duration
from exporter.logs import fields
from exporter.model import TOKEN_INFO, FetchError, FetchResult, ReportStatus
from exporter.planner import Job, Pace, Planner, SavedPacing, jobs_for
from exporter.secret import token_key

log = logging.getLogger(__name__)

MAX_YOUNG = 256  # requests started less than YOUNG_SECONDS ago, in flight at once
YOUNG_SECONDS = 2.0  # a healthy answer takes well under this (250 ms is slow for the API)

OnPace = Callable[[dict[tuple[str, str], ReportStatus]], None]


class Ledger(Protocol):
    """Where the refresher records what the budget needs to survive a crash (the state store)."""

    def spend(self, key: str, saved: SavedPacing) -> concurrent.futures.Future[None] | None:
        """A request was taken from token ``key`` (``saved``: its bucket after it); the request is sent
        at once when None is returned (the spend is durable already), else once the future is done."""

    def paced(self, saved: SavedPacing) -> None:
        """The tokens configured now, with their buckets (after every configure: at start, at a reload)."""

    def finished(self, key: str, job: Job, reason: str | None, saved: SavedPacing) -> None:
        """The job answered (after the store recorded the result); ``saved``: the token's pacing now."""


def server_of(op: OperationConfig) -> str:
    """The scope of a timeout or refused connection: the wolkvox server behind the base URL. Operations
    behind one proxy (or one simulator) share a base URL but not a server: one hanging server must not
    pause the others."""
    return f"{op.base_url} {op.server}"


def plan_jobs(config: Config) -> dict[str, list[Job]]:
    """The jobs of every token (by token key) that ``config`` asks for."""
    return jobs_for(
        ((token_key(op.token), op.name, server_of(op), op.apis) for op in config.operations),
        config.refresh_interval,
        config.token_info_interval,
        TOKEN_INFO,
    )


class Refresher:
    """Background refresher. ``start``/``stop``/``reload``/``save`` may be called from any
    thread; everything else runs on the refresher's own event loop."""

    def __init__(
        self,
        config: Config,
        on_result: Callable[[FetchResult], None],
        *,
        on_pace: OnPace | None = None,
        saved: SavedPacing | None = None,
        ledger: Ledger | None = None,
        client: WolkvoxClient | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        max_young: int = MAX_YOUNG,
        young_seconds: float = YOUNG_SECONDS,
    ) -> None:
        self._config = config
        self._max_young = max_young
        self._young_seconds = young_seconds
        self._young: asyncio.Semaphore | None = None
        self._on_result = on_result
        self._on_pace = on_pace
        self._ledger = ledger
        self._clock = clock
        self._wall = wall
        self._client = client or WolkvoxClient(
            connect_timeout=config.connect_timeout,
            read_timeout=config.read_timeout,
            max_body_bytes=config.max_body_bytes,
        )
        self._planner = Planner(clock=clock, wall=wall)
        if saved is not None:
            self._planner.restore(saved)
        # What save() answers when the loop is not running: the restored state, or the final one.
        self._last_saved = saved or SavedPacing()
        self._operations: dict[str, OperationConfig] = {}
        # Tokens waiting for their time: a heap of (time, token key), and each token's one valid time
        # (an entry whose time differs is stale and skipped).
        self._heap: list[tuple[float, str]] = []
        self._scheduled: dict[str, float] = {}
        self._wake: asyncio.Event | None = None  # set when a token is scheduled earlier than the heap's head
        self._scheduler: asyncio.Task[None] | None = None
        self._in_flight: dict[str, asyncio.Task[None]] = {}  # token key -> its request's task
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run_loop, name="refresher", daemon=True)

    # ----- lifecycle (any thread) -------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop asking for new jobs; give in-flight requests up to ``timeout`` to finish, then cancel them.
        True if none had to be cancelled."""
        loop, stopping = self._loop, self._stopping
        if loop is None or stopping is None or not self._thread.is_alive():
            return True
        future = asyncio.run_coroutine_threadsafe(self._shutdown(timeout), loop)
        try:
            clean = future.result(timeout + 5.0)
        except (TimeoutError, asyncio.CancelledError):
            clean = False
        loop.call_soon_threadsafe(stopping.set)
        self._thread.join(timeout=5.0)
        return bool(clean)

    @property
    def running(self) -> bool:
        """Its thread is alive: it may still take or finish a request."""
        return self._thread.is_alive()

    def reload(self, config: Config) -> None:
        """Take a new configuration: tokens and reports that stay keep their pacing."""
        self._call(lambda: self._apply(config))

    def save(self) -> SavedPacing:
        """The planner's state for the state store (an empty one before start or after stop)."""
        saved = self._call(self._planner.save)
        return saved if saved is not None else self._last_saved

    def _call(self, function: Callable[[], Any]) -> Any:
        """Run ``function`` on the refresher's loop and return its result (None if not running)."""
        loop = self._loop
        if loop is None or not self._thread.is_alive():
            return None

        async def call() -> Any:
            return function()

        try:
            return asyncio.run_coroutine_threadsafe(call(), loop).result(timeout=10.0)
        except (TimeoutError, RuntimeError, asyncio.CancelledError):
            return None

    # ----- the loop --------------------------------------------------------------------------------

    def _run_loop(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._main(loop))
        finally:
            loop.close()

    async def _main(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._stopping = asyncio.Event()
        self._young = asyncio.Semaphore(self._max_young)
        self._wake = asyncio.Event()
        self._apply(self._config)
        # The restored due times have been used: keep only the tokens' saved buckets (a token a later
        # reload adds may still find its own). 140,000 due times were ~30 MB for the life of the process.
        tokens = self._last_saved.tokens  # (not the whole SavedPacing: a local lives as long as this loop)
        self._planner.restore(SavedPacing(tokens=tokens))
        self._last_saved = SavedPacing(tokens=tokens)
        self._scheduler = loop.create_task(self._schedule(), name="scheduler")
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            tasks = [self._scheduler, *self._in_flight.values()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._last_saved = self._planner.save()
            await self._client.close()

    async def _shutdown(self, timeout: float) -> bool:
        """No new request starts; those in flight end when their answer is in (or are cancelled at
        ``timeout``)."""
        self._closing = True
        if self._scheduler is not None:
            self._scheduler.cancel()
        busy = list(self._in_flight.values())
        if busy:
            _, pending = await asyncio.wait(busy, timeout=timeout)
            if pending:
                log.warning("abandoning %d in-flight request(s) at shutdown", len(pending))
                return False
        return True

    def _apply(self, config: Config) -> None:
        self._config = config
        self._operations = {op.name: op for op in config.operations}
        jobs = plan_jobs(config)
        _log_stretch(config, jobs, self._planner.configure(jobs, config.daily_request_limit))
        if self._ledger is not None:
            self._ledger.paced(self._planner.save(jobs, reports=False))
        # Removed tokens drop out when their heap entry comes up (the planner has no job for them); an
        # in-flight answer of theirs is dropped by the store.
        self._scheduled = {key: when for key, when in self._scheduled.items() if key in jobs}
        now = self._clock()
        for key in jobs:
            self._schedule_at(key, now)
        self._publish_pace()

    def _schedule_at(self, key: str, when: float) -> None:
        """Ask the planner for ``key``'s job at ``when`` (or earlier, if it is scheduled earlier already)."""
        current = self._scheduled.get(key)
        if current is not None and current <= when:
            return
        self._scheduled[key] = when
        if not self._heap or when < self._heap[0][0]:
            assert self._wake is not None  # set by _main before anything is scheduled
            self._wake.set()
        heapq.heappush(self._heap, (when, key))

    def _publish_pace(self) -> None:
        if self._on_pace is not None:
            try:
                self._on_pace(self._planner.status())
            except Exception:
                log.exception("publishing the pace failed")

    async def _schedule(self) -> None:
        """Start each token's job when the planner allows it; never more young requests than allowed."""
        young, wake, loop = self._young, self._wake, asyncio.get_running_loop()
        assert young is not None and wake is not None  # set by _main before the scheduler starts
        while not self._closing:
            now = self._clock()
            if not self._heap or self._heap[0][0] > now:
                wait = self._heap[0][0] - now if self._heap else None
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await wake.wait()
                continue
            when, key = heapq.heappop(self._heap)
            if self._scheduled.get(key) != when:
                continue  # stale: the token was scheduled again, or removed
            del self._scheduled[key]
            await young.acquire()  # a young place first, so a start-up burst never piles up tasks
            job, wait = self._planner.take(key)
            if job is None:
                young.release()
                if not math.isinf(wait):
                    self._schedule_at(key, self._clock() + wait)
                continue  # infinite: busy or removed; ``finished`` or a reload schedules it again
            durable = (
                self._ledger.spend(key, self._planner.save((key,), reports=False)) if self._ledger else None
            )
            self._in_flight[key] = loop.create_task(self._run_job(key, job, durable), name=f"request-{key}")

    async def _run_job(
        self, key: str, job: Job, durable: concurrent.futures.Future[None] | None = None
    ) -> None:
        """Send one job (its young place is already taken) once its spend is durable, record the
        outcome, schedule the token again."""
        try:
            if durable is not None:
                try:
                    await asyncio.wrap_future(durable)
                except BaseException:
                    assert self._young is not None  # the scheduler took this request's place
                    self._young.release()
                    raise
                if self._closing:  # shutting down while the spend was committed: the request is not sent
                    assert self._young is not None
                    self._young.release()
                    return
            result = await self._young_request(job)
        finally:
            self._in_flight.pop(key, None)
        self._planner.finished(key, job, result.reason)
        try:
            self._on_result(result)
            if self._ledger is not None:
                self._ledger.finished(key, job, result.reason, self._planner.save((key,)))
        except Exception:
            log.exception("recording a result failed")
        if self._on_pace is not None:
            status = self._planner.status_of(key, job.operation, job.api)
            if status is not None:
                self._on_pace({(job.operation, job.api): status})
        if not self._closing:
            self._schedule_at(key, self._clock())  # the planner says when (after the token's gap)

    async def _young_request(self, job: Job) -> FetchResult:
        """``_request`` in the young place the scheduler took for it; the place is given back at the
        answer, or after ``young_seconds`` if the answer is not in by then."""
        young = self._young
        assert young is not None  # set by _main; the scheduler took this request's place
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                young.release()

        timer = asyncio.get_running_loop().call_later(self._young_seconds, release)
        try:
            return await self._request(job)
        finally:
            timer.cancel()
            release()

    async def _request(self, job: Job) -> FetchResult:
        operation = self._operations.get(job.operation)
        started = self._clock()
        value: Any = None
        reason: str | None = None
        detail = ""
        try:
            if operation is None:
                raise FetchError("invalid_response", "the operation was removed by a reload")
            if job.api == TOKEN_INFO:
                value = await self._client.fetch_token_info(
                    base_url=operation.base_url,
                    server=operation.server,
                    token=operation.token,
                    ca_file=operation.ca_file,
                )
            else:
                value = await self._client.fetch(
                    base_url=operation.base_url,
                    server=operation.server,
                    token=operation.token,
                    api=job.api,
                    ca_file=operation.ca_file,
                )
        except FetchError as error:
            reason, detail = error.reason, error.detail
            log.warning(
                "fetch failed",
                extra=fields(operation=job.operation, api=job.api, reason=reason, detail=detail),
            )
        except Exception:
            # A bug of ours, not an upstream answer: keep serving, count it, and show where it happened.
            reason, detail = "invalid_response", "unexpected error in the exporter (see the log)"
            log.exception("unexpected error fetching", extra=fields(operation=job.operation, api=job.api))
        else:
            log.debug("fetched", extra=fields(operation=job.operation, api=job.api, value=value))
        return FetchResult(
            operation=job.operation,
            api=job.api,
            finished_at=self._wall(),
            duration=self._clock() - started,
            value=value,
            reason=reason,
            detail=detail,
        )


def _log_stretch(config: Config, jobs: dict[str, list[Job]], paces: dict[str, Pace]) -> None:
    """One line per distinct stretched pace, naming (a few of) the operations it applies to."""
    stretched: dict[float, list[str]] = {}
    for key, pace in paces.items():
        if pace.stretch > 1.0:
            names = sorted({job.operation for job in jobs[key]})
            stretched.setdefault(round(config.refresh_interval * pace.stretch), []).extend(names)
    for interval, names in sorted(stretched.items()):
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        log.warning(
            "daily_request_limit %d does not allow every report every %s: refreshing every %s instead "
            "(operations %s; each report is one request, all of a token's reports share its budget)",
            config.daily_request_limit,
            format_duration(config.refresh_interval),
            format_duration(interval),
            shown,
        )
