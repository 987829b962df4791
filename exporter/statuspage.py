"""The landing page: which report is failing and why, like Prometheus' targets page. Plain HTML, no
JavaScript; every text from the config or upstream is escaped. Tokens never reach it: failure details
are redacted by the client, and the page runs them through the log redactor as well."""

from __future__ import annotations

import html
import time
from collections.abc import Callable, Sequence

from exporter import __version__
from exporter.config import format_duration
from exporter.store import ReportRow

MAX_HEALTHY_ROWS = 1000  # failing rows are always all shown; a huge healthy tail is cut

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;font-size:14px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f0f0f0}
tr.failing td{background:#fde8e8}
.state-ok{color:#176f2c;font-weight:bold}
.state-failing{color:#b00020;font-weight:bold}
.state-waiting{color:#666}
.summary{font-size:16px}
code{font-size:13px}
"""


def _ago(when: float | None, now: float) -> str:
    if when is None:
        return "never"
    return f"{format_duration(max(1.0, round(now - when)))} ago"


def _in(when: float | None, now: float) -> str:
    if when is None:
        return "-"
    seconds = when - now
    return "now" if seconds < 1 else f"in {format_duration(round(seconds))}"


def _value(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value == int(value) else f"{value:,.2f}"


def _last_month(row: ReportRow) -> str:
    """The closing value of the report's last closed month, the month, and when that value was fetched
    (a value fetched days before the month ended is not the month's final figure)."""
    closed = row.last_month
    if closed is None or closed.month is None:
        return "-"
    seen = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(closed.at))
    return f"{_value(closed.value)}<br><small>{html.escape(closed.month)}, fetched {seen}</small>"


def _row(row: ReportRow, now: float, scrub: Callable[[str], str]) -> str:
    e = html.escape
    if row.failing:
        state, css = "FAILING", "state-failing"
    elif row.last_success is None:
        state, css = "waiting", "state-waiting"
    else:
        state, css = "OK", "state-ok"
    if row.last_failure is not None:
        reason, at, detail = row.last_failure
        failure = f"<code>{e(reason)}</code> {e(_ago(at, now))}<br><small>{e(scrub(detail))}</small>"
    else:
        failure = "-"
    interval = format_duration(row.interval) if row.interval is not None else "-"
    return (
        f'<tr class="{"failing" if row.failing else "ok"}">'
        f"<td>{e(row.operation)}</td><td>{e(row.api)}</td>"
        f'<td class="{css}">{state}</td>'
        f"<td>{_value(row.value)}</td><td>{_last_month(row)}</td><td>{e(_ago(row.last_success, now))}</td>"
        f"<td>{failure}</td><td>{e(_in(row.next_due, now))}</td><td>every {e(interval)}</td></tr>"
    )


def render(
    rows: Sequence[ReportRow],
    *,
    telemetry_path: str,
    ready: bool,
    scrub: Callable[[str], str] = lambda text: text,
    now: float | None = None,
) -> str:
    """The whole page. Failing reports first, then the rest in configuration order."""
    now = time.time() if now is None else now
    failing = [row for row in rows if row.failing]
    healthy = [row for row in rows if not row.failing]
    shown = failing + healthy[:MAX_HEALTHY_ROWS]
    operations = {row.operation for row in rows}
    failing_ops = {row.operation for row in failing}
    path = html.escape(telemetry_path)
    cut = (
        f"<p>{len(healthy) - MAX_HEALTHY_ROWS} more healthy report(s) are not listed; "
        f'<a href="{path}">{path}</a> has them all.</p>'
        if len(healthy) > MAX_HEALTHY_ROWS
        else ""
    )
    body = "\n".join(_row(row, now, scrub) for row in shown)
    if failing:
        health = f"{len(failing)} failing report(s) in {len(failing_ops)} operation(s)"
        health = f'<span class="state-failing">{health}</span>'
    else:
        health = '<span class="state-ok">no failing report</span>'
    readiness = "yes" if ready else "not yet (not every operation has been tried)"
    summary = f"{len(operations)} operation(s), {len(rows)} report(s); {health}; ready: {readiness}."
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>wolkvox exporter</title><style>{_STYLE}</style></head>
<body>
<h1>wolkvox exporter</h1>
<p>Prometheus exporter for wolkvox billing usage, version {html.escape(__version__)}.
Values are cached and refreshed in the background: a scrape never calls the wolkvox API.</p>
<p class="summary">{summary}</p>
<p><a href="{path}">{path}</a> (metrics) &middot; <a href="/-/healthy">/-/healthy</a> &middot;
<a href="/-/ready">/-/ready</a> &middot; POST /-/reload re-reads the configuration &middot;
<a href="/statement">/statement</a> (usage and cost of the month, by operation and label)</p>
<h2>Reports</h2>
<table>
<thead><tr><th>Operation</th><th>Service (api)</th><th>State</th><th>Last value</th><th>Last month</th>
<th>Last success</th>
<th>Last failure</th><th>Next refresh</th><th>Pace in use</th></tr></thead>
<tbody>
{body}
</tbody></table>
{cut}
</body></html>
"""
