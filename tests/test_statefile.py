"""The optional state file: unit tests of exporter/statefile.py, and restarts of the real exporter.

A restarted exporter (after SIGTERM, or after kill -9) must show the last good values at once and must
not use a token again before refresh_interval has passed since its last use in the previous run.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from harness import Exporter, Simulator, holds, value, wait_until

from exporter.monthclose import SavedMonths, Seen
from exporter.planner import SavedPacing
from exporter.secret import Secret, token_key
from exporter.statefile import StateFile, StateSaver

VALUES = {
    "bogota": {"stereo_rec": (1234.5, 1_700_000_000.25)},
    "lima": {"stereo_rec": (0.0, 1_700_000_100.0)},
}
PACING = SavedPacing(
    tokens={"0123456789abcdef": {"level": 0.5, "at": 1_700_000_000.5, "paused_until": 1_700_000_000.5}},
    reports={"0123456789abcdef": {"bogota/stereo_rec": 1_700_000_300.0, "lima/stereo_rec": 1_700_000_400.0}},
)


def pacing(level: float) -> SavedPacing:
    return SavedPacing(tokens={"k": {"level": level, "at": 1.0, "paused_until": 0.0}})


def temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".state-"))


# ----- unit tests ---------------------------------------------------------------------------------------


def test_round_trip(tmp_path: Path) -> None:
    state = StateFile(tmp_path / "state.json")
    state.save(VALUES, PACING)
    loaded = StateFile(tmp_path / "state.json").load()
    assert loaded is not None
    assert loaded.values == VALUES
    assert loaded.pacing == PACING
    assert temp_files(tmp_path) == []


def test_the_parent_directory_is_created(tmp_path: Path) -> None:
    path = tmp_path / "var" / "lib" / "wolkvox" / "state.json"
    StateFile(path).save(VALUES, PACING)
    assert StateFile(path).load() is not None


def test_no_file_is_no_state_and_no_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert StateFile(tmp_path / "absent.json").load() is None
    assert caplog.records == []


@pytest.mark.parametrize(
    "content",
    [
        b"\x00\xff\xfe garbage",
        b"",
        b"{not json",
        b"[1, 2, 3]",
        b'{"version": 3, "values": {}, "pacing": {"tokens": {}, "reports": {}}}',
        b'{"version": 1}',
        b'{"version": 1, "values": {"a": {"stereo_rec": ["x", "y"]}}, "last_used": {}}',
        b'{"version": 1, "values": {"a": {"stereo_rec": [1]}}, "last_used": {}}',
        b'{"version": 2, "values": {}, "pacing": {"tokens": {"k": {"at": "yesterday"}}, "reports": {}}}',
        b'{"version": 1, "values": [], "last_used": {}}',
        b"[" * 100_000 + b"]" * 100_000,
    ],
    ids=[
        "binary",
        "empty",
        "truncated",
        "list",
        "future-version",
        "no-sections",
        "bad-pair",
        "short-pair",
        "bad-time",
        "values-list",
        "deeply-nested",
    ],
)
def test_a_corrupt_file_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes
) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="exporter.statefile"):
        assert StateFile(path).load() is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0] and "ignored" in warnings[0]
    # The bad file is not deleted behind the operator's back; the next save replaces it.
    assert path.read_bytes() == content
    StateFile(path).save(VALUES, PACING)
    assert StateFile(path).load() is not None


def test_a_half_written_document_is_ignored(tmp_path: Path) -> None:
    """What a crash in the middle of a non-atomic write would leave behind."""
    path = tmp_path / "state.json"
    StateFile(path).save(VALUES, PACING)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    assert StateFile(path).load() is None


def test_an_unchanged_state_is_not_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    state = StateFile(path)
    state.save(VALUES, PACING)
    before = path.stat()
    state.save({k: dict(v) for k, v in VALUES.items()}, copy.deepcopy(PACING))
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    state.save(VALUES, pacing(0.25))
    assert path.stat().st_ino != before.st_ino  # a new file renamed over the old one


def test_readers_never_see_a_partial_file(tmp_path: Path) -> None:
    """A writer replacing a large state (up to 300 times) while a reader loads it: every load is whole.
    The writer stops once the reader has loaded each version many times."""
    path = tmp_path / "state.json"
    big = {f"operation-{i:04d}": {"stereo_rec": (float(i), 1_700_000_000.0 + i)} for i in range(2000)}
    small = {"only": {"stereo_rec": (1.0, 1_700_000_000.0)}}
    StateFile(path).save(small, SavedPacing())
    done = threading.Event()
    seen: list[int] = []
    bad: list[str] = []

    def read() -> None:
        reader = StateFile(path)
        while not done.is_set():
            loaded = reader.load()
            if loaded is None or len(loaded.values) not in (len(big), len(small)):
                bad.append(repr(loaded)[:100])
                return
            seen.append(len(loaded.values))

    thread = threading.Thread(target=read)
    thread.start()
    writer = StateFile(path)
    try:
        for i in range(300):
            writer.save(big if i % 2 == 0 else small, pacing(float(i)))
            if min(seen.count(len(big)), seen.count(len(small)), 25) == 25:
                break
    finally:
        done.set()
        thread.join(timeout=30)
    assert not bad, bad
    assert len(set(seen)) == 2, "the reader should have seen both versions"
    assert temp_files(tmp_path) == []


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.json"
    StateFile(path).save(VALUES, PACING)
    good = path.read_bytes()

    def no_rename(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_rename)
    state = StateFile(path)
    with caplog.at_level(logging.WARNING, logger="exporter.statefile"):
        for i in range(3):  # the saver retries every second: each try must clean up after itself
            state.save(VALUES, pacing(float(i)))
    assert path.read_bytes() == good
    assert temp_files(tmp_path) == []
    assert any("cannot write" in r.getMessage() for r in caplog.records)


def test_a_state_path_that_is_a_directory_leaves_no_temporary_files(tmp_path: Path) -> None:
    """A misconfigured state_file (an existing directory): saving fails every second, and every failure
    must clean up, or the parent directory fills with .state-*.tmp files."""
    target = tmp_path / "state.json"
    target.mkdir()
    state = StateFile(target)
    for i in range(5):
        state.save(VALUES, pacing(float(i)))
    assert temp_files(tmp_path) == []
    assert state.load() is None


def test_the_file_names_tokens_only_by_their_key(tmp_path: Path) -> None:
    token = "CANARY-statefile-0f9e8d7c6b5a"
    key = token_key(Secret(token))
    assert len(key) == 16 and token not in key
    path = tmp_path / "state.json"
    StateFile(path).save(VALUES, SavedPacing(reports={key: {"bogota/stereo_rec": 1_700_000_000.0}}))
    text = path.read_text()
    assert key in text and token not in text and "CANARY" not in text


def test_the_saver_writes_changes_and_a_last_state_when_stopped(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    current: dict[str, Any] = {"values": {}, "pacing": pacing(1.0)}
    saver = StateSaver(StateFile(path), lambda: (current["values"], current["pacing"]), interval=0.05)
    saver.start()
    try:

        def saved_pacing() -> SavedPacing | None:
            loaded = StateFile(path).load()
            return loaded.pacing if loaded is not None else None

        wait_until(lambda: saved_pacing() == pacing(1.0), timeout=5, what="the first save")
        current["pacing"] = pacing(2.0)
        wait_until(lambda: saved_pacing() == pacing(2.0), timeout=5, what="the change to be saved")
    finally:
        saver.stop()

    # With a long interval, only stop() can have written the final state.
    slow = StateSaver(StateFile(path), lambda: ({}, pacing(3.0)), interval=3600)
    slow.start()
    slow.stop()
    loaded = StateFile(path).load()
    assert loaded is not None and loaded.pacing == pacing(3.0)


def test_a_version_1_file_keeps_its_values(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"version": 1, "values": {"a": {"stereo_rec": [5, 6]}}, "last_used": {}}))
    loaded = StateFile(path).load()
    assert loaded is not None and loaded.values == {"a": {"stereo_rec": (5.0, 6.0)}}
    assert loaded.pacing == SavedPacing()


MONTHS = SavedMonths(
    seen={"bogota": {"stereo_rec": Seen(12.0, 1_796_083_800.0, "2026-12"), "amd_ai": Seen(3.0, 1.5, None)}},
    closed={"bogota": {"stereo_rec": Seen(43_000.5, 1_796_082_900.0, "2026-11")}},
)


def test_the_month_close_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    StateFile(path).save(VALUES, PACING, MONTHS)
    loaded = StateFile(path).load()
    assert loaded is not None
    assert loaded.months == MONTHS
    assert loaded.values == VALUES and loaded.pacing == PACING
    assert json.loads(path.read_text())["version"] == 2  # an optional section: older exporters still read it


def test_a_version_2_file_without_month_close_loads_with_no_months(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    StateFile(path).save(VALUES, PACING)
    assert "month_close" not in json.loads(path.read_text())
    loaded = StateFile(path).load()
    assert loaded is not None and loaded.months == SavedMonths() and loaded.values == VALUES


@pytest.mark.parametrize(
    "month_close",
    [
        {"seen": {}, "closed": {"a": {"stereo_rec": [1, 2, None]}}},
        {"seen": {}, "closed": {"a": {"stereo_rec": [1, 2, "2026-13"]}}},
        {"seen": {"a": {"stereo_rec": [1, 2, "November"]}}, "closed": {}},
        {"seen": {"a": {"stereo_rec": [1, 2]}}, "closed": {}},
        {"seen": {"a": {"stereo_rec": ["x", 2, "2026-11"]}}, "closed": {}},
        {"seen": {}},
        [],
    ],
    ids=["closed-without-month", "month-13", "month-name", "short-entry", "bad-value", "no-closed", "list"],
)
def test_a_corrupt_month_close_section_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, month_close: Any
) -> None:
    path = tmp_path / "state.json"
    document = {
        "version": 2,
        "values": {},
        "pacing": {"tokens": {}, "reports": {}},
        "month_close": month_close,
    }
    path.write_text(json.dumps(document))
    with caplog.at_level(logging.WARNING, logger="exporter.statefile"):
        assert StateFile(path).load() is None
    assert any("ignored" in r.getMessage() for r in caplog.records)


# ----- the real exporter across restarts ------------------------------------------------------------------

MAIN, CONTROL = "tok-state-main", "tok-state-control"


def restart_config(sim: Simulator, state: Path) -> dict[str, Any]:
    return {
        "refresh_interval": "1m",
        "connect_timeout": "1s",
        "read_timeout": "2s",
        "state_file": str(state),
        "operations": [
            {"name": "main", "server": "wv0001", "token": MAIN, "base_url": sim.url},
            {"name": "control", "server": "wv0002", "token": CONTROL, "base_url": sim.url},
        ],
    }


def saved(state: Path) -> dict[str, Any]:
    try:
        return json.loads(state.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}


def requests_of(sim: Simulator, token: str) -> int:
    return sim.stats()["tokens"].get(token, {}).get("requests", 0)


def restart_scenario(
    sim: Simulator, start_exporter: Callable[..., Exporter], tmp_path: Path, stop: Callable[[Exporter], None]
) -> None:
    state = tmp_path / "state.json"
    config = restart_config(sim, state)
    first = start_exporter(config)
    samples = first.wait_for(
        lambda s: (
            value(s, "wolkvox_up", operation="main") == 1 and value(s, "wolkvox_up", operation="control") == 1
        ),
        what="both operations fetched",
    )
    minutes = value(samples, "wolkvox_stereo_rec_minutes", operation="main")
    assert minutes is not None
    main_key, control_key = token_key(Secret(MAIN)), token_key(Secret(CONTROL))

    # The background saver writes within about a second of a change: poll the file, do not guess.
    def has_both() -> bool:
        doc = saved(state)
        reports = doc.get("pacing", {}).get("reports", {})
        return {main_key, control_key} <= set(reports) and "main" in doc.get("values", {})

    wait_until(has_both, timeout=5, what="the state file to hold both tokens' pacing")
    text = state.read_text()
    assert MAIN not in text and CONTROL not in text
    assert saved(state)["values"]["main"]["stereo_rec"][0] == minutes

    stop(first)
    main_requests = requests_of(sim, MAIN)
    assert main_requests == 1

    # Forget the control token's pacing: the new process must fetch it at once, which shows its
    # refresher is running while the main token's report is held back by what the file says.
    doc = saved(state)
    del doc["pacing"]["reports"][control_key]
    del doc["pacing"]["tokens"][control_key]
    state.write_text(json.dumps(doc), encoding="utf-8")
    control_requests = requests_of(sim, CONTROL)

    started = time.monotonic()
    second = start_exporter(config)
    first_page = second.samples()
    assert value(first_page, "wolkvox_stereo_rec_minutes", operation="main") == minutes
    assert value(first_page, "wolkvox_scrape_requests_total", operation="main") == 0
    assert requests_of(sim, MAIN) == main_requests

    # For the first few seconds (and until the control token has been used again), no request on the
    # main token: it was used less than refresh_interval ago.
    def main_unused() -> bool:
        return requests_of(sim, MAIN) == main_requests

    what = "the main token not used again too early"
    holds(main_unused, started + 3.0 - time.monotonic(), what=what)
    wait_until(
        lambda: (main_unused() or pytest.fail(what)) and requests_of(sim, CONTROL) > control_requests,
        timeout=15,
        what="the control token fetched again",
    )
    samples = second.samples()
    assert value(samples, "wolkvox_stereo_rec_minutes", operation="main") == minutes
    assert value(samples, "wolkvox_up", operation="control") == 1
    assert MAIN not in state.read_text()


def test_restart_after_sigterm_serves_saved_values_and_waits_for_the_interval(
    simulator: Simulator, start_exporter: Callable[..., Exporter], tmp_path: Path
) -> None:
    def graceful(exporter: Exporter) -> None:
        assert exporter.process.stop(timeout=15) == 0

    restart_scenario(simulator, start_exporter, tmp_path, graceful)


def test_restart_after_kill_9_serves_saved_values_and_waits_for_the_interval(
    simulator: Simulator, start_exporter: Callable[..., Exporter], tmp_path: Path
) -> None:
    def brutal(exporter: Exporter) -> None:
        assert exporter.process.stop(sig=signal.SIGKILL) == -signal.SIGKILL

    restart_scenario(simulator, start_exporter, tmp_path, brutal)
