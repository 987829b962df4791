"""The landing page: which report is failing, since when, why, and what to do, like Prometheus' targets
page. Plain HTML, no JavaScript; every text from the config or upstream is escaped. Tokens never reach it:
failure details are redacted by the client, and the page runs them through the log redactor as well.

Every time is shown twice: relative ("3 min ago") for reading, absolute (UTC, ISO 8601) for a screenshot
pasted into a ticket. Each failure reason has a one-line hint that links to its section of the runbook
(``docs/runbook.md``, anchors ``#reason-<reason>`` and ``#config-reload``).
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable, Sequence

from exporter import __version__
from exporter.store import ReloadStatus, ReportRow

MAX_HEALTHY_ROWS = 1000  # failing rows are always all shown; a huge healthy tail is cut
# Where the hints link to; --web.runbook-url points them at a copy of your own (an intranet wiki...).
DEFAULT_RUNBOOK_URL = "https://github.com/wolkvox-exporter/wolkvox-exporter/blob/main/docs/runbook.md"

# What a person on call does first, per failure reason: one line each (the runbook has the rest).
HINTS: dict[str, str] = {
    "timeout": "wolkvox did not answer in time; usually passes by itself. If it lasts, check the network "
    "path to the server and wolkvox's status.",
    "connection": "The server could not be reached (DNS, refused, TLS): check the operation's server or "
    "base_url, the firewall and any proxy.",
    "http_status": "An HTTP error status (maintenance, backup, a proxy): usually passes; if it lasts, ask "
    "wolkvox support.",
    "api_error": "wolkvox answered an error (its message is above): too many requests at once on the token "
    "means another user of the same token.",
    "auth": "The token was refused: generate a new one in wolkvox Manager, put it in the config, reload.",
    "token_limit": "The token's daily request budget is spent: no new values until wolkvox's day ends. "
    "Look for other users of the token.",
    "unknown_api": "wolkvox does not know this api: fix its name in apis: (--config.check suggests one) "
    "and reload.",
    "invalid_response": "The answer was not wolkvox's JSON (an HTML error page, a proxy?): the detail above "
    "says what came.",
    "parse": "A value in the answer could not be read (the raw value is above and in the log): report it.",
}

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
.reload-failed{background:#fde8e8;border:1px solid #b00020;padding:6px 10px}
small,.hint{color:#555}
td.failure{max-width:34em}
code{font-size:13px}
time{white-space:nowrap}
"""


def plain_duration(seconds: float) -> str:
    """A duration in one plain unit: "69 s", "5 min", "7.5 min", "16 min", "1.5 h", "3 d"."""
    seconds = abs(seconds)
    if seconds < 120:
        return f"{round(seconds)} s"
    for size, unit, limit in ((60, "min", 120), (3600, "h", 48), (86_400, "d", None)):
        count = seconds / size
        if limit is None or count < limit:
            shown = f"{count:.1f}".removesuffix(".0") if count < 10 else f"{count:.0f}"
            return f"{shown} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


def iso_utc(when: float) -> str:
    """ISO 8601 in UTC, to the second: 2026-12-04T12:30:05Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def _at(when: float | None, now: float, *, empty: str = "-") -> str:
    """A past moment: relative, and absolute beneath it (already escaped HTML)."""
    if when is None:
        return empty
    ago = "just now" if now - when < 1 else f"{plain_duration(now - when)} ago"
    stamp = iso_utc(when)
    return f'{ago}<br><small><time datetime="{stamp}">{stamp}</time></small>'


def _in(when: float | None, now: float) -> str:
    if when is None:
        return "-"
    seconds = when - now
    if seconds < 1:
        return "now"
    stamp = iso_utc(when)
    return f'in {plain_duration(seconds)}<br><small><time datetime="{stamp}">{stamp}</time></small>'


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
    return (
        f"{_value(closed.value)}<br><small>{html.escape(closed.month)}, fetched {iso_utc(closed.at)}</small>"
    )


def _hint(reason: str, runbook_url: str) -> str:
    text = HINTS.get(reason)
    if text is None:
        return ""
    link = html.escape(f"{runbook_url}#reason-{reason}")
    return f'<br><span class="hint">{html.escape(text)} <a href="{link}">Runbook</a></span>'


def _row(row: ReportRow, now: float, scrub: Callable[[str], str], runbook_url: str) -> str:
    e = html.escape
    if row.failing:
        state, css = "FAILING", "state-failing"
    elif row.last_success is None:
        state, css = "waiting", "state-waiting"
    else:
        state, css = "OK", "state-ok"
    if row.last_failure is not None:
        reason, at, detail = row.last_failure
        ago = "just now" if now - at < 1 else f"{plain_duration(now - at)} ago"
        failure = f"<code>{e(reason)}</code> {ago}, {iso_utc(at)}<br><small>{e(scrub(detail))}</small>"
        if row.failing:
            failure += _hint(reason, runbook_url)
    else:
        failure = "-"
    since = _at(row.failing_since, now) if row.failing else "-"
    pace = f"every {plain_duration(row.interval)}" if row.interval is not None else "-"
    return (
        f'<tr class="{"failing" if row.failing else "ok"}">'
        f"<td>{e(row.operation)}</td><td>{e(row.api)}</td>"
        f'<td class="{css}">{state}</td>'
        f"<td>{_value(row.value)}</td><td>{_last_month(row)}</td>"
        f"<td>{_at(row.last_success, now, empty='never')}</td>"
        f"<td>{since}</td>"
        f'<td class="failure">{failure}</td><td>{_in(row.next_due, now)}</td><td>{pace}</td></tr>'
    )


def _reload(status: ReloadStatus | None, now: float, scrub: Callable[[str], str], runbook_url: str) -> str:
    """The configuration in force and the last reload's result."""
    if status is None:
        return ""
    loaded = _at(status.loaded_at, now).replace("<br>", " ")
    if status.at is None:
        return f"<p>Configuration loaded {loaded}; no reload since the start.</p>"
    when = _at(status.at, now).replace("<br>", " ")
    if status.ok:
        return f'<p>Last configuration reload <span class="state-ok">succeeded</span> {when}.</p>'
    link = html.escape(f"{runbook_url}#config-reload")
    return (
        f'<p class="reload-failed"><span class="state-failing">Last configuration reload FAILED</span> '
        f"{when}: <code>{html.escape(scrub(status.error))}</code><br>"
        f"Still running the configuration loaded {loaded}. Fix the file (<code>--config.check</code> "
        f'lists every problem), then reload. <a href="{link}">Runbook</a></p>'
    )


def render(
    rows: Sequence[ReportRow],
    *,
    telemetry_path: str,
    ready: bool,
    scrub: Callable[[str], str] = lambda text: text,
    now: float | None = None,
    reload: ReloadStatus | None = None,
    runbook_url: str = DEFAULT_RUNBOOK_URL,
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
    body = "\n".join(_row(row, now, scrub, runbook_url) for row in shown)
    if failing:
        health = f"{len(failing)} failing report(s) in {len(failing_ops)} operation(s)"
        health = f'<span class="state-failing">{health}</span>'
    else:
        health = '<span class="state-ok">no failing report</span>'
    readiness = "yes" if ready else "not yet (not every operation has been tried)"
    summary = f"{len(operations)} operation(s), {len(rows)} report(s); {health}; ready: {readiness}."
    runbook = html.escape(runbook_url)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>wolkvox exporter</title><style>{_STYLE}</style></head>
<body>
<h1>wolkvox exporter</h1>
<p>Prometheus exporter for wolkvox billing usage, version {html.escape(__version__)}.
Values are cached and refreshed in the background: a scrape never calls the wolkvox API.
Page rendered {iso_utc(now)} (times in UTC).</p>
<p class="summary">{summary}</p>
{_reload(reload, now, scrub, runbook_url)}
<p><a href="{path}">{path}</a> (metrics) &middot; <a href="/-/healthy">/-/healthy</a> &middot;
<a href="/-/ready">/-/ready</a> &middot; POST /-/reload re-reads the configuration &middot;
<a href="/statement">/statement</a> (usage and cost of the month, by operation and label) &middot;
<a href="{runbook}">Runbook</a></p>
<h2>Reports</h2>
<table>
<thead><tr><th>Operation</th><th>Service (api)</th><th>State</th><th>Last value</th><th>Last month</th>
<th>Last success</th><th>Failing since</th>
<th>Last failure, and what to do</th><th>Next refresh</th><th>Pace in use</th></tr></thead>
<tbody>
{body}
</tbody></table>
{cut}
</body></html>
"""
