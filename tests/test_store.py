"""The store: per-operation state, expiry, and the rendered page (checked through a real parser)."""

from __future__ import annotations

import logging
import zlib
from typing import Any

import pytest
from harness import labelled, parse_samples, value
from prometheus_client.parser import text_string_to_metric_families

from exporter.model import REASONS, FetchResult, Reading, ReportStatus
from exporter.monthclose import SavedMonths, Seen
from exporter.page import Pages, RenderedPage
from exporter.store import OperationInfo, Store


class PagedStore:
    """A store with its page, wired as the exporter does (without the process metrics)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.store = Store(*args, **kwargs)
        self.pages = Pages(self.store, include_process_metrics=False)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def render(self) -> RenderedPage:
        return self.pages.render()

    @property
    def page(self) -> RenderedPage:
        return self.pages.page


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_store(clock: Clock, max_age: float = 3600.0, **kwargs: Any) -> PagedStore:
    operations = [
        OperationInfo("bogota", budget_minutes=40000),
        OperationInfo('li"ma\\x'),
    ]
    return PagedStore(operations, max_age=max_age, wall=clock, monotonic=clock, **kwargs)


def ok(op: str, minutes: float, at: float, api: str = "stereo_rec", month: str | None = None) -> FetchResult:
    return FetchResult(operation=op, api=api, finished_at=at, duration=0.25, value=Reading(minutes, 1, month))


def failed(op: str, reason: str, at: float) -> FetchResult:
    return FetchResult(
        operation=op, api="stereo_rec", finished_at=at, duration=1.5, reason=reason, detail="no data"
    )


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
    assert labelled(samples, "wolkvox_last_error_info", operation="bogota") == [
        {"operation": "bogota", "api": "stereo_rec", "reason": "timeout", "host": "", "message": "no data"}
    ]


def test_last_error_info_is_one_series_per_failing_report_with_a_short_safe_message() -> None:
    """One series per report whose last request failed (an unknown api included, while wolkvox_up stays
    1), naming the host; the message is one line of at most 120 characters, tokens masked; gone after
    the report's next success."""
    from exporter.logs import redact as scrub

    clock = Clock()
    info = OperationInfo("op", apis=("stereo_rec", "ivr_minutes", "no_such_api"), host="wv1.wolkvox.com")
    store = PagedStore([info], max_age=3600, wall=clock)
    scrub.set(["tok-SECRET-123"])
    try:
        long = "wolkvox answered code 500: echo tok-SECRET-123\n" + "y" * 500
        store.record(FetchResult("op", "stereo_rec", clock.now, 0.1, value=Reading(5, 1)))
        store.record(FetchResult("op", "ivr_minutes", clock.now, 0.1, reason="api_error", detail=long))
        store.record(
            FetchResult("op", "no_such_api", clock.now, 0.1, reason="unknown_api", detail="DOES NOT EXIST")
        )
        samples = parse_samples(store.render().plain.decode())
    finally:
        scrub.set([])
    series = {s["api"]: s for s in labelled(samples, "wolkvox_last_error_info", operation="op")}
    assert set(series) == {"ivr_minutes", "no_such_api"}
    assert value(samples, "wolkvox_up", operation="op") == 0  # ivr_minutes failed
    message = series["ivr_minutes"]["message"]
    assert "tok-SECRET" not in message and "<redacted>" in message
    assert len(message) == 120 and message.endswith("...") and "\n" not in message
    assert series["ivr_minutes"]["host"] == "wv1.wolkvox.com"
    assert series["no_such_api"]["reason"] == "unknown_api"
    assert series["no_such_api"]["message"] == "DOES NOT EXIST"

    clock.now += 300
    store.record(FetchResult("op", "ivr_minutes", clock.now, 0.1, value=Reading(7, 1)))
    samples = parse_samples(store.render().plain.decode())
    assert [s["api"] for s in labelled(samples, "wolkvox_last_error_info")] == ["no_such_api"]
    assert value(samples, "wolkvox_up", operation="op") == 1


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


def test_every_family_has_help_and_type_and_the_page_is_one_gzip_member() -> None:
    clock = Clock()
    store = make_store(clock)
    store.record(ok("bogota", 1, clock.now))
    page = store.render()
    # One complete gzip member (a client that reads only the first member must get the whole page).
    reader = zlib.decompressobj(16 + zlib.MAX_WBITS)
    text = reader.decompress(page.gzipped).decode()
    assert reader.eof and reader.unused_data == b""
    # The operations' part, then the exporter's own lines (the tail compressed on its own).
    assert 'wolkvox_stereo_rec_minutes{operation="bogota"} 1\n' in text
    assert text.index("# HELP wolkvox_up ") < text.index("# HELP wolkvox_exporter_build_info ")
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
    store = PagedStore(
        [OperationInfo("op", apis=("stereo_rec", "no_such_api", "ivr_calls"))],
        max_age=3600,
        wall=clock,
        monotonic=clock,
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
    only_unknown = PagedStore([OperationInfo("x", apis=("nope",))], max_age=60, wall=clock, monotonic=clock)
    only_unknown.record(FetchResult("x", "nope", clock.now, 0.1, reason="unknown_api"))
    assert value(parse_samples(only_unknown.render().plain.decode()), "wolkvox_up", operation="x") == 0


def test_token_info_is_shared_by_the_token_and_expires() -> None:
    from exporter.model import TokenInfo
    from exporter.store import Schedule

    clock = Clock()
    store = PagedStore(
        [
            OperationInfo("a", token_key="k1"),
            OperationInfo("b", token_key="k1"),
            OperationInfo("c", token_key="k2"),
        ],
        max_age=600,
        wall=clock,
        monotonic=clock,
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


@pytest.mark.parametrize(
    ("api", "reason"), [("token_info", "auth"), ("stereo_rec", "auth"), ("ivr_calls", "token_limit")]
)
def test_a_token_refused_on_any_request_fails_every_operation_of_the_token(api: str, reason: str) -> None:
    """auth and token_limit are the token's failures, whichever request met them: every operation of
    the token is down with that reason at once (its reports are not all retried while the token is
    paused); only the request that was made is counted."""
    clock = Clock()
    apis = ("stereo_rec", "ivr_calls")
    store = PagedStore(
        [OperationInfo(name, apis=apis, token_key="k2" if name == "c" else "k1") for name in "abc"],
        max_age=3600,
        wall=clock,
        monotonic=clock,
    )
    for name in "abc":
        for each in apis:
            store.record(ok(name, 5.0, clock.now - 300, api=each))
    clock.now += 1
    detail = "wolkvox answered code 403: PLEASE VALIDATE TOKEN"
    store.record(FetchResult("a", api, clock.now, 0.1, reason=reason, detail=detail))
    samples = parse_samples(store.render().plain.decode())
    for name in "ab":
        assert value(samples, "wolkvox_up", operation=name) == 0, name
        # Every report of the token, each named with the request that met the refusal.
        failing = labelled(samples, "wolkvox_last_error_info", operation=name, reason=reason)
        assert sorted(s["api"] for s in failing) == sorted(apis), name
        assert value(samples, "wolkvox_stereo_rec_minutes", operation=name) == 5.0  # until max_age
    assert value(samples, "wolkvox_up", operation="c") == 1  # another token
    assert value(samples, "wolkvox_scrape_errors_total", operation="a", reason=reason) == 1
    assert value(samples, "wolkvox_scrape_errors_total", operation="b", reason=reason) == 0  # no request
    assert value(samples, "wolkvox_scrape_requests_total", operation="b") == 2
    rows = {(r.operation, r.api): r for r in store.report_rows()}
    for name in "ab":
        for each in apis:
            row = rows[(name, each)]
            assert row.failing and row.failing_since == clock.now, (name, each)
            assert row.last_failure is not None and row.last_failure[0] == reason
            assert "PLEASE VALIDATE TOKEN" in row.last_failure[2]
    # Each report's own next answer says how it is: b is up again once both of its reports answered.
    clock.now += 60
    store.record(ok("b", 6.0, clock.now))
    assert value(parse_samples(store.render().plain.decode()), "wolkvox_up", operation="b") == 0
    store.record(ok("b", 6.0, clock.now, api="ivr_calls"))
    samples = parse_samples(store.render().plain.decode())
    assert value(samples, "wolkvox_up", operation="b") == 1
    assert value(samples, "wolkvox_up", operation="a") == 0


def test_a_request_failure_of_another_kind_stays_with_its_report() -> None:
    clock = Clock()
    store = PagedStore(
        [OperationInfo(name, token_key="k1") for name in "ab"], max_age=3600, wall=clock, monotonic=clock
    )
    for name in "ab":
        store.record(ok(name, 5.0, clock.now))
    store.record(failed("a", "timeout", clock.now))
    store.record(FetchResult("a", "token_info", clock.now, 0.1, reason="http_status"))
    samples = parse_samples(store.render().plain.decode())
    assert value(samples, "wolkvox_up", operation="a") == 0
    assert value(samples, "wolkvox_up", operation="b") == 1


# ----- the month close ------------------------------------------------------------------------------------

NOV_30 = 1_796_083_200.0 - 300  # 2026-11-30 23:55 UTC
APIS = ("stereo_rec", "ivr_minutes", "chat_licenses")


def month_store(clock: Clock, max_age: float = 3600.0) -> Store:
    return PagedStore([OperationInfo("bogota", apis=APIS)], max_age=max_age, wall=clock, monotonic=clock)


def previous_month(store: Store) -> dict[tuple[str, ...], float]:
    """Every previous-month sample on the page, by (name, api, month)."""
    samples = parse_samples(store.render().plain.decode())
    return {
        (name, dict(labels).get("api", ""), dict(labels)["month"]): v
        for (name, labels), v in samples.items()
        if name.endswith("_previous_month")
    }


def test_the_first_answer_of_a_new_month_closes_the_old_one_for_each_api() -> None:
    clock = Clock(NOV_30)
    store = month_store(clock)
    for api, minutes in zip(APIS, (43_000, 9_000, 7), strict=True):
        store.record(ok("bogota", minutes - 10, NOV_30 - 300, api, "2026-11"))
        store.record(ok("bogota", minutes, NOV_30, api, "2026-11"))
    assert previous_month(store) == {}
    clock.now = NOV_30 + 600
    for api, minutes in zip(APIS, (12, 3, 7), strict=True):
        store.record(ok("bogota", minutes, clock.now, api, "2026-12"))
    assert previous_month(store) == {
        ("wolkvox_stereo_rec_minutes_previous_month", "", "2026-11"): 43_000,
        ("wolkvox_billing_usage_previous_month", "stereo_rec", "2026-11"): 43_000,
        ("wolkvox_billing_usage_previous_month", "ivr_minutes", "2026-11"): 9_000,
        ("wolkvox_billing_usage_previous_month", "chat_licenses", "2026-11"): 7,
    }
    samples = parse_samples(store.render().plain.decode())
    assert value(samples, "wolkvox_stereo_rec_minutes", operation="bogota") == 12  # the new month
    (row,) = [r for r in store.report_rows() if r.api == "ivr_minutes"]
    assert row.last_month == Seen(9_000, NOV_30, "2026-11")


def test_a_mid_month_correction_is_not_a_close() -> None:
    clock = Clock(NOV_30 - 14 * 86400)
    store = month_store(clock)
    store.record(ok("bogota", 20_000, clock.now, month="2026-11"))
    store.record(ok("bogota", 9_000, clock.now + 300, month="2026-11"))  # the vendor corrected it
    assert previous_month(store) == {}
    # Without a date either: mid-month, a drop is a correction.
    store.record(ok("bogota", 4_000, clock.now + 600))
    assert previous_month(store) == {}
    assert value(
        parse_samples(store.render().plain.decode()), "wolkvox_stereo_rec_minutes", operation="bogota"
    )


def test_a_month_closes_once_and_its_value_stays_until_the_next_close() -> None:
    """Without dates: the drop at 00:05 closes November; a correction at 02:00 (still near the 1st)
    must not replace November's value with December's; January replaces it."""
    clock = Clock(NOV_30)
    store = month_store(clock)

    def at(when: float, minutes: float) -> None:
        clock.now = when
        store.record(ok("bogota", minutes, when))

    at(NOV_30, 43_000)
    at(NOV_30 + 600, 50)
    at(NOV_30 + 2 * 3600, 20)
    closed = {("wolkvox_stereo_rec_minutes_previous_month", "", "2026-11"): 43_000}
    assert {k: v for k, v in previous_month(store).items() if k[1] == ""} == closed
    at(NOV_30 + 20 * 86400, 30_000)  # Dec 20: month-to-date again
    assert {k: v for k, v in previous_month(store).items() if k[1] == ""} == closed
    dec_31 = NOV_30 + 31 * 86400
    at(dec_31, 44_000)
    at(dec_31 + 600, 9)
    # One series at a time: December replaced November.
    assert previous_month(store) == {
        ("wolkvox_stereo_rec_minutes_previous_month", "", "2026-12"): 44_000,
        ("wolkvox_billing_usage_previous_month", "stereo_rec", "2026-12"): 44_000,
    }


def test_failures_and_max_age_across_the_1st_do_not_lose_the_close() -> None:
    """The last November value was dropped from /metrics (older than max_age) before December's first
    answer came: it is still what November closed at."""
    clock = Clock(NOV_30 - 4 * 3600)
    store = month_store(clock, max_age=3600)
    store.record(ok("bogota", 41_000, clock.now, month="2026-11"))
    clock.now = NOV_30 + 6 * 3600
    store.record(failed("bogota", "timeout", clock.now))
    assert b"wolkvox_stereo_rec_minutes{" not in store.render().plain
    store.record(ok("bogota", 100, clock.now + 60, month="2026-12"))
    assert previous_month(store)[("wolkvox_stereo_rec_minutes_previous_month", "", "2026-11")] == 41_000


def test_the_closing_values_are_kept_and_restored_and_a_restart_still_notices_the_close() -> None:
    clock = Clock(NOV_30)
    store = month_store(clock)
    store.record(ok("bogota", 43_000, NOV_30, month="2026-11"))
    store.record(ok("bogota", 7, NOV_30, "chat_licenses", month="2026-11"))
    store.record(ok("bogota", 12, NOV_30 + 600, month="2026-12"))
    saved = store.month_state()
    assert saved.closed == {"bogota": {"stereo_rec": Seen(43_000, NOV_30, "2026-11")}}
    assert saved.seen["bogota"]["chat_licenses"] == Seen(7, NOV_30, "2026-11")

    # A restart on the 3rd: November is on the first page, before any answer.
    clock.now = NOV_30 + 2 * 86400
    restarted = month_store(clock)
    restarted.restore_months(saved)
    assert previous_month(restarted) == {
        ("wolkvox_stereo_rec_minutes_previous_month", "", "2026-11"): 43_000,
        ("wolkvox_billing_usage_previous_month", "stereo_rec", "2026-11"): 43_000,
    }
    # The licences' last November reading came back too: December's first answer closes November.
    restarted.record(ok("bogota", 8, clock.now, "chat_licenses", month="2026-12"))
    assert (
        previous_month(restarted)[("wolkvox_billing_usage_previous_month", "chat_licenses", "2026-11")] == 7
    )


def test_restoring_keeps_only_configured_apis_and_never_overrides_what_is_known() -> None:
    clock = Clock(NOV_30)
    store = month_store(clock)
    store.record(ok("bogota", 12, NOV_30, month="2026-12"))
    store.restore_months(
        SavedMonths(
            seen={"bogota": {"stereo_rec": Seen(1, 1, "2026-10")}},
            closed={
                "bogota": {"amd_ai": Seen(5, 1, "2026-10")},
                "gone": {"stereo_rec": Seen(5, 1, "2026-10")},
            },
        )
    )
    assert previous_month(store) == {}
    assert store.month_state().seen["bogota"]["stereo_rec"].month == "2026-12"


def test_an_api_removed_by_a_reload_loses_its_closing_value() -> None:
    clock = Clock(NOV_30)
    store = month_store(clock)
    for api in ("stereo_rec", "ivr_minutes"):
        store.record(ok("bogota", 100, NOV_30, api, "2026-11"))
        store.record(ok("bogota", 1, NOV_30 + 600, api, "2026-12"))
    store.reconfigure([OperationInfo("bogota", apis=("ivr_minutes",))], max_age=3600)
    assert previous_month(store) == {("wolkvox_billing_usage_previous_month", "ivr_minutes", "2026-11"): 100}


# ----- time: wall-clock steps ------------------------------------------------------------------------------


class SteppingClock:
    """A fake monotonic clock and a wall clock that follows it, shifted by ``skew`` (a wall-clock step)."""

    def __init__(self) -> None:
        self.mono = 5_000.0
        self.skew = 0.0

    def wall(self) -> float:
        return 1_800_000_000.0 + self.mono + self.skew

    def store(self, max_age: float = 3600.0) -> PagedStore:
        return PagedStore(
            [OperationInfo("bogota")], max_age=max_age, wall=self.wall, monotonic=lambda: self.mono
        )


def step_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "wall clock stepped" in r.getMessage()]


def test_after_a_step_back_nothing_exported_lies_ahead_and_ages_stay_monotonic(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = SteppingClock()
    clock.skew = 2 * 86400.0  # the wall clock runs two days ahead for a while...
    store = clock.store(max_age=1800)
    store.record(ok("bogota", 10, clock.wall()))
    fetched_during_skew = clock.wall()
    clock.mono += 600
    caplog.set_level(logging.WARNING, logger="exporter.clock")
    clock.skew = -25 * 3600.0  # ...then steps back to 25 hours behind: 3d1h
    samples = parse_samples(store.render().plain.decode())
    last = value(samples, "wolkvox_last_success_timestamp_seconds", operation="bogota")
    assert last == pytest.approx(clock.wall() - 600)  # ten minutes ago, on the clock as it is now
    assert last < clock.wall() < fetched_during_skew
    assert store.report_rows()[0].last_success == pytest.approx(clock.wall() - 600)
    [line] = step_lines(caplog)
    assert line.levelname == "WARNING" and "stepped back by 3d1h (" in line.getMessage()
    assert "-262800 s" in line.getMessage()
    # The value fetched during the skew is as old as it is: gone max_age after its fetch, not 3 days on.
    clock.mono += 1199
    assert (
        value(parse_samples(store.render().plain.decode()), "wolkvox_stereo_rec_minutes", operation="bogota")
        == 10
    )
    clock.mono += 2
    assert (
        value(parse_samples(store.render().plain.decode()), "wolkvox_stereo_rec_minutes", operation="bogota")
        is None
    )
    assert len(step_lines(caplog)) == 1  # once per step


def test_a_step_forward_moves_the_times_shown_and_expires_nothing_early(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = SteppingClock()
    store = clock.store(max_age=1800)
    store.record(ok("bogota", 10, clock.wall()))
    store.set_pace({("bogota", "stereo_rec"): ReportStatus(300.0, clock.wall() + 300, 0)})
    caplog.set_level(logging.WARNING, logger="exporter.clock")
    clock.mono += 60
    clock.skew = 2 * 86400.0
    samples = parse_samples(store.render().plain.decode())
    assert (
        value(samples, "wolkvox_stereo_rec_minutes", operation="bogota") == 10
    )  # two days "later", but a minute old
    assert value(samples, "wolkvox_last_success_timestamp_seconds", operation="bogota") == pytest.approx(
        clock.wall() - 60
    )
    assert store.report_rows()[0].next_due == pytest.approx(clock.wall() + 240)
    [line] = step_lines(caplog)
    assert "stepped forward by 2d" in line.getMessage()


def test_slewing_and_small_steps_are_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    clock = SteppingClock()
    store = clock.store()
    caplog.set_level(logging.INFO, logger="exporter.clock")
    for _ in range(100):  # NTP slewing: 0.5 ms per second, for 100 minutes
        clock.mono += 60
        clock.skew += 0.03
        store.render()
    clock.skew += 59  # a step, but under a minute: the times move, no line
    store.record(ok("bogota", 1, clock.wall()))
    store.render()
    assert step_lines(caplog) == []


def test_restored_values_from_the_future_are_taken_as_of_now_and_count_as_ready(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = SteppingClock()
    store = clock.store(max_age=600)
    assert not store.ready
    caplog.set_level(logging.WARNING, logger="exporter.store")
    store.restore_values({"bogota": {"stereo_rec": (77.0, clock.wall() + 2 * 86400)}})
    assert store.ready  # a restored pause must not keep a restarted exporter out of service
    samples = parse_samples(store.render().plain.decode())
    assert value(samples, "wolkvox_last_success_timestamp_seconds", operation="bogota") == clock.wall()
    assert "1 restored value(s) lay up to 2d ahead of this clock" in caplog.text
    clock.mono += 601
    assert (
        value(parse_samples(store.render().plain.decode()), "wolkvox_stereo_rec_minutes", operation="bogota")
        is None
    )


def test_a_restored_value_older_than_max_age_does_not_make_ready() -> None:
    clock = SteppingClock()
    store = clock.store(max_age=600)
    store.restore_values({"bogota": {"stereo_rec": (77.0, clock.wall() - 601)}})
    assert not store.ready
