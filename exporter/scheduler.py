"""When each token may be used next, and a bounded pool of workers that uses it.

The unit of scheduling is the token, not the operation: the wolkvox API allows one request at a time
per token and one query per token per ``refresh_interval``. All (operation, api) jobs that share a token
form one *lane*; a lane runs its jobs round-robin, one request at a time, so a token is never used by two
requests at once. After a success the lane waits a full ``refresh_interval``; after a failure it retries
with capped exponential backoff and jitter (starting at 30 s or ``refresh_interval`` if shorter, capped at
``refresh_interval``); ``token_limit`` (the daily budget is spent) waits 12 intervals (an hour at 5m).

Lanes whose last request timed out or could not connect are *suspect*: at most half of the workers may
be busy with suspect lanes, so upstreams that hang until their timeout cannot starve the healthy ones.

Knows nothing of HTTP serving or metrics: results go to the ``on_result`` callback.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from exporter.client import FetchError
from exporter.config import Config, OperationConfig
from exporter.model import TOKEN_INFO, FetchResult
from exporter.secret import Secret

log = logging.getLogger(__name__)

FIRST_RETRY_SECONDS = 30.0
# After TOKEN LIMIT EXCEEDED (the daily budget is spent): 12 intervals, one hour at the default 5m.
TOKEN_LIMIT_BACKOFF_INTERVALS = 12
SUSPECT_REASONS = frozenset({"timeout", "connection"})

# Returns the value for a billing api, or a client.TokenInfo for TOKEN_INFO; raises FetchError.
Fetch = Callable[[OperationConfig, str], Any]


def token_key(token: Secret) -> str:
    """A stable, non-reversible name for a token, for logs and the state file."""
    return hashlib.sha256(token.reveal().encode()).hexdigest()[:16]


def retry_delay(failures: int, refresh_interval: float, reason: str | None, rng: random.Random) -> float:
    """Seconds to wait after the ``failures``-th failure in a row (``failures`` >= 1)."""
    if reason == "token_limit":
        return TOKEN_LIMIT_BACKOFF_INTERVALS * refresh_interval * rng.uniform(0.9, 1.0)
    first = min(FIRST_RETRY_SECONDS, refresh_interval)
    delay = min(first * 2 ** min(failures - 1, 30), refresh_interval)
    # Jitter downwards only, so the cap of refresh_interval always holds.
    return delay * rng.uniform(0.75, 1.0)


@dataclass(eq=False)
class _Lane:
    key: str
    jobs: list[tuple[OperationConfig, str]]
    due: float = 0.0
    next_index: int = 0
    failures: int = 0
    suspect: bool = False
    in_flight: bool = False
    queued: bool = False  # has a live entry in one of the heaps
    removed: bool = False
    last_used_wall: float | None = None
    info_due: float = 0.0  # when the next token_info read may take a turn
    seq: int = field(default=0)


class Refresher:
    """Background refresher: one dispatcher thread and ``config.fetch_workers`` worker threads."""

    def __init__(
        self,
        config: Config,
        fetch: Fetch,
        on_result: Callable[[FetchResult], None],
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        last_used: dict[str, float] | None = None,
    ) -> None:
        self._fetch = fetch
        self._on_result = on_result
        self._clock = clock
        self._wall = wall
        self._rng = rng or random.Random()
        self._cond = threading.Condition()
        self._healthy: list[tuple[float, int, _Lane]] = []
        self._suspect: list[tuple[float, int, _Lane]] = []
        self._seq = itertools.count()
        self._lanes: dict[Secret, _Lane] = {}
        self._workers = config.fetch_workers
        self._suspect_limit = max(1, self._workers // 2)
        self._in_flight = 0
        self._suspect_in_flight = 0
        self._stopping = False
        self._work: queue.SimpleQueue[_Lane | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._refresh_interval = config.effective_refresh_interval
        self._token_info_interval = config.token_info_interval
        self._apply_config(config, last_used or {})

    # ----- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        dispatcher = threading.Thread(target=self._dispatch, name="dispatcher", daemon=True)
        self._threads.append(dispatcher)
        for i in range(self._workers):
            self._threads.append(threading.Thread(target=self._work_loop, name=f"fetch-{i}", daemon=True))
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop dispatching; wait up to ``timeout`` for in-flight requests. True if all finished."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for _ in range(self._workers):
            self._work.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        still_running = [t.name for t in self._threads if t.is_alive()]
        if still_running:
            log.warning("abandoning %d in-flight request(s) at shutdown", len(still_running))
        return not still_running

    def reload(self, config: Config) -> None:
        if config.fetch_workers != self._workers:
            log.warning("fetch_workers changes take effect after a restart (running with %d)", self._workers)
        with self._cond:
            self._refresh_interval = config.effective_refresh_interval
            self._token_info_interval = config.token_info_interval
            self._apply_config(config, {})
            self._cond.notify_all()

    def token_usage(self) -> dict[str, float]:
        """When each token was last used (wall clock), by token key: for the state file."""
        with self._cond:
            return {
                lane.key: lane.last_used_wall
                for lane in self._lanes.values()
                if lane.last_used_wall is not None and not lane.removed
            }

    # ----- configuration -> lanes ---------------------------------------------------------------

    def _apply_config(self, config: Config, last_used: dict[str, float]) -> None:
        """(Re)build lanes from the config. Called with the condition held (or before start)."""
        jobs_by_token: dict[Secret, list[tuple[OperationConfig, str]]] = {}
        for operation in config.operations:
            for api in operation.apis:
                jobs_by_token.setdefault(operation.token, []).append((operation, api))
        now, wall = self._clock(), self._wall()
        for token, jobs in jobs_by_token.items():
            lane = self._lanes.get(token)
            if lane is not None:
                # Same token as before (maybe in flight right now): keep its timing, never a second lane.
                lane.jobs = jobs
                lane.next_index %= len(jobs)
                if lane.removed:
                    lane.removed = False
                    if not lane.in_flight and not lane.queued:
                        self._push(lane)
                continue
            # token_info (if enabled) takes the second turn, after every lane's first billing answer.
            lane = _Lane(key=token_key(token), jobs=jobs, due=now, info_due=now + self._refresh_interval)
            used = last_used.get(lane.key)
            if used is not None:
                # Restarted: the token was used at `used`; respect its interval across the restart.
                lane.last_used_wall = used
                interval = self._refresh_interval
                lane.due = now + max(0.0, min(used + interval - wall, interval))
            self._lanes[token] = lane
            self._push(lane)
        for token, lane in self._lanes.items():
            # Removed lanes stay known (not scheduled) so a token that comes back reuses its lane.
            lane.removed = token not in jobs_by_token

    # ----- dispatching ----------------------------------------------------------------------------

    def _push(self, lane: _Lane) -> None:
        lane.seq = next(self._seq)
        lane.queued = True
        heapq.heappush(self._suspect if lane.suspect else self._healthy, (lane.due, lane.seq, lane))

    def _peek(self, heap: list[tuple[float, int, _Lane]]) -> _Lane | None:
        while heap and heap[0][2].removed:
            heapq.heappop(heap)[2].queued = False
        return heap[0][2] if heap else None

    def _next_lane(self) -> tuple[_Lane | None, float | None]:
        """The lane to run now, else how long to wait (None: until notified)."""
        if self._in_flight >= self._workers:
            return None, None
        candidates = []
        healthy = self._peek(self._healthy)
        if healthy is not None:
            candidates.append((healthy.due, self._healthy))
        if self._suspect_in_flight < self._suspect_limit:
            suspect = self._peek(self._suspect)
            if suspect is not None:
                candidates.append((suspect.due, self._suspect))
        if not candidates:
            return None, None
        due, heap = min(candidates, key=lambda c: c[0])
        wait = due - self._clock()
        if wait > 0:
            return None, wait
        lane = heapq.heappop(heap)[2]
        lane.queued = False
        return lane, None

    def _dispatch(self) -> None:
        with self._cond:
            while not self._stopping:
                lane, wait = self._next_lane()
                if lane is None:
                    self._cond.wait(timeout=wait)
                    continue
                lane.in_flight = True
                self._in_flight += 1
                if lane.suspect:
                    self._suspect_in_flight += 1
                self._work.put(lane)

    # ----- workers -------------------------------------------------------------------------------

    def _work_loop(self) -> None:
        while True:
            lane = self._work.get()
            if lane is None:
                return
            operation, api = self._next_job(lane)
            result = self._run_one(operation, api)
            try:
                self._on_result(result)
            except Exception:
                log.exception("recording a result failed")
            self._reschedule(lane, result)

    def _next_job(self, lane: _Lane) -> tuple[OperationConfig, str]:
        """The lane's next turn: a due token_info read, else its next billing api (round-robin)."""
        jobs = lane.jobs
        if self._token_info_interval and self._clock() >= lane.info_due:
            lane.info_due = self._clock() + self._token_info_interval
            return jobs[0][0], TOKEN_INFO
        return jobs[lane.next_index % len(jobs)]

    def _run_one(self, operation: OperationConfig, api: str) -> FetchResult:
        started = self._clock()
        value: Any = None
        reason: str | None = None
        try:
            value = self._fetch(operation, api)
        except FetchError as error:
            reason = error.reason
            log.warning(
                "fetch failed: operation=%s api=%s reason=%s detail=%s",
                operation.name,
                api,
                error.reason,
                error.detail,
            )
        except Exception:
            # A bug of ours, not an upstream answer: keep serving, count it, and show where it happened.
            reason = "invalid_response"
            log.exception("unexpected error fetching operation=%s api=%s", operation.name, api)
        else:
            log.debug("fetched operation=%s api=%s value=%s", operation.name, api, value)
        return FetchResult(
            operation=operation.name,
            api=api,
            finished_at=self._wall(),
            duration=self._clock() - started,
            value=value,
            reason=reason,
        )

    def _reschedule(self, lane: _Lane, result: FetchResult) -> None:
        with self._cond:
            self._in_flight -= 1
            if lane.suspect:
                self._suspect_in_flight -= 1
            lane.in_flight = False
            lane.last_used_wall = result.finished_at
            if result.api != TOKEN_INFO:
                lane.next_index = (lane.next_index + 1) % len(lane.jobs)
            if result.ok:
                lane.failures = 0
                lane.suspect = False
                delay = self._refresh_interval
            else:
                lane.failures += 1
                lane.suspect = result.reason in SUSPECT_REASONS
                delay = retry_delay(lane.failures, self._refresh_interval, result.reason, self._rng)
            lane.due = self._clock() + delay
            if not lane.removed:
                self._push(lane)
            self._cond.notify_all()
