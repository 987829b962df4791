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
right after costs the token at most ``margin`` requests of its day, never a request beyond its limit.

Per token, the rows handed to the store: the newest known to be committed, and those handed since (any of
them may be committed, and so the newest, at any moment). For each spend (the planner took the request;
the bucket after it, at wall time ``at``):

* every one of those rows restores at most the true level: the spend is durable already, nothing to do;
* else the newest handed row does: the request waits for that row's commit;
* else a reservation is committed first, and the request waits for it.

After a spend that was durable already, when less than half the margin is left and no row is on its way,
a fresh reservation is committed ahead: it is handed like any other (``StateStore.spend``, committed
within about a second), but no request waits for it unless it needs it. A handed row is known committed
when its future is done, or the future of a row of the same token handed after it is (the store commits
what it was handed in order). A token-wide pause, and a change of pace by a reload (or at a restart), hand
a row too, at the lower of the true level and what the newest row would restore: the margin is kept. A
token a reload removes is forgotten here: if it comes back, its first spend commits.

Not thread-safe: the refresher's loop calls it.
"""

from __future__ import annotations

import concurrent.futures
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from exporter.planner import Pace, restored_level, saved_pace

MARGIN_SHARE = 100  # a reservation's margin: 1 % of the daily limit (daily_limit // MARGIN_SHARE)
TOLERANCE = 1e-9  # requests: rounding of the levels compared


class TokenWriter(Protocol):
    """The part of the state store (``statestore.StateStore``) that reservations write through."""

    def spend(
        self, token: str, level: float, at: float, paused_until: float, extra: dict[str, float] | None = None
    ) -> concurrent.futures.Future[None]: ...


@dataclass(slots=True)
class _Row:
    """A token row handed to the store: its level at ``at`` on the pace (``burst``, ``limit``); ``done``,
    done once it is committed (None: read from the store at start)."""

    level: float
    at: float
    burst: float
    limit: float
    done: concurrent.futures.Future[None] | None = None


@dataclass(slots=True)
class _Rows:
    committed: _Row | None = None  # the newest row known committed
    handed: tuple[_Row, ...] = ()  # handed after it, oldest first, not known committed


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

    def restore(self, tokens: Mapping[str, Mapping[str, float]]) -> None:
        """The rows read from the store at start (``SavedPacing.tokens``): committed. A row without its
        pace or with a number missing counts as none (the token's first spend commits)."""
        for key, saved in tokens.items():
            level, at, burst, limit = (
                saved.get(name, math.nan) for name in ("level", "at", "burst", "limit")
            )
            if all(math.isfinite(number) for number in (level, at, burst, limit)):
                self._rows[key] = _Rows(committed=_Row(level, at, burst, limit))

    def spend(self, key: str, token: Mapping[str, float]) -> concurrent.futures.Future[None] | None:
        """A request was taken from token ``key``; ``token`` is its bucket after it (``SavedPacing``'s
        form). None when the request may be sent now, else a future done once it may."""
        level, at = token["level"], token["at"]
        pace = saved_pace(token["burst"], token["limit"])
        margin = margin_of(pace.limit)
        rows = self._settled(key)

        def covers(row: _Row | None) -> bool:
            return row is not None and _restore(row, at, pace) <= level + TOLERANCE

        if rows.handed and covers(rows.handed[-1]):
            if covers(rows.committed) and all(covers(row) for row in rows.handed):
                return None
            newest = rows.handed[-1].done  # the committed row does not cover the spend: the newest does
            assert newest is not None  # every handed row has its future
            return newest
        if not rows.handed and covers(rows.committed):
            assert rows.committed is not None
            if margin and level - _restore(rows.committed, at, pace) < margin / 2:
                self._hand(key, rows, token, *reserved(level, at, margin, pace.limit))  # ahead
            return None
        return self._hand(key, rows, token, *reserved(level, at, margin, pace.limit))

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
            newest = rows.handed[-1] if rows.handed else rows.committed
            if newest is not None and (newest.burst, newest.limit) != (token["burst"], token["limit"]):
                self._hand_kept(key, self._settled(key), token)

    def rows_of(self, key: str) -> tuple[_Row | None, tuple[_Row, ...]]:
        """The row known committed and those handed since (for tests)."""
        rows = self._rows.get(key, _Rows())
        return rows.committed, rows.handed

    # ----- inside ---------------------------------------------------------------------------------

    def _settled(self, key: str) -> _Rows:
        """``key``'s rows, those now known committed moved out of ``handed``."""
        rows = self._rows.get(key)
        if rows is None:
            rows = self._rows[key] = _Rows()
        for index in range(len(rows.handed) - 1, -1, -1):
            done = rows.handed[index].done
            if done is not None and done.done():
                rows.committed = rows.handed[index]
                rows.handed = rows.handed[index + 1 :]
                break
        return rows

    def _hand(
        self, key: str, rows: _Rows, token: Mapping[str, float], level: float, at: float
    ) -> concurrent.futures.Future[None]:
        done = self._writer.spend(key, level, at, token["paused_until"], dict(token))
        rows.handed = (*rows.handed, _Row(level, at, token["burst"], token["limit"], done))
        return done

    def _hand_kept(self, key: str, rows: _Rows, token: Mapping[str, float]) -> None:
        """Hand the bucket ``token`` at the lower of its level and what the newest row restores then."""
        level, at = token["level"], token["at"]
        pace = saved_pace(token["burst"], token["limit"])
        newest = rows.handed[-1] if rows.handed else rows.committed
        if newest is not None:
            level = min(level, _restore(newest, at, pace))
        if margin_of(pace.limit):
            level, at = float(math.floor(level)), float(math.ceil(at))
        self._hand(key, rows, token, level, at)


def _restore(row: _Row, wall: float, pace: Pace) -> float:
    """What a restart at ``wall`` on ``pace`` makes of ``row``: the planner's own formula."""
    return restored_level(row.level, row.at, row.burst, row.limit, wall, pace)
