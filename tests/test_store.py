"""The store: per-operation state, expiry, and the rendered page (checked through a real parser)."""

from __future__ import annotations

import gzip

from conftest import parse_samples, value
from prometheus_client.parser import text_string_to_metric_families

from exporter.model import REASONS, FetchResult, Reading
from exporter.store import OperationInfo, Store


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_store(clock: Clock, max_age: float = 3600.0, **kwargs) -> Store:
    operations = [
        OperationInfo("bogota", budget_minutes=40000),
        OperationInfo('li"ma\\x'),
    ]
    return Store(operations, max_age=max_age, wall=clock, include_process_metrics=False, **kwargs)


def ok(op: str, minutes: float, at: float, api: str = "stereo_rec") -> FetchResult:
    return FetchResult(operation=op, api=api, finished_at=at, duration=0.25, value=Reading(minutes, rows=1))


def failed(op: str, reason: str, at: float) -> FetchResult:
    return FetchResult(operation=op, api="stereo_rec", finished_at=at, duration=1.5, reason=reason)


def test_first_page_has_up_zero_and_every_reason_at_zero() -> None:
    store = make_store(Clock())
    samples = parse_samples(store.page.plain.decode())
    for op in ("bogota", 'li"ma\\x'):
        assert value(samples, "wolkvox_up", operation=op) == 0
        assert value(samples, "wolkvox_scrape_requests_total", operation=op) == 0
        for reason in REASONS:
            assert value(samples, "wolkvox_scrape_errors_total", operation=op, reason=reason) == 0
        assert value(samples, "wolkvox_stereo_rec_minutes", operation=op) is None
    assert value(samples, "wolkvox_stereo_rec_budget_minutes", operation="bogota") == 40000
    assert value(samples, "wolkvox_stereo_rec_budget_minutes", operation='li"ma\\x') is None
    assert not store.ready


def test_success_then_failure_keeps_the_last_good_value() -> None:
    clock = Clock()
    store = make_store(clock)
    store.record(ok("bogota", 1234.5, clock.now))
    clock.now += 300
    store.record(failed("bogota", "timeout", clock.now))
    samples = parse_samples(store.render().plain.decode())
    assert value(samples, "wolkvox_stereo_rec_minutes", operation="bogota") == 1234.5
    assert value(samples, "wolkvox_last_success_timestamp_seconds", operation="bogota") == clock.now - 300
    assert value(samples, "wolkvox_up", operation="bogota") == 0
    assert value(samples, "wolkvox_scrape_errors_total", operation="bogota", reason="timeout") == 1
    assert value(samples, "wolkvox_scrape_requests_total", operation="bogota") == 2
    assert value(samples, "wolkvox_scrape_duration_seconds", operation="bogota") == 1.5
    assert value(samples, "wolkvox_last_error_info", operation="bogota", reason="timeout") == 1


def test_value_older_than_max_age_is_dropped_and_comes_back_on_success() -> None:
    clock = Clock()
    store = make_store(clock, max_age=3600)
    store.record(ok("bogota", 10, clock.now))
    clock.now += 3599
    assert b"wolkvox_stereo_rec_minutes{" in store.render().plain
    clock.now += 2
    page = store.render().plain
    assert b"wolkvox_stereo_rec_minutes{" not in page
    # The timestamp of the last success stays: it is what tells how old the data is.
    assert value(parse_samples(page.decode()), "wolkvox_last_success_timestamp_seconds", operation="bogota")
    store.record(ok("bogota", 20, clock.now))
    assert (
        value(parse_samples(store.render().plain.decode()), "wolkvox_stereo_rec_minutes", operation="bogota")
        == 20
    )


def test_ready_once_every_operation_was_tried() -> None:
    clock = Clock()
    store = make_store(clock)
    store.record(failed("bogota", "connection", clock.now))
    assert not store.ready
    store.record(ok('li"ma\\x', 1, clock.now))
    assert store.ready


def test_every_family_has_help_and_type_and_gzip_matches_plain() -> None:
    clock = Clock()
    store = make_store(clock)
    store.record(ok("bogota", 1, clock.now))
    page = store.render()
    assert gzip.decompress(page.gzipped) == page.plain
    text = page.plain.decode()
    families = list(text_string_to_metric_families(text))
    assert families
    for family in families:
        assert family.documentation, family.name
        assert f"# TYPE {family.name}" in text or f"# TYPE {family.name}_total" in text
    assert text.count("# HELP wolkvox_up ") == 1


def test_reconfigure_keeps_counters_of_kept_operations_and_drops_removed_ones() -> None:
    clock = Clock()
    store = make_store(clock)
    store.record(failed("bogota", "parse", clock.now))
    store.reconfigure([OperationInfo("bogota"), OperationInfo("quito")], max_age=3600)
    samples = parse_samples(store.render().plain.decode())
    assert value(samples, "wolkvox_scrape_errors_total", operation="bogota", reason="parse") == 1
    assert value(samples, "wolkvox_stereo_rec_budget_minutes", operation="bogota") is None
    assert value(samples, "wolkvox_up", operation="quito") == 0
    assert value(samples, "wolkvox_up", operation='li"ma\\x') is None
    # A result for an operation removed while its request was in flight is ignored.
    store.record(ok('li"ma\\x', 5, clock.now))
    assert b'operation="li' not in store.render().plain


def test_restored_values_show_until_too_old() -> None:
    clock = Clock()
    store = make_store(clock, max_age=600)
    store.restore_values({"bogota": {"stereo_rec": (77.0, clock.now - 100)}, "gone": {"stereo_rec": (1, 1)}})
    samples = parse_samples(store.render().plain.decode())
    assert value(samples, "wolkvox_stereo_rec_minutes", operation="bogota") == 77
    assert value(samples, "wolkvox_scrape_requests_total", operation="bogota") == 0
    clock.now += 501
    assert b"wolkvox_stereo_rec_minutes{" not in store.render().plain


def test_reload_status_is_exported() -> None:
    store = make_store(Clock())
    store.set_reload_status(False)
    samples = parse_samples(store.render().plain.decode())
    assert value(samples, "wolkvox_config_last_reload_successful") == 0
    store.set_reload_status(True)
    assert value(parse_samples(store.render().plain.decode()), "wolkvox_config_last_reload_successful") == 1


def test_an_unknown_api_does_not_take_the_operation_down_but_a_failing_one_does() -> None:
    clock = Clock()
    store = Store(
        [OperationInfo("op", apis=("stereo_rec", "no_such_api", "ivr_calls"))],
        max_age=3600,
        wall=clock,
        include_process_metrics=False,
    )
    store.record(ok("op", 1, clock.now))
    store.record(FetchResult("op", "no_such_api", clock.now, 0.1, reason="unknown_api"))
    store.record(ok("op", 2, clock.now, api="ivr_calls"))
    samples = parse_samples(store.render().plain.decode())
    assert value(samples, "wolkvox_up", operation="op") == 1
    assert value(samples, "wolkvox_billing_usage", operation="op", api="ivr_calls") == 2
    store.record(FetchResult("op", "ivr_calls", clock.now, 0.1, reason="timeout"))
    assert value(parse_samples(store.render().plain.decode()), "wolkvox_up", operation="op") == 0
    # Only unknown apis: nothing succeeded, so not up.
    only_unknown = Store(
        [OperationInfo("x", apis=("nope",))], max_age=60, wall=clock, include_process_metrics=False
    )
    only_unknown.record(FetchResult("x", "nope", clock.now, 0.1, reason="unknown_api"))
    assert value(parse_samples(only_unknown.render().plain.decode()), "wolkvox_up", operation="x") == 0


def test_token_info_is_shared_by_the_token_and_expires() -> None:
    from exporter.model import TokenInfo
    from exporter.store import Schedule

    clock = Clock()
    store = Store(
        [
            OperationInfo("a", token_key="k1"),
            OperationInfo("b", token_key="k1"),
            OperationInfo("c", token_key="k2"),
        ],
        max_age=600,
        wall=clock,
        include_process_metrics=False,
        schedule=Schedule(token_info_interval=3600),
    )
    store.record(FetchResult("a", "token_info", clock.now, 0.1, value=TokenInfo(1000, 12, 40)))
    samples = parse_samples(store.render().plain.decode())
    assert value(samples, "wolkvox_token_limit", operation="b") == 1000
    assert value(samples, "wolkvox_token_used_today", operation="a") == 12
    assert value(samples, "wolkvox_token_limit", operation="c") is None
    assert value(samples, "wolkvox_scrape_requests_total", operation="a") == 1
    assert value(samples, "wolkvox_up", operation="a") == 0  # token_info does not make an operation up
    clock.now += 7199
    assert b"wolkvox_token_limit{" in store.render().plain
    clock.now += 2  # two token_info intervals without a new answer
    assert b"wolkvox_token_limit{" not in store.render().plain
