"""exporter.statement: sums checked against hand-computed decimals, the money rule, grouping, and every
renderer read back (CSV with `csv`, JSON with `json`)."""

from __future__ import annotations

import csv
import io
import json
from decimal import Decimal

import pytest

from exporter.monthclose import SavedMonths, Seen
from exporter.statement import (
    NO_GROUP,
    StatementError,
    Terms,
    Total,
    build,
    parse_month,
    pick_format,
    plain,
    render,
    shown,
    totals_in_memory,
)

MONTH = "2026-11"
TERMS = Terms(
    currency="USD",
    labels={
        "bogota": {"client": "acme", "team": "sales"},
        "lima": {"client": "acme"},
        "quito": {"client": "globex", "team": "support"},
        "cusco": {},
    },
    prices={
        "bogota": {"stereo_rec": Decimal("0.004"), "chat_licenses": Decimal("12.5")},
        "lima": {"stereo_rec": Decimal("0.0035")},
        "quito": {"ivr_minutes": Decimal("0.005")},
    },
    order=("bogota", "lima", "quito", "cusco"),
)
TOTALS = [
    Total("quito", "ivr_minutes", MONTH, 25.0, True),  # 0.125: half a cent, shown 0.13 (half up)
    Total("bogota", "chat_licenses", MONTH, 3.0, True),  # 37.5
    Total("bogota", "stereo_rec", MONTH, 37702.57, True),  # 150.81028 (as floats: 150.81028000000001)
    Total("lima", "stereo_rec", MONTH, 1234.5, True),  # 4.32075
    Total("cusco", "stereo_rec", MONTH, 10.0, True),  # no price: no cost
    Total("bogota", "stereo_rec", "2026-10", 99999.0, True),  # another month: left out
]
# Hand-computed: acme = 150.81028 + 37.5 + 4.32075; globex = 0.125; total = the three.
ACME = Decimal("192.63103")
GLOBEX = Decimal("0.125")
TOTAL = Decimal("192.75603")


def test_costs_subtotals_and_total_are_exact_decimals() -> None:
    statement = build(TOTALS, TERMS, MONTH, group="client")
    costs = {(line.operation, line.api): line.cost for line in statement.lines}
    assert costs == {
        ("bogota", "stereo_rec"): Decimal("150.81028"),
        ("bogota", "chat_licenses"): Decimal("37.5"),
        ("lima", "stereo_rec"): Decimal("4.32075"),
        ("quito", "ivr_minutes"): Decimal("0.125"),
        ("cusco", "stereo_rec"): None,
    }
    assert [(s.value, s.cost, s.lines) for s in statement.subtotals] == [
        ("acme", ACME, 3),
        ("globex", GLOBEX, 1),
        (NO_GROUP, Decimal(0), 1),
    ]
    assert statement.total == TOTAL and statement.closed
    # Grouped: acme's lines first (configuration order inside a group, then apis in the table's order).
    assert [(line.operation, line.api) for line in statement.lines] == [
        ("bogota", "stereo_rec"),
        ("bogota", "chat_licenses"),
        ("lima", "stereo_rec"),
        ("quito", "ivr_minutes"),
        ("cusco", "stereo_rec"),
    ]
    assert statement.label_names == ("client", "team")


def test_money_is_rounded_half_up_to_the_minor_unit_only_when_shown() -> None:
    assert shown(Decimal("0.125"), "USD") == Decimal("0.13")  # half-even would give 0.12
    assert shown(Decimal("0.135"), "USD") == Decimal("0.14")
    assert shown(Decimal("1234.5"), "JPY") == Decimal("1235")
    assert shown(Decimal("1.2345"), "KWD") == Decimal("1.235")
    assert shown(Decimal("7"), "COP") == Decimal("7.00")
    # Ten lines of 0.1 x 1 sum to exactly 1 (floats would give 0.9999999999999999).
    terms = Terms("USD", prices={f"op{i}": {"stereo_rec": Decimal("0.1")} for i in range(10)})
    totals = [Total(f"op{i}", "stereo_rec", MONTH, 1.0, True) for i in range(10)]
    assert build(totals, terms, MONTH).total == Decimal("1.0")
    # No 28-digit rounding of the default context on a long product.
    terms = Terms("USD", prices={"a": {"stereo_rec": Decimal("0.123456789012345678901234567")}})
    line = build([Total("a", "stereo_rec", MONTH, 987654.321, True)], terms, MONTH).lines[0]
    assert line.cost == Decimal("121932.631124828532112482852332114007")  # 36 digits, by hand


def test_csv_reads_back_with_the_csv_module() -> None:
    text = render(build(TOTALS, TERMS, MONTH, group="client"), "csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    header = next(csv.reader(io.StringIO(text)))
    assert header == [
        *("row", "month", "status", "client", "team", "operation", "api", "unit", "usage"),
        *("unit_price", "cost", "currency"),
    ]
    kinds = ["line", "line", "line", "subtotal", "line", "subtotal", "line", "subtotal", "total"]
    assert [r["row"] for r in rows] == kinds
    bogota = rows[0]
    assert bogota == {
        "row": "line",
        "month": MONTH,
        "status": "closed",
        "client": "acme",
        "team": "sales",
        "operation": "bogota",
        "api": "stereo_rec",
        "unit": "minutes",
        "usage": "37702.57",
        "unit_price": "0.004",
        "cost": "150.81",
        "currency": "USD",
    }
    subtotals = {r["client"]: Decimal(r["cost"]) for r in rows if r["row"] == "subtotal"}
    assert subtotals == {"acme": Decimal("192.63"), "globex": Decimal("0.13"), NO_GROUP: Decimal("0.00")}
    (total,) = [r for r in rows if r["row"] == "total"]
    assert Decimal(total["cost"]) == Decimal("192.76") and total["currency"] == "USD"
    cusco = next(r for r in rows if r["operation"] == "cusco")
    assert cusco["unit_price"] == "" and cusco["cost"] == "" and cusco["client"] == ""


def test_json_reads_back_with_the_json_module() -> None:
    document = json.loads(render(build(TOTALS, TERMS, MONTH, group="client"), "json"))
    assert document["month"] == MONTH and document["status"] == "closed" and document["currency"] == "USD"
    assert document["labels"] == ["client", "team"] and document["group"] == "client"
    assert "ROUND_HALF_UP" in document["rounding"]
    exact = sum(Decimal(line["cost_exact"]) for line in document["lines"] if line["cost_exact"] is not None)
    assert exact == TOTAL == Decimal(document["total"]["cost_exact"])
    assert document["total"]["cost"] == "192.76"
    first = document["lines"][0]
    assert first["labels"] == {"client": "acme", "team": "sales"} and first["usage"] == "37702.57"
    assert [(s["value"], s["cost"], s["cost_exact"]) for s in document["subtotals"]] == [
        ("acme", "192.63", "192.63103"),
        ("globex", "0.13", "0.125"),
        (NO_GROUP, "0.00", "0"),
    ]


def test_html_escapes_labels_and_shows_every_line() -> None:
    terms = Terms("USD", labels={"x": {"client": "<b>acme</b>"}}, prices={"x": {"stereo_rec": Decimal(1)}})
    page = render(build([Total("x", "stereo_rec", MONTH, 2.0, False)], terms, MONTH, "client"), "html")
    assert "&lt;b&gt;acme&lt;/b&gt;" in page and "<b>acme" not in page
    assert "<script" not in page and "to date" in page and "Subtotal client" in page


def test_totals_in_memory_take_the_last_reading_and_the_closed_month() -> None:
    months = SavedMonths(
        seen={
            "bogota": {"stereo_rec": Seen(5.0, 1_796_000_000.0, "2026-12")},
            "lima": {"stereo_rec": Seen(7.0, 1_795_000_000.0)},
        },
        closed={"bogota": {"stereo_rec": Seen(900.0, 1_795_900_000.0, "2026-11")}},
    )
    assert totals_in_memory(months, "2026-12") == [Total("bogota", "stereo_rec", "2026-12", 5.0, False)]
    # lima's reading has no vendor month: the UTC month of its fetch (2026-11-18).
    assert sorted(totals_in_memory(months, "2026-11"), key=lambda t: t.operation) == [
        Total("bogota", "stereo_rec", "2026-11", 900.0, True),
        Total("lima", "stereo_rec", "2026-11", 7.0, False),
    ]
    assert totals_in_memory(months, "2026-10") == []


def test_a_month_without_data_has_no_lines() -> None:
    statement = build(TOTALS, TERMS, "2025-01")
    assert statement.lines == () and statement.total == 0 and not statement.closed


@pytest.mark.parametrize("month", ["2026-13", "2026-1", "26-11", "2026-11-01", "", "november"])
def test_bad_months_are_refused(month: str) -> None:
    with pytest.raises(StatementError, match=r"^month: expected YYYY-MM"):
        parse_month(month)


def test_bad_group_and_format_are_refused() -> None:
    with pytest.raises(StatementError, match=r"^group: 'region' is not an operation label"):
        build(TOTALS, TERMS, MONTH, group="region")
    with pytest.raises(StatementError, match=r"^format: expected one of csv, json, html"):
        pick_format("xlsx", None)


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", "html"),
        ("application/json", "json"),
        ("*/*", "csv"),
        (None, "csv"),
    ],
)
def test_the_default_format_follows_the_accept_header(accept: str | None, expected: str) -> None:
    assert pick_format(None, accept) == expected
    assert pick_format("json", accept) == "json"


def test_plain_numbers() -> None:
    assert [plain(Decimal(t)) for t in ("1234.50", "1E+3", "0.000", "-0")] == ["1234.5", "1000", "0", "0"]
