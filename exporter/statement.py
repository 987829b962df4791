"""The monthly statement: per operation and service its usage, unit, unit price, cost and currency, the
operation's labels as columns, a subtotal per value of one label (``group``) and a total; rendered as CSV,
JSON or HTML (no JavaScript).

Pure: month totals (``MonthTotal``-shaped rows, from the live store or the state store) and the prices
and labels of the configuration in, a ``Statement`` out, then text. No I/O, no clock.

Money rule: usage and unit prices become ``Decimal`` from their shortest decimal spelling (the float
``0.1`` is ``Decimal("0.1")``, not its binary expansion); a line's cost is usage x unit price, exact;
subtotals and the total are sums of the exact costs. Only what is shown is rounded, to the currency's
minor unit (ISO 4217: 2 digits unless ``MINOR_UNITS`` says otherwise), half away from zero
(``ROUND_HALF_UP``, as on an invoice). So a shown total is the rounded exact sum, and may differ from the
sum of the rounded lines above it by less than half a minor unit per line. Unit prices and usage are
shown as they are, unrounded. A line without a unit price has no cost and is not in the sums.
"""

from __future__ import annotations

import csv
import html
import io
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Context, Decimal
from typing import TYPE_CHECKING, Protocol

from exporter.model import BILLING_APIS
from exporter.monthclose import SavedMonths, utc_month

if TYPE_CHECKING:
    from exporter.config import Config

FORMATS = ("csv", "json", "html")
CONTENT_TYPES = {
    "csv": "text/csv; charset=utf-8",
    "json": "application/json",
    "html": "text/html; charset=utf-8",
}
ROUNDING = ROUND_HALF_UP
# ISO 4217 minor units that are not 2; any other currency code is taken as 2.
MINOR_UNITS = {
    **dict.fromkeys(("BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG", "RWF"), 0),
    **dict.fromkeys(("UGX", "UYI", "VND", "VUV", "XAF", "XOF", "XPF"), 0),
    **dict.fromkeys(("BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"), 3),
    "CLF": 4,
    "UYW": 4,
}
CSV_COLUMNS = ("operation", "api", "unit", "usage", "unit_price", "cost", "currency")  # after the labels
NO_GROUP = "(none)"  # the group of an operation without the grouping label
# Money arithmetic: 100 digits, so products of prices and usage and their sums are exact (the default
# context would round them to 28 digits).
EXACT = Context(prec=100)
_MONTH = re.compile(r"(\d{4})-(0[1-9]|1[0-2])")


class StatementError(ValueError):
    """A bad request for a statement (month, format, group): ``str()`` is one line for the user."""


class MonthTotalLike(Protocol):
    """One report's total for one month (``exporter.statestore.MonthTotal`` has this shape)."""

    @property
    def operation(self) -> str: ...
    @property
    def api(self) -> str: ...
    @property
    def month(self) -> str: ...
    @property
    def value(self) -> float: ...
    @property
    def closed(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class Total:
    """A ``MonthTotalLike`` made here (from the live store)."""

    operation: str
    api: str
    month: str
    value: float
    closed: bool


@dataclass(frozen=True)
class Terms:
    """What the configuration says of billing: per operation its labels and unit prices, the currency."""

    currency: str
    labels: dict[str, dict[str, str]] = field(default_factory=dict)  # operation -> label -> value
    prices: dict[str, dict[str, Decimal]] = field(default_factory=dict)  # operation -> api -> price
    order: tuple[str, ...] = ()  # operations in configuration order

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(sorted({name for labels in self.labels.values() for name in labels}))


@dataclass(frozen=True)
class Line:
    operation: str
    api: str
    labels: dict[str, str]
    usage: Decimal
    unit: str
    unit_price: Decimal | None
    cost: Decimal | None  # exact
    closed: bool


@dataclass(frozen=True)
class Subtotal:
    value: str  # of the grouping label (NO_GROUP when an operation lacks it)
    cost: Decimal  # exact
    lines: int


@dataclass(frozen=True)
class Statement:
    month: str
    currency: str
    label_names: tuple[str, ...]
    group: str | None
    lines: tuple[Line, ...]
    subtotals: tuple[Subtotal, ...]
    total: Decimal  # exact

    @property
    def closed(self) -> bool:
        """Every line is the final value of a closed month."""
        return bool(self.lines) and all(line.closed for line in self.lines)


# ----- inputs ------------------------------------------------------------------------------------------


def to_decimal(number: float) -> Decimal:
    """The shortest decimal spelling of a float (``repr``), exactly."""
    return Decimal(repr(float(number)))


def terms_of(config: Config) -> Terms:
    return Terms(
        currency=config.currency.upper(),
        labels={op.name: dict(op.labels) for op in config.operations},
        prices={op.name: {api: to_decimal(p) for api, p in op.prices} for op in config.operations},
        order=tuple(op.name for op in config.operations),
    )


def parse_month(text: str) -> str:
    """``YYYY-MM`` checked; raises StatementError."""
    if not _MONTH.fullmatch(text):
        raise StatementError(f"month: expected YYYY-MM (e.g. 2026-11), got {text[:20]!r}")
    return text


def pick_format(requested: str | None, accept: str | None) -> str:
    """``format=`` when given; else HTML for a browser (Accept names text/html), JSON when asked for,
    else CSV. Raises StatementError for an unknown format."""
    if requested:
        if requested not in FORMATS:
            raise StatementError(f"format: expected one of {', '.join(FORMATS)}, got {requested[:20]!r}")
        return requested
    accept = (accept or "").lower()
    if "text/html" in accept:
        return "html"
    if "application/json" in accept:
        return "json"
    return "csv"


def totals_in_memory(months: SavedMonths, month: str) -> list[Total]:
    """What the running exporter holds of ``month``: each report's last reading (not closed; the month is
    the vendor's, else the UTC month it was fetched in) and its last closed month (closed)."""
    totals: dict[tuple[str, str], Total] = {}
    for operation, per_api in months.seen.items():
        for api, seen in per_api.items():
            if (seen.month or utc_month(seen.at)) == month:
                totals[operation, api] = Total(operation, api, month, seen.value, closed=False)
    for operation, per_api in months.closed.items():
        for api, closed in per_api.items():
            if closed.month == month:  # a closed month's final value wins over a late reading of it
                totals[operation, api] = Total(operation, api, month, closed.value, closed=True)
    return list(totals.values())


# ----- the statement -----------------------------------------------------------------------------------


def build(totals: Iterable[MonthTotalLike], terms: Terms, month: str, group: str | None = None) -> Statement:
    """The statement of ``month`` from its totals (rows of other months are left out). Raises
    StatementError when ``group`` is not a label some operation has."""
    if group is not None and group not in terms.label_names:
        known = ", ".join(terms.label_names) or "none are configured"
        raise StatementError(f"group: {group[:40]!r} is not an operation label (labels: {known})")
    rank = {name: i for i, name in enumerate(terms.order)}
    lines: list[Line] = []
    for row in totals:
        if row.month != month:
            continue
        usage = to_decimal(row.value)
        price = terms.prices.get(row.operation, {}).get(row.api)
        billing_api = BILLING_APIS.get(row.api)
        lines.append(
            Line(
                operation=row.operation,
                api=row.api,
                labels=terms.labels.get(row.operation, {}),
                usage=usage,
                unit=billing_api.unit if billing_api is not None else "",
                unit_price=price,
                cost=EXACT.multiply(usage, price) if price is not None else None,
                closed=row.closed,
            )
        )
    apis = list(BILLING_APIS)

    def order(line: Line) -> tuple[object, ...]:
        by_operation = (rank.get(line.operation, len(rank)), line.operation)
        by_api = (apis.index(line.api) if line.api in apis else len(apis), line.api)
        if group is None:
            return (*by_operation, *by_api)
        value = line.labels.get(group)
        return (value is None, value or "", *by_operation, *by_api)

    lines.sort(key=order)
    subtotals: list[Subtotal] = []
    if group is not None:
        for line in lines:
            value = line.labels.get(group, NO_GROUP)
            if not subtotals or subtotals[-1].value != value:
                subtotals.append(Subtotal(value, Decimal(0), 0))
            last = subtotals[-1]
            subtotals[-1] = Subtotal(value, EXACT.add(last.cost, line.cost or 0), last.lines + 1)
    total = Decimal(0)
    for line in lines:
        total = EXACT.add(total, line.cost or 0)
    return Statement(month, terms.currency, terms.label_names, group, tuple(lines), tuple(subtotals), total)


def shown(money: Decimal, currency: str) -> Decimal:
    """Money as shown: rounded to the currency's minor unit (the one rounding step; see the docstring)."""
    return money.quantize(Decimal(1).scaleb(-MINOR_UNITS.get(currency.upper(), 2)), rounding=ROUNDING)


def plain(number: Decimal) -> str:
    """A decimal without exponent or trailing zeros: 1234.50 -> "1234.5", 1E+3 -> "1000"."""
    text = format(number.normalize(), "f")
    return "0" if text in ("-0", "") else text


# ----- renderers ---------------------------------------------------------------------------------------


def render(statement: Statement, fmt: str) -> str:
    if fmt == "csv":
        return render_csv(statement)
    if fmt == "json":
        return render_json(statement)
    if fmt == "html":
        return render_html(statement)
    raise StatementError(f"format: expected one of {', '.join(FORMATS)}, got {fmt[:20]!r}")


def _status(closed: bool) -> str:
    return "closed" if closed else "to date"


def render_csv(statement: Statement) -> str:
    """One header row, then ``line`` rows, a ``subtotal`` row after each group, a ``total`` row. Columns:
    row, month, status, the label names, operation, api, unit, usage, unit_price, cost, currency."""
    s = statement
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")

    def row(kind: str, status: str, labels: dict[str, str], rest: list[str]) -> None:
        writer.writerow([kind, s.month, status, *(labels.get(name, "") for name in s.label_names), *rest])

    writer.writerow(["row", "month", "status", *s.label_names, *CSV_COLUMNS])
    subtotals = iter(s.subtotals)
    for index, line in enumerate(s.lines):
        price = plain(line.unit_price) if line.unit_price is not None else ""
        cost = str(shown(line.cost, s.currency)) if line.cost is not None else ""
        rest = [line.operation, line.api, line.unit, plain(line.usage), price, cost, s.currency]
        row("line", _status(line.closed), line.labels, rest)
        if _ends_group(s, index):
            sub = next(subtotals)
            group = {s.group: sub.value} if s.group is not None else {}
            row("subtotal", "", group, ["", "", "", "", "", str(shown(sub.cost, s.currency)), s.currency])
    row("total", _status(s.closed), {}, ["", "", "", "", "", str(shown(s.total, s.currency)), s.currency])
    return out.getvalue()


def _ends_group(s: Statement, index: int) -> bool:
    """Whether line ``index`` is the last of its group (when grouped)."""
    if s.group is None:
        return False
    last = index + 1 == len(s.lines)
    return last or s.lines[index + 1].labels.get(s.group) != s.lines[index].labels.get(s.group)


_MONEY_KEYS = ("cost", "cost_exact")


def _money(amount: Decimal, currency: str) -> dict[str, str]:
    return {"cost": str(shown(amount, currency)), "cost_exact": plain(amount)}


def render_json(statement: Statement) -> str:
    """Decimals as strings (exact); ``cost`` rounded as shown, ``cost_exact`` as computed."""
    s = statement
    lines = [
        {
            "operation": line.operation,
            "api": line.api,
            "labels": line.labels,
            "unit": line.unit,
            "usage": plain(line.usage),
            "unit_price": plain(line.unit_price) if line.unit_price is not None else None,
            **(_money(line.cost, s.currency) if line.cost is not None else dict.fromkeys(_MONEY_KEYS)),
            "currency": s.currency,
            "status": _status(line.closed),
        }
        for line in s.lines
    ]
    document = {
        "month": s.month,
        "status": _status(s.closed),
        "currency": s.currency,
        "rounding": f"{ROUNDING} to {MINOR_UNITS.get(s.currency, 2)} decimal(s), only when shown",
        "labels": list(s.label_names),
        "group": s.group,
        "lines": lines,
        "subtotals": [
            {"group": s.group, "value": sub.value, "lines": sub.lines, **_money(sub.cost, s.currency)}
            for sub in s.subtotals
        ],
        "total": {**_money(s.total, s.currency), "currency": s.currency},
    }
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;font-size:14px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f0f0f0}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.subtotal td{background:#eef3fb;font-weight:bold}
tr.total td{background:#dde6f5;font-weight:bold;border-top:2px solid #555}
.open{color:#8a5a00}
form{margin:1em 0}
"""


def _number(number: Decimal) -> str:
    return f"{number.normalize():,f}"


def render_html(statement: Statement) -> str:
    s, e = statement, html.escape
    cur = e(s.currency)
    head = "".join(f"<th>{e(name)}</th>" for name in s.label_names)
    columns = 7 + len(s.label_names)
    rows: list[str] = []
    subtotals = iter(s.subtotals)
    for index, line in enumerate(s.lines):
        labels = "".join(f"<td>{e(line.labels.get(name, ''))}</td>" for name in s.label_names)
        price = _number(line.unit_price) if line.unit_price is not None else "-"
        cost = f"{shown(line.cost, s.currency):,}" if line.cost is not None else "-"
        status = "" if line.closed else ' <small class="open">(to date)</small>'
        rows.append(
            f"<tr>{labels}<td>{e(line.operation)}</td><td>{e(line.api)}{status}</td><td>{e(line.unit)}</td>"
            f'<td class="num">{_number(line.usage)}</td><td class="num">{price}</td>'
            f'<td class="num">{cost}</td><td>{cur}</td></tr>'
        )
        if _ends_group(s, index):
            sub = next(subtotals)
            rows.append(
                f'<tr class="subtotal"><td colspan="{columns - 2}">Subtotal {e(s.group or "")} = '
                f'{e(sub.value)} ({sub.lines} line(s))</td><td class="num">{shown(sub.cost, s.currency):,}'
                f"</td><td>{cur}</td></tr>"
            )
    rows.append(
        f'<tr class="total"><td colspan="{columns - 2}">Total</td>'
        f'<td class="num">{shown(s.total, s.currency):,}</td><td>{cur}</td></tr>'
    )
    status = (
        "closed: every value is the month's final figure"
        if s.closed
        else '<span class="open">to date: the month is not closed, values are the latest fetched</span>'
    )
    group_options = "".join(
        f'<option value="{e(name)}"{" selected" if name == s.group else ""}>{e(name)}</option>'
        for name in s.label_names
    )
    query = f"month={e(s.month)}" + (f"&amp;group={e(s.group)}" if s.group else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>wolkvox statement {e(s.month)}</title>
<style>{_STYLE}</style></head>
<body>
<h1>Statement {e(s.month)}</h1>
<p>{status}. Costs are usage &times; unit price, summed exactly and rounded to the currency's minor unit
(half up) only where shown. <a href="/">Back to the exporter</a></p>
<form method="get" action="statement">
<label>Month <input name="month" value="{e(s.month)}" pattern="[0-9]{{4}}-[0-9]{{2}}" size="8"></label>
<label>Group by <select name="group"><option value="">(no grouping)</option>{group_options}</select></label>
<button type="submit">Show</button>
Download: <a href="statement?{query}&amp;format=csv">CSV</a> &middot;
<a href="statement?{query}&amp;format=json">JSON</a>
</form>
<table>
<thead><tr>{head}<th>Operation</th><th>Service (api)</th><th>Unit</th><th>Usage</th><th>Unit price</th>
<th>Cost</th><th>Currency</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table>
</body></html>
"""
