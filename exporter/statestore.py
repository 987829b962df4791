"""The optional state store (``state_store``): values, pacing, budget and closed months across restarts,
in SQLite (Python's own ``sqlite3``), WAL mode.

What is kept, and why it is kept so (``docs/state-store.md`` has the schema and how to read it):

* ``tokens``: a journal of each token's bucket (level, when, pause). A row is committed BEFORE every
  request is sent (``spend``), so a process killed at any moment has recorded every request it sent: the
  daily budget holds across a crash loop of any period.
* ``reports``: a journal of each report's value, next due time and last reading, appended when a request
  answered.
* ``months``: the closing value of every closed month (kept 25 months), for the statement.

Both journals are append-only (new rows land on the last page: a random row update would rewrite a
whole page per request), and ``compact`` drops the rows a newer one supersedes, at most every
``COMPACT_SECONDS``. Journal rows name a token or report by a number (``token_names``, ``report_names``),
and a new store has 1 KiB pages: each transaction rewrites the journals' last pages, so both halve the
bytes written per request. Nothing is written while nothing happens. Tokens are named by their key only.

Writes go through one thread (``state-writer``): at most one transaction a second; a request waiting
for its spend waits for the next one. A store that cannot be written (read-only directory, full disk)
costs one warning an hour and a count on /metrics; fetching and serving go on (the in-memory budget
still holds within the run). A corrupt store or one of another format is moved aside
(``<name>.corrupt-<time>``) and the exporter starts fresh, saying so; a store of format 3 is migrated in
one transaction. A JSON state file of format 1 or 2
(the ``state_file`` of earlier versions) is migrated once, when the store does not exist yet.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
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

FORMAT = 4  # PRAGMA user_version; the JSON state files were formats 1 and 2; format 3 is migrated
PAGE_SIZE = 1024  # bytes: each transaction rewrites the journals' last pages; smaller pages, fewer bytes
WRITE_SECONDS = 1.0  # at most one transaction a second
COMPACT_SECONDS = 600.0  # superseded journal rows are dropped at most this often
WARN_SECONDS = 3600.0  # a failing write is logged at most once an hour
KEEP_MONTHS = 25  # closed months older than this are dropped (the statement needs 13)
_MONTH_RE = re.compile(r"\d{4}-(0[1-9]|1[0-2])")

Values = dict[str, dict[str, tuple[float, float]]]

# The journals name a token or report by a small integer (``token_names``, ``report_names``: written once
# per name), and a report's last reading by ``seen`` when it is its value (SEEN_*): ~75 B a request.
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS token_names (id INTEGER PRIMARY KEY, token TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS report_names (
    id INTEGER PRIMARY KEY, operation TEXT NOT NULL, api TEXT NOT NULL, UNIQUE (operation, api));
CREATE TABLE IF NOT EXISTS tokens (
    token INTEGER NOT NULL, level REAL NOT NULL, at REAL NOT NULL, paused_until REAL NOT NULL,
    pause_intervals REAL, burst REAL, "limit" REAL);
CREATE TABLE IF NOT EXISTS reports (
    report INTEGER NOT NULL, token INTEGER, due REAL, value REAL, fetched_at REAL,
    seen INTEGER NOT NULL, seen_value REAL, seen_at REAL, seen_month TEXT);
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
    WHERE r.rowid IN (SELECT max(rowid) FROM reports GROUP BY report);
"""
_TABLES = frozenset({"meta", "token_names", "report_names", "tokens", "reports", "months"})
# reports.seen: no reading; the reading is (value, fetched_at) of the fetched_at's UTC month; the same
# without a month; the reading is in seen_value, seen_at, seen_month. 0 and 1 take no byte in a row.
SEEN_NONE, SEEN_VALUE, SEEN_VALUE_NO_MONTH, SEEN_OWN = 0, 1, 2, 3
# Format 3 named tokens and reports by text in every journal row: its newest rows are copied over.
_RENAME_3 = "ALTER TABLE tokens RENAME TO tokens_3; ALTER TABLE reports RENAME TO reports_3;"
_COPY_3 = """
INSERT INTO token_names (token) SELECT DISTINCT token FROM tokens_3;
INSERT INTO token_names (token) SELECT DISTINCT token FROM reports_3 WHERE token != '' ON CONFLICT DO NOTHING;
INSERT INTO report_names (operation, api) SELECT DISTINCT operation, api FROM reports_3;
INSERT INTO tokens (token, level, at, paused_until, pause_intervals, burst, "limit")
    SELECT n.id, level, at, paused_until, pause_intervals, burst, "limit"
    FROM tokens_3 JOIN token_names n USING (token)
    WHERE tokens_3.rowid IN (SELECT max(rowid) FROM tokens_3 GROUP BY token) ORDER BY tokens_3.rowid;
INSERT INTO reports (report, token, due, value, fetched_at, seen, seen_value, seen_at, seen_month)
    SELECT n.id, t.id, due, value, fetched_at, CASE WHEN seen_value IS NULL THEN 0 ELSE 3 END,
        seen_value, seen_at, seen_month
    FROM reports_3 JOIN report_names n USING (operation, api) LEFT JOIN token_names t USING (token)
    WHERE reports_3.rowid IN (SELECT max(rowid) FROM reports_3 GROUP BY operation, api)
    ORDER BY reports_3.rowid;
DROP TABLE tokens_3;
DROP TABLE reports_3;
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
        if version == 3:
            raise StoreError(f"{target}: a state store of format 3: start the exporter once to migrate it")
        raise StoreError(f"{target}: not a state store of format {FORMAT} (format {version})")
    return db


def _latest_readings(db: sqlite3.Connection) -> Iterator[tuple[str, str, Seen | None]]:
    """Each report's last reading (operation, api, reading), from its newest journal row."""
    for op, api, value, at, *seen in db.execute(
        "SELECT n.operation, n.api, r.value, r.fetched_at, r.seen, r.seen_value, r.seen_at, r.seen_month "
        "FROM reports r JOIN report_names n ON n.id = r.report "
        "WHERE r.rowid IN (SELECT max(rowid) FROM reports GROUP BY report)"
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
    ) -> None:
        self.path = Path(path)
        self._legacy = Path(legacy_json) if legacy_json else None
        self._wall = wall
        self.on_health = on_health
        self.sink: Sink | None = None  # set before load: values and months go there, not in SavedState
        self._write_seconds = write_seconds
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._pending = _Pending()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="state-writer", daemon=True)
        self._appended = False  # journal rows appended since the last compaction
        self._last_compact = time.monotonic()
        self._last_commit = 0.0  # monotonic
        self._last_warning = -WARN_SECONDS
        self._count = 0  # values read at start
        self.write_errors = 0
        self.last_write: float | None = None

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
            elif version == 3 and {"tokens", "reports", "months", "meta"} <= tables:
                _migrate_3(db)
                log.info("state_store %s: migrated from format 3 to format %d", self.path, FORMAT)
            elif version != FORMAT or not _TABLES <= tables:
                raise _Unusable(f"format {version}, this exporter reads format {FORMAT}")
            state, self._count = _read(db, self.sink)
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
        self._flush()
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
        if self._thread.ident is not None:
            self._thread.join(timeout=10.0)
        self._flush()
        if self._appended:
            self.compact()
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
            if self._stopping:
                return
            # At most one transaction per write_seconds: wait out the rest of it.
            rest = self._last_commit + self._write_seconds - time.monotonic()
            if rest > 0:
                time.sleep(rest)
            self._wake.clear()
            try:
                self._flush()
                if self._appended and time.monotonic() - self._last_compact >= COMPACT_SECONDS:
                    self.compact()
            except Exception as error:  # a bug of ours: keep the thread (requests wait on it)
                self._failed("unexpected error", error)

    def _flush(self) -> None:
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
                    'INSERT INTO tokens (token, level, at, paused_until, pause_intervals, burst, "limit") '
                    "VALUES ((SELECT id FROM token_names WHERE token = ?), ?, ?, ?, ?, ?, ?)",
                    [(key, *row) for key, row in pending.tokens.items()],
                )
            if pending.reports:
                db.executemany(
                    "INSERT INTO reports (report, token, due, value, fetched_at, seen, seen_value, seen_at, "
                    "seen_month) VALUES ((SELECT id FROM report_names WHERE operation = ? AND api = ?), "
                    "(SELECT id FROM token_names WHERE token = ?), ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (op, api, token or None, due, value, at, *_seen_row(value, at, seen))
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
        self._appended = self._appended or bool(pending.tokens or pending.reports)

    def compact(self) -> None:
        """Drop journal rows that a newer row of the same token or report supersedes, and closed months
        older than KEEP_MONTHS."""
        self._last_compact = time.monotonic()
        self._appended = False
        db = self._db
        if db is None:
            return
        oldest = _months_back(utc_month(self._wall()), KEEP_MONTHS)
        try:
            with _transaction(db):
                db.execute(
                    "DELETE FROM tokens WHERE rowid NOT IN (SELECT max(rowid) FROM tokens GROUP BY token)"
                )
                db.execute(
                    "DELETE FROM reports WHERE rowid NOT IN (SELECT max(rowid) FROM reports GROUP BY report)"
                )
                db.execute("DELETE FROM months WHERE month < ?", (oldest,))
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as error:
            self._failed("cannot compact it", error)

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


def _migrate_3(db: sqlite3.Connection) -> None:
    """Format 3 into format 4, in one transaction (a kill -9 midway leaves format 3)."""
    try:
        db.executescript(
            f"BEGIN IMMEDIATE; {_RENAME_3} {SCHEMA} {_COPY_3} PRAGMA user_version = {FORMAT}; COMMIT;"
        )
    except sqlite3.Error:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise
    # Once, the smaller pages of a new store (only outside WAL mode; skipped while a reader has it open).
    with contextlib.suppress(sqlite3.Error):
        db.execute("PRAGMA journal_mode = DELETE")
        db.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        db.execute("VACUUM")
    db.execute("PRAGMA journal_mode = WAL")


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


def _read(db: sqlite3.Connection, sink: Sink | None = None) -> tuple[SavedState, int]:
    """Everything the store holds, row by row (the newest row of each token and report wins); values and
    months straight into ``sink`` when there is one. Also the count of values read."""
    state = SavedState()
    count = 0
    months_seen: dict[str, str] = {}
    for token, *values in db.execute(
        'SELECT n.token, level, at, paused_until, pause_intervals, burst, "limit" '
        "FROM tokens t CROSS JOIN token_names n ON n.id = t.token ORDER BY t.rowid"
    ):
        state.pacing.tokens[token] = {
            name: float(v) for name, v in zip(TOKEN_FIELDS, values, strict=True) if v is not None
        }
    for op, api, token, due, value, at, seen_flag, seen_value, seen_at, seen_month in db.execute(
        "SELECT n.operation, n.api, t.token, due, value, fetched_at, seen, seen_value, seen_at, seen_month "
        "FROM reports r CROSS JOIN report_names n ON n.id = r.report "
        "LEFT JOIN token_names t ON t.id = r.token ORDER BY r.rowid"
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
