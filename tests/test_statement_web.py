"""/statement on the running exporter (formats, errors, auth, a real browser) and the `statement`
subcommand (over a stand-in for the state store: the real one comes with exporter/statestore.py). Set
WOLKVOX_SCREENSHOTS=DIR to keep the statement's screenshot."""

from __future__ import annotations

import calendar
import csv
import io
import json
import os
import re
import time
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import requests
import yaml
from harness import Exporter, Simulator, run_cli, value
from test_statuspage import chromium

from exporter import cli
from exporter.config import ConfigError, load_config
from exporter.monthclose import Seen, utc_month
from exporter.statestore import MonthTotal, StateStore

PRICES = {"stereo_rec": 0.004, "ivr_minutes": 0.0125}
OPERATIONS = {
    "bogota": ("wv9901", {"client": "acme", "team": "sales"}),
    "lima": ("wv0042", {"client": "acme", "team": "support"}),
    "quito": ("wv0077", {"client": "globex"}),
}
APIS = ["stereo_rec", "ivr_minutes"]


def config(simulator: Simulator) -> dict[str, Any]:
    return {
        "refresh_interval": "1h",
        "max_age": "2h",
        "currency": "USD",
        "prices": PRICES,
        "labels": {"team": "ops"},
        "operations": [
            {
                "name": name,
                "server": server,
                "token": f"tok-{name}",
                "base_url": simulator.url,
                "apis": APIS,
                "labels": labels,
            }
            for name, (server, labels) in OPERATIONS.items()
        ],
    }


def fetched(exporter: Exporter) -> dict[tuple[str, str], float]:
    samples = exporter.wait_for(
        lambda s: all(
            value(s, "wolkvox_billing_usage", operation=op, api=api) is not None
            for op in OPERATIONS
            for api in APIS
        ),
        timeout=20,
        what="every report fetched",
    )
    return {
        (op, api): value(samples, "wolkvox_billing_usage", operation=op, api=api)  # type: ignore[misc]
        for op in OPERATIONS
        for api in APIS
    }


def cost(usage: float, api: str) -> Decimal:
    return Decimal(repr(usage)) * Decimal(repr(PRICES[api]))


def test_the_statement_of_this_month_in_every_format(simulator: Simulator, run_exporter) -> None:
    exporter = run_exporter(config(simulator))
    usage = fetched(exporter)
    month = utc_month(time.time())

    response = exporter.get("/statement?group=client&format=csv")
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    lines = [r for r in rows if r["row"] == "line"]
    assert {(r["operation"], r["api"]): Decimal(r["usage"]) for r in lines} == {
        key: Decimal(repr(v)) for key, v in usage.items()
    }
    assert all(r["month"] == month and r["status"] == "to date" for r in lines)
    assert {r["operation"]: r["team"] for r in lines} == {
        "bogota": "sales",
        "lima": "support",
        "quito": "ops",
    }
    acme = sum(cost(v, api) for (op, api), v in usage.items() if op != "quito")
    globex = sum(cost(v, api) for (op, api), v in usage.items() if op == "quito")
    subtotals = {r["client"]: Decimal(r["cost"]) for r in rows if r["row"] == "subtotal"}

    def shown(amount: Decimal) -> Decimal:  # the documented rule: half up, to the cent (quantize's own
        return amount.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)  # default is half even)

    assert subtotals == {"acme": shown(acme), "globex": shown(globex)}
    (total,) = [r for r in rows if r["row"] == "total"]
    assert Decimal(total["cost"]) == shown(acme + globex)

    document = exporter.get(f"/statement?month={month}&format=json").json()
    assert document["group"] is None and document["subtotals"] == []
    assert Decimal(document["total"]["cost_exact"]) == acme + globex

    # A browser gets HTML by default; the landing page links the statement.
    page = exporter.get("/statement", headers={"Accept": "text/html,*/*;q=0.8"})
    assert page.headers["Content-Type"].startswith("text/html") and "<script" not in page.text
    assert "Statement " + month in page.text
    assert 'href="/statement"' in exporter.get("/").text


@pytest.mark.parametrize(
    ("query", "status", "line"),
    [
        ("?month=2026-13", 400, "month: expected YYYY-MM (e.g. 2026-11), got '2026-13'"),
        ("?format=xlsx", 400, "format: expected one of csv, json, html, got 'xlsx'"),
        ("?group=region", 400, "group: 'region' is not an operation label (labels: client, team)"),
        ("?month=2020-01", 404, "no data for month 2020-01"),
        ("?month=2020-01&format=json", 404, "no data for month 2020-01"),
    ],
)
def test_bad_requests_and_months_without_data_get_one_line(
    simulator: Simulator, run_exporter, query: str, status: int, line: str
) -> None:
    exporter = run_exporter(config(simulator))
    response = exporter.get(f"/statement{query}")
    assert response.status_code == status
    assert response.text == line + "\n"


def test_the_statement_is_behind_the_same_basic_auth_as_metrics(
    simulator: Simulator, run_exporter, tmp_path: Path
) -> None:
    hashed = bcrypt.hashpw(b"s3cret-pass", bcrypt.gensalt(rounds=4)).decode()
    web = tmp_path / "web.yml"
    web.write_text(yaml.safe_dump({"basic_auth_users": {"finance": hashed}}), encoding="utf-8")
    exporter = run_exporter(config(simulator), web_config_file=str(web))
    assert exporter.get("/statement").status_code == 401
    assert exporter.get("/metrics").status_code == 401
    fetched_once = requests.get(f"{exporter.url}/metrics", auth=("finance", "s3cret-pass"), timeout=5)
    assert fetched_once.status_code == 200
    response = requests.get(
        f"{exporter.url}/statement?month=2020-01", auth=("finance", "s3cret-pass"), timeout=5
    )
    assert response.status_code == 404  # authenticated, and no data that month


def test_a_person_reads_the_statement_in_a_browser(
    simulator: Simulator, run_exporter, tmp_path: Path
) -> None:
    exporter = run_exporter(config(simulator))
    usage = fetched(exporter)
    url = f"{exporter.url}/statement?group=client"
    dom = chromium("--dump-dom", url, profile=tmp_path / "profile-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom.stdout))
    expected = f"{Decimal(repr(usage['bogota', 'stereo_rec'])).normalize():,f}"
    assert re.search(rf"acme sales bogota stereo_rec \(to date\) minutes {expected} ", text)
    assert "Subtotal client = acme (4 line(s))" in text and "Subtotal client = globex (2 line(s))" in text
    assert re.search(r"Total [\d,]+\.\d\d USD", text), text

    # Kept in $WOLKVOX_SCREENSHOTS when set, to look at (as tests/test_statuspage.py does).
    directory = Path(os.environ.get("WOLKVOX_SCREENSHOTS") or tmp_path)
    directory.mkdir(parents=True, exist_ok=True)
    picture = directory / "statement.png"
    shot = chromium(f"--screenshot={picture}", "--window-size=1300,600", url, profile=tmp_path / "profile")
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 10_000


# ----- the subcommand ---------------------------------------------------------------------------------


class RealStore(dict[str, list[MonthTotal]]):
    """``store[path] = rows`` writes the rows' closed months into a real state store at ``path``, as a
    running exporter would have when each month closed."""

    def __setitem__(self, path: str, rows: list[MonthTotal]) -> None:
        store = StateStore(path)
        store.load()
        for row in rows:
            year, month = map(int, row.month.split("-"))
            at = calendar.timegm((year, month, 28, 12, 0, 0))  # fetched late in that month
            store.put_month(row.operation, row.api, Seen(row.value, at, row.month))
        store.stop()
        super().__setitem__(path, rows)


@pytest.fixture
def state_store() -> RealStore:
    return RealStore()


def write_config(tmp_path: Path, state_file: bool = True) -> Path:
    """One operation whose token comes from a variable that is not set, and one with a token file that is
    not there: a statement needs neither (finance need not hold the tokens)."""
    path = tmp_path / "config.yml"
    bogota = {
        "name": "bogota",
        "server": "wv1",
        "token": "${WOLKVOX_TOKEN_NOT_HERE}",
        "labels": {"client": "acme"},
    }
    document: dict[str, Any] = {
        "prices": {"stereo_rec": 0.004},
        "operations": [bogota, {"name": "lima", "server": "wv2", "token_file": "no-such.token"}],
    }
    if state_file:
        document["state_file"] = "state.db"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


def test_the_subcommand_prints_what_the_web_app_would(
    state_store: RealStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path)
    with pytest.raises(ConfigError, match="WOLKVOX_TOKEN_NOT_HERE is not set"):
        load_config(path, {})  # the exporter itself needs the tokens
    state_store[str(tmp_path / "state.db")] = [MonthTotal("bogota", "stereo_rec", "2026-11", 1234.5, True)]
    args = ["statement", "--config.file", str(path), "--month", "2026-11"]
    assert cli.main([*args, "--format", "json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["total"] == {"cost": "4.94", "cost_exact": "4.938", "currency": "USD"}
    assert document["lines"][0]["labels"] == {"client": "acme"} and document["status"] == "closed"
    assert cli.main([*args, "--group", "client"]) == 0  # csv by default
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["row"], r["cost"]) for r in rows] == [
        ("line", "4.94"),
        ("subtotal", "4.94"),
        ("total", "4.94"),
    ]


@pytest.mark.parametrize(
    ("extra", "state_file", "problem"),
    [
        (["--month", "2026-10"], True, "no data for month 2026-10 in "),
        (["--month", "2026-1"], True, "month: expected YYYY-MM"),
        (["--month", "2026-11", "--format", "pdf"], True, "format: expected one of csv, json, html"),
        (["--month", "2026-11", "--group", "team"], True, "group: 'team' is not an operation label"),
        (["--month", "2026-11"], False, "state_store is not set"),
    ],
)
def test_the_subcommand_fails_with_one_line(
    state_store: RealStore,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    state_file: bool,
    problem: str,
) -> None:
    path = write_config(tmp_path, state_file)
    state_store[str(tmp_path / "state.db")] = [MonthTotal("bogota", "stereo_rec", "2026-11", 1.0, True)]
    assert cli.main(["statement", "--config.file", str(path), *extra]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith("wolkvox-exporter statement: ") and problem in line


def test_the_subcommand_reports_a_store_error_in_one_line(
    state_store: RealStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path)
    assert cli.main(["statement", "--config.file", str(path), "--month", "2026-11"]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert (
        line
        == f"wolkvox-exporter statement: {tmp_path / 'state.db'}: no state store there (not a regular file)"
    )


def test_the_subcommand_from_the_command_line(tmp_path: Path) -> None:
    """The real entry point: a bad flag value is one line on stderr and exit status 1, no traceback."""
    path = write_config(tmp_path)
    done = run_cli("statement", "--config.file", str(path), "--month", "2026-11", "--format", "xml")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == "wolkvox-exporter statement: format: expected one of csv, json, html, got 'xml'\n"
