"""The state store (exporter/statestore.py): round trips, the migration of JSON state files, faults, the
monthly totals the statement reads; the budget across reloads (planner, fake clock); and, with the real
exporter: restarts (SIGTERM, kill -9), a kill -9 loop and a reload churn counted by the simulator against
the daily limit, a read-only directory, a full disk, a corrupt store and paths that are not files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from harness import (
    Exporter,
    Simulator,
    exporter_args,
    holds,
    missing,
    start_exporter_process,
    value,
    wait_until,
    write_yaml,
)

from exporter import statestore
from exporter.monthclose import Seen
from exporter.planner import Job, Planner
from exporter.refresher import token_key
from exporter.secret import Secret
from exporter.statestore import (
    FORMAT,
    PAGE_SIZE,
    WARN_SECONDS,
    MonthTotal,
    SavedState,
    StateStore,
    StoreError,
    months_available,
    read_month_totals,
)

KEY = "0123456789abcdef"
AT = 1_796_083_800.0  # 2026-12-01 00:50 UTC


def opened(path: Path, **kwargs: Any) -> StateStore:
    store = StateStore(path, **kwargs)
    store.load()
    store.start()
    return store


PLANNER_EXTRA = {"pause_intervals": 12.0, "burst": 14.0, "limit": 1000.0}  # what the planner also saves
# The token's saved form after ``fill``: its spend, as the store gives it back.
FILLED_TOKENS = {KEY: {"level": 0.5, "at": AT, "paused_until": AT + 60, **PLANNER_EXTRA}}


def fill(store: StateStore) -> None:
    store.spend(KEY, 0.5, AT, AT + 60, PLANNER_EXTRA).result(timeout=5)
    store.put_report("bogota", "stereo_rec", KEY, AT + 300, (1234.5, AT), Seen(1234.5, AT, "2026-12"))
    store.put_report("lima", "stereo_rec", KEY, AT + 400, None, None)
    store.put_month("bogota", "stereo_rec", Seen(43_000.5, AT - 3600, "2026-11"))


def rows(path: Path, table: str) -> int:
    with contextlib.closing(sqlite3.connect(path)) as db:
        query = {"tokens": "SELECT count(*) FROM tokens", "reports": "SELECT count(*) FROM reports"}[table]
        return int(db.execute(query).fetchone()[0])


# ----- round trips ------------------------------------------------------------------------------------


def test_what_is_written_comes_back_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "var" / "lib" / "state.db"  # the parent directory is created
    store = opened(path)
    fill(store)
    store.stop()
    again = StateStore(path)
    state = again.load()
    assert state.values == {"bogota": {"stereo_rec": (1234.5, AT)}}
    assert state.pacing.tokens == FILLED_TOKENS
    assert state.pacing.reports == {KEY: {"bogota/stereo_rec": AT + 300, "lima/stereo_rec": AT + 400}}
    assert state.months.seen == {"bogota": {"stereo_rec": Seen(1234.5, AT, "2026-12")}}
    assert state.months.closed == {"bogota": {"stereo_rec": Seen(43_000.5, AT - 3600, "2026-11")}}
    again.stop()


def test_each_kind_of_last_reading_comes_back(tmp_path: Path) -> None:
    """A reading equal to the value is kept as a flag: with the value's UTC month, without a month, or
    (a vendor month other than the UTC one, another value) in full."""
    path = tmp_path / "state.db"
    readings = {
        "same": ((5.0, AT), Seen(5.0, AT, "2026-12")),
        "no-month": ((6.0, AT), Seen(6.0, AT, None)),
        "vendor-month": ((7.0, AT), Seen(7.0, AT, "2026-11")),
        "other": ((8.0, AT), Seen(9.0, AT - 60, "2026-12")),
        "reading-only": (None, Seen(10.0, AT, "2026-12")),
    }
    store = opened(path)
    for op, (pair, seen) in readings.items():
        store.put_report(op, "stereo_rec", KEY, AT + 300, pair, seen)
    store.stop()
    state = StateStore(path).load()
    assert state.months.seen == {op: {"stereo_rec": seen} for op, (_, seen) in readings.items()}
    assert read_month_totals(path, "2026-11") == [
        MonthTotal("vendor-month", "stereo_rec", "2026-11", 7.0, False)
    ]
    assert [t.operation for t in read_month_totals(path, "2026-12")] == [
        "no-month",
        "other",
        "reading-only",
        "same",
    ]
    with contextlib.closing(sqlite3.connect(path)) as db:  # the view the documentation reads with
        rows = db.execute("SELECT operation, seen_value, seen_at, seen_month FROM latest_reports").fetchall()
    assert sorted(rows) == sorted((op, s.value, s.at, s.month) for op, (_, s) in readings.items())


FORMAT_3 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE tokens (
    token TEXT NOT NULL, level REAL NOT NULL, at REAL NOT NULL, paused_until REAL NOT NULL,
    pause_intervals REAL, burst REAL, "limit" REAL);
CREATE TABLE reports (
    operation TEXT NOT NULL, api TEXT NOT NULL, token TEXT NOT NULL, due REAL,
    value REAL, fetched_at REAL, seen_value REAL, seen_at REAL, seen_month TEXT);
CREATE TABLE months (
    operation TEXT NOT NULL, api TEXT NOT NULL, month TEXT NOT NULL, value REAL NOT NULL,
    at REAL NOT NULL, PRIMARY KEY (operation, api, month)) WITHOUT ROWID;
PRAGMA user_version = 3;
"""


def test_a_format_3_store_is_migrated_with_its_budget(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.db"
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.executescript(FORMAT_3)
        db.executemany(
            "INSERT INTO tokens VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(KEY, 3.0, AT - 10, 0.0, None, None, None), (KEY, 0.5, AT, AT + 60, 12.0, 14.0, 1000.0)],
        )
        db.executemany(
            "INSERT INTO reports VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                ("bogota", "stereo_rec", KEY, AT, 1.0, AT - 600, 1.0, AT - 600, "2026-12"),
                ("bogota", "stereo_rec", KEY, AT + 300, 1234.5, AT, 1234.5, AT, "2026-12"),
                ("lima", "stereo_rec", "", None, None, None, None, None, None),
            ],
        )
        db.execute("INSERT INTO months VALUES ('bogota', 'stereo_rec', '2026-11', 43000.5, ?)", (AT - 3600,))
    state = migrated(path, 3, caplog)
    assert state.pacing.reports == {KEY: {"bogota/stereo_rec": AT + 300}}
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA page_size").fetchone()[0] == PAGE_SIZE
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def migrated(path: Path, version: int, caplog: pytest.LogCaptureFixture) -> SavedState:
    """A store of ``version`` (what ``fill`` writes, and a closed November): refused by the statement,
    migrated by a load with one line, its budget, values and months carried over, the newest rows only."""
    with pytest.raises(StoreError, match=f"format {version}: start the exporter once"):
        read_month_totals(path, "2026-11")
    with caplog.at_level(logging.INFO, logger="exporter.statestore"):
        store = StateStore(path)
        state = store.load()
    store.stop()
    assert any(f"migrated from format {version}" in r.getMessage() for r in caplog.records)
    assert not [p for p in path.parent.iterdir() if ".corrupt-" in p.name]
    assert state.pacing.tokens == FILLED_TOKENS
    assert state.values == {"bogota": {"stereo_rec": (1234.5, AT)}}
    assert state.months.seen == {"bogota": {"stereo_rec": Seen(1234.5, AT, "2026-12")}}
    assert read_month_totals(path, "2026-11") == [
        MonthTotal("bogota", "stereo_rec", "2026-11", 43_000.5, True)
    ]
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == FORMAT
    assert rows(path, "tokens") == 1 and rows(path, "reports") == 2  # the newest row of each
    return state


# Format 4: each journal in one table, the newest row (highest rowid) of a token or report its state.
FORMAT_4 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE token_names (id INTEGER PRIMARY KEY, token TEXT NOT NULL UNIQUE);
CREATE TABLE report_names (
    id INTEGER PRIMARY KEY, operation TEXT NOT NULL, api TEXT NOT NULL, UNIQUE (operation, api));
CREATE TABLE tokens (
    token INTEGER NOT NULL, level REAL NOT NULL, at REAL NOT NULL, paused_until REAL NOT NULL,
    pause_intervals REAL, burst REAL, "limit" REAL);
CREATE TABLE reports (
    report INTEGER NOT NULL, token INTEGER, due REAL, value REAL, fetched_at REAL,
    seen INTEGER NOT NULL, seen_value REAL, seen_at REAL, seen_month TEXT);
CREATE TABLE months (
    operation TEXT NOT NULL, api TEXT NOT NULL, month TEXT NOT NULL, value REAL NOT NULL,
    at REAL NOT NULL, PRIMARY KEY (operation, api, month)) WITHOUT ROWID;
CREATE VIEW latest_reports AS SELECT * FROM reports;
INSERT INTO token_names VALUES (1, '0123456789abcdef');
INSERT INTO report_names VALUES (1, 'bogota', 'stereo_rec'), (2, 'lima', 'stereo_rec');
INSERT INTO tokens VALUES (1, 3.0, 1796083790.0, 0.0, NULL, NULL, NULL),
    (1, 0.5, 1796083800.0, 1796083860.0, 12.0, 14.0, 1000.0);
INSERT INTO reports VALUES (1, 1, 1796083800.0, 1.0, 1796083200.0, 1, NULL, NULL, NULL),
    (1, 1, 1796084100.0, 1234.5, 1796083800.0, 1, NULL, NULL, NULL),
    (2, 1, 1796084200.0, NULL, NULL, 0, NULL, NULL, NULL);
INSERT INTO months VALUES ('bogota', 'stereo_rec', '2026-11', 43000.5, 1796080200.0);
PRAGMA user_version = 4;
"""


def test_a_format_4_store_is_migrated_with_its_budget(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.db"
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.executescript(FORMAT_4)
    state = migrated(path, 4, caplog)
    assert state.pacing.reports == {KEY: {"bogota/stereo_rec": AT + 300, "lima/stereo_rec": AT + 400}}


def test_a_journal_turns_over_keeping_the_newest_row_of_every_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows go to the current generation; once it holds a round of them, the other generation's rows
    still newest of their report move over and the other is emptied: the journal stays within about
    two rounds, and a report not fetched again (``idle``) keeps its row through every turn."""
    monkeypatch.setattr(statestore, "COMPACT_MIN_ROWS", 4)
    path = tmp_path / "state.db"
    store = opened(path, write_seconds=0.0)
    store.put_report("idle", "stereo_rec", KEY, AT, (1.0, AT), None)
    sizes = []
    for round_ in range(1, 16):
        for op in ("a", "b", "c"):
            store.put_report(op, "stereo_rec", KEY, AT + round_, (float(round_), AT + round_), None)
        store.spend(KEY, 1.0, AT + round_, 0.0).result(timeout=5)  # a transaction per round
        sizes.append(rows(path, "reports"))
    store.stop()
    # Four reports: a turn when the current generation holds four rows (here: every round and a third).
    assert max(sizes) <= 3 * 4, sizes
    assert sizes[-1] < sizes[2] + 4, sizes  # bounded, not growing with the rounds
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'reports_current'").fetchone() is not None
        assert db.execute("SELECT value FROM latest_reports WHERE operation = 'idle'").fetchall() == [(1.0,)]
    state = StateStore(path).load()
    assert state.values == {
        "idle": {"stereo_rec": (1.0, AT)},
        **{op: {"stereo_rec": (15.0, AT + 15)} for op in ("a", "b", "c")},
    }


def test_answers_are_batched_and_a_waiting_spend_cuts_the_batch_short(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = opened(path, write_seconds=0.2, batch_seconds=30.0)
    try:
        store.put_token(KEY, 1.0, AT, 0.0)  # the first transaction: nothing before it
        wait_until(lambda: store.last_write is not None, timeout=5, what="the first write")
        store.put_report("bogota", "stereo_rec", KEY, AT + 300, (5.0, AT), None)
        holds(lambda: rows(path, "reports") == 0, 1.0, what="the answer waiting for its batch")
        started = time.monotonic()
        store.spend(KEY, 0.0, AT + 1, 0.0).result(timeout=5)
        assert time.monotonic() - started < 5.0  # not the batch's 30 s
        assert rows(path, "reports") == 1  # the answer went with the spend
    finally:
        store.stop()


def test_a_spend_is_committed_when_its_future_is_done(tmp_path: Path) -> None:
    """What the budget rests on: once ``spend`` says done, another connection (a process started after
    a kill -9) sees the row."""
    path = tmp_path / "state.db"
    store = opened(path)
    try:
        store.spend(KEY, 2.0, AT, 0.0).result(timeout=5)
        with contextlib.closing(sqlite3.connect(path)) as db:
            assert db.execute(
                "SELECT level FROM tokens JOIN token_names n ON n.id = tokens.token WHERE n.token = ?", (KEY,)
            ).fetchall() == [(2.0,)]
    finally:
        store.stop()


def test_the_newest_row_wins_and_compaction_keeps_only_it(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = opened(path, write_seconds=0.0)
    for level in (3.0, 2.0, 1.0):
        store.spend(KEY, level, AT + level, 0.0).result(timeout=5)
    assert rows(path, "tokens") == 3
    store.compact()
    assert rows(path, "tokens") == 1
    store.stop()
    assert StateStore(path).load().pacing.tokens[KEY]["level"] == 1.0


def test_at_most_one_transaction_a_second_and_none_while_idle(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = opened(path)
    try:
        store.put_token(KEY, 1.0, AT, 0.0)
        wait_until(lambda: store.last_write is not None, timeout=5, what="the first write")
        first = store.last_write
        started = time.monotonic()
        futures = [store.spend(KEY, 1.0 - i / 10, AT + i, 0.0) for i in range(5)]
        for future in futures:
            future.result(timeout=5)
        # The five spends shared one transaction, not before a second after the first write.
        assert store.last_write is not None and first is not None and store.last_write - first >= 0.9
        assert time.monotonic() - started <= 2.0
        assert rows(path, "tokens") == 2
        # Nothing to write: nothing written (the files do not change).
        files = [path, Path(f"{path}-wal")]
        before = [(f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        last = store.last_write
        holds(lambda: [(f.stat().st_size, f.stat().st_mtime_ns) for f in files] == before, 1.5, "no write")
        assert store.last_write == last
    finally:
        store.stop()


def test_the_store_names_tokens_only_by_their_key(tmp_path: Path) -> None:
    token = "CANARY-statestore-0f9e8d7c6b5a"
    key = token_key(Secret(token))
    path = tmp_path / "state.db"
    store = opened(path)
    store.spend(key, 1.0, AT, 0.0).result(timeout=5)
    store.stop()
    data = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert key.encode() in data and b"CANARY" not in data


# ----- migration of the JSON state file -----------------------------------------------------------------

JSON_V2 = {
    "version": 2,
    "values": {"bogota": {"stereo_rec": [1234.5, AT]}, "lima": {"stereo_rec": [0.0, AT + 100]}},
    "pacing": {
        "tokens": {KEY: {"level": 0.5, "at": AT, "paused_until": AT}},
        "reports": {KEY: {"bogota/stereo_rec": AT + 300, "lima/stereo_rec": AT + 400}},
    },
    "month_close": {
        "seen": {"bogota": {"stereo_rec": [1234.5, AT, "2026-12"]}},
        "closed": {"bogota": {"stereo_rec": [43_000.5, AT - 3600, "2026-11"]}},
    },
}


def test_a_version_2_file_is_migrated_once(tmp_path: Path) -> None:
    legacy = tmp_path / "state.json"
    legacy.write_text(json.dumps(JSON_V2))
    path = tmp_path / "state.db"
    store = StateStore(path, legacy_json=legacy)
    state = store.load()
    store.stop()
    assert state.values == {"bogota": {"stereo_rec": (1234.5, AT)}, "lima": {"stereo_rec": (0.0, AT + 100)}}
    assert not legacy.exists() and (tmp_path / "state.json.migrated").exists()
    again = StateStore(path, legacy_json=legacy).load()
    assert again.values == state.values
    assert again.pacing.tokens == {KEY: {"level": 0.5, "at": AT, "paused_until": AT}}
    assert again.pacing.reports == JSON_V2["pacing"]["reports"]  # type: ignore[index]
    assert again.months.closed == {"bogota": {"stereo_rec": Seen(43_000.5, AT - 3600, "2026-11")}}
    assert read_month_totals(path, "2026-11") == [
        MonthTotal("bogota", "stereo_rec", "2026-11", 43_000.5, True)
    ]


def test_a_json_file_at_the_store_path_is_migrated_in_place(tmp_path: Path) -> None:
    """``state_file: state`` of an earlier version (no .json): the store takes the path, the JSON is kept
    as ``state.migrated``."""
    path = tmp_path / "state"
    path.write_text(json.dumps(JSON_V2))
    store = StateStore(path)
    state = store.load()
    store.stop()
    assert state.values["bogota"] == {"stereo_rec": (1234.5, AT)}
    assert (tmp_path / "state.migrated").exists() and path.read_bytes().startswith(b"SQLite format 3")
    assert StateStore(path).load().values == state.values


def test_a_version_1_file_keeps_its_values(tmp_path: Path) -> None:
    legacy = tmp_path / "state.json"
    legacy.write_text(json.dumps({"version": 1, "values": {"a": {"stereo_rec": [5, 6]}}, "last_used": {}}))
    store = StateStore(tmp_path / "state.db", legacy_json=legacy)
    state = store.load()
    store.stop()
    assert state.values == {"a": {"stereo_rec": (5.0, 6.0)}} and state.pacing.tokens == {}


@pytest.mark.parametrize(
    "content",
    [
        b"\x00\xff\xfe garbage",
        b"{not json",
        b'{"version": 3, "values": {}, "pacing": {"tokens": {}, "reports": {}}}',
        b'{"version": 2, "values": {}, "pacing": {"tokens": {"k": {"at": "yesterday"}}, "reports": {}}}',
        b'{"version": 2, "values": {}, "pacing": {"tokens": {}, "reports": {}}, "month_close": '
        b'{"seen": {}, "closed": {"a": {"stereo_rec": [1, 2, "2026-13"]}}}}',
        b"[" * 100_000 + b"]" * 100_000,
    ],
    ids=["binary", "truncated", "future-version", "bad-time", "month-13", "deeply-nested"],
)
def test_a_json_file_that_cannot_be_migrated_says_what_starts_fresh(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes
) -> None:
    legacy = tmp_path / "state.json"
    legacy.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="exporter.statestore"):
        store = StateStore(tmp_path / "state.db", legacy_json=legacy)
        state = store.load()
        store.stop()
    assert state.values == {} and state.pacing.tokens == {}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "not migrated" in warnings[0]
    assert all(word in warnings[0] for word in ("values", "pacing", "budget"))
    (aside,) = tmp_path.glob("state.json.corrupt-*")  # kept for the operator, never read again
    assert aside.read_bytes() == content and aside.name in warnings[0] and not legacy.exists()


# ----- faults -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"\x00\xff\xfe garbage" * 100, b"SQLite format 3\x00" + b"\x07" * 5000])
def test_a_corrupt_store_is_moved_aside_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes
) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="exporter.statestore"):
        store = opened(path)
    fill(store)
    store.stop()
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("state.db.corrupt-")]
    assert len(aside) == 1 and aside[0].read_bytes() == content
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and aside[0].name in warnings[0]
    assert all(word in warnings[0] for word in ("starting fresh", "values", "pacing", "budget"))
    assert StateStore(path).load().values  # the fresh store works


def test_a_store_of_another_format_is_moved_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "state.db"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute(f"PRAGMA user_version = {FORMAT + 1}")
        db.execute("CREATE TABLE future (x)")
    with caplog.at_level(logging.WARNING, logger="exporter.statestore"):
        StateStore(path).load()
    assert any(f"format {FORMAT + 1}" in r.getMessage() for r in caplog.records)
    assert [p for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == FORMAT


def not_files(tmp_path: Path) -> dict[str, Path]:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    directory = tmp_path / "dir"
    directory.mkdir()
    return {"fifo": fifo, "dev-zero": Path("/dev/zero"), "directory": directory}


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory"])
def test_a_path_that_is_not_a_regular_file_is_refused(tmp_path: Path, kind: str) -> None:
    path = not_files(tmp_path)[kind]
    with pytest.raises(StoreError) as error:
        StateStore(path).load()
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    # The JSON state file to migrate too: a FIFO would hang its read.
    with pytest.raises(StoreError) as error:
        StateStore(tmp_path / "state.db", legacy_json=path).load()
    assert str(error.value).startswith(f"state_file {path}:")


def test_failed_writes_are_counted_and_warned_about_once_an_hour(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state.db"
    health: list[Any] = []
    store = StateStore(path, on_health=health.append, write_seconds=0.0)
    store.load()

    def full(self: StateStore, db: sqlite3.Connection, pending: Any) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(StateStore, "_write", full)
    clock = [1000.0]
    monkeypatch.setattr("exporter.statestore.time.monotonic", lambda: clock[0])
    with caplog.at_level(logging.WARNING, logger="exporter.statestore"):
        for i in range(5):
            store.put_token(KEY, 1.0, AT + i, 0.0)
            store.flush()
            clock[0] += 60
        clock[0] += WARN_SECONDS
        store.put_token(KEY, 1.0, AT, 0.0)
        store.flush()
    assert store.write_errors == 6 and health[-1].write_errors == 6 and health[-1].last_write is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "disk is full" in warnings[0] and "once an hour" in warnings[0]
    store.stop()


# ----- the monthly totals (the statement's interface) ------------------------------------------------------


def test_month_totals_read_closed_months_and_the_current_one_while_the_exporter_writes(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.db"
    store = opened(path)
    try:
        fill(store)
        store.put_report("lima", "ivr_minutes", KEY, AT + 300, (7.0, AT), Seen(7.0, AT, None))  # a UTC month
        wait_until(lambda: months_available(path) == ["2026-11", "2026-12"], timeout=10, what="both months")
        assert read_month_totals(path, "2026-11") == [
            MonthTotal("bogota", "stereo_rec", "2026-11", 43_000.5, True)
        ]
        assert read_month_totals(path, "2026-12") == [
            MonthTotal("bogota", "stereo_rec", "2026-12", 1234.5, False),
            MonthTotal("lima", "ivr_minutes", "2026-12", 7.0, False),
        ]
        assert read_month_totals(path, "2025-01") == []
    finally:
        store.stop()


def test_month_totals_of_a_missing_or_foreign_file_raise_one_line(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(other)) as db:
        db.execute("CREATE TABLE t (x)")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    for path in (tmp_path / "absent.db", other, text, tmp_path):
        for call in (lambda p: read_month_totals(p, "2026-11"), months_available):
            with pytest.raises(StoreError) as error:
                call(path)
            assert "\n" not in str(error.value) and str(path) in str(error.value)
    with pytest.raises(StoreError):
        read_month_totals(other, "November")


def test_closed_months_older_than_two_years_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = opened(path, wall=lambda: AT)  # December 2026
    for month in ("2024-10", "2024-11", "2025-11"):
        store.put_month("a", "stereo_rec", Seen(1.0, AT, month))
    store.put_token(KEY, 1.0, AT, 0.0)
    store.stop()  # compacts
    assert months_available(path) == ["2024-11", "2025-11"]  # 13 months and more are kept


# ----- the budget across reloads (planner, fake clock) ------------------------------------------------------


def test_a_token_removed_and_re_added_within_a_day_keeps_its_bucket() -> None:
    now = [0.0]
    planner = Planner(clock=lambda: now[0], wall=lambda: AT + now[0], gap=0.0)
    jobs = {"k": [Job("a", "stereo_rec", "s", 1.0)]}
    planner.configure(jobs, daily_limit=10)  # burst 1
    job, _ = planner.take("k")
    assert job is not None
    planner.finished("k", job, None)
    for _ in range(15):
        now[0] += 2.0
        planner.configure({}, daily_limit=10)
        planner.configure(jobs, daily_limit=10)
        assert planner.take("k")[0] is None  # no fresh bucket
    now[0] += 86_400.0 + 1
    planner.configure({}, daily_limit=10)
    now[0] += 86_400.0 + 1  # removed for more than a day: a new token
    planner.configure(jobs, daily_limit=10)
    assert planner.take("k")[0] is not None


def test_an_answer_after_its_token_was_removed_frees_the_token_for_when_it_returns() -> None:
    now = [0.0]
    planner = Planner(clock=lambda: now[0], wall=lambda: now[0], gap=0.0)
    jobs = {"k": [Job("a", "stereo_rec", "s", 1.0)]}
    planner.configure(jobs, daily_limit=1000)
    job, _ = planner.take("k")
    assert job is not None
    planner.configure({}, daily_limit=1000)
    planner.configure(jobs, daily_limit=1000)
    assert planner.take("k")[0] is None  # still busy: one request at a time
    planner.finished("k", job, None)
    now[0] += 100.0  # the bucket (1 request, 999 a day) refilled
    assert planner.take("k")[0] is not None


# ----- the real exporter ------------------------------------------------------------------------------------

MAIN, CONTROL = "tok-state-main", "tok-state-control"


def requests_of(sim: Simulator, token: str) -> int:
    return int(sim.stats()["tokens"].get(token, {}).get("requests", 0))


def restart_config(sim: Simulator, state: Path) -> dict[str, Any]:
    return {
        "refresh_interval": "1m",
        "connect_timeout": "1s",
        "read_timeout": "2s",
        "state_store": str(state),
        "operations": [
            {"name": "main", "server": "wv0001", "token": MAIN, "base_url": sim.url},
            {"name": "control", "server": "wv0002", "token": CONTROL, "base_url": sim.url},
        ],
    }


def restart_scenario(
    sim: Simulator, start_exporter: Callable[..., Exporter], tmp_path: Path, stop: Callable[[Exporter], None]
) -> None:
    state = tmp_path / "state.db"
    config = restart_config(sim, state)
    first = start_exporter(config)
    samples = first.wait_for(
        lambda s: (
            value(s, "wolkvox_up", operation="main") == 1 and value(s, "wolkvox_up", operation="control") == 1
        ),
        what="both operations fetched",
    )
    minutes = value(samples, "wolkvox_stereo_rec_minutes", operation="main")
    main_key, control_key = token_key(Secret(MAIN)), token_key(Secret(CONTROL))

    def stored() -> set[str]:
        with contextlib.closing(sqlite3.connect(state)) as db:
            return {
                row[0] for row in db.execute("SELECT operation FROM latest_reports WHERE value IS NOT NULL")
            }

    # Answers are batched up to five seconds (exporter/statestore.py BATCH_SECONDS).
    wait_until(lambda: stored() == {"main", "control"}, timeout=10, what="both reports in the store")
    stop(first)
    main_requests = requests_of(sim, MAIN)
    assert main_requests == 1

    # Forget the control token: the new process must fetch it at once, which shows its refresher runs
    # while the main token's report is held back by what the store says.
    with contextlib.closing(sqlite3.connect(state)) as db, db:
        named = "(SELECT id FROM token_names WHERE token = ?)"
        for table in ("tokens_a", "tokens_b", "reports_a", "reports_b"):  # each journal's two generations
            db.execute(f"DELETE FROM {table} WHERE token = {named}", (control_key,))  # noqa: S608
    control_requests = requests_of(sim, CONTROL)
    started = time.monotonic()
    second = start_exporter(config)
    first_page = second.samples()
    assert value(first_page, "wolkvox_stereo_rec_minutes", operation="main") == minutes
    assert value(first_page, "wolkvox_scrape_requests_total", operation="main") == 0

    def main_unused() -> bool:
        return requests_of(sim, MAIN) == main_requests

    what = "the main token not used again too early"
    holds(main_unused, started + 3.0 - time.monotonic(), what=what)
    wait_until(
        lambda: (main_unused() or pytest.fail(what)) and requests_of(sim, CONTROL) > control_requests,
        timeout=15,
        what="the control token fetched again",
    )
    assert main_key.encode() in state.read_bytes() + Path(f"{state}-wal").read_bytes()
    for path in tmp_path.glob("state.db*"):
        assert MAIN.encode() not in path.read_bytes()


def test_restart_after_sigterm_serves_saved_values_and_waits_for_the_interval(
    simulator: Simulator, start_exporter: Callable[..., Exporter], tmp_path: Path
) -> None:
    restart_scenario(simulator, start_exporter, tmp_path, lambda e: e.process and e.process.stop(timeout=15))


def test_restart_after_kill_9_serves_saved_values_and_waits_for_the_interval(
    simulator: Simulator, start_exporter: Callable[..., Exporter], tmp_path: Path
) -> None:
    restart_scenario(
        simulator, start_exporter, tmp_path, lambda e: e.process and e.process.stop(sig=signal.SIGKILL)
    )


LIMIT = 2  # a burst of 1 (and 1 a day): without the spends recorded first, 3 kills go past the limit


@pytest.fixture
def limited_simulator(tmp_path: Path) -> Iterator[Simulator]:
    from harness import start_simulator

    # Every answer takes 2 s: each exporter is killed with its request sent and unanswered, so only the
    # spend recorded before sending can tell the next one (no answer, no next due time, is ever saved).
    sim = start_simulator(tmp_path / "simulator.log", "--daily-limit", str(LIMIT), "--latency", "2s")
    yield sim
    sim.stop()


def test_a_kill_9_loop_never_takes_a_token_past_its_daily_limit(
    limited_simulator: Simulator, tmp_path: Path
) -> None:
    sim = limited_simulator
    config = {
        "refresh_interval": "1s",
        "daily_request_limit": LIMIT,
        "state_store": str(tmp_path / "state.db"),
        "operations": [
            {
                "name": "loop",
                "server": "wv0001",
                "token": MAIN,
                "base_url": sim.url,
                "apis": ["stereo_rec", "ivr_minutes", "chat_licenses"],
            }
        ],
    }
    kills = LIMIT + 2
    for i in range(kills):
        exporter = start_exporter_process(config, tmp_path, log_level="info", name=f"loop-{i}")
        assert exporter.process is not None
        time.sleep(0.5)  # the scenario itself: killed half a second after it listens
        exporter.process.stop(sig=signal.SIGKILL)
        assert "Traceback" not in exporter.process.log()
    sent = requests_of(sim, MAIN)
    # The first run spent the burst (one request); the bucket refills 1 a day: no other run may send.
    assert sent == 1, f"{sent} requests in {kills} runs against daily_request_limit {LIMIT}"


RESERVED_LIMIT = 100  # a margin of 1 request (1 %): each row reserves a request beyond its spend
RESERVED_APIS = ["stereo_rec", "ivr_minutes", "ivr_calls", "amd_ai", "rec_screen", "interactions"]


def test_a_kill_9_loop_with_reservations_never_sends_more_than_the_bucket_holds(tmp_path: Path) -> None:
    """A limit of 100: the rows committed before the requests reserve one more request of the budget. Each
    run is killed with its request unanswered (as above); without the rows, each run would start with a
    full burst: 7 runs, 7 requests against a burst of 6."""
    from harness import start_simulator

    sim = start_simulator(tmp_path / "simulator.log", "--daily-limit", str(RESERVED_LIMIT), "--latency", "2s")
    runs = 7
    try:
        config = {
            "refresh_interval": "1s",
            "daily_request_limit": RESERVED_LIMIT,
            "state_store": str(tmp_path / "state.db"),
            "operations": [
                {
                    "name": "loop",
                    "server": "wv0001",
                    "token": MAIN,
                    "base_url": sim.url,
                    "apis": RESERVED_APIS,
                }
            ],
        }
        for i in range(runs):
            exporter = start_exporter_process(config, tmp_path, log_level="info", name=f"reserve-{i}")
            assert exporter.process is not None
            time.sleep(0.5)  # the scenario itself: killed half a second after it listens
            exporter.process.stop(sig=signal.SIGKILL)
            assert "Traceback" not in exporter.process.log()
        sent = requests_of(sim, MAIN)
    finally:
        sim.stop()
    # The burst is the token's 6 reports; the bucket refills 94 a day (none within this test). A run
    # costs the bucket its request and at most the margin (whole requests): never a request beyond it.
    burst, margin = len(RESERVED_APIS), RESERVED_LIMIT // 100
    assert burst // (1 + margin) <= sent <= burst, (
        f"{sent} requests in {runs} runs against a burst of {burst}"
    )


def test_a_reload_churn_never_refills_a_token(simulator: Simulator, tmp_path: Path) -> None:
    """An operation removed and re-added by reload, 15 times: its token keeps its bucket (in memory)."""
    churned = {"name": "churn", "server": "wv0001", "token": MAIN, "base_url": simulator.url}
    steady = {"name": "steady", "server": "wv0002", "token": CONTROL, "base_url": simulator.url}
    config = {"refresh_interval": "1s", "daily_request_limit": 10, "operations": [churned, steady]}
    exporter = start_exporter_process(config, tmp_path, log_level="info")
    exporter.wait_for(lambda s: value(s, "wolkvox_up", operation="churn") == 1, what="the first fetch")
    assert exporter.process is not None
    for cycle in range(15):
        for operations in ([steady], [churned, steady]):
            write_yaml(exporter.config_path, {**config, "operations": operations})
            response = requests.post(f"{exporter.url}/-/reload", timeout=10)
            assert response.status_code == 200, response.text
        assert requests_of(simulator, MAIN) == 1, f"cycle {cycle}: the re-added token got a fresh bucket"
    exporter.process.stop()


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """mount(8) a small tmpfs (needs root): ``tmpfs("size=64k")`` or ``tmpfs("ro")``."""
    mounted: list[Path] = []

    def mount(options: str) -> Path:
        if shutil.which("mount") is None:
            missing("mount(8) not found (Debian: apt-get install mount)")
        target = tmp_path / f"mnt{len(mounted)}"
        target.mkdir()
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True, text=True
        )
        if result.returncode != 0:
            missing(f"cannot mount a tmpfs (needs root): {result.stderr.strip()}")
        mounted.append(target)
        return target

    yield mount
    for target in mounted:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def store_config(sim: Simulator, path: Path) -> dict[str, Any]:
    return {
        "refresh_interval": "1s",
        "daily_request_limit": 1_000_000,  # a request every second or so: something to write
        "state_store": str(path),
        "operations": [{"name": "main", "server": "wv0001", "token": MAIN, "base_url": sim.url}],
    }


def warnings_of(exporter: Exporter) -> list[str]:
    assert exporter.process is not None
    return [
        line for line in exporter.process.log().splitlines() if "state_store" in line and "level=warn" in line
    ]


def test_a_read_only_directory_is_one_warning_and_a_metric(
    simulator: Simulator, tmpfs: Callable[[str], Path], tmp_path: Path
) -> None:
    directory = tmpfs("ro,size=64k")
    exporter = start_exporter_process(
        store_config(simulator, directory / "state.db"), tmp_path, log_level="info"
    )
    samples = exporter.wait_for(
        lambda s: (
            value(s, "wolkvox_up", operation="main") == 1
            and (value(s, "wolkvox_state_write_errors_total") or 0) >= 3
        ),
        timeout=20,
        what="fetching on, and several failed writes",
    )
    assert value(samples, "wolkvox_state_last_write_timestamp_seconds") == 0
    assert len(warnings_of(exporter)) == 1 and "read-only file system" in warnings_of(exporter)[0]
    assert exporter.process is not None and "Traceback" not in exporter.process.log()
    exporter.process.stop()


def test_a_full_disk_is_one_warning_and_writes_resume_when_there_is_room(
    simulator: Simulator, tmpfs: Callable[[str], Path], tmp_path: Path
) -> None:
    directory = tmpfs("size=64k")
    filler = directory / "filler"
    with contextlib.suppress(OSError), filler.open("wb") as handle:
        while True:
            handle.write(b"\0" * 4096)
            handle.flush()
    exporter = start_exporter_process(
        store_config(simulator, directory / "state.db"), tmp_path, log_level="info"
    )
    exporter.wait_for(
        lambda s: (
            value(s, "wolkvox_up", operation="main") == 1
            and (value(s, "wolkvox_state_write_errors_total") or 0) >= 3
        ),
        timeout=20,
        what="fetching on, and several failed writes",
    )
    assert len(warnings_of(exporter)) == 1
    filler.unlink()
    samples = exporter.wait_for(
        lambda s: (value(s, "wolkvox_state_last_write_timestamp_seconds") or 0) > 0,
        timeout=10,
        what="a write once there is room",
    )
    assert (value(samples, "wolkvox_state_last_write_timestamp_seconds") or 0) <= time.time()
    assert len(warnings_of(exporter)) == 1
    assert exporter.process is not None and "Traceback" not in exporter.process.log()
    exporter.process.stop()


def test_a_corrupt_store_is_moved_aside_and_the_exporter_starts_fresh(
    simulator: Simulator, tmp_path: Path
) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not a database" * 200)
    exporter = start_exporter_process(store_config(simulator, path), tmp_path, log_level="info")
    exporter.wait_for(
        lambda s: (value(s, "wolkvox_state_last_write_timestamp_seconds") or 0) > 0,
        what="the fresh store written",
    )
    assert [p.name for p in tmp_path.glob("state.db.corrupt-*")]
    assert exporter.process is not None
    log = exporter.process.log()
    assert "moved aside" in log and "starting fresh" in log and "Traceback" not in log
    exporter.process.stop()


def test_a_state_store_that_is_not_a_file_stops_the_start_with_one_line(tmp_path: Path) -> None:
    for kind, path in not_files(tmp_path).items():
        config = write_yaml(
            tmp_path / f"{kind}.yml",
            {
                "state_store": str(path),
                "operations": [
                    {"name": "a", "server": "wv0001", "token": MAIN, "base_url": "http://127.0.0.1:9"}
                ],
            },
        )
        result = subprocess.run(
            [sys.executable, *exporter_args(config)],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=Path.cwd(),
        )
        assert result.returncode == 1, kind
        lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
        assert len(lines) == 1 and str(path) in lines[0] and "Traceback" not in lines[0], (kind, lines)


def test_the_statement_of_a_month_no_longer_in_memory_comes_from_the_store(
    simulator: Simulator, run_exporter: Callable[..., Exporter], tmp_path: Path
) -> None:
    path = tmp_path / "state.db"
    store = opened(path)
    store.put_month("main", "stereo_rec", Seen(43_000.5, AT - 86_400 * 400, "2025-10"))  # 14 months back
    store.stop()
    exporter = run_exporter(store_config(simulator, path))
    answer = exporter.get("/statement", params={"month": "2025-10", "format": "json"})
    assert answer.status_code == 200, answer.text
    (line,) = answer.json()["lines"]
    assert line["operation"] == "main" and line["status"] == "closed"
    assert exporter.get("/statement", params={"month": "2025-09", "format": "json"}).status_code == 404
