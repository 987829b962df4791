"""Month detection (exporter/monthclose.py): pure logic, no processes, no clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from exporter.model import BILLING_APIS
from exporter.monthclose import MARGIN, Seen, closed_month, kind_of, utc_month


def at(text: str) -> float:
    """Unix time of ``2026-11-30 23:55`` (UTC)."""
    return datetime.strptime(text, "%Y-%m-%d %H:%M").replace(tzinfo=UTC).timestamp()


# ----- the vendor's month, from the answers' date


def test_a_later_vendor_month_closes_the_earlier_one() -> None:
    last = Seen(43_000, at("2026-11-30 23:55"), "2026-11")
    assert closed_month(last, Seen(12, at("2026-12-01 00:05"), "2026-12")) == "2026-11"


def test_the_year_turns() -> None:
    last = Seen(43_000, at("2026-12-31 23:55"), "2026-12")
    assert closed_month(last, Seen(12, at("2027-01-01 00:05"), "2027-01")) == "2026-12"


@pytest.mark.parametrize("value", [0, 21_000, 42_999, 43_000, 50_000])
def test_same_vendor_month_is_never_a_close_whatever_the_value(value: float) -> None:
    """A drop within the month is the vendor correcting a value, also right after the 1st."""
    last = Seen(43_000, at("2026-12-01 00:05"), "2026-12")
    assert closed_month(last, Seen(value, at("2026-12-01 00:10"), "2026-12")) is None


def test_the_vendor_month_wins_over_the_wall_clock() -> None:
    """A vendor east of UTC is already in December at 20:00 UTC on Nov 30; one west of it still in
    November at 03:00 UTC on Dec 1. The dates say so; the wall clock is not asked."""
    east = Seen(43_000, at("2026-11-30 18:55"), "2026-11")
    assert closed_month(east, Seen(3, at("2026-11-30 19:05"), "2026-12")) == "2026-11"
    west = Seen(43_000, at("2026-12-01 03:00"), "2026-11")
    assert closed_month(west, Seen(43_010, at("2026-12-01 03:05"), "2026-11")) is None


def test_an_earlier_vendor_month_is_not_a_close() -> None:
    last = Seen(12, at("2026-12-01 00:05"), "2026-12")
    assert closed_month(last, Seen(43_000, at("2026-12-01 00:10"), "2026-11")) is None


def test_a_licence_count_closes_on_the_vendor_month_without_dropping() -> None:
    last = Seen(7, at("2026-11-30 23:55"), "2026-11")
    assert closed_month(last, Seen(7, at("2026-12-01 00:05"), "2026-12"), "level") == "2026-11"


# ----- no readable date: a drop near the 1st (usage), the UTC month (levels)


@pytest.mark.parametrize(
    ("before", "after", "zone"),
    [
        ("2026-11-30 23:55", "2026-12-01 00:05", "UTC"),
        ("2026-12-01 04:55", "2026-12-01 05:05", "UTC-5 (Colombia)"),
        ("2026-11-30 18:55", "2026-11-30 19:05", "UTC+5"),
        ("2026-11-30 09:55", "2026-11-30 10:05", "UTC+14"),
        ("2026-12-01 11:55", "2026-12-01 12:05", "UTC-12"),
    ],
)
def test_without_a_date_a_drop_near_the_1st_closes_the_month(before: str, after: str, zone: str) -> None:
    last = Seen(43_000, at(before), None)
    assert closed_month(last, Seen(12, at(after), None)) == "2026-11", zone


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ("2026-11-15 11:55", "2026-11-15 12:05"),
        ("2026-11-29 08:00", "2026-11-29 08:05"),
        ("2026-12-02 15:00", "2026-12-02 15:05"),
    ],
)
def test_without_a_date_a_mid_month_drop_is_not_a_close(before: str, after: str) -> None:
    last = Seen(43_000, at(before), None)
    assert closed_month(last, Seen(21_500, at(after), None)) is None


def test_without_a_date_no_drop_across_the_1st_is_not_a_close() -> None:
    """A usage total that did not drop: the vendor's month has not turned yet (or nothing was used)."""
    last = Seen(43_000, at("2026-11-30 23:55"), None)
    assert closed_month(last, Seen(43_010, at("2026-12-01 00:05"), None)) is None


def test_without_a_date_the_month_of_the_last_reading_is_kept_when_known() -> None:
    last = Seen(43_000, at("2026-12-01 03:55"), "2026-11")
    assert closed_month(last, Seen(12, at("2026-12-01 04:05"), None)) == "2026-11"


def test_a_drop_after_a_gap_closes_the_month_of_the_last_reading() -> None:
    """The exporter was off from Oct 20 to Dec 3: what it kept is October's, and says so."""
    last = Seen(30_000, at("2026-10-20 10:00"), None)
    assert closed_month(last, Seen(900, at("2026-12-03 10:00"), None)) == "2026-10"


def test_without_a_date_a_licence_count_closes_with_the_utc_month() -> None:
    last = Seen(7, at("2026-11-30 23:55"), None)
    assert closed_month(last, Seen(7, at("2026-12-01 00:05"), None), "level") == "2026-11"
    assert closed_month(last, Seen(6, at("2026-11-30 23:58"), None), "level") is None  # a licence removed


def test_kinds_come_from_the_model() -> None:
    assert kind_of("stereo_rec") == "usage"
    assert kind_of("chat_licenses") == "level"
    assert kind_of("no_such_api") == "usage"
    assert {kind_of(api) for api in BILLING_APIS} == {"usage", "level"}


def test_utc_month() -> None:
    assert utc_month(at("2026-11-30 23:59")) == "2026-11"
    assert utc_month(at("2026-12-01 00:00")) == "2026-12"


# ----- properties

MID_MONTH = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 12, 31), timezones=st.just(UTC)
).filter(lambda d: 2 <= d.day <= 27)
VALUES = st.floats(min_value=0, max_value=1e9, allow_nan=False)


@given(MID_MONTH, st.integers(min_value=1, max_value=6 * 3600), VALUES, VALUES)
def test_no_close_far_from_the_1st_without_dates(start: datetime, gap: int, old: float, new: float) -> None:
    """Two readings at least MARGIN away from any 1st-of-month: a usage drop there is a correction."""
    end = start + timedelta(seconds=gap)
    assume(end.day <= 27)
    last, reading = Seen(old, start.timestamp(), None), Seen(new, end.timestamp(), None)
    assert closed_month(last, reading) is None
    assert closed_month(last, reading, "level") is None


@given(MID_MONTH, MID_MONTH, VALUES, VALUES, st.sampled_from(["usage", "level"]))
def test_no_close_within_one_vendor_month(a: datetime, b: datetime, old: float, new: float, kind) -> None:
    """Whatever the times and values, two answers dated in the same month never close it."""
    month = f"{a.year:04d}-{a.month:02d}"
    assert closed_month(Seen(old, a.timestamp(), month), Seen(new, b.timestamp(), month), kind) is None


def test_margin_covers_every_time_zone() -> None:
    assert MARGIN >= 14 * 3600  # UTC+14 (Kiribati) turns 14 hours before UTC; UTC-12 12 hours after
