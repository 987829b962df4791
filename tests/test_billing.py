"""Every billing service, prices and the daily request budget: config and the real process."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import Simulator, value

from exporter.client import REASONS
from exporter.config import ConfigError, load_config

SERVICES = ["stereo_rec", "ivr_minutes", "amd_ai", "chat_licenses"]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yml"
    path.write_text(text, encoding="utf-8")
    return path


def test_prices_merge_top_level_and_operation(tmp_path: Path) -> None:
    config = load_config(
        write(
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
        ("daily_request_limit: 0", "daily_request_limit"),
    ],
)
def test_bad_billing_keys_are_one_line_errors(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path, f"{text}\noperations: [{{server: wv1, token: secret-token}}]\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert message.startswith(f"{path}: {key}") and "\n" not in message and "secret-token" not in message


def test_daily_budget_warning_and_stretch(tmp_path: Path) -> None:
    ops = "operations: [{server: wv1, token: a, apis: [stereo_rec, ivr_minutes, amd_ai]}]\n"
    within = load_config(write(tmp_path, ops))
    # One request per token per 5 minutes, whatever the number of apis: 288 a day.
    assert within.requests_per_token_per_day() == 288
    assert not any("daily_request_limit" in w for w in within.warnings)

    over = load_config(write(tmp_path, "refresh_interval: 1m\n" + ops))
    assert over.requests_per_token_per_day() == 1440
    assert over.effective_refresh_interval == 60  # stretch_intervals is off by default
    assert any("daily_request_limit" in w and "1440" in w for w in over.warnings)

    stretched = load_config(write(tmp_path, "refresh_interval: 1m\nstretch_intervals: true\n" + ops))
    assert stretched.effective_refresh_interval == pytest.approx(86.4)
    assert stretched.requests_per_token_per_day(stretched.effective_refresh_interval) <= 1000


def test_several_services_per_operation_on_metrics(simulator: Simulator, start_exporter) -> None:
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
    exporter = start_exporter(config)
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
    assert set(REASONS) >= {"unknown_api"}
    # All requests of one token, whatever the service, one at a time.
    stats = simulator.stats()
    assert stats["tokens"]["tok-b"]["max_in_flight"] == 1 and stats["total_violations"] == 0
    assert exporter.process.proc.poll() is None


def test_stretched_intervals_keep_requests_inside_the_daily_limit(
    simulator: Simulator, start_exporter
) -> None:
    # 0.1 s asked, but a limit of 172,800 a day allows one request per 0.5 s per token.
    limit = 172_800
    config = {
        "refresh_interval": "0.1s",
        "daily_request_limit": limit,
        "stretch_intervals": True,
        "operations": [
            {
                "name": "a",
                "server": "wv1",
                "token": "tok-a",
                "base_url": simulator.url,
                "apis": ["stereo_rec", "ivr_calls"],
            }
        ],
    }
    exporter = start_exporter(config)
    samples = exporter.wait_for(lambda s: value(s, "wolkvox_up", operation="a") == 1)
    assert value(samples, "wolkvox_refresh_interval_seconds") == 0.5
    assert value(samples, "wolkvox_token_planned_requests_per_day") == limit
    assert value(samples, "wolkvox_token_daily_request_limit") == limit
    before = simulator.stats()["tokens"]["tok-a"]["requests"]
    window = 3.0
    time.sleep(window)  # a measurement window, not a wait for a condition
    made = simulator.stats()["tokens"]["tok-a"]["requests"] - before
    assert 1 <= made <= window / 0.5 + 1
    # One request per 0.5 s per token is 172,800 a day: inside the limit.
    assert "stretching refresh_interval" in exporter.process.log()


def test_token_info_is_read_and_exported_for_every_operation_of_the_token(
    simulator: Simulator, start_exporter
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
    exporter = start_exporter(config)
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
