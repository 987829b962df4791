"""Every billing service, prices and the daily request budget: config and the real process."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from harness import REPO, Simulator, holds, value, wait_until, write_config_text

from exporter.config import ConfigError, load_config
from exporter.families import BILLING_USAGE
from exporter.model import BILLING_APIS
from exporter.simulator.api import KNOWN_APIS, LICENCE_APIS, description, usage_value

SERVICES = ["stereo_rec", "ivr_minutes", "amd_ai", "chat_licenses"]


def test_prices_merge_top_level_and_operation(tmp_path: Path) -> None:
    config = load_config(
        write_config_text(
            tmp_path,
            "currency: COP\nprices: {stereo_rec: 0.004, ivr_minutes: 0.01}\noperations:\n"
            "  - {server: wv1, token: a, prices: {stereo_rec: 0.003}, cost_budget: 500}\n"
            "  - {server: wv2, token: b}\n",
        )
    )
    first, second = config.operations
    assert dict(first.prices) == {"stereo_rec": 0.003, "ivr_minutes": 0.01}
    assert dict(second.prices) == {"stereo_rec": 0.004, "ivr_minutes": 0.01}
    assert first.cost_budget == 500 and second.cost_budget is None
    assert config.currency == "COP"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("prices: {stereo_rec: -1}", "prices.stereo_rec"),
        ("prices: {Bad-Api: 1}", "prices"),
        ("prices: [1, 2]", "prices"),
        ("currency: 'U$D'", "currency"),
        ("token_info_interval: 30m", "token_info_interval"),
        ("stretch_intervals: maybe", "stretch_intervals"),
        ("fetch_workers: 0", "fetch_workers"),
        ("daily_request_limit: 0", "daily_request_limit"),
    ],
)
def test_bad_billing_keys_are_one_line_errors(tmp_path: Path, text: str, key: str) -> None:
    path = write_config_text(tmp_path, f"{text}\noperations: [{{server: wv1, token: secret-token}}]\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert message.startswith(f"{path}: {key}") and "\n" not in message and "secret-token" not in message


def test_retired_keys_still_load_with_a_warning_saying_what_they_do_now(tmp_path: Path) -> None:
    ops = "operations: [{server: wv1, token: a}]\n"
    config = load_config(write_config_text(tmp_path, "fetch_workers: 32\nstretch_intervals: false\n" + ops))
    assert any("fetch_workers" in w and "no longer used" in w for w in config.warnings)
    assert any("stretch_intervals" in w and "always stretch" in w for w in config.warnings)
    assert not any("fetch_workers" in w for w in load_config(write_config_text(tmp_path, ops)).warnings)


def test_several_services_per_operation_on_metrics(simulator: Simulator, run_exporter) -> None:
    config = {
        "refresh_interval": "0.2s",
        "daily_request_limit": 1_000_000,
        "currency": "USD",
        "prices": {"stereo_rec": 0.004, "ivr_minutes": 0.01},
        "operations": [
            {
                "name": "bogota",
                "server": "wv9901",
                "token": "tok-b",
                "base_url": simulator.url,
                "apis": [*SERVICES, "no_such_api"],
                "cost_budget": 900,
            },
            {"name": "lima", "server": "wv0042", "token": "tok-l", "base_url": simulator.url},
        ],
    }
    exporter = run_exporter(config)
    samples = exporter.wait_for(
        lambda s: (
            all(value(s, "wolkvox_billing_usage", operation="bogota", api=a) is not None for a in SERVICES)
            and value(s, "wolkvox_scrape_errors_total", operation="bogota", reason="unknown_api") >= 1
        ),
        timeout=20,
        what="every service of bogota and the unknown api counted",
    )
    # stereo_rec keeps its own name too, with the same value.
    assert value(samples, "wolkvox_stereo_rec_minutes", operation="bogota") == value(
        samples, "wolkvox_billing_usage", operation="bogota", api="stereo_rec"
    )
    assert value(samples, "wolkvox_billing_usage", operation="bogota", api="no_such_api") is None
    assert (
        value(samples, "wolkvox_billing_unit_price", operation="bogota", api="stereo_rec", currency="USD")
        == 0.004
    )
    assert (
        value(samples, "wolkvox_billing_unit_price", operation="lima", api="stereo_rec", currency="USD")
        == 0.004
    )
    # A price for an api the operation does not query is not exported.
    assert (
        value(samples, "wolkvox_billing_unit_price", operation="lima", api="ivr_minutes", currency="USD")
        is None
    )
    assert value(samples, "wolkvox_billing_cost_budget", operation="bogota", currency="USD") == 900
    # All requests of one token, whatever the service, one at a time.
    stats = simulator.stats()
    assert stats["tokens"]["tok-b"]["max_in_flight"] == 1 and stats["total_violations"] == 0


def test_four_services_and_a_shared_token_all_fresh_within_seconds_one_request_at_a_time(
    simulator: Simulator, run_exporter
) -> None:
    # Long enough for the token's four back-to-back requests (answer + 1 s gap each) to fit in it.
    interval = 6.0
    config = {
        "refresh_interval": f"{interval:g}s",
        "daily_request_limit": 1_000_000,
        "operations": [
            {
                "name": "solo",
                "server": "wv1",
                "token": "tok-solo",
                "base_url": simulator.url,
                "apis": SERVICES,
            },
            {"name": "a", "server": "wv2", "token": "tok-shared", "base_url": simulator.url},
            {"name": "b", "server": "wv3", "token": "tok-shared", "base_url": simulator.url},
        ],
    }
    started = time.monotonic()
    exporter = run_exporter(config)
    exporter.wait_for(
        lambda s: (
            all(value(s, "wolkvox_billing_usage", operation="solo", api=a) is not None for a in SERVICES)
            and all(value(s, "wolkvox_stereo_rec_minutes", operation=o) is not None for o in ("a", "b"))
        ),
        timeout=15,
        what="every value of every report",
    )
    # Back to back on each token (answer + 1 s gap): 4 reports in a few seconds, not 4 intervals.
    assert time.monotonic() - started < 12

    def refreshed_twice() -> dict | None:
        tokens = simulator.stats()["tokens"]
        reports = {**tokens["tok-solo"]["reports"], **tokens["tok-shared"]["reports"]}
        return reports if len(reports) == 6 and all(r["requests"] >= 2 for r in reports.values()) else None

    reports = wait_until(refreshed_twice, timeout=30, what="every report fetched twice")
    for name, report in reports.items():
        # Each report again a full interval after its answer: never sooner, and at most a turn of its
        # token (another report's answer and the 1 s gap) later.
        assert interval <= report["min_gap_seconds"] < interval + 2.5, name
    stats = simulator.stats()
    assert stats["tokens"]["tok-solo"]["max_in_flight"] == 1
    assert stats["tokens"]["tok-shared"]["max_in_flight"] == 1
    assert stats["total_violations"] == 0
    samples = exporter.samples()
    for api in SERVICES:
        assert value(samples, "wolkvox_refresh_interval_seconds", operation="solo", api=api) == interval


def test_a_token_past_its_daily_budget_stops_at_its_burst_and_exports_the_stretched_pace(
    simulator: Simulator, start_exporter
) -> None:
    limit, apis = 20, [*SERVICES, "ivr_calls", "interactions", "rec_screen"]
    config = {
        "refresh_interval": "1s",
        "daily_request_limit": limit,
        "operations": [
            {"name": "a", "server": "wv1", "token": "tok-a", "base_url": simulator.url, "apis": apis},
        ],
    }
    exporter = start_exporter(config)
    # 7 reports are at most half the budget: a burst of all 7 (a first full picture), then 13 a day
    # shared by the 7: one every 12.9 hours each.
    samples = exporter.wait_for(
        lambda s: value(s, "wolkvox_scrape_requests_total", operation="a") == 7, what="the start-up burst"
    )
    stretched = len(apis) * 86_400 / (limit - 7)
    for api in apis:
        assert value(samples, "wolkvox_refresh_interval_seconds", operation="a", api=api) == pytest.approx(
            stretched
        )
    assert value(samples, "wolkvox_token_planned_requests_per_day") == len(apis) * 86_400
    assert "daily_request_limit 20 does not allow every report every 1s" in exporter.process.log()
    # Nothing more is sent for a while (the next request is hours away).
    holds(lambda: simulator.stats()["tokens"]["tok-a"]["requests"] == 7, 3.0, what="only the burst sent")
    status = exporter.get("/").text
    assert "every 13 h" in status  # 12h55m, in one plain unit


def test_token_info_is_read_and_exported_for_every_operation_of_the_token(
    simulator: Simulator, run_exporter
) -> None:
    config = {
        "refresh_interval": "0.3s",
        "daily_request_limit": 1_000_000,
        "token_info_interval": "1h",
        "operations": [
            {"name": "a", "server": "wv1", "token": "shared", "base_url": simulator.url},
            {"name": "b", "server": "wv2", "token": "shared", "base_url": simulator.url},
        ],
    }
    exporter = run_exporter(config)
    samples = exporter.wait_for(
        lambda s: (
            value(s, "wolkvox_token_limit", operation="a") is not None
            and value(s, "wolkvox_token_limit", operation="b") is not None
        ),
        timeout=20,
        what="token_info for both operations",
    )
    assert value(samples, "wolkvox_token_limit", operation="a") == 0  # the simulator's default: no limit
    assert value(samples, "wolkvox_token_used_today", operation="b") >= 1
    exporter.wait_for(lambda s: value(s, "wolkvox_scrape_requests_total", operation="b") >= 3)
    stats = simulator.stats()["tokens"]["shared"]
    assert stats["apis"]["token_info"] == 1  # at most hourly
    assert stats["max_in_flight"] == 1


def test_one_table_of_billing_services_feeds_the_help_the_simulator_and_the_dashboards() -> None:
    """model.BILLING_APIS is the one place a billing service is named: what reads it says the same."""
    board = json.loads((REPO / "grafana" / "dashboards" / "wolkvox-billing.json").read_text())
    mappings = {
        api: option["text"]
        for panel in board["panels"]
        for override in panel.get("fieldConfig", {}).get("overrides", [])
        if override["matcher"].get("options") == "Service (unit)"
        for prop in override["properties"]
        for mapping in prop["value"]
        for api, option in mapping["options"].items()
    }
    assert set(KNOWN_APIS) == set(BILLING_APIS) == set(mappings)
    month = 1_767_225_600.0  # 2026-01-01T00:00:00Z
    for name, api in BILLING_APIS.items():
        assert mappings[name] == f"{name} ({api.unit})"
        assert f"{name}: {api.measures}" in BILLING_USAGE.help
        assert description(name) == api.description
        assert (name in LICENCE_APIS) == (api.kind == "level")
        if api.kind == "usage":  # grows at the table's rate: 10 hours at 100 per hour
            grown = usage_value(name, "t", "wv1", month + 36_000, 100) - usage_value(
                name, "t", "wv1", month, 100
            )
            assert grown == pytest.approx(1000 * api.simulated_rate)
