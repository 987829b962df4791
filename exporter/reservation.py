"""Reservations: each token's daily budget committed ahead of its requests, so that most requests are sent
without a write to the state store and without waiting for one.

A restart restores a token's bucket from its newest row in the store (``planner.restored_level``). The
budget is hard across restarts as long as, whenever a request is sent, a committed row that is the
token's newest restores at most the level the bucket truly has after that request. Committing the exact
bucket before every request keeps that at the cost of a row and a wait of up to a second per request. A
*reservation* commits the bucket ``margin`` requests lower instead: ``margin`` is 1 % of the token's
daily limit (``daily_limit // 100``; 0 below a limit of 100, where every spend is committed exactly, as
before), its level a whole number rounded down and its time a whole second rounded up (both conservative,
and SQLite stores a whole REAL in a few bytes). The next requests are covered by it already: a restart
right after costs the token at most ``margin`` requests of its day (and less than one more of rounding),
never a request beyond its limit: a token whose bucket was nearly empty waits up to 1 % of a day (about
15 minutes) more for its next request.

Per token, the rows handed to the store: the newest known to be committed, and those handed since (any of
them may be committed, and so the newest, at any moment). For each spend (the planner took the request;
the bucket after it, at wall time ``at``):

* every one of those rows restores at most the true level: the spend is durable already, nothing to do;
* else the newest handed row does, and an urgent row is on its way (that one, or another token's handed
  after it): the request waits for that commit;
* else a fresh reservation is committed first (``StateStore.spend``, urgent), the request waits for it.

Ahead: after a spend that was durable already, when less than half the margin is left over the row known
committed and nothing is on its way, a fresh reservation is handed without urgency (``put_token``: it
rides the store's next transaction, whenever that comes). When less than a quarter is left, the rows on
their way are still not known committed and no urgent row handed after them is on its way, a fresh
reservation is handed urgently, without waiting for it: the request that would need it finds it
committed.

Known committed: a row whose future is done, and every row handed before a row whose future is done (the
store commits what it is handed in order, a row without urgency with its next transaction, which an
urgent row brings forward). With many tokens, the urgent rows of some keep the ahead rows of all known
committed, and the store's transactions keep their own pace. After a failed write, nothing is known
committed any more (``forget``): every token's next spend commits.

A token-wide pause, and a change of pace by a reload (or at a restart), hand a row too, at the lower of
the true level and what the newest row restores then: the reservation is kept. A token a reload removes
is forgotten here: if it comes back, its first spend commits. At an orderly stop, once no request can be
sent any more, each token's bucket itself is written (``release``): only a crash costs the margin.

Not thread-safe: the refresher's loop calls it (``forget`` excepted: any thread).
"""

from __future__ import annotations

import concurrent.futures
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from exporter.planner import Pace, restored_level, saved_pace

MARGIN_SHARE = 100  # a reservation's margin: 1 % of the daily limit (daily_limit // MARGIN_SHARE)
TOLERANCE = 1e-9  # requests: rounding of the levels compared
_BUCKET = frozenset({"level", "at", "paused_until", "burst", "limit"})  # what the planner saves of a bucket
MAX_HANDED = 3  # rows of a token on their way without urgency; one more is handed urgently


class TokenWriter(Protocol):
    """The part of the state store (``statestore.StateStore``) that reservations write through."""

    def spend(
        self, token: str, level: float, at: float, paused_until: float, extra: dict[str, float] | None = None
    ) -> concurrent.futures.Future[None]: ...

    def put_token(
        self, token: str, level: float, at: float, paused_until: float, extra: dict[str, float] | None = None
    ) -> None: ...


@dataclass(slots=True)
class _Row:
    """A token row handed to the store: its level at ``at`` on the pace ``(burst, limit)``."""

    level: float
    at: float
    pace: tuple[float, float]  # one tuple shared by every row of that pace
    seq: int = 0  # the order it was handed in (0: read at start)
    done: concurrent.futures.Future[None] | None = None  # handed urgently: done once committed


@dataclass(slots=True)
class _Rows:
    committed: _Row | None = None  # the newest row known committed
    handed: tuple[_Row, ...] = ()  # handed after it, oldest first, not known committed

    @property
    def newest(self) -> _Row | None:
        """The row a restart would read if every row handed were committed."""
        return self.handed[-1] if self.handed else self.committed


def margin_of(limit: float) -> int:
    """A reservation's margin (requests) for a token of daily limit ``limit``."""
    return max(0, int(limit)) // MARGIN_SHARE


def reserved(level: float, at: float, margin: int, limit: float) -> tuple[float, float]:
    """The row (level, at) that reserves ``margin`` requests below a bucket's ``level`` at ``at``: whole
    numbers, rounded down and up; never below ``1 - limit`` (a restore caps, and flags, a level below
    ``-limit``) unless the level itself is. Margin 0: the bucket itself."""
    if margin <= 0:
        return level, at
    whole = math.floor(level)
    return float(max(whole - margin, min(whole, 1 - int(limit)))), float(math.ceil(at))


class Reservations:
    """Decides, per spend, whether a row must be committed before the request is sent (see the module's
    docstring), and hands the rows to ``writer``."""

    def __init__(self, writer: TokenWriter) -> None:
        self._writer = writer
        self._rows: dict[str, _Rows] = {}
        self._seq = 0  # rows handed so far
        self._urgent: deque[tuple[int, concurrent.futures.Future[None]]] = deque()  # not known done
        self._known = 0  # every row handed up to this one is committed
        self._forget = False
        self._paces: dict[tuple[float, float], tuple[float, float]] = {}

    def restore(self, tokens: Mapping[str, Mapping[str, float]]) -> None:
        """The rows read from the store at start (``SavedPacing.tokens``): committed. A row without its
        pace or with a number missing counts as none (the token's first spend commits)."""
        for key, saved in tokens.items():
            level, at, burst, limit = (
                saved.get(name, math.nan) for name in ("level", "at", "burst", "limit")
            )
            if all(math.isfinite(number) for number in (level, at, burst, limit)):
                self._rows[key] = _Rows(committed=_Row(level, at, self._pace(burst, limit)))

    def forget(self) -> None:
        """A write failed: no row handed so far is known committed (any thread; seen at the next call)."""
        self._forget = True

    def spend(self, key: str, token: Mapping[str, float]) -> concurrent.futures.Future[None] | None:
        """A request was taken from token ``key``; ``token`` is its bucket after it (``SavedPacing``'s
        form). None when the request may be sent now, else a future done once it may."""
        level, at = token["level"], token["at"]
        pace = saved_pace(token["burst"], token["limit"])
        margin = margin_of(pace.limit)
        rows = self._settled(key)

        def covers(row: _Row | None) -> bool:
            return row is not None and _restore(row, at, pace) <= level + TOLERANCE

        handed = rows.handed
        if covers(rows.committed) and all(covers(row) for row in handed):  # durable already
            assert rows.committed is not None
            left = level - _restore(rows.committed, at, pace)
            if margin and not handed and left < margin / 2:
                self._reserve(key, rows, token, margin, pace, urgent=False)
            elif margin and handed and left < margin / 4 and self._known_by(handed[-1]) is None:
                self._reserve(key, rows, token, margin, pace, urgent=True)
            return None
        if handed and covers(handed[-1]):
            future = self._known_by(handed[-1])
            if future is not None:  # the request waits for an urgent row on its way
                return future
        future = self._reserve(key, rows, token, margin, pace, urgent=True)
        assert future is not None
        return future

    def pause(self, key: str, token: Mapping[str, float]) -> None:
        """A token-wide pause (``token``: the bucket with its pause): its row keeps the reservation."""
        self._hand_kept(key, self._settled(key), token)

    def paced(self, tokens: Mapping[str, Mapping[str, float]]) -> None:
        """The tokens configured now, with their buckets (after every configure: at start and at each
        reload). A token no longer configured is forgotten; a token whose newest row is of another pace
        gets a row of its new pace (a restore refills a row at the pace it names)."""
        for key in [key for key in self._rows if key not in tokens]:
            del self._rows[key]
        for key, token in tokens.items():
            rows = self._rows.get(key)
            if rows is None:
                continue
            newest = rows.newest
            if newest is not None and newest.pace != (token["burst"], token["limit"]):
                self._hand_kept(key, self._settled(key), token)

    def release(self, tokens: Mapping[str, Mapping[str, float]]) -> None:
        """No request will be sent any more (an orderly stop; ``tokens``: every bucket, last): each token
        whose rows reserve part of its bucket gets a row of the bucket itself, so the next start loses
        none of it."""
        for key, token in tokens.items():
            rows = self._settled(key) if key in self._rows else None
            newest = None if rows is None else rows.newest
            if rows is None or newest is None or not _BUCKET <= token.keys():
                continue  # nothing handed, or the restored state of a refresher that never ran
            pace = saved_pace(token["burst"], token["limit"])
            if _restore(newest, token["at"], pace) < token["level"] - TOLERANCE:
                self._hand(key, rows, token, token["level"], token["at"], urgent=False)

    def rows_of(self, key: str) -> tuple[_Row | None, tuple[_Row, ...]]:
        """The row known committed and those handed since, as known now (for tests)."""
        rows = self._settled(key) if key in self._rows else _Rows()
        return rows.committed, rows.handed

    # ----- inside ---------------------------------------------------------------------------------

    def _settled(self, key: str) -> _Rows:
        """``key``'s rows, those now known committed moved out of ``handed``."""
        if self._forget:
            self._forget = False
            self._rows.clear()
            self._urgent.clear()
        urgent = self._urgent
        while urgent and urgent[0][1].done():
            self._known = urgent.popleft()[0]
        rows = self._rows.get(key)
        if rows is None:
            rows = self._rows[key] = _Rows()
            return rows
        for index in range(len(rows.handed) - 1, -1, -1):
            row = rows.handed[index]
            if row.seq <= self._known or (row.done is not None and row.done.done()):
                row.done, row.seq = None, 0  # a future holds a lock and a condition: ~1 KB a token
                rows.committed = row
                rows.handed = rows.handed[index + 1 :]
                break
        return rows

    def _known_by(self, row: _Row) -> concurrent.futures.Future[None] | None:
        """A future whose end makes ``row`` known committed: its own, or that of the newest urgent row on
        its way, when that was handed after it; None when there is none."""
        if row.done is not None:
            return row.done
        if self._urgent and self._urgent[-1][0] > row.seq:
            return self._urgent[-1][1]
        return None

    def _reserve(
        self, key: str, rows: _Rows, token: Mapping[str, float], margin: int, pace: Pace, *, urgent: bool
    ) -> concurrent.futures.Future[None] | None:
        level, at = reserved(token["level"], token["at"], margin, pace.limit)
        return self._hand(key, rows, token, level, at, urgent=urgent)

    def _hand(
        self, key: str, rows: _Rows, token: Mapping[str, float], level: float, at: float, *, urgent: bool
    ) -> concurrent.futures.Future[None] | None:
        self._seq += 1
        done: concurrent.futures.Future[None] | None = None
        if urgent or len(rows.handed) >= MAX_HANDED:
            done = self._writer.spend(key, level, at, token["paused_until"], dict(token))
            self._urgent.append((self._seq, done))
        else:
            self._writer.put_token(key, level, at, token["paused_until"], dict(token))
        row = _Row(level, at, self._pace(token["burst"], token["limit"]), self._seq, done)
        rows.handed = (*rows.handed, row)
        return done

    def _pace(self, burst: float, limit: float) -> tuple[float, float]:
        pace = (burst, limit)
        return self._paces.setdefault(pace, pace)

    def _hand_kept(self, key: str, rows: _Rows, token: Mapping[str, float]) -> None:
        """Hand the bucket ``token`` at the lower of its level and what the newest row restores then."""
        level, at = token["level"], token["at"]
        pace = saved_pace(token["burst"], token["limit"])
        newest = rows.newest
        if newest is not None:
            level = min(level, _restore(newest, at, pace))
        if margin_of(pace.limit):
            level, at = float(math.floor(level)), float(math.ceil(at))
        self._hand(key, rows, token, level, at, urgent=False)


def _restore(row: _Row, wall: float, pace: Pace) -> float:
    """What a restart at ``wall`` on ``pace`` makes of ``row``: the planner's own formula."""
    return restored_level(row.level, row.at, *row.pace, wall, pace)
