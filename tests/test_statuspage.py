"""The landing page answers "what is wrong?": per report its state, value, last success, last failure and
pace; escaped, no token; seen in a real browser (headless Chromium) as a person would see it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from harness import Exporter, Simulator, require, value

from exporter.model import ReportStatus
from exporter.monthclose import Seen
from exporter.statuspage import render
from exporter.store import OperationInfo, ReportRow, Store

NOW = 1_800_000_000.0
CANARY = "CANARY-status-7f3e9a1b2c"


def row(operation: str, api: str = "stereo_rec", **fields: object) -> ReportRow:
    base: dict = {
        "operation": operation,
        "api": api,
        "value": None,
        "last_success": None,
        "failing": False,
        "last_failure": None,
        "next_due": None,
        "interval": None,
    }
    return ReportRow(**{**base, **fields})


def test_failing_reports_come_first_with_reason_age_and_message() -> None:
    rows = [
        row("bogota", value=1234.5, last_success=NOW - 65, next_due=NOW + 235, interval=300.0),
        row(
            "lima",
            failing=True,
            last_failure=("auth", NOW - 10, "wolkvox answered code 403: PLEASE VALIDATE TOKEN"),
            next_due=NOW + 20,
            interval=300.0,
        ),
    ]
    page = render(rows, telemetry_path="/metrics", ready=True, now=NOW)
    assert page.index("lima") < page.index("bogota")
    assert "1 failing report(s) in 1 operation(s)" in page
    assert "<code>auth</code> 10s ago" in page and "PLEASE VALIDATE TOKEN" in page
    assert "1,234.50" in page and "1m5s ago" in page and "in 3m55s" in page and "every 5m" in page


def test_everything_from_config_or_upstream_is_escaped_and_scrubbed() -> None:
    rows = [
        row(
            "<script>alert(1)</script>",
            failing=True,
            last_failure=("api_error", NOW, f"<img src=x onerror=alert(1)> token {CANARY}"),
        )
    ]
    page = render(
        rows, telemetry_path="/m<x>", ready=False, now=NOW, scrub=lambda t: t.replace(CANARY, "***")
    )
    assert "<script>" not in page and "<img" not in page and "/m<x>" not in page
    assert "&lt;script&gt;" in page and CANARY not in page
    assert "not yet" in page


def test_the_store_gives_one_row_per_report_with_its_pace() -> None:
    store = Store(
        [OperationInfo("a", apis=("stereo_rec", "ivr_calls"))],
        max_age=3600,
        wall=lambda: NOW,
        monotonic=lambda: NOW,
    )
    store.set_pace({("a", "ivr_calls"): ReportStatus(interval=600.0, next_due=NOW + 60, failures=0)})
    rows = store.report_rows()
    assert [(r.operation, r.api) for r in rows] == [("a", "stereo_rec"), ("a", "ivr_calls")]
    assert rows[1].interval == 600.0 and rows[1].next_due == NOW + 60 and rows[0].interval is None


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    binary = require("chromium", "chromium")
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
    ]
    return subprocess.run([binary, *flags, *args], capture_output=True, text=True, timeout=120)


def test_a_person_sees_the_failing_and_the_healthy_operation_in_a_browser(
    simulator: Simulator, run_exporter, tmp_path: Path
) -> None:
    simulator.fault("invalid_token", token=CANARY)
    config = {
        "refresh_interval": "5m",
        "operations": [
            {"name": "bogota", "server": "wv9901", "token": "tok-healthy", "base_url": simulator.url},
            {"name": "lima", "server": "wv0042", "token": CANARY, "base_url": simulator.url},
        ],
    }
    exporter: Exporter = run_exporter(config)
    exporter.wait_for(
        lambda s: (
            value(s, "wolkvox_up", operation="bogota") == 1
            and value(s, "wolkvox_scrape_errors_total", operation="lima", reason="auth") == 1
        ),
        what="one healthy and one failing operation",
    )
    dom = chromium("--dump-dom", f"{exporter.url}/", profile=tmp_path / "profile-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    text = re.sub(r"<[^>]+>", " ", dom.stdout)  # what is on screen: the text, not the markup
    assert re.search(r"lima\s+stereo_rec\s+FAILING", text), text
    assert re.search(r"bogota\s+stereo_rec\s+OK", text), text
    assert "auth" in text and "PLEASE VALIDATE TOKEN" in text
    assert CANARY not in dom.stdout and "tok-healthy" not in dom.stdout

    screenshot = tmp_path / "status.png"
    shot = chromium(
        f"--screenshot={screenshot}",
        "--window-size=1400,500",
        f"{exporter.url}/",
        profile=tmp_path / "profile",
    )
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 10_000


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
