"""The month close with the real exporter and the real simulator: the simulator's clock plays the last
minutes of November and the first of December; /metrics then shows November's final value of every api
of every operation, not moved by a correction, and still after a restart with a state store."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from harness import Exporter, Samples, Simulator, value, wait_until

from exporter.simulator import usage_value
from exporter.statestore import StoreError, read_month_totals

APIS = ["stereo_rec", "ivr_minutes", "chat_licenses"]  # two usage totals and a licence count
OPERATIONS = {"bogota": ("wv0001", "tok-month-bogota"), "lima": ("wv0002", "tok-month-lima")}
NOV_END = "2026-11-30T23:55:00Z"
DEC_FIRST = "2026-12-01T00:05:00Z"
DEC_THIRD = "2026-12-03T10:00:00Z"


def config(sim: Simulator, state: Path) -> dict[str, Any]:
    return {
        "refresh_interval": "1s",
        "connect_timeout": "1s",
        "read_timeout": "2s",
        "daily_request_limit": 10_000_000,
        "state_store": str(state),
        "operations": [
            {"name": name, "server": server, "token": token, "base_url": sim.url, "apis": APIS}
            for name, (server, token) in OPERATIONS.items()
        ],
    }


def served(at: str, scale: float = 1.0) -> dict[tuple[str, str], float]:
    """What the simulator answers at ``at`` for every (operation, api) (items are whole numbers)."""
    moment = datetime.fromisoformat(at).timestamp()
    return {
        (name, api): math.floor(scale * usage_value(api, token, server, moment, 600))
        for name, (server, token) in OPERATIONS.items()
        for api in APIS
    }


def usage(samples: Samples) -> dict[tuple[str, str], float | None]:
    return {
        (op, api): value(samples, "wolkvox_billing_usage", operation=op, api=api)
        for op in OPERATIONS
        for api in APIS
    }


def previous(samples: Samples) -> dict[tuple[str, str, str], float]:
    """Every wolkvox_billing_usage_previous_month sample, by (operation, api, month)."""
    out: dict[tuple[str, str, str], float] = {}
    for (name, labels), v in samples.items():
        if name == "wolkvox_billing_usage_previous_month":
            label = dict(labels)
            out[label["operation"], label["api"], label["month"]] = v
    return out


def closed_november(november: dict[tuple[str, str], float]) -> dict[tuple[str, str, str], float]:
    return {(op, api, "2026-11"): v for (op, api), v in november.items()}


def assert_november_closed(samples: Samples, november: dict[tuple[str, str], float]) -> None:
    assert previous(samples) == closed_november(november)
    for op in OPERATIONS:
        minutes = value(samples, "wolkvox_stereo_rec_minutes_previous_month", operation=op, month="2026-11")
        assert minutes == november[op, "stereo_rec"]


def statement_of(exporter: Exporter, month: str) -> dict[tuple[str, str, str], float]:
    """/statement's lines of ``month`` (JSON), by (operation, api, month); every one must be closed."""
    response = exporter.get(f"/statement?month={month}&format=json")
    assert response.status_code == 200, response.text
    document = response.json()
    assert document["status"] == "closed"
    return {(line["operation"], line["api"], month): float(line["usage"]) for line in document["lines"]}


def saved(state: Path, part: str) -> int:
    """How many reports the state store holds November of: closed (``part`` "closed") or as the
    latest reading ("seen"); read as the statement reads it, while the exporter runs."""
    try:
        totals = read_month_totals(state, "2026-11")
    except StoreError:
        return 0  # not created yet
    return sum(1 for total in totals if total.closed == (part == "closed"))


def test_a_month_change_keeps_november_for_every_api_through_a_correction_and_a_restart(
    simulator: Simulator, run_exporter: Callable[..., Exporter], tmp_path: Path
) -> None:
    state = tmp_path / "state.db"
    simulator.set_clock(NOV_END)
    november, december = served(NOV_END), served(DEC_FIRST)
    assert all(december[key] < november[key] for key in november if key[1] != "chat_licenses")
    first = run_exporter(config(simulator, state))
    samples = first.wait_for(lambda s: usage(s) == november, what="November's values of every api")
    assert previous(samples) == {}

    simulator.set_clock(DEC_FIRST)
    samples = first.wait_for(
        lambda s: usage(s) == december and len(previous(s)) == len(november),
        what="December's first answers, and November closed",
    )
    assert_november_closed(samples, november)
    # The statement: November closed, December to date.
    assert statement_of(first, "2026-11") == closed_november(november)
    current = first.get("/statement?month=2026-12&format=json").json()
    assert current["status"] == "to date"
    assert {(line["operation"], line["api"]): float(line["usage"]) for line in current["lines"]} == december
    # The status page's "Last month" column: the value, its month, and when the exporter fetched it.
    page = first.get("/").text
    shown = f"{november['lima', 'ivr_minutes']:,.0f}<br><small>2026-11, fetched "
    assert shown in page and page.count("<small>2026-11, fetched ") == len(november)

    # The vendor corrects bogota's values within December: a drop, the same month, not a close.
    simulator.fault("correction", token=OPERATIONS["bogota"][1])
    corrected = {key: v for key, v in served(DEC_FIRST, 0.5).items() if key[0] == "bogota"}
    samples = first.wait_for(
        lambda s: all(usage(s)[key] == v for key, v in corrected.items()), what="the corrected values"
    )
    assert any(corrected[key] < december[key] for key in corrected)
    assert_november_closed(samples, november)
    simulator.clear_faults()

    # Restart on the 3rd with the state store: November is on the very first page, and stays.
    wait_until(
        lambda: saved(state, "closed") == len(november),
        timeout=5,
        what="the state store to hold every closed month",
    )
    assert first.stop() == 0
    simulator.set_clock(DEC_THIRD)
    second = run_exporter(config(simulator, state))
    first_page = second.samples()
    assert value(first_page, "wolkvox_scrape_requests_total", operation="bogota") == 0
    assert_november_closed(first_page, november)
    assert statement_of(second, "2026-11") == closed_november(november)  # across the restart
    samples = second.wait_for(lambda s: usage(s) == served(DEC_THIRD), what="fresh values on the 3rd")
    assert_november_closed(samples, november)
    # The statement's view: November's closing values read back from the store after the restart.
    totals = {(t.operation, t.api): t.value for t in read_month_totals(state, "2026-11") if t.closed}
    assert totals == november


def test_a_restart_between_the_last_answer_of_a_month_and_the_first_of_the_next_still_closes_it(
    simulator: Simulator, run_exporter: Callable[..., Exporter], tmp_path: Path
) -> None:
    state = tmp_path / "state.db"
    simulator.set_clock(NOV_END)
    november = served(NOV_END)
    first = run_exporter(config(simulator, state))
    first.wait_for(lambda s: usage(s) == november, what="November's values")

    wait_until(
        lambda: saved(state, "seen") == len(november),
        timeout=5,
        what="the state store to hold every last reading",
    )
    assert first.stop() == 0
    simulator.set_clock(DEC_FIRST)
    second = run_exporter(config(simulator, state))
    samples = second.wait_for(lambda s: len(previous(s)) == len(november), what="November closed")
    assert_november_closed(samples, november)


def test_without_a_month_change_nothing_closes(
    simulator: Simulator, run_exporter: Callable[..., Exporter], tmp_path: Path
) -> None:
    """Mid-month, with a correction: values drop, but no previous-month series appears."""
    simulator.set_clock("2026-11-15T12:00:00Z")
    exporter = run_exporter(config(simulator, tmp_path / "state.db"))
    exporter.wait_for(lambda s: usage(s) == served("2026-11-15T12:00:00Z"), what="mid-November values")
    simulator.fault("correction")
    samples = exporter.wait_for(
        lambda s: usage(s) == served("2026-11-15T12:00:00Z", 0.5), what="every value corrected"
    )
    assert previous(samples) == {}
    assert not any(name == "wolkvox_stereo_rec_minutes_previous_month" for name, _ in samples)
