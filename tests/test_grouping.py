"""Grouping the bill by an operation label with promtool: the copy-and-adapt recording rules of
prometheus/examples/ (two operations of one client, an HA pair of exporters), a broken join caught, and
the dashboard's "By group" queries on the same duplicated series."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import yaml
from harness import REPO, promtool
from tools import DASHBOARD_DIR, RULES_FILE, expand_grafana_vars, panel_targets

EXAMPLES = REPO / "prometheus" / "examples"
EXAMPLE_RULES = EXAMPLES / "cost-by-client.rules.yml"
EXAMPLE_TEST = EXAMPLES / "cost-by-client_test.yml"
ONE_PER_OPERATION = "max by (operation, client) (wolkvox_operation_info)"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120)


def test_the_example_rules_are_valid_and_follow_the_naming_convention() -> None:
    done = run("check", "rules", str(EXAMPLE_RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    rules = [
        r for g in yaml.safe_load(EXAMPLE_RULES.read_text(encoding="utf-8"))["groups"] for r in g["rules"]
    ]
    assert {r["record"].split(":")[0] for r in rules} == {"client", "client_api"}
    for rule in rules:
        assert rule["expr"].count(ONE_PER_OPERATION) == 1, rule["record"]
        assert "group_left (client)" in rule["expr"], rule["record"]


def test_the_example_joins_two_operations_of_one_client() -> None:
    done = run("test", "rules", str(EXAMPLE_TEST))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def _copy_test(tmp_path: Path, rules_text: str, tests: list[dict[str, Any]] | None = None) -> Path:
    """The example's unit test in ``tmp_path``, over the repo's rules file and ``rules_text``."""
    spec = yaml.safe_load(EXAMPLE_TEST.read_text(encoding="utf-8"))
    (tmp_path / "example.rules.yml").write_text(rules_text, encoding="utf-8")
    spec["rule_files"] = [str(RULES_FILE), str(tmp_path / "example.rules.yml")]
    if tests is not None:
        spec["tests"][0]["promql_expr_test"] = tests
    path = tmp_path / "test.yml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def test_a_join_on_the_raw_info_metric_is_caught(tmp_path: Path) -> None:
    """Without max by, the two replicas' info series make the join ambiguous: the test must fail."""
    text = EXAMPLE_RULES.read_text(encoding="utf-8")
    assert run("test", "rules", str(_copy_test(tmp_path, text))).returncode == 0
    broken = text.replace(ONE_PER_OPERATION, "wolkvox_operation_info")
    done = run("test", "rules", str(_copy_test(tmp_path, broken)))
    assert done.returncode != 0 and "FAILED" in done.stdout + done.stderr


def _panel_expr(title: str, ref: str = "A") -> str:
    dashboard = json.loads((DASHBOARD_DIR / "wolkvox-billing.json").read_text(encoding="utf-8"))
    (expr,) = [t["expr"] for p, t in panel_targets(dashboard) if p["title"] == title and t["refId"] == ref]
    return expand_grafana_vars(expr.replace("$api", ".+"), group="client")


def test_the_dashboards_group_queries_count_each_operation_once(tmp_path: Path) -> None:
    """The same HA-duplicated series as the example: the dashboard's queries give the same sums."""
    acme, globex, none = {"client": "acme"}, {"client": "globex"}, {}

    def samples(values: list[tuple[dict[str, str], float]], **labels: str) -> list[dict[str, Any]]:
        out = []
        for group, value in values:
            inner = ", ".join(f'{k}="{v}"' for k, v in {**group, **labels}.items())
            out.append({"labels": f"{{{inner}}}", "value": value})
        return out

    tests = [
        {
            "expr": _panel_expr("Cost by $group this month"),
            "eval_time": "240h",
            "exp_samples": samples([(acme, 36.5), (globex, 1), (none, 1)], currency="USD"),
        },
        {
            "expr": _panel_expr("Cost per $group", "B"),  # the month-end forecast
            "eval_time": "240h",
            "exp_samples": samples([(acme, 50.15), (globex, 3.1), (none, 3.1)], currency="USD"),
        },
        {
            "expr": _panel_expr("Usage per $group and service"),
            "eval_time": "240h",
            "exp_samples": samples([(acme, 1500), (none, 250)], api="stereo_rec")
            + samples([(acme, 2)], api="chat_licenses")
            + samples([(globex, 100)], api="ivr_minutes"),
        },
        {
            "expr": _panel_expr("Last month per $group"),
            "eval_time": "240h",
            "exp_samples": samples([(acme, 4.1)], month="1969-12", currency="USD"),
        },
    ]
    done = run("test", "rules", str(_copy_test(tmp_path, "groups: []\n", tests)))
    assert done.returncode == 0, done.stdout + done.stderr
