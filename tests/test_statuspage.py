"""The status page (exporter/statuspage.py), rendered from report rows: no server needed."""

from __future__ import annotations

from exporter.monthclose import Seen
from exporter.statuspage import render
from exporter.store import ReportRow

NOW = 1_796_256_000.0  # 2026-12-03 00:00 UTC


def report(api: str, last_month: Seen | None) -> ReportRow:
    return ReportRow(
        operation="bogota",
        api=api,
        value=12.0,
        last_success=NOW - 60,
        failing=False,
        last_failure=None,
        next_due=NOW + 240,
        interval=300.0,
        last_month=last_month,
    )


def test_the_last_month_column_shows_the_closing_value_its_month_and_when_it_was_fetched() -> None:
    rows = [
        report("stereo_rec", Seen(43_210.5, 1_796_082_900.0, "2026-11")),
        report("ivr_minutes", None),
    ]
    page = render(rows, telemetry_path="/metrics", ready=True, now=NOW)
    assert "<th>Last month</th>" in page
    assert "<td>43,210.50<br><small>2026-11, fetched 2026-11-30 23:55 UTC</small></td>" in page
    ivr = page[page.index("<td>ivr_minutes</td>") :]
    assert ivr.split("</tr>", 1)[0].count("<td>-</td>") == 2  # no last month, no failure
    # Every row has as many cells as the header.
    header = page[page.index("<thead>") : page.index("</thead>")]
    for row in page.split('<tr class="ok">')[1:]:
        assert row.split("</tr>", 1)[0].count("<td") == header.count("<th>")
