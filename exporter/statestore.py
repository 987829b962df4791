"""The optional state store (``state_store``): values, pacing, budget and closed months across restarts,
in SQLite (Python's own ``sqlite3``), WAL mode.

What is kept, and why it is kept so (``docs/state-store.md`` has the schema and how to read it):

* ``tokens``: a journal of each token's bucket (level, when, pause). A row is committed BEFORE a request
  is sent (``spend``; the ledger in exporter/reservation.py decides when one is needed), so a process
  killed at any moment has recorded every request it sent: the daily budget holds across a crash loop.
* ``reports``: a journal of each report's value, next due time and last reading, appended when a request
  answered.
* ``months``: the closing value of every closed month (kept 25 months), for the statement.

Both journals are append-only (new rows land on the last page: a random row update would rewrite a
whole page per request), each in two generations (``_Journal``): once the current one holds about a round
of requests, the other's rows still newest of their name are copied over and it is emptied whole, which
frees its pages without writing them (deleting superseded rows one by one wrote as much as appending
them). Journal rows name a token or report by a number (``token_names``, ``report_names``), and a new
store has 1 KiB pages: each transaction rewrites the journals' last pages. Nothing is written while
nothing happens. Tokens are named by their key only.

Writes go through one thread (``state-writer``): a request waiting for its spend is committed at most a
second after the previous transaction, everything else is batched up to five seconds. A store that cannot
be written (read-only directory, full disk) costs one warning an hour and a count on /metrics; fetching
and serving go on (the in-memory budget still holds within the run). A corrupt store or one of another
format is moved aside (``<name>.corrupt-<time>``) and the exporter starts fresh, saying so; a store of
format 3 or 4 is migrated in one transaction. A JSON state file of format 1 or 2 (the ``state_file`` of
earlier versions) is migrated once, when the store does not exist yet.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import math
import os
import re
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from exporter.monthclose import SavedMonths, Seen, utc_month
from exporter.planner import SavedPacing

log = logging.getLogger(__name__)

FORMAT = 5  # PRAGMA user_version; the JSON state files were formats 1 and 2; formats 3 and 4 are migrated
PAGE_SIZE = 1024  # bytes: each transaction rewrites the journals' last pages; smaller pages, fewer bytes
WRITE_SECONDS = 1.0  # a request waiting for its spend: at most a second after the previous transaction
BATCH_SECONDS = 5.0  # everything else (answers, pauses, months) waits for a transaction at most this long
COMPACT_MIN_ROWS = 1000  # a journal's generation is not turned over before it holds this many rows
WARN_SECONDS = 3600.0  # a failing write is logged at most once an hour
KEEP_MONTHS = 25  # closed months older than this are dropped (the statement needs 13)
_MONTH_RE = re.compile(r"\d{4}-(0[1-9]|1[0-2])")

Values = dict[str, dict[str, tuple[float, float]]]

# The journals name a token or report by a small integer (``token_names``, ``report_names``: written once
# per name), and a report's last reading by ``seen`` when it is its value (SEEN_*).
_BUCKET_COLUMNS = (  # a token's
    "token INTEGER NOT NULL, level REAL NOT NULL, at REAL NOT NULL, paused_until REAL NOT NULL, "
    'pause_intervals REAL, burst REAL, "limit" REAL'
)
_REPORT_COLUMNS = (
    "report INTEGER NOT NULL, token INTEGER, due REAL, value REAL, fetched_at REAL, "
    "seen INTEGER NOT NULL, seen_value REAL, seen_at REAL, seen_month TEXT"
)
# Each journal is a pair of tables (its two generations, ``_a`` and ``_b``) read as one through a view of
# the journal's name; ``seq`` numbers the rows of a pair in the order they were written.
GENERATIONS = ("a", "b")


def _journal_schema(name: str, columns: str) -> str:
    """A journal's two generations and the view reading them as one (names are ours, never input)."""
    tables = [
        f"CREATE TABLE IF NOT EXISTS {name}_{g} (seq INTEGER PRIMARY KEY, {columns});" for g in GENERATIONS
    ]
    union = " UNION ALL ".join(f"SELECT * FROM {name}_{g}" for g in GENERATIONS)  # noqa: S608
    return "\n".join([*tables, f"CREATE VIEW IF NOT EXISTS {name} AS {union};"])


SCHEMA = f"""CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS token_names (id INTEGER PRIMARY KEY, token TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS report_names (
    id INTEGER PRIMARY KEY, operation TEXT NOT NULL, api TEXT NOT NULL, UNIQUE (operation, api));
{_journal_schema("tokens", _BUCKET_COLUMNS)}
{_journal_schema("reports", _REPORT_COLUMNS)}
CREATE TABLE IF NOT EXISTS months (
    operation TEXT NOT NULL, api TEXT NOT NULL, month TEXT NOT NULL, value REAL NOT NULL,
    at REAL NOT NULL, PRIMARY KEY (operation, api, month)) WITHOUT ROWID;
CREATE VIEW IF NOT EXISTS latest_reports AS
    SELECT n.operation, n.api, t.token, r.due, r.value, r.fetched_at,
        CASE r.seen WHEN 0 THEN NULL WHEN 3 THEN r.seen_value ELSE r.value END AS seen_value,
        CASE r.seen WHEN 0 THEN NULL WHEN 3 THEN r.seen_at ELSE r.fetched_at END AS seen_at,
        CASE r.seen WHEN 1 THEN strftime('%Y-%m', r.fetched_at, 'unixepoch') WHEN 3 THEN r.seen_month END
            AS seen_month
    FROM reports r JOIN report_names n ON n.id = r.report LEFT JOIN token_names t ON t.id = r.token
    WHERE r.seq IN (SELECT max(seq) FROM reports GROUP BY report);
"""  # noqa: S608 (built from our own constants)
_TABLES = frozenset(
    {"meta", "token_names", "report_names", "months"}
    | {f"{name}_{g}" for name in ("tokens", "reports") for g in GENERATIONS}
)
# reports.seen: no reading; the reading is (value, fetched_at) of the fetched_at's UTC month; the same
# without a month; the reading is in seen_value, seen_at, seen_month. 0 and 1 take no byte in a row.
SEEN_NONE, SEEN_VALUE, SEEN_VALUE_NO_MONTH, SEEN_OWN = 0, 1, 2, 3
# Formats 3 and 4 kept each journal in one table (format 3 naming tokens and reports by text): the newest
# row of each token and report is copied into the first generation of format 5.
_RENAME_OLD = (
    "DROP VIEW IF EXISTS latest_reports; "
    "ALTER TABLE tokens RENAME TO tokens_old; ALTER TABLE reports RENAME TO reports_old;"
)
_COPY_3 = """
INSERT INTO token_names (token) SELECT DISTINCT token FROM tokens_old;
INSERT INTO token_names (token) SELECT DISTINCT token FROM reports_old WHERE token != ''
    ON CONFLICT DO NOTHING;
INSERT INTO report_names (operation, api) SELECT DISTINCT operation, api FROM reports_old;
INSERT INTO tokens_a (token, level, at, paused_until, pause_intervals, burst, "limit")
    SELECT n.id, level, at, paused_until, pause_intervals, burst, "limit"
    FROM tokens_old JOIN token_names n USING (token)
    WHERE tokens_old.rowid IN (SELECT max(rowid) FROM tokens_old GROUP BY token) ORDER BY tokens_old.rowid;
INSERT INTO reports_a (report, token, due, value, fetched_at, seen, seen_value, seen_at, seen_month)
    SELECT n.id, t.id, due, value, fetched_at, CASE WHEN seen_value IS NULL THEN 0 ELSE 3 END,
        seen_value, seen_at, seen_month
    FROM reports_old JOIN report_names n USING (operation, api) LEFT JOIN token_names t USING (token)
    WHERE reports_old.rowid IN (SELECT max(rowid) FROM reports_old GROUP BY operation, api)
    ORDER BY reports_old.rowid;
DROP TABLE tokens_old;
DROP TABLE reports_old;
"""
_COPY_4 = """
INSERT INTO tokens_a SELECT rowid, * FROM tokens_old
    WHERE rowid IN (SELECT max(rowid) FROM tokens_old GROUP BY token) ORDER BY rowid;
INSERT INTO reports_a SELECT rowid, * FROM reports_old
    WHERE rowid IN (SELECT max(rowid) FROM reports_old GROUP BY report) ORDER BY rowid;
DROP TABLE tokens_old;
DROP TABLE reports_old;
"""
# A token's saved pacing (planner.SavedPacing.tokens), the optional fields last.
TOKEN_FIELDS = ("level", "at", "paused_until", "pause_intervals", "burst", "limit")


class StoreError(Exception):
    """The store cannot be used as asked (a one-line message, never a traceback)."""


@dataclass(frozen=True, slots=True)
class MonthTotal:
    """One report's total of one month: the closing value of a closed month, or (``closed`` False) the
    current month's latest value."""

    operation: str
    api: str
    month: str  # "YYYY-MM"
    value: float
    closed: bool


@dataclass
class SavedState:
    values: Values = field(default_factory=dict)
    pacing: SavedPacing = field(default_factory=SavedPacing)
    months: SavedMonths = field(default_factory=SavedMonths)


class Sink(Protocol):
    """Takes each report's value, last reading and closed months as they are read (the snapshot store):
    at 140,000 reports, dictionaries of them only to be copied were ~60 MB at peak."""

    def restore_report(
        self, operation: str, api: str, value: tuple[float, float] | None, seen: Seen | None
    ) -> None: ...

    def restore_closed(self, operation: str, api: str, closed: Seen) -> None: ...


@dataclass(frozen=True, slots=True)
class Health:
    """What /metrics says of the store."""

    write_errors: int
    last_write: float | None  # Unix time of the last committed transaction


# ----- reading without an exporter (the statement, an operator) ------------------------------------------


def _open_read_only(path: str | os.PathLike[str]) -> sqlite3.Connection:
    target = Path(path)
    if not target.is_file():
        raise StoreError(f"{target}: no state store there (not a regular file)")
    try:
        db = sqlite3.connect(f"{target.absolute().as_uri()}?mode=ro", uri=True, timeout=5.0)
        version = db.execute("PRAGMA user_version").fetchone()[0]
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as error:
        raise StoreError(f"{target}: not a state store ({error})") from None
    if version != FORMAT or not _TABLES <= tables:
        db.close()
        if version in (3, 4):
            raise StoreError(
                f"{target}: a state store of format {version}: start the exporter once to migrate it"
            )
        raise StoreError(f"{target}: not a state store of format {FORMAT} (format {version})")
    return db


def _latest_readings(db: sqlite3.Connection) -> Iterator[tuple[str, str, Seen | None]]:
    """Each report's last reading (operation, api, reading), from its newest journal row."""
    for op, api, value, at, *seen in db.execute(
        "SELECT n.operation, n.api, r.value, r.fetched_at, r.seen, r.seen_value, r.seen_at, r.seen_month "
        "FROM reports r JOIN report_names n ON n.id = r.report "
        "WHERE r.seq IN (SELECT max(seq) FROM reports GROUP BY report)"
    ):
        yield op, api, _seen_of(value, at, *seen)


def read_month_totals(path: str | os.PathLike[str], month: str) -> list[MonthTotal]:
    """Every report's total of ``month`` ("YYYY-MM"): closing values of the closed month, else the latest
    reading of the month when it is the current one. [] when the store holds nothing of that month.
    Read-only: works with or without an exporter running. Raises StoreError."""
    if not _MONTH_RE.fullmatch(month):
        raise StoreError(f"month {month!r}: expected YYYY-MM")
    db = _open_read_only(path)
    try:
        totals = [
            MonthTotal(op, api, month, float(value), True)
            for op, api, value in db.execute(
                "SELECT operation, api, value FROM months WHERE month = ? ORDER BY operation, api", (month,)
            )
        ]
        closed = {(t.operation, t.api) for t in totals}
        current = []
        for op, api, seen in _latest_readings(db):
            if seen is None or (op, api) in closed:
                continue
            if (seen.month or utc_month(seen.at)) == month:
                current.append(MonthTotal(op, api, month, seen.value, False))
    except sqlite3.Error as error:
        raise StoreError(f"{path}: cannot read it ({error})") from None
    finally:
        db.close()
    return totals + sorted(current, key=lambda t: (t.operation, t.api))


def months_available(path: str | os.PathLike[str]) -> list[str]:
    """Every month ("YYYY-MM") the store holds a total of, oldest first. Raises StoreError."""
    db = _open_read_only(path)
    try:
        months = {row[0] for row in db.execute("SELECT DISTINCT month FROM months")}
        for _op, _api, seen in _latest_readings(db):
            if seen is not None:
                months.add(seen.month or utc_month(seen.at))
    except sqlite3.Error as error:
        raise StoreError(f"{path}: cannot read it ({error})") from None
    finally:
        db.close()
    return sorted(months)


# ----- the exporter's store ------------------------------------------------------------------------------


def check_path(path: str | os.PathLike[str], key: str = "state_store") -> None:
    """Refuse a path that exists and is not a regular file (a FIFO, /dev/zero, a directory): StoreError."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as error:
        raise StoreError(f"{key} {path}: cannot use it: {error.strerror or error}") from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise StoreError(f"{key} {path}: {kind}; give the path of a file (it is created if absent)")


@dataclass(slots=True)
class _Journal:
    """One journal (``tokens`` or ``reports``): rows are appended to its current generation; when that
    holds as many rows as the journal has names (about one round of requests), the other generation's
    rows that are still the newest of their name are copied over and the other generation is emptied
    (SQLite frees its pages without writing them), and becomes the current one. Deleting superseded rows
    one by one instead rewrote every page that held one: as many bytes again as appending them."""

    name: str  # "tokens" or "reports"
    key: str  # the column naming a token or report
    names: str  # the table of those names
    current: str = GENERATIONS[0]
    rows: int = 0  # in the current generation
    seq: int = 0  # the newest row's, in either generation
    live: int = 0  # names: what one round of requests writes at most

    @property
    def table(self) -> str:
        return f"{self.name}_{self.current}"

    @property
    def other(self) -> str:
        return f"{self.name}_{GENERATIONS[1 - GENERATIONS.index(self.current)]}"

    def due(self) -> bool:
        return self.rows >= max(self.live, COMPACT_MIN_ROWS)

    def read(self, db: sqlite3.Connection) -> None:
        """Which generation is current (the one holding the newest row, unless ``meta`` says), its rows,
        the newest seq, the names."""
        newest = {
            g: db.execute(f"SELECT max(seq) FROM {self.name}_{g}").fetchone()[0] or 0  # noqa: S608
            for g in GENERATIONS
        }
        saved = db.execute("SELECT value FROM meta WHERE key = ?", (f"{self.name}_current",)).fetchone()
        self.current = saved[0] if saved and saved[0] in GENERATIONS else max(newest, key=newest.__getitem__)
        self.seq = max(newest.values())
        self.rows = db.execute(f"SELECT count(*) FROM {self.table}").fetchone()[0]  # noqa: S608
        self.live = db.execute(f"SELECT count(*) FROM {self.names}").fetchone()[0]  # noqa: S608

    def newest(self, table: str, alias: str = "") -> str:
        """The WHERE clause of the rows of generation ``table`` that are the newest of their name: the
        newest of its own, and, in the other generation, only names the current one does not hold."""
        key = self.key  # table and column names are ours, never input
        where = f" WHERE {alias}seq IN (SELECT max(seq) FROM {table} GROUP BY {key})"  # noqa: S608
        if table == self.other:
            where += f" AND {alias}{key} NOT IN (SELECT {key} FROM {self.table})"  # noqa: S608
        return where

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def turn_over(self, db: sqlite3.Connection) -> int:
        """Inside a transaction: the other generation's rows still newest for their name move into the
        current one, the other is emptied and is to become current (``turned_over``, once committed).
        The count of names."""
        other = self.other
        db.execute(f"INSERT INTO {self.table} SELECT * FROM {other}{self.newest(other)}")  # noqa: S608
        db.execute(f"DELETE FROM {other}")  # noqa: S608 (no WHERE: the whole table's pages are freed)
        db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (f"{self.name}_current", other[-1]),
        )
        return int(db.execute(f"SELECT count(*) FROM {self.names}").fetchone()[0])  # noqa: S608

    def turned_over(self, live: int) -> None:
        """After the transaction of ``turn_over`` committed."""
        self.current, self.rows, self.live = self.other[-1], 0, live


@dataclass(slots=True)
class _Pending:
    tokens: dict[str, tuple[float | None, ...]] = field(default_factory=dict)  # as TOKEN_FIELDS
    reports: dict[tuple[str, str], tuple[Any, ...]] = field(default_factory=dict)
    months: dict[tuple[str, str, str], tuple[float, float]] = field(default_factory=dict)
    waiting: list[concurrent.futures.Future[None]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.tokens or self.reports or self.months or self.waiting)


class StateStore:
    """The exporter's state store. ``load`` once, then ``start``; the ``put_*`` and ``spend`` methods may
    be called from any thread; ``stop`` writes what is pending and closes."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        legacy_json: str | os.PathLike[str] | None = None,
        wall: Callable[[], float] = time.time,
        on_health: Callable[[Health], None] | None = None,
        write_seconds: float = WRITE_SECONDS,
        batch_seconds: float = BATCH_SECONDS,
    ) -> None:
        self.path = Path(path)
        self._legacy = Path(legacy_json) if legacy_json else None
        self._wall = wall
        self.on_health = on_health
        self.sink: Sink | None = None  # set before load: values and months go there, not in SavedState
        self._write_seconds = write_seconds
        self._batch_seconds = max(batch_seconds, write_seconds)
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._pending = _Pending()
        self._wake = threading.Event()  # something to write
        self._urgent = threading.Event()  # a request waits for its spend
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="state-writer", daemon=True)
        self._journals = (
            _Journal("tokens", "token", "token_names"),
            _Journal("reports", "report", "report_names"),
        )
        self._last_commit = 0.0  # monotonic
        self._last_warning = -WARN_SECONDS
        self._count = 0  # values read at start
        self.write_errors = 0
        self.last_write: float | None = None
        self.turnovers = {journal.name: 0 for journal in self._journals}  # for the benchmark

    # ----- start --------------------------------------------------------------------------------

    def load(self) -> SavedState:
        """Open (or create) the store and read it row by row; migrate a JSON state file once. Raises
        StoreError only for a path that is not a regular file; every other fault is logged and the
        exporter starts with what it has."""
        check_path(self.path)
        if self._legacy is not None:
            check_path(self._legacy, "state_file")  # a FIFO would hang the read
        started = time.monotonic()
        self._json_in_place()
        fresh = not self.path.exists()
        try:
            state = self._open_and_read()
        except _Unusable as error:
            self._move_aside(str(error))
            fresh = True
            state = self._try_open_fresh()
        except (sqlite3.Error, OSError) as error:
            self._failed("cannot open it", error)
            state = SavedState()
        if fresh and self._legacy is not None:
            migrated = self._migrate(self._legacy)
            if migrated is not None:
                state = migrated
                self._count = sum(len(apis) for apis in state.values.values())
                if self.sink is not None:
                    _drain(state, self.sink)
        self._report_health()
        log.info(
            "state_store %s: read %d value(s) and %d token(s) in %.2f s",
            self.path,
            self._count,
            len(state.pacing.tokens),
            time.monotonic() - started,
        )
        return state

    def _json_in_place(self) -> None:
        """A JSON state file at the store's own path (``state_file: state`` of an earlier version): renamed
        ``<name>.migrated`` and migrated into a new store there."""
        try:
            with open(self.path, "rb") as handle:
                head = handle.read(64).lstrip()
        except OSError:
            return
        if head.startswith((b"{", b"[")):
            moved = self.path.with_name(self.path.name + ".migrated")
            try:
                os.replace(self.path, moved)
            except OSError as error:
                self._failed("cannot move the JSON state file aside to migrate it", error)
                return
            self._legacy = moved

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=5.0, isolation_level=None, check_same_thread=False)
        try:
            db.execute(f"PRAGMA page_size = {PAGE_SIZE}")  # a new store only (before its first table)
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")  # a killed process loses no committed transaction
            # Debian builds SQLite to overwrite deleted content: emptying a journal's generation would write
            # every page it frees. The store holds no secret (tokens are named by their key only).
            db.execute("PRAGMA secure_delete = OFF")
        except sqlite3.Error:
            db.close()
            raise
        return db

    def _open_and_read(self) -> SavedState:
        try:
            db = self._connect()
        except sqlite3.DatabaseError as error:
            if _corrupt(error):
                raise _Unusable(str(error)) from None
            raise
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if version == 0 and tables <= _TABLES:  # new, or a creation that failed half-way
                try:
                    db.executescript(f"BEGIN IMMEDIATE; {SCHEMA} PRAGMA user_version = {FORMAT}; COMMIT;")
                except sqlite3.Error:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                    raise
            elif version in (3, 4) and {"tokens", "reports", "months", "meta"} <= tables:
                _migrate_old(db, version)
                log.info("state_store %s: migrated from format %d to format %d", self.path, version, FORMAT)
            elif version != FORMAT or not _TABLES <= tables:
                raise _Unusable(f"format {version}, this exporter reads format {FORMAT}")
            for journal in self._journals:
                journal.read(db)
            state, self._count = _read(db, self._journals, self.sink)
        except sqlite3.DatabaseError as error:
            db.close()
            if _corrupt(error):
                raise _Unusable(str(error)) from None
            raise
        except BaseException:
            db.close()
            raise
        self._db = db
        return state

    def _try_open_fresh(self) -> SavedState:
        try:
            return self._open_and_read()
        except (_Unusable, sqlite3.Error, OSError) as error:
            self._failed("cannot create it", error)
            return SavedState()

    def _move_aside(self, why: str) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._wall()))
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        try:
            os.replace(self.path, aside)
            for suffix in ("-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(f"{self.path}{suffix}", f"{aside}{suffix}")
            where = f"moved aside to {aside.name}"
        except OSError as error:
            where = f"could not move it aside ({error.strerror or error})"
        log.warning(
            "state_store %s: unusable (%s), %s; starting fresh: values, pacing and the daily budget "
            "(each token's full burst) start anew",
            self.path,
            why,
            where,
        )

    def _migrate(self, legacy: Path) -> SavedState | None:
        """Read a JSON state file of format 1 or 2 once into the new store, then rename it ``.migrated``."""
        try:
            raw = json.loads(legacy.read_bytes())
            state = parse_json_state(raw)
        except FileNotFoundError:
            return None
        except (
            OSError,
            ValueError,
            TypeError,
            KeyError,
            AttributeError,
            IndexError,
            RecursionError,
        ) as error:
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._wall()))
            aside = legacy.with_name(f"{legacy.name}.corrupt-{stamp}")
            try:
                os.replace(legacy, aside)
                where = f"moved aside to {aside.name}"
            except OSError as move_error:
                where = f"could not move it aside ({move_error.strerror or move_error})"
            log.warning(
                "state_file %s: not migrated, cannot read it (%s), %s; starting fresh: values, pacing "
                "and the daily budget start anew",
                legacy,
                error if isinstance(error, ValueError) else type(error).__name__,
                where,
            )
            return None
        rows: dict[tuple[str, str], tuple[Any, ...]] = {}  # token, due, value, fetched at, seen
        for op, values in state.values.items():
            for api, (value, at) in values.items():
                rows[(op, api)] = (None, None, value, at, state.months.seen.get(op, {}).get(api))
        for op, seens in state.months.seen.items():
            for api, seen in seens.items():
                rows.setdefault((op, api), (None, None, None, None, seen))
        for key, dues in state.pacing.reports.items():
            for name, due in dues.items():
                op, _, api = name.partition("/")
                rows[(op, api)] = (key, due, *rows.get((op, api), (None, None, None, None, None))[2:])
        with self._lock:
            self._pending.reports.update(rows)
            for key, saved in state.pacing.tokens.items():
                self._pending.tokens[key] = _token_row(
                    saved["level"], saved["at"], saved["paused_until"], saved
                )
            for op, closed_ones in state.months.closed.items():
                for api, closed in closed_ones.items():
                    if closed.month is not None:
                        self._pending.months[(op, api, closed.month)] = (closed.value, closed.at)
        self.flush()
        if not legacy.name.endswith(".migrated"):
            with contextlib.suppress(OSError):
                os.replace(legacy, legacy.with_name(legacy.name + ".migrated"))
        log.info(
            "state_file %s migrated into state_store %s (renamed to %s.migrated)",
            legacy,
            self.path,
            legacy.name,
        )
        return state

    # ----- writes (any thread) ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._urgent.set()
        if self._thread.ident is not None:
            self._thread.join(timeout=10.0)
        self.flush()
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None

    def spend(
        self, token: str, level: float, at: float, paused_until: float, extra: dict[str, float] | None = None
    ) -> concurrent.futures.Future[None]:
        """Record a token's bucket right after a request was taken from it; the future is done when the
        row is committed (or could not be), and only then may the request be sent."""
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self._lock:
            self._pending.tokens[token] = _token_row(level, at, paused_until, extra)
            self._pending.waiting.append(future)
        self._urgent.set()
        self._wake.set()
        return future

    def put_token(
        self, token: str, level: float, at: float, paused_until: float, extra: dict[str, float] | None = None
    ) -> None:
        with self._lock:
            self._pending.tokens[token] = _token_row(level, at, paused_until, extra)
        self._wake.set()

    def put_report(
        self,
        operation: str,
        api: str,
        token: str,
        due: float | None,
        value: tuple[float, float] | None,
        seen: Seen | None,
    ) -> None:
        v, at = value if value is not None else (None, None)
        with self._lock:
            self._pending.reports[(operation, api)] = (token, due, v, at, seen)
        self._wake.set()

    def put_month(self, operation: str, api: str, closed: Seen) -> None:
        if closed.month is None:
            return
        with self._lock:
            self._pending.months[(operation, api, closed.month)] = (closed.value, closed.at)
        self._wake.set()

    # ----- the writer thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait()
            # A transaction write_seconds after the previous one when a request waits for its spend,
            # batch_seconds after it otherwise: per transaction, each journal's last pages are rewritten.
            while not self._stopping:
                urgent = self._urgent.is_set()
                rest = self._last_commit + (self._write_seconds if urgent else self._batch_seconds)
                rest -= time.monotonic()
                if rest <= 0:
                    break
                if urgent:
                    time.sleep(rest)
                else:
                    self._urgent.wait(rest)  # a spend cuts the batch's wait short
            if self._stopping:
                return
            self._wake.clear()
            self._urgent.clear()
            try:
                self.flush()
            except Exception as error:  # a bug of ours: keep the thread (requests wait on it)
                self._failed("unexpected error", error)

    def flush(self) -> None:
        """Write what is pending now, in the calling thread (the writer thread does this on its cadence;
        ``stop`` once more; a benchmark on its own clock)."""
        with self._lock:
            pending, self._pending = self._pending, _Pending()
        if not pending:
            return
        try:
            if self._db is None:
                self._open_and_read()  # the directory may have become writable
            assert self._db is not None
            self._write(self._db, pending)
        except (sqlite3.Error, OSError, _Unusable) as error:
            self._failed("cannot write it", error)
        else:
            self.last_write = self._wall()
        finally:
            self._last_commit = time.monotonic()
            for future in pending.waiting:
                future.set_result(None)  # sent either way: a full disk must not stop fetching
            self._report_health()

    def _write(self, db: sqlite3.Connection, pending: _Pending) -> None:
        tokens, reports = self._journals
        seqs = (tokens.seq, reports.seq)
        try:
            self._write_rows(db, pending)
        except BaseException:
            tokens.seq, reports.seq = seqs  # rolled back
            raise
        tokens.rows += len(pending.tokens)
        reports.rows += len(pending.reports)
        if tokens.due() or reports.due():
            self.compact(only_due=True)

    def _write_rows(self, db: sqlite3.Connection, pending: _Pending) -> None:
        tokens, reports = self._journals
        with _transaction(db):
            # A name already there writes nothing; a new one is written once.
            names = {(key,) for key in pending.tokens}
            names.update((token,) for token, *_ in pending.reports.values() if token)
            db.executemany("INSERT INTO token_names (token) VALUES (?) ON CONFLICT DO NOTHING", names)
            if pending.reports:
                db.executemany(
                    "INSERT INTO report_names (operation, api) VALUES (?, ?) ON CONFLICT DO NOTHING",
                    pending.reports.keys(),
                )
            if pending.tokens:
                db.executemany(
                    f"INSERT INTO {tokens.table} "  # noqa: S608
                    '(seq, token, level, at, paused_until, pause_intervals, burst, "limit") '
                    "VALUES (?, (SELECT id FROM token_names WHERE token = ?), ?, ?, ?, ?, ?, ?)",
                    [(tokens.next_seq(), key, *row) for key, row in pending.tokens.items()],
                )
            if pending.reports:
                db.executemany(
                    f"INSERT INTO {reports.table} "  # noqa: S608
                    "(seq, report, token, due, value, fetched_at, seen, seen_value, seen_at, seen_month) "
                    "VALUES (?, (SELECT id FROM report_names WHERE operation = ? AND api = ?), "
                    "(SELECT id FROM token_names WHERE token = ?), ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (
                            reports.next_seq(),
                            op,
                            api,
                            token or None,
                            _whole(due),
                            value,
                            at,
                            *_seen_row(value, at, seen),
                        )
                        for (op, api), (token, due, value, at, seen) in pending.reports.items()
                    ],
                )
            if pending.months:
                db.executemany(
                    "INSERT INTO months (operation, api, month, value, at) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT (operation, api, month) "
                    "DO UPDATE SET value = excluded.value, at = excluded.at",
                    [(op, api, month, *row) for (op, api, month), row in pending.months.items()],
                )
                # A month closed: the oldest one kept may have changed.
                db.execute(
                    "DELETE FROM months WHERE month < ?",
                    (_months_back(utc_month(self._wall()), KEEP_MONTHS),),
                )

    def compact(self, *, only_due: bool = False) -> None:
        """Turn each journal over (``_Journal``; only those due with ``only_due``): what remains is the
        newest row of each token and report."""
        db = self._db
        if db is None:
            return
        journals = [j for j in self._journals if j.due() or not only_due]
        # Forced, twice: the second turn leaves one generation with only the newest rows, the other empty.
        for _ in range(1 if only_due else 2):
            try:
                with _transaction(db):
                    names = [j.turn_over(db) for j in journals]
            except sqlite3.Error as error:
                self._failed("cannot compact it", error)
                return
            for journal, live in zip(journals, names, strict=True):
                journal.turned_over(live)
                self.turnovers[journal.name] += 1

    def _failed(self, what: str, error: BaseException) -> None:
        self.write_errors += 1
        if isinstance(error, sqlite3.OperationalError) and "unable to open" in str(error):
            error = OSError(0, f"{error}: {_why_not_writable(self.path.parent)}")
        now = time.monotonic()
        if now - self._last_warning >= WARN_SECONDS:
            self._last_warning = now
            detail = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            log.warning(
                "state_store %s: %s: %s (values, pacing and budget are kept in memory only; "
                "this warning repeats at most once an hour, see wolkvox_state_write_errors_total)",
                self.path,
                what,
                detail,
            )

    def _report_health(self) -> None:
        if self.on_health is not None:
            self.on_health(Health(self.write_errors, self.last_write))


def _why_not_writable(directory: Path) -> str:
    try:
        if os.statvfs(directory).f_flag & os.ST_RDONLY:
            return "read-only file system"
    except OSError as error:
        return error.strerror or str(error)
    return "the directory is not writable" if not os.access(directory, os.W_OK) else "see the path"


def _corrupt(error: sqlite3.Error) -> bool:
    """The file is not a database, or a damaged one (not: it cannot be opened or written)."""
    return getattr(error, "sqlite_errorname", "") in ("SQLITE_NOTADB", "SQLITE_CORRUPT")


class _Unusable(Exception):
    """The file is not a store this exporter can read: it is moved aside."""


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _token_row(
    level: float, at: float, paused_until: float, extra: dict[str, float] | None
) -> tuple[float | None, ...]:
    optional = [extra.get(name) if extra else None for name in TOKEN_FIELDS[3:]]
    return (level, at, paused_until, *optional)


def _seen_row(
    value: float | None, at: float | None, seen: Seen | None
) -> tuple[int, float | None, float | None, str | None]:
    """``seen, seen_value, seen_at, seen_month`` of a report row (SEEN_*)."""
    if seen is None:
        return (SEEN_NONE, None, None, None)
    if seen.value == value and seen.at == at:
        if seen.month is None:
            return (SEEN_VALUE_NO_MONTH, None, None, None)
        if seen.month == utc_month(seen.at):
            return (SEEN_VALUE, None, None, None)
    return (SEEN_OWN, seen.value, seen.at, seen.month)


def _seen_of(
    value: Any,
    at: Any,
    seen: int,
    seen_value: Any,
    seen_at: Any,
    seen_month: str | None,
    months: dict[str, str] | None = None,
) -> Seen | None:
    """A report row's last reading (the reverse of ``_seen_row``); ``months`` shares one string per month
    (one per report was ~8 MB at 140,000)."""
    if seen == SEEN_OWN and seen_value is not None and seen_at is not None:
        month = seen_month
    elif seen in (SEEN_VALUE, SEEN_VALUE_NO_MONTH) and value is not None and at is not None:
        seen_value, seen_at = value, at
        month = utc_month(at) if seen == SEEN_VALUE else None
    else:
        return None
    if month is not None and months is not None:
        month = months.setdefault(month, month)
    return Seen(float(seen_value), float(seen_at), month)


def _migrate_old(db: sqlite3.Connection, version: int) -> None:
    """Format 3 or 4 into format 5, in one transaction (a kill -9 midway leaves the old format)."""
    copy = _COPY_3 if version == 3 else _COPY_4
    try:
        db.executescript(
            f"BEGIN IMMEDIATE; {_RENAME_OLD} {SCHEMA} {copy} PRAGMA user_version = {FORMAT}; COMMIT;"
        )
    except sqlite3.Error:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise
    if version == 3:  # once, the smaller pages of a new store (outside WAL mode; not while a reader has it)
        with contextlib.suppress(sqlite3.Error):
            db.execute("PRAGMA journal_mode = DELETE")
            db.execute(f"PRAGMA page_size = {PAGE_SIZE}")
            db.execute("VACUUM")
        db.execute("PRAGMA journal_mode = WAL")


def _whole(when: float | None) -> float | None:
    """A due time rounded up to the second: stored in 4 bytes instead of 8, and never earlier."""
    return None if when is None else float(math.ceil(when))


def _months_back(month: str, count: int) -> str:
    index = int(month[:4]) * 12 + int(month[5:7]) - 1 - count
    return f"{index // 12:04d}-{index % 12 + 1:02d}"


def _drain(state: SavedState, sink: Sink) -> None:
    """Hand values and months over to ``sink`` (and out of ``state``)."""
    for op, values in state.values.items():
        for api, value in values.items():
            sink.restore_report(op, api, value, state.months.seen.get(op, {}).get(api))
    for op, seens in state.months.seen.items():
        for api, seen in seens.items():
            if api not in state.values.get(op, {}):
                sink.restore_report(op, api, None, seen)
    for op, closed_ones in state.months.closed.items():
        for api, closed in closed_ones.items():
            sink.restore_closed(op, api, closed)
    state.values, state.months = {}, SavedMonths()


def _newest(db: sqlite3.Connection, journal: _Journal, select: str) -> Iterator[Any]:
    """The newest row of each name of ``journal``: ``select`` (``x`` the journal's table) over the other
    generation, without the names the current one holds, then over the current one. Each generation
    on its own: a GROUP BY over the view of both copied every row into a temporary table (+5 MB)."""
    for table in (journal.other, journal.table):
        yield from db.execute(select.format(table=table) + journal.newest(table, "x.") + " ORDER BY x.seq")


def _read(
    db: sqlite3.Connection, journals: tuple[_Journal, _Journal], sink: Sink | None = None
) -> tuple[SavedState, int]:
    """Everything the store holds, row by row (the newest row of each token and report); values and
    months straight into ``sink`` when there is one. Also the count of values read."""
    state = SavedState()
    count = 0
    months_seen: dict[str, str] = {}
    tokens, reports = journals
    for token, *values in _newest(
        db,
        tokens,
        'SELECT n.token, level, at, paused_until, pause_intervals, burst, "limit" '
        "FROM {table} x CROSS JOIN token_names n ON n.id = x.token",
    ):
        state.pacing.tokens[token] = {
            name: float(v) for name, v in zip(TOKEN_FIELDS, values, strict=True) if v is not None
        }
    for op, api, token, due, value, at, seen_flag, seen_value, seen_at, seen_month in _newest(
        db,
        reports,
        "SELECT n.operation, n.api, t.token, due, value, fetched_at, seen, seen_value, seen_at, seen_month "
        "FROM {table} x CROSS JOIN report_names n ON n.id = x.report "
        "LEFT JOIN token_names t ON t.id = x.token",
    ):
        if due is not None and token:
            state.pacing.reports.setdefault(token, {})[f"{op}/{api}"] = float(due)
        pair = (float(value), float(at)) if value is not None and at is not None else None
        seen = _seen_of(value, at, seen_flag, seen_value, seen_at, seen_month, months_seen)
        count += pair is not None
        if sink is not None:
            sink.restore_report(op, api, pair, seen)
            continue
        if pair is not None:
            state.values.setdefault(op, {})[api] = pair
        if seen is not None:
            state.months.seen.setdefault(op, {})[api] = seen
    for op, api, month, value, at in db.execute(
        "SELECT operation, api, month, value, at FROM months ORDER BY operation, api, month"
    ):
        closed = Seen(float(value), float(at), month)  # the latest month wins
        if sink is not None:
            sink.restore_closed(op, api, closed)
        else:
            state.months.closed.setdefault(op, {})[api] = closed
    return state, count


# ----- the JSON state file of earlier versions (formats 1 and 2) -------------------------------------------


def parse_json_state(raw: Any) -> SavedState:
    """A JSON state file's content; ValueError (or another lookup/type error) when it is not one."""
    if not isinstance(raw, dict) or raw.get("version") not in (1, 2):
        raise ValueError("not a version 1 or 2 state file")
    values: Values = {}
    for op, apis in raw["values"].items():
        values[str(op)] = {str(api): (float(pair[0]), float(pair[1])) for api, pair in apis.items()}
    pacing = SavedPacing()
    if raw["version"] == 2:
        for section, target in (("tokens", pacing.tokens), ("reports", pacing.reports)):
            for key, entries in raw["pacing"][section].items():
                target[str(key)] = {str(name): float(when) for name, when in entries.items()}
    months = SavedMonths()
    month_close = raw.get("month_close")
    if month_close is not None:
        months.seen = _load_months(month_close["seen"], closed=False)
        months.closed = _load_months(month_close["closed"], closed=True)
    return SavedState(values=values, pacing=pacing, months=months)


def _load_months(raw: Any, *, closed: bool) -> dict[str, dict[str, Seen]]:
    """Entries ``[value, at, month]``; a closed month must name its month."""
    loaded: dict[str, dict[str, Seen]] = {}
    for op, apis in raw.items():
        entries: dict[str, Seen] = {}
        for api, (value, at, month) in apis.items():
            if month is None and closed:
                raise ValueError(f"month_close: {op}/{api}: a closed month without its month")
            if month is not None and not (isinstance(month, str) and _MONTH_RE.fullmatch(month)):
                raise ValueError(f"month_close: {op}/{api}: month {month!r} is not YYYY-MM")
            entries[str(api)] = Seen(float(value), float(at), month)
        loaded[str(op)] = entries
    return loaded
