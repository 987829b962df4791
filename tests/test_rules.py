"""Prometheus rules (prometheus/rules/wolkvox.rules.yml) and Alertmanager config (alertmanager/).

- promtool checks the rules and runs every unit test file in prometheus/tests/;
- every alert is covered firing AND not firing, and across the month rollover;
- every month-end forecast divides by the one elapsed-share rule, and the list of licence-type (level)
  apis, never extrapolated, is the same in every rule, in the file's comment and in the simulator;
- the unit tests are not vacuous: rules broken on purpose (a copy) make them fail;
- amtool checks the Alertmanager config and routes each alert's severity to the right receiver;
- a real Alertmanager (loopback, webhooks pointed at a local receiver) inhibits a warning when a
  critical alert of the same family and operation fires.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from harness import (
    REPO,
    Webhooks,
    amtool,
    holds,
    promtool,
    start_alertmanager,
    wait_until,
    which,
)
from tools import RULES_FILE

from exporter.model import BILLING_APIS

RULE_TESTS_DIR = REPO / "prometheus" / "tests"
RULE_TEST_FILES = sorted(RULE_TESTS_DIR.glob("*.yml"))
AM_CONFIG = REPO / "alertmanager" / "alertmanager.yml"
SEVERITY_RECEIVER = {"critical": "pager", "warning": "team", "info": "null"}
FAMILIES = {"budget", "cost", "fetch", "exporter"}
# Alerts about the exporter process itself: no operation label.
EXPORTER_PROCESS = {"WolkvoxExporterDown", "WolkvoxExporterAbsent", "WolkvoxConfigReloadFailed"}
NO_OPERATION = EXPORTER_PROCESS | {
    "WolkvoxRequestPlanOverDailyLimit",
    "WolkvoxStateStoreWriteFailing",
    "WolkvoxExporterRejectingConnections",
}
# No value worth printing: up == 0, absent() == 1, reload == 0; the fetch alerts read the info series
# (always 1): their texts give the failing apis, reasons and messages instead.
FETCH_BY_REASON = {
    "WolkvoxFetchFailing",
    "WolkvoxTokenRejected",
    "WolkvoxTokenLimitReached",
    "WolkvoxUnknownApiConfigured",
}
NO_VALUE = EXPORTER_PROCESS | FETCH_BY_REASON
RUNBOOK = REPO / "docs" / "runbook.md"
RUNBOOK_DEFAULT = "https://github.com/wolkvox-exporter/wolkvox-exporter/blob/main/docs/runbook.md"
RUNBOOK_URL = re.compile(
    r"\{\{ or \$externalLabels\.wolkvox_runbook_url "
    + re.escape(f'"{RUNBOOK_DEFAULT}"')
    + r" \}\}#(?P<anchor>[a-z0-9_-]+)"
)
# Counts of active licences or connectors (a level, not a month-to-date total): never extrapolated.
LEVEL_APIS = {name for name, api in BILLING_APIS.items() if api.kind == "level"}
CUMULATIVE_APIS = set(BILLING_APIS) - LEVEL_APIS
ELAPSED = "wolkvox:month_elapsed:ratio"


def load_rules() -> dict[str, Any]:
    return yaml.safe_load(RULES_FILE.read_text(encoding="utf-8"))


def all_rules() -> list[dict[str, Any]]:
    return [rule for group in load_rules()["groups"] for rule in group["rules"]]


def alert_rules() -> list[dict[str, Any]]:
    return [rule for rule in all_rules() if "alert" in rule]


def alert_names() -> list[str]:
    return [rule["alert"] for rule in alert_rules()]


def run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=REPO)


# --------------------------------------------------------------------------- promtool


def test_rules_pass_promtool_check() -> None:
    done = run([promtool(), "check", "rules", str(RULES_FILE)])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


class PromtoolRuns:
    """``promtool test rules`` runs, all queued at once on a pool as wide as the machine and awaited one
    by one: the unit tests take seconds of CPU each (months of 5-minute samples), the mutation cases
    below as many again; run one after the other they were the slowest part of the suite.

    Started when the tests are collected (conftest.py calls ``start_in_background``), they run at a low
    CPU priority on what the other tests leave idle, until a test here waits for one: from then on
    they start at the normal priority."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="wolkvox-promtool-"))
        self.niceness = 10
        self.live: set[subprocess.Popen[str]] = set()
        self.pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="promtool")
        self.runs: dict[str, Future[subprocess.CompletedProcess[str]]] = {}
        binary = promtool()
        for test_file in RULE_TEST_FILES:
            self.runs[test_file.name] = self.pool.submit(self._run, [binary, "test", "rules", str(test_file)])
        rules = RULES_FILE.read_text(encoding="utf-8")
        for name, (pattern, replacement, (test_file_name, group)) in sorted(MUTATIONS.items()):
            case = self.rules_of(name).parent.parent
            (case / "rules").mkdir(parents=True)
            (case / "tests").mkdir()
            self.rules_of(name).write_text(rules.replace(pattern, replacement), encoding="utf-8")
            # Only the group meant to catch it (the others pass in the run of the whole file above).
            spec = yaml.safe_load((RULE_TESTS_DIR / test_file_name).read_text(encoding="utf-8"))
            spec["tests"] = [g for g in spec["tests"] if g["name"] == group]
            assert spec["tests"], f"no test group {group!r} in {test_file_name}"
            unit_tests = case / "tests" / test_file_name
            unit_tests.write_text(yaml.safe_dump(spec), encoding="utf-8")
            self.runs[name] = self.pool.submit(self._run, [binary, "test", "rules", str(unit_tests)])

    def _run(self, args: list[str]) -> subprocess.CompletedProcess[str]:
        # nice(1), not a preexec_fn: preexec_fn is not safe in a process with threads (this is a pool).
        niceness = ["nice", "-n", str(self.niceness)] if self.niceness else []
        proc = subprocess.Popen(
            niceness + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO
        )
        self.live.add(proc)
        try:
            stdout, stderr = proc.communicate(timeout=300)
        finally:
            proc.kill()  # a no-op once it has exited
            self.live.discard(proc)
        return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)

    def rules_of(self, mutation: str) -> Path:
        """The mutated copy of the rules file."""
        return self.directory / re.sub(r"\W+", "-", mutation) / "rules" / RULES_FILE.name

    def result(self, key: str) -> subprocess.CompletedProcess[str]:
        if self.niceness:
            # A test waits: nothing here is background work any more.
            self.niceness = 0
            for proc in list(self.live):
                try:
                    os.setpriority(os.PRIO_PROCESS, proc.pid, 0)
                except OSError:  # not allowed (raising a priority needs root), or already gone
                    pass
        return self.runs[key].result(timeout=600)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        for proc in list(self.live):
            proc.kill()
        self.pool.shutdown(wait=True)
        shutil.rmtree(self.directory, ignore_errors=True)


_RUNS: list[PromtoolRuns] = []  # the one set of runs of this test session, once started


def start_in_background() -> Callable[[], None]:
    """Queue the promtool runs now (conftest.py, once the tests are collected); returns how to stop them."""
    if not _RUNS and which("promtool"):
        _RUNS.append(PromtoolRuns())
    return stop_runs


def stop_runs() -> None:
    while _RUNS:
        _RUNS.pop().close()


@pytest.fixture(scope="module")
def promtool_runs() -> Iterator[PromtoolRuns]:
    if not _RUNS:
        _RUNS.append(PromtoolRuns())
    yield _RUNS[0]
    stop_runs()


@pytest.mark.parametrize("test_file", RULE_TEST_FILES, ids=lambda p: p.name)
def test_promtool_unit_tests_pass(test_file: Path, promtool_runs: PromtoolRuns) -> None:
    # The test files name the rules file by a relative path: they test the one file compose mounts.
    spec = yaml.safe_load(test_file.read_text(encoding="utf-8"))
    assert [(test_file.parent / f).resolve() for f in spec["rule_files"]] == [RULES_FILE]
    done = promtool_runs.result(test_file.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


# --------------------------------------------------------------------------- rule hygiene


def test_recording_rules_follow_naming_convention() -> None:
    records = [rule["record"] for rule in all_rules() if "record" in rule]
    assert records, "no recording rules"
    assert len(records) == len(set(records)), "duplicate recording rule names"
    for name in records:
        assert re.fullmatch(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", name), f"{name}: not level:metric:operations"


def test_expected_recording_rules_exist() -> None:
    records = {rule["record"] for rule in all_rules() if "record" in rule}
    assert {
        "operation:wolkvox_stereo_rec_minutes:increase1d",
        "operation:wolkvox_stereo_rec_minutes:forecast_month_end",
        "operation:wolkvox_stereo_rec_budget_used:ratio",
        "wolkvox:stereo_rec_minutes:sum",
        ELAPSED,
        "operation_api:wolkvox_billing_usage:max",
        "operation_api:wolkvox_billing_usage:increase1d",
        "operation_api:wolkvox_billing_cost:month_to_date",
        "operation_api:wolkvox_billing_cost:forecast_month_end",
        "operation:wolkvox_billing_cost:month_to_date",
        "operation:wolkvox_billing_cost:forecast_month_end",
        "operation:wolkvox_billing_cost_budget_used:ratio",
        "operation:wolkvox_billing_cost_forecast_budget:ratio",
        "wolkvox:billing_cost_month_to_date:sum",
        "wolkvox:billing_cost_forecast_month_end:sum",
        "operation:wolkvox_token_budget_used:ratio",
        "operation:wolkvox_stereo_rec_minutes_previous_month:max",
        "operation_api:wolkvox_billing_usage_previous_month:max",
        "operation_api:wolkvox_billing_cost:previous_month",
        "operation:wolkvox_billing_cost:previous_month",
        "wolkvox:billing_cost_previous_month:sum",
        "wolkvox:stereo_rec_minutes_previous_month:sum",
        "operation:wolkvox_stereo_rec_budget_used_previous_month:ratio",
        "operation:wolkvox_billing_cost_budget_used_previous_month:ratio",
    } <= records


def test_every_previous_month_rule_keeps_the_month_label() -> None:
    """Only the last closed month is exported, but two replicas may briefly disagree on which one it is:
    every aggregation keeps `month`, so two months are never added together."""
    rules = [r for r in all_rules() if "previous_month" in r.get("record", "")]
    assert len(rules) == 8
    for rule in rules:
        for grouping in re.findall(r"(?:sum|max) by \(([^)]*)\)", rule["expr"]):
            assert "month" in grouping.replace(" ", "").split(","), rule["record"]


def test_forecast_uses_calendar_functions_and_guards_the_first_day() -> None:
    (elapsed,) = [r for r in all_rules() if r.get("record") == ELAPSED]
    for fn in ("days_in_month()", "day_of_month()", "time()"):
        assert fn in elapsed["expr"]
    assert "day_of_month() >= 2" in elapsed["expr"]
    # The calendar is written once: no forecast carries its own copy (with its own constants).
    calendar = [r.get("record", r.get("alert")) for r in all_rules() if "days_in_month" in r["expr"]]
    assert calendar == [ELAPSED]


def test_every_forecast_divides_by_the_elapsed_share_of_the_month() -> None:
    forecasts = {
        r["record"]: r["expr"] for r in all_rules() if r.get("record", "").endswith(":forecast_month_end")
    }
    assert {
        "operation:wolkvox_stereo_rec_minutes:forecast_month_end",
        "operation_api:wolkvox_billing_cost:forecast_month_end",
    } <= set(forecasts)
    for name, expr in forecasts.items():
        # Either the forecast itself (divided by, or guarded by, the elapsed share) or a sum of one.
        assert ELAPSED in expr or re.search(r"\(operation(_api)?:\w+:forecast_month_end\)", expr), name
    assert (
        f"/ on () group_left () {ELAPSED}"
        in forecasts["operation:wolkvox_stereo_rec_minutes:forecast_month_end"]
    )


def test_level_apis_are_listed_once_and_the_same_everywhere() -> None:
    text = RULES_FILE.read_text(encoding="utf-8")
    regexes = re.findall(r'api[!=]~"([a-z0-9_|]+)"', text)
    assert len(regexes) == 3, regexes  # usage per day, and the two halves of the cost forecast
    assert len(set(regexes)) == 1, "the copies of the level-api regex differ"
    assert set(regexes[0].split("|")) == LEVEL_APIS
    # The file's header documents both kinds, api by api.
    header = text.split("groups:", 1)[0]
    level_doc = header.split("- LEVEL:", 1)[1]
    cumulative_doc = header.split("- CUMULATIVE:", 1)[1].split("- LEVEL:", 1)[0]
    assert set(re.findall(r"[a-z][a-z0-9_]+", level_doc)) >= LEVEL_APIS
    assert all(re.search(rf"\b{api}\b", cumulative_doc) for api in CUMULATIVE_APIS)
    assert not any(re.search(rf"\b{api}\b", cumulative_doc) for api in LEVEL_APIS)


def test_the_simulator_knows_the_same_apis_and_levels_as_the_exporter() -> None:
    from exporter.simulator import KNOWN_APIS, LICENCE_APIS

    assert set(LICENCE_APIS) == LEVEL_APIS
    assert set(KNOWN_APIS) == set(BILLING_APIS)


@pytest.mark.parametrize(
    "rule", [r for r in alert_rules() if "billing_cost" in r["expr"]], ids=lambda r: r["alert"]
)
def test_cost_alerts_name_the_currency(rule: dict[str, Any]) -> None:
    assert rule["labels"]["family"] == "cost"
    assert "$labels.currency" in rule["annotations"]["description"]


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_alert_has_severity_family_and_annotations(rule: dict[str, Any]) -> None:
    assert rule["alert"].startswith("Wolkvox")
    labels = rule.get("labels", {})
    assert labels.get("severity") in SEVERITY_RECEIVER
    assert labels.get("family") in FAMILIES
    annotations = rule.get("annotations", {})
    assert annotations.get("summary", "").strip()
    assert annotations.get("description", "").strip()
    text = annotations["summary"] + annotations["description"]
    if rule["alert"] not in NO_OPERATION:
        assert "$labels.operation" in text, "the alert text must name the operation"
    if rule["alert"] not in NO_VALUE:
        assert "$value" in text, "the alert text must give the number that triggered it"
    # Multi-line YAML that still renders as one paragraph: no stray newline inside the text.
    assert "\n" not in annotations["description"].strip()


@pytest.mark.parametrize("name", sorted(FETCH_BY_REASON))
def test_fetch_alerts_name_api_reason_host_and_message_and_group_by_operation(name: str) -> None:
    (rule,) = [r for r in alert_rules() if r["alert"] == name]
    text = rule["annotations"]["description"]
    assert "wolkvox_last_error_info" in text
    for label in ("api", "message"):
        assert f".Labels.{label}" in text or f"$labels.{label}" in text, f"{name} does not print the {label}"
    if name != "WolkvoxUnknownApiConfigured":  # the host is no news for an unknown api
        assert ".Labels.host" in text and ".Labels.reason" in text
    assert "First step" in text
    # Grouped by operation (and api for an unknown api), never by reason or message: a label that
    # changes would restart `for`.
    (grouping,) = re.findall(r"max by \(([^)]*)\)", rule["expr"])
    assert {g.strip() for g in grouping.split(",")} <= {"instance", "job", "operation", "api"}


def test_reasons_that_waiting_does_not_cure_alert_within_minutes() -> None:
    """Each failure reason is covered by exactly one alert; auth, token_limit and unknown_api fire
    after 1m, the transient reasons after 15m."""
    from exporter.model import REASONS

    rules = {r["alert"]: r for r in alert_rules() if r["alert"] in FETCH_BY_REASON}
    covered: dict[str, str] = {}
    for name, rule in rules.items():
        (selector,) = re.findall(r'wolkvox_last_error_info\{reason(=|!~)"([a-z_|]+)"\}', rule["expr"])
        op, listed = selector[0], set(selector[1].split("|"))
        reasons = listed if op == "=" else set(REASONS) - listed
        for reason in reasons:
            assert reason not in covered, f"{reason} alerts twice: {covered.get(reason)}, {name}"
            covered[reason] = name
    assert set(covered) == set(REASONS)
    for reason in ("auth", "token_limit", "unknown_api"):
        assert rules[covered[reason]]["for"] == "1m", reason
    for reason in set(REASONS) - {"auth", "token_limit", "unknown_api"}:
        assert rules[covered[reason]]["for"] == "15m", reason


def _github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings: lower case, punctuation but '-' and '_' dropped, spaces to
    '-', a repeated one suffixed -1, -2, ..."""
    anchors: set[str] = set()
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        match = None if in_code else re.match(r"#{1,6} +(.+?) *$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    return anchors


def test_github_anchor_rules_as_implemented_here() -> None:
    assert _github_anchors("# A b\n## `C`: d.e\n## A b\n```\n# not a heading\n```") == {
        "a-b",
        "c-de",
        "a-b-1",
    }


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_alert_links_its_section_of_the_runbook(rule: dict[str, Any]) -> None:
    url = rule["annotations"].get("runbook_url", "")
    match = RUNBOOK_URL.fullmatch(url)
    assert match, f"runbook_url {url!r} is not the shared base and an anchor"
    assert match["anchor"] == rule["alert"].lower()
    assert match["anchor"] in _github_anchors(RUNBOOK.read_text(encoding="utf-8"))


def test_runbook_links_within_the_page_resolve() -> None:
    text = RUNBOOK.read_text(encoding="utf-8")
    anchors = _github_anchors(text)
    links = re.findall(r"\]\(#([^)]+)\)", text)
    assert len(links) > 20
    assert set(links) - anchors == set()
    # A section per failure reason, for the fetch alerts and the status page to link to.
    from exporter.model import REASONS

    assert {f"reason-{reason}" for reason in REASONS} <= anchors


def test_the_status_page_links_the_same_runbook_and_existing_sections() -> None:
    """The landing page's hints link #reason-<reason> and #config-reload of the page the alerts link."""
    from exporter import statuspage
    from exporter.model import REASONS

    assert statuspage.DEFAULT_RUNBOOK_URL == RUNBOOK_DEFAULT
    anchors = _github_anchors(RUNBOOK.read_text(encoding="utf-8"))
    source = Path(statuspage.__file__).read_text(encoding="utf-8")
    linked = set(re.findall(r'f"\{runbook_url\}#([a-z-]+)', source))  # the links it builds
    assert linked == {"reason-", "config-reload"}
    linked = {"config-reload"} | {f"reason-{reason}" for reason in REASONS}
    assert linked - anchors == set(), "the status page links sections the runbook does not have"
    assert set(statuspage.HINTS) == set(REASONS)


def test_runbook_timings_are_the_rules() -> None:
    """The runbook's table of how soon each alert fires states each alert's severity and `for` as the
    rules have them."""
    rules = {r["alert"]: r for r in alert_rules()}
    rows = re.findall(
        r"^\| [^|]+ \| (Wolkvox\w+) \| (\w+) \| (\w+) \| [^|]+ \|$",
        RUNBOOK.read_text(encoding="utf-8"),
        re.MULTILINE,
    )
    assert {name for name, _, _ in rows} == FETCH_BY_REASON | {"WolkvoxDataStale"}
    for name, severity, wait in rows:
        assert (rules[name]["labels"]["severity"], rules[name]["for"]) == (severity, wait), name


def _fed_by_the_exporter(rule: dict[str, Any]) -> bool:
    """The alert reads a series the exporter exports, directly or through a recording rule."""
    return bool(re.search(r"(?<![\"=])\b(wolkvox_\w+|\w+:wolkvox\w*:\w+|wolkvox:\w+)", rule["expr"]))


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_alerts_fed_by_the_exporter_keep_firing_through_its_absence(rule: dict[str, Any]) -> None:
    """Longer than WolkvoxExporterDown takes to fire, so Alertmanager mutes them before they resolve."""
    (down,) = [r for r in alert_rules() if r["alert"] == "WolkvoxExporterDown"]
    if rule["alert"] in {"WolkvoxExporterDown", "WolkvoxExporterAbsent"}:
        assert not _fed_by_the_exporter(rule)
        assert "keep_firing_for" not in rule
        return
    assert _fed_by_the_exporter(rule)
    assert _duration_seconds(rule.get("keep_firing_for", "0s")) >= _duration_seconds(down["for"]) + 5 * 60


def test_alert_names_are_unique() -> None:
    assert len(alert_names()) == len(set(alert_names()))


def _alert_tests() -> Iterator[tuple[str, Path, dict[str, Any]]]:
    for path in RULE_TEST_FILES:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
        for group in spec.get("tests", []):
            for case in group.get("alert_rule_test", []):
                yield path.name, group.get("name", ""), case


def _duration_seconds(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    parts = re.findall(r"(\d+)(ms|s|m|h|d|w)", text)
    assert "".join(n + u for n, u in parts) == text, f"unparsed duration {text!r}"
    return sum(int(n) * units[u] for n, u in parts)


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    firing = {case["alertname"] for _, _, case in _alert_tests() if case.get("exp_alerts")}
    quiet = {case["alertname"] for _, _, case in _alert_tests() if not case.get("exp_alerts")}
    names = set(alert_names())
    assert names - firing == set(), "alerts never tested firing"
    assert names - quiet == set(), "alerts never tested not firing"
    assert (firing | quiet) - names == set(), "tests for alerts that do not exist"


def test_month_rollover_is_tested_for_every_alert() -> None:
    """rollover_test.yml checks every alert stays quiet after Feb 1 00:00 UTC (744h)."""
    quiet_after_rollover = {
        case["alertname"]
        for file, _, case in _alert_tests()
        if file == "rollover_test.yml"
        and not case.get("exp_alerts")
        and _duration_seconds(case["eval_time"]) > 744 * 3600
    }
    assert set(alert_names()) - quiet_after_rollover == set()


# The unit test groups (file, group name) that the mutations below must make fail.
ROLLOVER = ("rollover_test.yml", "month rollover Jan 31 -> Feb 1")
BUDGET = ("budget_test.yml", "budget thresholds and forecast on Jan 11")
FETCH_FAILING = ("fetch_test.yml", "fetches failing for 15 minutes, reason changes during the outage")
BY_REASON = ("fetch_test.yml", "a rejected token, a spent budget and an unknown api alert within minutes")
NEVER_FETCHED = ("fetch_test.yml", "an operation that never had a value")
EXPORTER_STOPS = ("fetch_test.yml", "the exporter stops; its alerts do not resolve")
EXPORTER_DOWN = ("exporter_test.yml", "exporter down, config reload failed")
REJECTED = ("exporter_test.yml", "connections rejected at --web.max-connections")
BILLING_COST = ("billing_test.yml", "cost per service, per operation and in total; cost alerts")
TOKEN_BUDGET = ("billing_test.yml", "daily token budget, request plan, unknown api")
LAST_MONTH = ("month_close_test.yml", "last closed month, per api, per operation, in total, against budgets")

# Rules broken on purpose: the unit tests must notice each one. (pattern, replacement, the group that does)
MUTATIONS: dict[str, tuple[str, str, tuple[str, str]]] = {
    "forecast not guarded on the 1st": (
        "and on () (day_of_month() >= 2)",
        "and on () (day_of_month() >= 1)",
        ROLLOVER,
    ),
    "daily usage as a clamped delta": (
        "max by (operation) (increase(wolkvox_stereo_rec_minutes[1d]))",
        "max by (operation) (clamp_min(delta(wolkvox_stereo_rec_minutes[1d]), 0))",
        ROLLOVER,
    ),
    "warning threshold moved to 90%": (
        "operation:wolkvox_stereo_rec_budget_used:ratio >= 0.8",
        "operation:wolkvox_stereo_rec_budget_used:ratio >= 0.9",
        BUDGET,
    ),
    "usage summed over exporter replicas": (
        "record: operation:wolkvox_stereo_rec_minutes:max\n        expr: max by (operation)",
        "record: operation:wolkvox_stereo_rec_minutes:max\n        expr: sum by (operation)",
        BUDGET,
    ),
    "fetch failing after 5m instead of 15m": (
        'unknown_api"})\n        for: 15m',
        'unknown_api"})\n        for: 5m',
        FETCH_FAILING,
    ),
    "fetch failing resolves the moment its series vanish": (
        'unknown_api"})\n        for: 15m\n        keep_firing_for: 15m',
        'unknown_api"})\n        for: 15m',
        EXPORTER_STOPS,
    ),
    "data stale resolves the moment its series vanish": (
        "        for: 5m\n        keep_firing_for: 15m\n"
        "        labels:\n          severity: critical\n          family: fetch",
        "        for: 5m\n        labels:\n          severity: critical\n          family: fetch",
        EXPORTER_STOPS,
    ),
    "an operation that never succeeded is never stale": (
        "unless on (operation) wolkvox_last_success_timestamp_seconds\n            ) > 1800",
        "unless on (operation) wolkvox_last_success_timestamp_seconds\n            ) > 1e12",
        NEVER_FETCHED,
    ),
    "a rejected token waits 15m": (
        '(wolkvox_last_error_info{reason="auth"})\n        for: 1m',
        '(wolkvox_last_error_info{reason="auth"})\n        for: 15m',
        BY_REASON,
    ),
    "token limit alert on every error reason": (
        'max by (instance, job, operation) (wolkvox_last_error_info{reason="token_limit"})',
        "max by (instance, job, operation) (wolkvox_last_error_info)",
        BY_REASON,
    ),
    "exporter down for another job": (
        'expr: up{job="wolkvox"} == 0',
        "expr: up == 0",
        EXPORTER_DOWN,
    ),
    "billing usage summed over exporter replicas": (
        "expr: max by (operation, api) (wolkvox_billing_usage)",
        "expr: sum by (operation, api) (wolkvox_billing_usage)",
        BILLING_COST,
    ),
    "licences extrapolated like usage": (
        'operation_api:wolkvox_billing_cost:month_to_date{api!~"',
        'operation_api:wolkvox_billing_cost:month_to_date{api!~"none", level!~"',
        BILLING_COST,
    ),
    "licence cost forecast on the 1st": (
        "\n            and on () wolkvox:month_elapsed:ratio",
        "",
        BILLING_COST,
    ),
    "licences counted in usage per day": (
        "increase(wolkvox_billing_usage{api!~",
        "increase(wolkvox_billing_usage{level!~",
        BILLING_COST,
    ),
    "cost forecast on the 1st across the rollover": (
        "\n            and on () wolkvox:month_elapsed:ratio",
        "",
        ROLLOVER,
    ),
    "token limit 0 divided by": (
        "max by (operation) (wolkvox_token_limit > 0)",
        "max by (operation) (wolkvox_token_limit)",
        TOKEN_BUDGET,
    ),
    "token budget warning at 90%": (
        "operation:wolkvox_token_budget_used:ratio >= 0.8",
        "operation:wolkvox_token_budget_used:ratio >= 0.9",
        TOKEN_BUDGET,
    ),
    "request plan equal to the limit alerts": (
        "wolkvox_token_planned_requests_per_day > wolkvox_token_daily_request_limit",
        "wolkvox_token_planned_requests_per_day >= wolkvox_token_daily_request_limit",
        TOKEN_BUDGET,
    ),
    "unknown api alert on every error reason": (
        'max by (instance, job, operation, api) (wolkvox_last_error_info{reason="unknown_api"})',
        "max by (instance, job, operation, api) (wolkvox_last_error_info)",
        TOKEN_BUDGET,
    ),
    "previous-month usage summed over exporter replicas": (
        "max by (operation, api, month) (wolkvox_billing_usage_previous_month)",
        "sum by (operation, api, month) (wolkvox_billing_usage_previous_month)",
        LAST_MONTH,
    ),
    "previous-month cost from this month's usage": (
        "operation_api:wolkvox_billing_usage_previous_month:max\n          * on (operation, api)",
        "operation_api:wolkvox_billing_usage:max\n          * on (operation, api)",
        LAST_MONTH,
    ),
    "previous-month cost total without its currency": (
        "sum by (month, currency) (operation:wolkvox_billing_cost:previous_month)",
        "sum by (month) (operation:wolkvox_billing_cost:previous_month)",
        LAST_MONTH,
    ),
    "previous-month minutes against the cost budget": (
        "/ on (operation) group_left () operation:wolkvox_stereo_rec_budget_minutes:max",
        "/ on (operation) group_left () operation:wolkvox_billing_cost_budget:max",
        LAST_MONTH,
    ),
    "rejected connections alert on a burst": (
        "increase(wolkvox_exporter_connections_rejected_total[10m]) > 0\n        for: 15m",
        "increase(wolkvox_exporter_connections_rejected_total[10m]) > 0\n        for: 5m",
        REJECTED,
    ),
    "rejected connections summed over exporters": (
        "increase(wolkvox_exporter_connections_rejected_total[10m]) > 0",
        "sum by (job) (increase(wolkvox_exporter_connections_rejected_total[10m])) > 0",
        REJECTED,
    ),
    "rejected connections alert on the counter, not its increase": (
        "increase(wolkvox_exporter_connections_rejected_total[10m]) > 0",
        "wolkvox_exporter_connections_rejected_total > 0",
        REJECTED,
    ),
    "rejected connections as a delta, blind to a restart": (
        "increase(wolkvox_exporter_connections_rejected_total[10m]) > 0",
        "delta(wolkvox_exporter_connections_rejected_total[10m]) > 0",
        REJECTED,
    ),
    "rejected connections in a window a trickle slips through": (
        "increase(wolkvox_exporter_connections_rejected_total[10m]) > 0",
        "increase(wolkvox_exporter_connections_rejected_total[3m]) > 0",
        REJECTED,
    ),
    "cost budget alert below the budget": (
        "operation:wolkvox_billing_cost_budget_used:ratio >= 1",
        "operation:wolkvox_billing_cost_budget_used:ratio >= 0.8",
        BILLING_COST,
    ),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_unit_tests_catch_a_broken_rule(mutation: str, promtool_runs: PromtoolRuns) -> None:
    pattern, _, (test_name, group) = MUTATIONS[mutation]
    text = RULES_FILE.read_text(encoding="utf-8")
    assert text.count(pattern) == 1, f"mutation pattern not found exactly once: {pattern!r}"
    checked = run([promtool(), "check", "rules", str(promtool_runs.rules_of(mutation))])
    assert checked.returncode == 0, "the mutated rules must still be valid: " + checked.stdout
    done = promtool_runs.result(mutation)
    output = done.stdout + done.stderr
    assert done.returncode != 0, f"{test_name} ({group}) still passes with '{mutation}':\n{output}"
    assert "FAILED" in output


# --------------------------------------------------------------------------- Alertmanager


def test_alertmanager_config_passes_amtool() -> None:
    done = run([amtool(), "check-config", str(AM_CONFIG)])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_alertmanager_webhooks_are_placeholders() -> None:
    config = yaml.safe_load(AM_CONFIG.read_text(encoding="utf-8"))
    urls = [hook["url"] for r in config["receivers"] for hook in r.get("webhook_configs", [])]
    assert urls
    for url in urls:
        assert re.match(r"https://[a-z.]*example\.(com|org|net)/", url), url


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_alert_routes_to_the_receiver_of_its_severity(rule: dict[str, Any]) -> None:
    labels = {"alertname": rule["alert"], **rule["labels"], "operation": "bogota"}
    done = run(
        [amtool(), "config", "routes", "test", f"--config.file={AM_CONFIG}"]
        + [f"{k}={v}" for k, v in labels.items()]
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == SEVERITY_RECEIVER[rule["labels"]["severity"]]


@pytest.fixture
def running_alertmanager(tmp_path: Path) -> Iterator[tuple[str, Webhooks]]:
    hooks = Webhooks()
    child, url = start_alertmanager(tmp_path, hooks)
    try:
        yield url, hooks
    finally:
        child.stop()
        hooks.close()


def _rule_labels(alertname: str) -> dict[str, str]:
    (rule,) = [r for r in alert_rules() if r["alert"] == alertname]
    return {"alertname": alertname, **rule["labels"]}


def test_alertmanager_inhibits_warning_when_critical_fires(
    running_alertmanager: tuple[str, Webhooks],
) -> None:
    url, hooks = running_alertmanager
    now = datetime.now(UTC)
    sent = [
        {**_rule_labels("WolkvoxStereoRecBudgetExhausted"), "operation": "cali"},
        {**_rule_labels("WolkvoxStereoRecBudgetNearlyUsed"), "operation": "cali"},  # inhibited
        {**_rule_labels("WolkvoxStereoRecBudgetNearlyUsed"), "operation": "medellin"},  # other operation
        {**_rule_labels("WolkvoxFetchFailing"), "operation": "cali"},  # other family
        # The cost budget is not the minutes budget: another family, not inhibited.
        {**_rule_labels("WolkvoxCostForecastOverBudget"), "operation": "cali", "currency": "USD"},
        {**_rule_labels("WolkvoxStereoRecBudgetNotConfigured"), "operation": "pereira"},  # info: not sent
    ]
    payload = [
        {
            "labels": labels,
            "annotations": {"summary": "test", "description": "test"},
            "startsAt": now.isoformat(),
            "endsAt": (now + timedelta(minutes=10)).isoformat(),
        }
        for labels in sent
    ]
    # The critical alert first, and only once Alertmanager lists it the others: posted in one batch, the
    # warning's group (group_wait 0s) may be flushed before the inhibiting alert is in (seen under load).
    requests.post(f"{url}/api/v2/alerts", json=payload[:1], timeout=5).raise_for_status()
    wait_until(
        lambda: requests.get(f"{url}/api/v2/alerts", timeout=5).json(),
        timeout=20,
        what="alertmanager to list the critical alert",
    )
    requests.post(f"{url}/api/v2/alerts", json=payload[1:], timeout=5).raise_for_status()

    def states() -> dict[tuple[str, str], dict[str, Any]] | None:
        alerts = requests.get(f"{url}/api/v2/alerts", timeout=5).json()
        by_key = {(a["labels"]["alertname"], a["labels"]["operation"]): a["status"] for a in alerts}
        return by_key if len(by_key) == len(sent) else None

    status = wait_until(states, timeout=20, what="alertmanager to list the alerts")
    inhibited = ("WolkvoxStereoRecBudgetNearlyUsed", "cali")
    status = wait_until(
        lambda: (s := states()) and s[inhibited]["state"] == "suppressed" and s,
        timeout=20,
        what="the warning to be suppressed",
    )
    assert status[inhibited]["inhibitedBy"], status[inhibited]
    for key, st in status.items():
        if key != inhibited:
            assert st["state"] == "active", (key, st)
            assert not st["inhibitedBy"], (key, st)

    expected = {
        ("/pager", "WolkvoxStereoRecBudgetExhausted", "cali"),
        ("/team", "WolkvoxStereoRecBudgetNearlyUsed", "medellin"),
        ("/team", "WolkvoxFetchFailing", "cali"),
        ("/team", "WolkvoxCostForecastOverBudget", "cali"),
    }
    wait_until(lambda: hooks.delivered() >= expected, timeout=30, what=f"deliveries {expected}")
    # A sentinel alert, posted now, is delivered only after every group created before it was flushed
    # (group_wait 0s flushes a group when it is created): by then the inhibited warning and the info
    # alert would have been delivered if they were going to be.
    sentinel = {**payload[3], "labels": {**sent[3], "operation": "sentinel"}}
    requests.post(f"{url}/api/v2/alerts", json=[sentinel], timeout=5).raise_for_status()
    expected.add(("/team", "WolkvoxFetchFailing", "sentinel"))
    wait_until(lambda: hooks.delivered() >= expected, timeout=30, what="the sentinel delivery")
    assert hooks.delivered() == expected


def test_an_exporter_down_leaves_the_other_exporters_warnings_alone(
    running_alertmanager: tuple[str, Webhooks],
) -> None:
    """The exporter-family alerts are per exporter instance and carry no operation: one replica of an HA
    pair down must not hide the other's warnings (its clients may be what now fills the other's
    --web.max-connections). Only the down exporter's own alerts are muted."""
    url, hooks = running_alertmanager
    now = datetime.now(UTC)

    def alert(name: str, instance: str) -> dict[str, Any]:
        return {
            "labels": {**_rule_labels(name), "job": "wolkvox", "instance": instance},
            "annotations": {"summary": "test", "description": "test"},
            "startsAt": now.isoformat(),
            "endsAt": (now + timedelta(minutes=10)).isoformat(),
        }

    down = alert("WolkvoxExporterDown", "a:19726")
    requests.post(f"{url}/api/v2/alerts", json=[down], timeout=5).raise_for_status()
    wait_until(
        lambda: requests.get(f"{url}/api/v2/alerts", timeout=5).json(),
        timeout=20,
        what="alertmanager to list the exporter-down alert",
    )
    others = [
        alert("WolkvoxExporterRejectingConnections", "b:19726"),
        alert("WolkvoxConfigReloadFailed", "b:19726"),
        alert("WolkvoxStateStoreWriteFailing", "a:19726"),  # the down exporter's own: muted
    ]
    requests.post(f"{url}/api/v2/alerts", json=others, timeout=5).raise_for_status()

    def states() -> dict[tuple[str, str], str] | None:
        alerts = requests.get(f"{url}/api/v2/alerts", timeout=5).json()
        by_key = {(a["labels"]["alertname"], a["labels"]["instance"]): a["status"]["state"] for a in alerts}
        return by_key if len(by_key) == 1 + len(others) else None

    wait_until(
        lambda: (
            (s := states())
            and "unprocessed" not in s.values()
            and s[("WolkvoxStateStoreWriteFailing", "a:19726")] == "suppressed"
        ),
        timeout=20,
        what="the down exporter's warning to be muted",
    )
    assert states() == {
        ("WolkvoxExporterDown", "a:19726"): "active",
        ("WolkvoxExporterRejectingConnections", "b:19726"): "active",
        ("WolkvoxConfigReloadFailed", "b:19726"): "active",
        ("WolkvoxStateStoreWriteFailing", "a:19726"): "suppressed",
    }
    expected = {
        ("/pager", "WolkvoxExporterDown", ""),
        ("/team", "WolkvoxExporterRejectingConnections", ""),
        ("/team", "WolkvoxConfigReloadFailed", ""),
    }
    wait_until(lambda: hooks.delivered() >= expected, timeout=30, what=f"deliveries {expected}")
    delivered = {(path, a["labels"]["alertname"], a["labels"]["instance"]) for path, a in hooks.alerts()}
    assert ("/team", "WolkvoxStateStoreWriteFailing", "a:19726") not in delivered


def test_alertmanager_sends_no_resolved_for_an_exporter_that_is_down(
    running_alertmanager: tuple[str, Webhooks],
) -> None:
    """While WolkvoxExporterDown fires for an exporter, the alerts of that exporter that Prometheus stops
    firing (keep_firing_for over) are muted: no "resolved" reaches a receiver. Another exporter's alert
    resolves as usual."""
    url, hooks = running_alertmanager
    now = datetime.now(UTC)

    def alert(name: str, ends: datetime, **labels: str) -> dict[str, Any]:
        return {
            "labels": {**_rule_labels(name), "job": "wolkvox", **labels},
            "annotations": {"summary": "test", "description": "test"},
            "startsAt": now.isoformat(),
            "endsAt": ends.isoformat(),
        }

    def post(alerts: list[dict[str, Any]]) -> None:
        requests.post(f"{url}/api/v2/alerts", json=alerts, timeout=5).raise_for_status()

    later = now + timedelta(minutes=10)
    post(
        [
            alert("WolkvoxFetchFailing", later, operation="cali", instance="a:19726"),
            alert("WolkvoxFetchFailing", later, operation="lima", instance="b:19726"),
        ]
    )
    firing = {("/team", "WolkvoxFetchFailing", "cali"), ("/team", "WolkvoxFetchFailing", "lima")}
    wait_until(lambda: hooks.delivered() >= firing, timeout=30, what="both fetch alerts delivered")

    post([alert("WolkvoxExporterDown", later, instance="a:19726")])
    wait_until(
        lambda: ("/pager", "WolkvoxExporterDown", "") in hooks.delivered(), timeout=30, what="exporter down"
    )

    def muted() -> bool:
        alerts = requests.get(f"{url}/api/v2/alerts", timeout=5).json()
        states = {a["labels"].get("operation"): a["status"]["state"] for a in alerts}
        return states.get("cali") == "suppressed" and states.get("lima") == "active"

    wait_until(muted, timeout=20, what="exporter a's fetch alert muted, b's not")

    # keep_firing_for is over: Prometheus sends both as resolved (endsAt now).
    resolved_at = datetime.now(UTC)
    post(
        [
            alert("WolkvoxFetchFailing", resolved_at, operation="cali", instance="a:19726"),
            alert("WolkvoxFetchFailing", resolved_at, operation="lima", instance="b:19726"),
        ]
    )
    wait_until(
        lambda: ("/team", "WolkvoxFetchFailing", "lima") in hooks.delivered("resolved"),
        timeout=30,
        what="the other exporter's alert resolved",
    )
    # Groups flush every group_interval (1 s here): three of them pass without a resolved for cali.
    holds(
        lambda: ("/team", "WolkvoxFetchFailing", "cali") not in hooks.delivered("resolved"),
        3.0,
        what="no resolved for the alert of the exporter that is down",
    )


def test_the_documented_alert_table_lists_every_alert_with_its_severity() -> None:
    text = (REPO / "docs" / "alerts-and-dashboards.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `(Wolkvox\w+)` \| (\w+) \|", text, re.MULTILINE))
    assert rows == {r["alert"]: r["labels"]["severity"] for r in alert_rules()}
