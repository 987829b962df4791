"""The landing page answers "what is wrong, since when, what to do?": per report its state, value, last
success, failing since, last failure with a hint that links to the runbook, and pace, every time both
relative and absolute (UTC, ISO 8601); the last reload's result; escaped, no token; seen in a real browser
(headless Chromium) as a person would see it. Set WOLKVOX_SCREENSHOTS=DIR to keep the screenshots."""

from __future__ import annotations

import html
import os
import re
import subprocess
from pathlib import Path

import pytest
import requests
from harness import Exporter, Simulator, require, value

from exporter.model import REASONS, FetchResult, Reading, ReportStatus, TokenInfo
from exporter.monthclose import Seen
from exporter.statuspage import DEFAULT_RUNBOOK_URL, HINTS, plain_duration, render
from exporter.store import OperationInfo, ReloadStatus, ReportRow, Store

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
    assert "<code>auth</code> 10 s ago, 2027-01-15T07:59:50Z" in page and "PLEASE VALIDATE TOKEN" in page
    assert "1,234.50" in page and "65 s ago" in page and "in 3.9 min" in page and "every 5 min" in page
    # Beside every relative time, the absolute one (NOW is 2027-01-15T08:00:00Z).
    assert '<time datetime="2027-01-15T07:58:55Z">' in page  # bogota's last success
    assert '<time datetime="2027-01-15T08:03:55Z">' in page  # its next refresh
    assert "Page rendered 2027-01-15T08:00:00Z" in page


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.4, "0 s"),
        (69.175, "69 s"),
        (119, "119 s"),
        (120, "2 min"),
        (300, "5 min"),
        (450, "7.5 min"),
        (978, "16 min"),
        (7199, "120 min"),
        (7200, "2 h"),
        (5400 * 2, "3 h"),
        (36 * 3600, "36 h"),
        (48 * 3600, "2 d"),
        (86_400 * 3.5, "3.5 d"),
        (86_400 * 40, "40 d"),
    ],
)
def test_durations_read_in_one_plain_unit(seconds: float, text: str) -> None:
    assert plain_duration(seconds) == text


def test_a_failing_report_says_since_when_and_what_to_do_with_a_runbook_link() -> None:
    failing = row(
        "lima",
        failing=True,
        failing_since=NOW - 1800,
        last_failure=("token_limit", NOW - 60, "wolkvox answered code 403: TOKEN LIMIT EXCEEDED"),
    )
    recovered = row("bogota", last_success=NOW - 5, last_failure=("timeout", NOW - 400, "no answer in 60s"))
    page = render(
        [failing, recovered], telemetry_path="/metrics", ready=True, now=NOW, runbook_url="https://x/rb"
    )
    lima = page[page.index("<td>lima</td>") : page.index("<td>bogota</td>")]
    assert '30 min ago<br><small><time datetime="2027-01-15T07:30:00Z">' in lima  # failing since
    assert (
        html.escape(HINTS["token_limit"]) in lima
        and '<a href="https://x/rb#reason-token_limit">Runbook</a>' in lima
    )
    # A report that recovered shows its last failure, but neither "failing since" nor a hint.
    bogota = page[page.index("<td>bogota</td>") :]
    assert "<code>timeout</code>" in bogota and "Runbook</a>" not in bogota
    assert bogota.split("</tr>", 1)[0].count("<td>-</td>") >= 2  # no last month, not failing


def test_every_failure_reason_has_a_one_line_hint() -> None:
    assert set(HINTS) == set(REASONS)
    for reason in REASONS:
        page = render(
            [row("op", failing=True, failing_since=NOW, last_failure=(reason, NOW, "x"))],
            telemetry_path="/metrics",
            ready=True,
            now=NOW,
        )
        assert f'href="{DEFAULT_RUNBOOK_URL}#reason-{reason}"' in page
        assert "\n" not in HINTS[reason] and len(HINTS[reason]) < 140


def test_the_last_reload_is_shown_failed_with_its_error_or_succeeded() -> None:
    failed = ReloadStatus(
        ok=False,
        at=NOW - 100,
        error=f"c.yml: operations[0].colour: unknown key {CANARY}",
        loaded_at=NOW - 7200,
    )
    page = render(
        [],
        telemetry_path="/metrics",
        ready=True,
        now=NOW,
        reload=failed,
        scrub=lambda t: t.replace(CANARY, "***"),
    )
    assert "Last configuration reload FAILED</span> 100 s ago" in page
    assert "<code>c.yml: operations[0].colour: unknown key ***</code>" in page and CANARY not in page
    assert "Still running the configuration loaded 2 h ago" in page
    assert f'href="{DEFAULT_RUNBOOK_URL}#config-reload"' in page
    ok = render(
        [], telemetry_path="/m", ready=True, now=NOW, reload=ReloadStatus(True, NOW - 30, "", NOW - 30)
    )
    assert 'reload <span class="state-ok">succeeded</span> 30 s ago' in ok and "FAILED" not in ok
    start = render(
        [], telemetry_path="/m", ready=True, now=NOW, reload=ReloadStatus(True, None, "", NOW - 60)
    )
    assert "Configuration loaded 60 s ago" in start and "no reload since the start" in start


def test_the_store_knows_since_when_a_report_fails() -> None:
    store = Store([OperationInfo("a")], max_age=3600, wall=lambda: NOW)

    def fetch(at: float, reason: str | None) -> None:
        value = None if reason else Reading(1.0, 1)
        store.record(FetchResult("a", "stereo_rec", at, 0.1, value=value, reason=reason, detail="d"))

    fetch(NOW - 900, None)
    fetch(NOW - 600, "timeout")
    fetch(NOW - 300, "auth")
    assert store.report_rows()[0].failing_since == NOW - 600  # the first failure of the streak
    fetch(NOW - 100, None)
    assert store.report_rows()[0].failing_since is None
    fetch(NOW - 50, "auth")
    assert store.report_rows()[0].failing_since == NOW - 50
    store.set_reload_status(False, "bad file")
    assert store.reload_status() == ReloadStatus(ok=False, at=NOW, error="bad file", loaded_at=NOW)


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


def screenshot(url: str, name: str, tmp_path: Path) -> Path:
    """A PNG of the page as Chromium draws it; kept in $WOLKVOX_SCREENSHOTS when set (to look at)."""
    directory = Path(os.environ.get("WOLKVOX_SCREENSHOTS") or tmp_path)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"statuspage-{name}.png"
    shot = chromium(
        f"--screenshot={path}", "--window-size=1600,720", url, profile=tmp_path / f"profile-{name}"
    )
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    return path


def on_screen(url: str, tmp_path: Path) -> tuple[str, str]:
    """(the DOM as Chromium built it, its text as a person reads it)."""
    dom = chromium("--dump-dom", url, profile=tmp_path / "profile-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    return dom.stdout, " ".join(re.sub(r"<[^>]+>", " ", dom.stdout).split())


ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


def test_a_person_sees_a_healthy_exporter_in_a_browser(
    simulator: Simulator, run_exporter, tmp_path: Path
) -> None:
    config = {
        "refresh_interval": "5m",
        "operations": [
            {"name": name, "server": server, "token": f"tok-{name}", "base_url": simulator.url}
            for name, server in (("bogota", "wv9901"), ("lima", "wv0042"))
        ],
    }
    exporter: Exporter = run_exporter(config)
    exporter.wait_for(
        lambda s: (
            value(s, "wolkvox_up", operation="bogota") == 1 and value(s, "wolkvox_up", operation="lima") == 1
        ),
        what="two healthy operations",
    )
    dom, text = on_screen(f"{exporter.url}/", tmp_path)
    assert re.search(r"bogota stereo_rec OK [\d,.]+ - (just now|\d+ s ago) " + ISO + " - - ", text), text
    assert "no failing report" in text and "every 5 min" in text
    assert "no reload since the start" in text and "FAILED" not in text
    assert "tok-bogota" not in dom and "tok-lima" not in dom
    screenshot(f"{exporter.url}/", "healthy", tmp_path)


def test_a_person_sees_what_fails_since_when_and_what_to_do_in_a_browser(
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
    # A reload of a broken file: refused, the running configuration stays.
    exporter.config_path.write_text(f"operations:\n  - {{server: wv1, token: {CANARY}, colour: blue}}\n")
    assert requests.post(f"{exporter.url}/-/reload", timeout=30).status_code == 500

    dom, text = on_screen(f"{exporter.url}/", tmp_path)
    assert re.search(r"lima stereo_rec FAILING - - never (just now|\d+ s ago) " + ISO + " auth ", text), text
    assert re.search(r"bogota stereo_rec OK", text), text
    assert "PLEASE VALIDATE TOKEN" in text and HINTS["auth"] in text
    assert f'href="{DEFAULT_RUNBOOK_URL}#reason-auth"' in dom
    assert re.search(r"Last configuration reload FAILED (just now|\d+ s ago) " + ISO, text), text
    assert "operations[0].colour: unknown key" in text and "Still running the configuration loaded" in text
    assert CANARY not in dom and "tok-healthy" not in dom
    screenshot(f"{exporter.url}/", "failing", tmp_path)


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
    assert "<td>43,210.50<br><small>2026-11, fetched 2026-11-30T23:55:00Z</small></td>" in page
    ivr = page[page.index("<td>ivr_minutes</td>") :]
    assert ivr.split("</tr>", 1)[0].count("<td>-</td>") == 2  # no last month, not failing
    # Every row has as many cells as the header.
    header = page[page.index("<thead>") : page.index("</thead>")]
    for row in page.split('<tr class="ok">')[1:]:
        assert row.split("</tr>", 1)[0].count("<td") == header.count("<th>")


def test_a_token_refused_on_its_token_info_read_is_a_failing_row_of_its_own() -> None:
    """A token refused on its token_info read pauses its reports: the page says that the token fails,
    since when and what to do, on a row of its own and on each report (which keeps its last value)."""
    store = Store([OperationInfo("lima", apis=("stereo_rec", "ivr_calls"))], max_age=3600, wall=lambda: NOW)
    for api in ("stereo_rec", "ivr_calls"):
        store.record(FetchResult("lima", api, NOW - 900, 0.1, value=Reading(5.0, 1)))
    store.record(FetchResult("lima", "ivr_calls", NOW - 700, 0.1, reason="timeout"))
    for at in (NOW - 600, NOW - 60):
        store.record(
            FetchResult("lima", "token_info", at, 0.1, reason="auth", detail="PLEASE VALIDATE TOKEN")
        )
    rows = store.report_rows()
    assert [(r.api, r.failing, r.failing_since, r.value) for r in rows] == [
        ("stereo_rec", True, NOW - 600, 5.0),
        ("ivr_calls", True, NOW - 700, 5.0),  # failing since its own timeout
        ("token_info", True, NOW - 600, None),
    ]
    assert rows[0].last_failure == (
        "auth",
        NOW - 60,
        "PLEASE VALIDATE TOKEN (the token was refused on lima token_info)",
    )
    page = render(rows, telemetry_path="/metrics", ready=True, now=NOW)
    assert "3 failing report(s)" in page and "#reason-auth" in page
    store.record(FetchResult("lima", "token_info", NOW, 0.1, value=TokenInfo(1000, 12, 40)))
    # The token_info row goes; each report says how it is at its own next answer.
    assert [(r.api, r.failing) for r in store.report_rows()] == [("stereo_rec", True), ("ivr_calls", True)]
