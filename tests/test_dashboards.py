"""Grafana dashboards (grafana/dashboards/*.json) and provisioning (grafana/provisioning/).

Static checks; tests/test_prometheus_integration.py runs every panel query against a real Prometheus.
- the dashboards use a templated datasource and never a hard-coded datasource uid;
- the `operation` variable and every per-operation query filter on it;
- every panel has a unit and a description, panels do not overlap, ids are unique;
- the required views exist, and the last row holds the other billing services and costs (expanded):
  usage per service, cost per operation and in total, the expected invoice, forecast vs cost budget,
  the token's requests today vs its limit, the planned requests vs the daily limit;
- cost is shown in a generic number unit with the currency label next to it (currency is a label);
- the `api` variable filters every per-service query;
- every query is valid PromQL (promtool) and uses only recording rules that exist.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from tools import (
    REPO,
    RULES_FILE,
    dashboard_files,
    expand_grafana_vars,
    iter_panels,
    panel_targets,
    promtool,
)

DS_REF = {"type": "prometheus", "uid": "${datasource}"}
DATASOURCES_YML = REPO / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARDS_YML = REPO / "grafana" / "provisioning" / "dashboards" / "wolkvox.yml"
# Series that carry an `operation` label: every selector of them must filter on $operation.
OPERATION_SERIES = re.compile(r"(?<![\w:])((?:operation:|wolkvox_)[A-Za-z0-9_:]*)(\{[^}]*\})?")
NO_OPERATION_LABEL = {
    "wolkvox_exporter_build_info",
    "wolkvox_config_last_reload_successful",
    # Global facts of one exporter's configuration.
    "wolkvox_token_planned_requests_per_day",
    "wolkvox_token_daily_request_limit",
    "wolkvox_refresh_interval_seconds",
}
# Series with an `api` label: every selector of them must also filter on $api.
API_SERIES = re.compile(
    r"(?<![\w:])((?:operation_api:|wolkvox_billing_usage|wolkvox_billing_unit_price)[A-Za-z0-9_:]*)(\{[^}]*\})?"
)
BILLING_ROW = "Other billing services and costs"
RECORDED_NAME = re.compile(r"(?<![\w:])([a-z_]+:[a-z0-9_]+:[a-z0-9_]+)(?![\w:])")


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def expand(expr: str) -> str:
    """expand_grafana_vars, plus the `api` variable (tools.py does not know it)."""
    return expand_grafana_vars(expr.replace("$api", "stereo_rec|chat_licenses"), "bogota|cali")


def unit_of(panel: dict[str, Any]) -> str:
    return panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")


def billing_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """The panels below the billing row (top-level: the row is expanded)."""
    top = dashboard["panels"]
    (start,) = [i for i, p in enumerate(top) if p["type"] == "row" and p["title"] == BILLING_ROW]
    return top[start + 1 :]


def recorded_names() -> set[str]:
    rules = yaml.safe_load(RULES_FILE.read_text(encoding="utf-8"))
    return {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}


DASHBOARDS = dashboard_files()
per_dashboard = pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)


def test_the_overview_dashboard_exists() -> None:
    assert REPO / "grafana" / "dashboards" / "wolkvox-overview.json" in DASHBOARDS


@per_dashboard
def test_dashboard_basics(path: Path) -> None:
    dashboard = load(path)
    assert re.fullmatch(r"[a-z0-9-]{1,40}", dashboard["uid"])
    assert dashboard["title"]
    assert dashboard["schemaVersion"] >= 36
    assert dashboard.get("id") is None, "provisioned dashboards must not carry a database id"
    ids = [p["id"] for p in iter_panels(dashboard)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    uids = [load(p)["uid"] for p in DASHBOARDS]
    assert len(uids) == len(set(uids)), "two dashboards share a uid"


def _walk(node: Any, where: str = "") -> list[tuple[str, str, Any]]:
    """(path, key, value) for every key of every object in the JSON tree."""
    found: list[tuple[str, str, Any]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            found.append((where, key, value))
            found.extend(_walk(value, f"{where}.{key}"))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found.extend(_walk(value, f"{where}[{i}]"))
    return found


@per_dashboard
def test_no_hard_coded_datasource(path: Path) -> None:
    dashboard = load(path)
    for where, key, value in _walk(dashboard):
        if key == "datasource":
            assert value == DS_REF, f"{where}.datasource = {value!r}: use the ${{datasource}} variable"
        if key == "uid" and where:  # the dashboard's own uid sits at the top level
            assert value == "${datasource}", f"{where}.uid = {value!r}"
    # Every query-bearing panel and every target name the datasource explicitly.
    for panel in iter_panels(dashboard):
        if panel["type"] != "row":
            assert panel.get("datasource") == DS_REF, panel["title"]
        for target in panel.get("targets", []):
            assert target.get("datasource") == DS_REF, panel["title"]


@per_dashboard
def test_template_variables(path: Path) -> None:
    variables = {v["name"]: v for v in load(path)["templating"]["list"]}
    datasource = variables["datasource"]
    assert datasource["type"] == "datasource"
    assert datasource["query"] == "prometheus"
    operation = variables["operation"]
    assert operation["type"] == "query"
    assert operation["datasource"] == DS_REF
    query = operation["query"]
    query = query["query"] if isinstance(query, dict) else query
    assert query == "label_values(wolkvox_up, operation)"
    assert operation["multi"] is True
    assert operation["includeAll"] is True
    api = variables["api"]
    assert api["type"] == "query"
    assert api["datasource"] == DS_REF
    query = api["query"]
    query = query["query"] if isinstance(query, dict) else query
    assert query == 'label_values(wolkvox_billing_usage{operation=~"$operation"}, api)'
    assert api["multi"] is True
    assert api["includeAll"] is True
    assert list(variables) == ["datasource", "operation", "api"]  # api's query uses $operation


@per_dashboard
def test_every_panel_has_unit_and_description(path: Path) -> None:
    for panel in iter_panels(load(path)):
        if panel["type"] == "row":
            continue
        assert panel.get("description", "").strip(), f"{panel['title']}: no description"
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        assert unit.strip(), f"{panel['title']}: no unit"
        assert panel.get("targets"), f"{panel['title']}: no query"


@per_dashboard
def test_per_operation_queries_filter_on_the_operation_variable(path: Path) -> None:
    for panel, target in panel_targets(load(path)):
        for name, selector in OPERATION_SERIES.findall(target["expr"]):
            if name in NO_OPERATION_LABEL or name.startswith("wolkvox:"):
                continue
            assert 'operation=~"$operation"' in selector, f"{panel['title']}: {name}{selector}"


@per_dashboard
def test_per_service_queries_filter_on_the_api_variable(path: Path) -> None:
    found = 0
    for panel, target in panel_targets(load(path)):
        for name, selector in API_SERIES.findall(target["expr"]):
            assert 'api=~"$api"' in selector, f"{panel['title']}: {name}{selector}"
            found += 1
    if path.name == "wolkvox-overview.json":
        assert found


@per_dashboard
def test_required_views_exist(path: Path) -> None:
    if path.name != "wolkvox-overview.json":
        pytest.skip("requirements of the overview dashboard")
    panels = [p for p in iter_panels(load(path)) if p["type"] != "row"]
    exprs = [" ".join(t["expr"] for t in p["targets"]) for p in panels]

    def some_panel(*needles: str) -> bool:
        return any(all(n in e for n in needles) for e in exprs)

    assert some_panel("operation:wolkvox_stereo_rec_minutes:max")  # month-to-date per operation
    assert some_panel("operation:wolkvox_stereo_rec_budget_used:ratio")  # budget used %
    assert some_panel("forecast_month_end", "budget_minutes")  # forecast vs budget, one panel
    assert some_panel("operation:wolkvox_stereo_rec_minutes:increase1d")  # minutes per day
    assert some_panel("wolkvox_up")  # fetch status
    assert some_panel("wolkvox_scrape_errors_total", "reason", "rate(")  # errors by reason rate
    assert some_panel("time()", "wolkvox_last_success_timestamp_seconds")  # age of last success
    assert some_panel("wolkvox_scrape_duration_seconds")  # fetch duration
    assert some_panel('up{job="wolkvox"}')  # exporter scraped at all
    ratio_panels = [p for p in panels if all(":ratio" in t["expr"] for t in p["targets"])]
    assert ratio_panels
    for panel in ratio_panels:
        assert panel["fieldConfig"]["defaults"]["unit"] == "percentunit", panel["title"]


@per_dashboard
def test_the_billing_row_is_the_last_row_and_expanded(path: Path) -> None:
    if path.name != "wolkvox-overview.json":
        pytest.skip("requirements of the overview dashboard")
    dashboard = load(path)
    rows = [p for p in dashboard["panels"] if p["type"] == "row"]
    assert rows[-1]["title"] == BILLING_ROW
    # Expanded: the expected invoice is visible without a click, and its panels are top-level (so the
    # grid test below checks them too).
    assert rows[-1]["collapsed"] is False and rows[-1]["panels"] == []
    panels = billing_panels(dashboard)
    assert len(panels) >= 6
    row_y = rows[-1]["gridPos"]["y"]
    assert all(p["gridPos"]["y"] > row_y for p in panels)
    for panel in panels:
        exprs = " ".join(t["expr"] for t in panel["targets"])
        assert "billing" in exprs or "token" in exprs, f"{panel['title']} is not about billing"


@per_dashboard
def test_billing_views_exist(path: Path) -> None:
    if path.name != "wolkvox-overview.json":
        pytest.skip("requirements of the overview dashboard")
    panels = billing_panels(load(path))
    exprs = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in panels}

    def some_panel(*needles: str) -> str:
        found = [title for title, e in exprs.items() if all(n in e for n in needles)]
        assert found, f"no billing panel queries all of {needles}"
        return found[0]

    # Usage per service: by operation x api, with the unit of each api shown next to its name.
    usage = next(p for p in panels if p["title"] == some_panel("operation_api:wolkvox_billing_usage:max"))
    assert usage["type"] == "table"
    (mapped,) = [o for o in usage["fieldConfig"]["overrides"] if o["matcher"]["options"] == "Service (unit)"]
    (mappings,) = [prop["value"] for prop in mapped["properties"] if prop["id"] == "mappings"]
    texts = mappings[0]["options"]
    assert texts["stereo_rec"]["text"] == "stereo_rec (minutes)"
    assert "licences" in texts["chat_licenses"]["text"]
    some_panel("operation_api:wolkvox_billing_usage:increase1d")
    some_panel("operation_api:wolkvox_billing_cost:month_to_date")
    # Month-to-date cost per operation and in total.
    some_panel("operation:wolkvox_billing_cost:month_to_date")
    some_panel("sum by (currency) (operation:wolkvox_billing_cost:month_to_date")
    # Forecast vs cost budget, in one panel.
    some_panel(
        "operation:wolkvox_billing_cost:forecast_month_end", "operation:wolkvox_billing_cost_budget:max"
    )
    some_panel("wolkvox_token_used_today", "wolkvox_token_limit")
    some_panel("wolkvox_token_planned_requests_per_day", "wolkvox_token_daily_request_limit")
    # The finance person's panel: the month-end forecast of the total cost, one value per currency.
    (invoice,) = [p for p in panels if p["title"] == "Expected invoice this month"]
    assert invoice["type"] in {"stat", "table"}
    (target,) = invoice["targets"]
    assert target["expr"].startswith("sum by (currency) (operation:wolkvox_billing_cost:forecast_month_end{")
    assert target["legendFormat"] == "{{currency}}"


@per_dashboard
def test_cost_is_shown_with_its_currency(path: Path) -> None:
    """Currency is a label, so no panel uses a fixed currency unit (currencyUSD would be wrong for a
    COP price and abbreviates to K/M): money is in `locale` format (thousands separators, exact
    decimals) with the currency label in the legend or in a column."""
    checked = 0
    for panel in iter_panels(load(path)):
        if panel["type"] == "row":
            continue
        assert not unit_of(panel).startswith("currency"), panel["title"]
        money = [t for t in panel["targets"] if "billing_cost" in t["expr"] and ":ratio" not in t["expr"]]
        if not money:
            continue
        checked += 1
        assert unit_of(panel) == "locale", panel["title"]
        for target in money:
            if target.get("format") == "table":
                continue  # a table shows the labels it keeps as columns (Currency, or see its description)
            assert "{{currency}}" in target["legendFormat"], f"{panel['title']}: {target['refId']}"
    if path.name == "wolkvox-overview.json":
        assert checked >= 5


@per_dashboard
def test_panels_fit_the_grid_without_overlapping(path: Path) -> None:
    top = load(path)["panels"]
    taken: dict[tuple[int, int], str] = {}
    for panel in top:
        g = panel["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] >= 0 and g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken[(x, y)]}"
                taken[(x, y)] = panel["title"]


@per_dashboard
def test_recording_rules_used_by_panels_exist(path: Path) -> None:
    known = recorded_names()
    for panel, target in panel_targets(load(path)):
        for name in RECORDED_NAME.findall(target["expr"]):
            assert name in known, f"{panel['title']}: {name} is not a recording rule"


@per_dashboard
def test_every_query_is_valid_promql(path: Path, tmp_path: Path) -> None:
    """promtool parses each query (variables expanded) as a rule expression."""
    dashboard = load(path)
    exprs = [t["expr"] for _, t in panel_targets(dashboard)]
    exprs += [a["expr"] for a in dashboard.get("annotations", {}).get("list", []) if a.get("expr")]
    # The series selector of each label_values() variable query.
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            exprs += re.findall(r"^label_values\((.+), *\w+\)$", query)
    rules = {
        "groups": [
            {
                "name": "dashboard-queries",
                "rules": [
                    {"record": f"dashboard:query_{i}:check", "expr": expand(e)} for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    rules_file = tmp_path / "queries.yml"
    rules_file.write_text(yaml.safe_dump(rules), encoding="utf-8")
    done = subprocess.run(
        [promtool(), "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in done.stdout
    for expr in exprs:
        assert "$" not in expand(expr), f"unexpanded variable in {expr}"


# --------------------------------------------------------------------------- provisioning


def test_datasource_provisioning() -> None:
    doc = yaml.safe_load(DATASOURCES_YML.read_text(encoding="utf-8"))
    assert doc["apiVersion"] == 1
    (ds,) = doc["datasources"]
    assert ds["type"] == "prometheus"
    assert ds["isDefault"] is True  # what the ${datasource} variable picks by default
    assert ds["url"] == "http://prometheus:9090"  # the compose service
    assert "uid" not in ds, "no hard-coded datasource uid anywhere"


def test_dashboard_provisioning() -> None:
    doc = yaml.safe_load(DASHBOARDS_YML.read_text(encoding="utf-8"))
    assert doc["apiVersion"] == 1
    (provider,) = doc["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"].startswith("/")
