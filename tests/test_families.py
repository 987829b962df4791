"""exporter/families.py: the table of metric families and how each renders from an operation's state."""

from __future__ import annotations

import re

import pytest
from harness import labelled, parse_samples, value
from prometheus_client.parser import text_string_to_metric_families

from exporter import __version__
from exporter.exposition import Family
from exporter.families import (
    GLOBAL_FAMILIES,
    OPERATION_FAMILIES,
    lines_by_family,
    render_global,
    render_operation,
)
from exporter.model import REASONS, ReportStatus
from exporter.monthclose import Seen
from exporter.store import GlobalFacts, OperationInfo, OperationState, Schedule

AT = 1_800_000_000.0
FAMILIES = [entry.family for entry in OPERATION_FAMILIES] + [family for family, _ in GLOBAL_FAMILIES]


def page_of(state: OperationState) -> str:
    """The operation's lines under their families' headers, as the page joins them."""
    return "".join(
        entry.family.header().decode() + lines.decode()
        for entry, lines in zip(OPERATION_FAMILIES, lines_by_family(render_operation(state)), strict=True)
        if lines
    )


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_every_family_follows_the_naming_conventions(family: Family) -> None:
    assert re.fullmatch(r"wolkvox_[a-z0-9_]+", family.name)
    assert family.type in ("gauge", "counter")
    assert family.name.endswith("_total") == (family.type == "counter")
    assert family.help.strip() and "\n" not in family.help


def test_family_names_are_unique() -> None:
    names = [family.name for family in FAMILIES]
    assert len(names) == len(set(names))


def test_an_operation_never_tried_is_down_with_every_reason_at_zero() -> None:
    state = OperationState(OperationInfo("bogota", budget_minutes=100))
    samples = parse_samples(page_of(state))
    assert value(samples, "wolkvox_up", operation="bogota") == 0
    assert value(samples, "wolkvox_stereo_rec_budget_minutes", operation="bogota") == 100
    assert value(samples, "wolkvox_scrape_requests_total", operation="bogota") == 0
    for reason in REASONS:  # present from the first page, so rate() sees the first increase
        assert value(samples, "wolkvox_scrape_errors_total", operation="bogota", reason=reason) == 0
    assert value(samples, "wolkvox_stereo_rec_minutes", operation="bogota") is None
    assert labelled(samples, "wolkvox_last_error_info") == []


def test_a_failing_operation_shows_its_reason_and_keeps_its_last_value() -> None:
    state = OperationState(OperationInfo("quito", apis=("stereo_rec", "ivr_calls")))
    good, bad = state.report("stereo_rec"), state.report("ivr_calls")
    good.tried, good.value, state.last_success = True, (1234.5, AT), AT
    bad.tried, bad.last_reason = True, "timeout"
    bad.last_failure = ("timeout", AT, "no data within the read timeout 60s")
    state.errors["timeout"] = 2
    samples = parse_samples(page_of(state))
    assert value(samples, "wolkvox_up", operation="quito") == 0
    assert labelled(samples, "wolkvox_last_error_info", operation="quito") == [
        {
            "operation": "quito",
            "api": "ivr_calls",
            "reason": "timeout",
            "host": "",
            "message": "no data within the read timeout 60s",
        }
    ]
    assert value(samples, "wolkvox_scrape_errors_total", operation="quito", reason="timeout") == 2
    assert value(samples, "wolkvox_stereo_rec_minutes", operation="quito") == 1234.5
    assert value(samples, "wolkvox_billing_usage", operation="quito", api="stereo_rec") == 1234.5
    assert value(samples, "wolkvox_billing_usage", operation="quito", api="ivr_calls") is None
    bad.last_reason = None  # the next answer succeeded
    bad.value = (7.0, AT)
    samples = parse_samples(page_of(state))
    assert value(samples, "wolkvox_up", operation="quito") == 1
    assert labelled(samples, "wolkvox_last_error_info", operation="quito") == []


def test_per_api_lines_follow_the_configured_apis_only() -> None:
    state = OperationState(
        OperationInfo(
            "lima", apis=("ivr_minutes", "stereo_rec"), prices=(("stereo_rec", 0.5), ("amd_ai", 2.0))
        )
    )
    for api, number in (("stereo_rec", 1.0), ("ivr_minutes", 2.0), ("amd_ai", 3.0)):
        state.report(api).value = (number, AT)
        state.report(api).pace = ReportStatus(interval=300.0, next_due=AT + 300, failures=0)
    state.report("stereo_rec").closed = Seen(99.0, AT - 86400, "2026-11")
    text = page_of(state)
    usage = [line for line in text.splitlines() if line.startswith("wolkvox_billing_usage{")]
    assert usage == [
        'wolkvox_billing_usage{operation="lima",api="ivr_minutes"} 2',
        'wolkvox_billing_usage{operation="lima",api="stereo_rec"} 1',
    ]
    samples = parse_samples(text)
    assert (
        value(samples, "wolkvox_billing_unit_price", operation="lima", api="stereo_rec", currency="USD")
        == 0.5
    )
    assert (
        value(samples, "wolkvox_billing_unit_price", operation="lima", api="amd_ai", currency="USD") is None
    )
    assert value(samples, "wolkvox_refresh_interval_seconds", operation="lima", api="amd_ai") is None
    assert (
        value(samples, "wolkvox_stereo_rec_minutes_previous_month", operation="lima", month="2026-11") == 99
    )


def test_every_entry_renders_only_its_own_family() -> None:
    state = OperationState(OperationInfo('a "quoted"\\name', budget_minutes=1, cost_budget=2))
    state.report("stereo_rec").value = (1.0, AT)
    state.token_info = (1000.0, 10.0, AT)
    for entry, lines in zip(OPERATION_FAMILIES, lines_by_family(render_operation(state)), strict=True):
        for line in lines.decode().splitlines():
            assert line.split("{", 1)[0] == entry.family.name, line


def test_each_operations_cached_lines_read_back_family_by_family() -> None:
    """The page cache keeps an operation's lines deflated with a table of byte offsets: reading it back
    gives every family's lines exactly, multi-byte names and a long error detail included."""
    state = OperationState(
        OperationInfo("São Paulo ñandú", apis=("stereo_rec", "ivr_minutes"), budget_minutes=9)
    )
    state.report("stereo_rec").value = (1234.5, AT)
    failed = state.report("ivr_minutes")
    failed.tried, failed.last_reason = True, "timeout"
    failed.last_failure = ("timeout", AT, "no data within the read timeout 10s ñ " + "x" * 400)
    state.errors["timeout"] = 3
    expected = [entry.render(state).encode() for entry in OPERATION_FAMILIES]
    assert sum(1 for lines in expected if lines) >= 4  # the case exercises several families
    assert lines_by_family(render_operation(state)) == expected


def test_the_global_families_have_headers_and_the_version() -> None:
    facts = GlobalFacts(
        reload_ok=False, reload_time=AT, schedule=Schedule(daily_request_limit=500), connections_rejected=7
    )
    text = render_global(facts).decode()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert all(families[name].documentation for name in families)
    samples = parse_samples(text)
    assert value(samples, "wolkvox_exporter_build_info", version=__version__) == 1
    assert value(samples, "wolkvox_config_last_reload_successful") == 0
    assert value(samples, "wolkvox_config_last_reload_success_timestamp_seconds") == AT
    assert value(samples, "wolkvox_token_daily_request_limit") == 500
    assert value(samples, "wolkvox_exporter_connections_rejected_total") == 7
