"""Helpers for the tests of the monitoring files: Grafana dashboards, their PromQL, the rules file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness import REPO

# --------------------------------------------------------------------------- Grafana dashboards

DASHBOARD_DIR = REPO / "grafana" / "dashboards"
RULES_FILE = REPO / "prometheus" / "rules" / "wolkvox.rules.yml"


def dashboard_files() -> list[Path]:
    return sorted(DASHBOARD_DIR.glob("*.json"))


def iter_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows included, and the panels inside collapsed rows."""
    out: list[dict[str, Any]] = []
    for panel in dashboard.get("panels", []):
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def panel_targets(dashboard: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(panel, target) for every query target of every panel."""
    return [(panel, target) for panel in iter_panels(dashboard) for target in panel.get("targets", [])]


def expand_grafana_vars(
    expr: str,
    operation_regex: str = ".+",
    rate_interval: str = "2m",
    interval: str = "1m",
    range_: str = "1h",
    group: str = "client",
) -> str:
    """The PromQL Grafana would send: dashboard variables replaced by concrete values."""
    replacements = {
        "${group}": group,
        "$group": group,
        "${operation:regex}": operation_regex,
        "${operation}": operation_regex,
        "$operation": operation_regex,
        "${__rate_interval}": rate_interval,
        "$__rate_interval": rate_interval,
        "${__interval}": interval,
        "$__interval": interval,
        "${__range}": range_,
        "$__range": range_,
    }
    for name, value in replacements.items():
        expr = expr.replace(name, value)
    return expr
