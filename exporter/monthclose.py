"""When a report's month closes: decided from two consecutive good readings of one (operation, api).

The wolkvox billing API answers only for the current month, so the final figure of a month (the one the
invoice is checked against) exists only as the last answer seen before the month changed. ``closed_month``
tells whether a month closed between two readings, and which:

- the vendor's month (``Reading.month``, from the rows' ``date``) when both readings have one: a later
  month in the new reading closes the old one, and a drop inside one month is a correction, never a close;
- otherwise, for usage apis, a DROP of the value near the 1st: some 1st-of-month 00:00 UTC lies within
  ``MARGIN`` of the interval between the two readings. The vendor's time zone is unknown, and its month
  turns anywhere between 14 hours before and 12 hours after 00:00 UTC (UTC+14 .. UTC-12);
- otherwise, for level apis (licence counts, which do not drop at the start of a month), a change of the
  UTC calendar month between the two fetches.

Pure: no I/O and no clock of its own. The store keeps the readings and what closed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from exporter.model import BILLING_APIS, Kind

MARGIN = 14 * 3600.0  # seconds either side of 00:00 UTC on the 1st within which a drop is a close


@dataclass(frozen=True, slots=True)
class Seen:
    """A good reading of one report: its value, when it was fetched (Unix time, wall clock), and the
    vendor's month (``YYYY-MM``) of its rows when their ``date`` was readable. Also what is kept of a
    closed month: its last value, when that was fetched, and the month (then never None)."""

    value: float
    at: float
    month: str | None = None


@dataclass
class SavedMonths:
    """What the state store keeps per operation and api: the last reading (to notice the next close, also
    across a restart) and the closing value of the last month that closed."""

    seen: dict[str, dict[str, Seen]] = field(default_factory=dict)
    closed: dict[str, dict[str, Seen]] = field(default_factory=dict)


def utc_month(at: float) -> str:
    """``YYYY-MM`` of a Unix time, in UTC."""
    moment = datetime.fromtimestamp(at, UTC)
    return f"{moment.year:04d}-{moment.month:02d}"


def _month_before(month: str) -> str:
    year, number = int(month[:4]), int(month[5:7])
    return f"{year - 1:04d}-12" if number == 1 else f"{year:04d}-{number - 1:02d}"


def _first_month_start(since: float, until: float) -> float | None:
    """The earliest 1st-of-month 00:00 UTC within [since, until], or None."""
    moment = datetime.fromtimestamp(since, UTC)
    start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    if start.timestamp() < since:
        year, month = (start.year + 1, 1) if start.month == 12 else (start.year, start.month + 1)
        start = start.replace(year=year, month=month)
    return start.timestamp() if start.timestamp() <= until else None


def kind_of(api: str) -> Kind:
    """The kind of an api; one this exporter does not know is taken as a usage total."""
    known = BILLING_APIS.get(api)
    return known.kind if known is not None else "usage"


def closed_month(last: Seen, new: Seen, kind: Kind = "usage") -> str | None:
    """The month (``YYYY-MM``) that closed between reading ``last`` and reading ``new``, or None.

    The caller keeps ``last.value`` as that month's final value (when it has not closed that month yet).
    """
    if last.month is not None and new.month is not None:
        return last.month if new.month > last.month else None
    if kind == "level":
        old, current = utc_month(last.at), utc_month(new.at)
        return (last.month or old) if current > old else None
    if new.value >= last.value:
        return None
    start = _first_month_start(last.at - MARGIN, new.at + MARGIN)
    if start is None:
        return None  # a mid-month drop: the vendor corrected a value
    return last.month or _month_before(utc_month(start))
