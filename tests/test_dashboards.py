"""Grafana dashboards (grafana/dashboards/*.json) and provisioning (grafana/provisioning/).

Static checks; tests/test_prometheus_integration.py runs every panel query against a real Prometheus.
- the dashboards use a templated datasource and never a hard-coded datasource uid;
- the `operation` variable and every per-operation query filter on it;
- every panel has a unit and a description, panels do not overlap, ids are unique;
- the required views exist, plus a collapsed row reserved for the other billing services;
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
NO_OPERATION_LABEL = {"wolkvox_exporter_build_info", "wolkvox_config_last_reload_successful"}
RECORDED_NAME = re.compile(r"(?<![\w:])([a-z_]+:[a-z0-9_]+:[a-z0-9_]+)(?![\w:])")


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


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
def test_a_collapsed_row_is_reserved_for_other_billing_services(path: Path) -> None:
    if path.name != "wolkvox-overview.json":
        pytest.skip("requirements of the overview dashboard")
    rows = [p for p in load(path)["panels"] if p["type"] == "row"]
    assert any(r["collapsed"] and "other billing" in r["title"].lower() for r in rows)
    # A collapsed row is the last top-level panel: nothing can sit below it.
    assert load(path)["panels"][-1]["type"] == "row"


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
    rules = {
        "groups": [
            {
                "name": "dashboard-queries",
                "rules": [
                    {"record": f"dashboard:query_{i}:check", "expr": expand_grafana_vars(e, "bogota|cali")}
                    for i, e in enumerate(exprs)
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
        assert "$" not in expand_grafana_vars(expr), f"unexpanded variable in {expr}"


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
