"""Every metric family of /metrics and how it is rendered from the state: one table.

A new per-operation metric is one ``Family`` and one entry in ``OPERATION_FAMILIES`` (a function from an
operation's state to its sample lines), plus its row in docs/metrics.md. The order of the table is the order
of the page. Sample output::

    # HELP wolkvox_stereo_rec_minutes Month-to-date stereo-recording minutes ...
    # TYPE wolkvox_stereo_rec_minutes gauge
    wolkvox_stereo_rec_minutes{operation="bogota"} 1234.5
"""

from __future__ import annotations

import itertools
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from exporter import __version__
from exporter.exposition import Family, sample
from exporter.logs import redact as scrub
from exporter.model import BILLING_APIS, REASONS, STEREO_REC
from exporter.secret import one_line
from exporter.store import GlobalFacts, OperationInfo, OperationState

OPERATION_INFO = Family(
    "wolkvox_operation_info",
    "gauge",
    "Always 1, one series per operation: its server and the labels given to it in the configuration "
    "(labels, top-level and per operation). Join it on operation to group other series by a label, e.g. "
    "sum by (client) (wolkvox_billing_usage * on (operation) group_left (client) "
    "max by (operation, client) (wolkvox_operation_info)).",
)
STEREO_REC_MINUTES = Family(
    "wolkvox_stereo_rec_minutes",
    "gauge",
    "Month-to-date stereo-recording minutes used by the operation (unit: minutes), as last fetched from "
    "the wolkvox billing API: a cached value, refreshed every wolkvox_refresh_interval_seconds "
    "(refresh_interval, or longer when the token's daily budget requires it), that drops at the start "
    "of each month. Absent when the last good value is older than max_age.",
)
BUDGET = Family(
    "wolkvox_stereo_rec_budget_minutes",
    "gauge",
    "Monthly stereo-recording budget of the operation in minutes, from the exporter's configuration.",
)
UP = Family(
    "wolkvox_up",
    "gauge",
    "1 if the last fetch of every api of the operation succeeded, else 0 (also before the first fetch); "
    "an api wolkvox does not know (unknown_api) is left out while another api succeeded. 0 while its "
    "token is refused (auth, token_limit) on any request, token_info included.",
)
# The vendor's message is a label: one line, at most this many characters, tokens masked.
LAST_ERROR_MESSAGE_CHARS = 120
LAST_ERROR = Family(
    "wolkvox_last_error_info",
    "gauge",
    "Always 1, one series per report (operation x api) whose last request failed, gone after its next "
    "success: the failure reason, the host asked, and the start of the error message (at most "
    f"{LAST_ERROR_MESSAGE_CHARS} characters, tokens masked). An api wolkvox does not know (reason "
    "unknown_api) is shown here while wolkvox_up stays 1.",
)
ERRORS = Family(
    "wolkvox_scrape_errors_total",
    "counter",
    f"Failed requests to the wolkvox API for the operation, by reason ({', '.join(REASONS)}).",
)
REQUESTS = Family(
    "wolkvox_scrape_requests_total", "counter", "Requests made to the wolkvox API for the operation."
)
LAST_SUCCESS = Family(
    "wolkvox_last_success_timestamp_seconds",
    "gauge",
    "Unix time of the last successful fetch for the operation.",
)
DURATION = Family(
    "wolkvox_scrape_duration_seconds",
    "gauge",
    "Duration of the last request to the wolkvox API for the operation, in seconds.",
)
BILLING_USAGE = Family(
    "wolkvox_billing_usage",
    "gauge",
    "Month-to-date usage of a wolkvox billing service (api) by the operation, as last fetched (cached; "
    "drops at the start of each month). The unit depends on the api: "
    + "; ".join(f"{api.name}: {api.measures}" for api in BILLING_APIS.values())
    + ".",
)
_CLOSED = (
    "the last value fetched before the first answer of the next month, labelled with the month it "
    "closes (month, YYYY-MM, the vendor's month from the answers' date). Kept from that first answer until "
    "the next month closes, and across restarts when state_store is set; never expires."
)
STEREO_REC_PREVIOUS_MONTH = Family(
    "wolkvox_stereo_rec_minutes_previous_month",
    "gauge",
    "Stereo-recording minutes of the operation's last closed month (unit: minutes): " + _CLOSED,
)
BILLING_USAGE_PREVIOUS_MONTH = Family(
    "wolkvox_billing_usage_previous_month",
    "gauge",
    "Usage of a wolkvox billing service (api) by the operation in its last closed month, in the unit of "
    "wolkvox_billing_usage: " + _CLOSED,
)
UNIT_PRICE = Family(
    "wolkvox_billing_unit_price",
    "gauge",
    "Configured price of one unit of the api's usage, in the currency of the label.",
)
COST_BUDGET = Family(
    "wolkvox_billing_cost_budget",
    "gauge",
    "Configured monthly cost budget of the operation, in the currency of the label.",
)
TOKEN_LIMIT = Family(
    "wolkvox_token_limit",
    "gauge",
    "Daily request limit of the operation's token, as read from information.php?api=token_info.",
)
TOKEN_USED = Family(
    "wolkvox_token_used_today",
    "gauge",
    "Requests made today with the operation's token (by anyone), as read from token_info.",
)
REFRESH_INTERVAL = Family(
    "wolkvox_refresh_interval_seconds",
    "gauge",
    "Seconds between two fetches of the report (operation x api) in use: refresh_interval, stretched "
    "evenly when the token's reports would need more than its daily_request_limit.",
)
BUILD_INFO = Family(
    "wolkvox_exporter_build_info", "gauge", "Always 1; the version label says which exporter is running."
)
CONNECTIONS_REJECTED = Family(
    "wolkvox_exporter_connections_rejected_total",
    "counter",
    "Connections to the exporter closed unserved because --web.max-connections were open (TLS "
    "handshakes in progress included); scrapes refused so fail at once.",
)
RELOAD_OK = Family(
    "wolkvox_config_last_reload_successful",
    "gauge",
    "1 if the last configuration (re)load succeeded, else 0.",
)
PLANNED_REQUESTS = Family(
    "wolkvox_token_planned_requests_per_day",
    "gauge",
    "Requests per day the configured intervals ask of the busiest token (one per report per "
    "refresh_interval, plus token_info reads); above daily_request_limit the intervals are stretched.",
)
CONFIGURED_INTERVAL = Family(
    "wolkvox_config_refresh_interval_seconds",
    "gauge",
    "refresh_interval from the configuration, in seconds: a report whose wolkvox_refresh_interval_seconds "
    "is above it belongs to a token whose reports were stretched to fit daily_request_limit.",
)
DAILY_LIMIT = Family(
    "wolkvox_token_daily_request_limit",
    "gauge",
    "Configured daily request budget per token (daily_request_limit).",
)
RELOAD_TIME = Family(
    "wolkvox_config_last_reload_success_timestamp_seconds",
    "gauge",
    "Unix time of the last successful configuration load.",
)
STATE_WRITE_ERRORS = Family(
    "wolkvox_state_write_errors_total",
    "counter",
    "Failed writes (or opens) of the state store (state_store): a read-only directory or a full disk. "
    "While it fails, values, pacing and the daily budget live in memory only. Absent without a store.",
)
STATE_LAST_WRITE = Family(
    "wolkvox_state_last_write_timestamp_seconds",
    "gauge",
    "Unix time of the last transaction committed to the state store; 0 before the first. Nothing is "
    "written while nothing changes. Absent without a store.",
)


@dataclass(frozen=True)
class OperationFamily:
    family: Family
    render: Callable[[OperationState], str]  # the operation's sample lines ("" for none)


def _per_api(family: Family, state: OperationState, values: dict[str, float], **extra: str) -> str:
    name = state.info.name
    return "".join(
        sample(family.name, {"operation": name, "api": api, **extra}, values[api])
        for api in state.info.apis
        if api in values
    )


def _one(family: Family, state: OperationState, value: float | None, **labels: str) -> str:
    if value is None:
        return ""
    return sample(family.name, {"operation": state.info.name, **labels}, value)


def _stereo_rec_previous_month(state: OperationState) -> str:
    report = state.reports.get(STEREO_REC)
    closed = report.closed if report is not None else None
    if closed is None or closed.month is None:
        return ""
    return _one(STEREO_REC_PREVIOUS_MONTH, state, closed.value, month=closed.month)


def _billing_previous_month(state: OperationState) -> str:
    name = state.info.name
    closed = {api: r.closed for api, r in state.reports.items() if r.closed is not None}
    return "".join(
        sample(
            BILLING_USAGE_PREVIOUS_MONTH.name,
            {"operation": name, "api": api, "month": str(closed[api].month)},
            closed[api].value,
        )
        for api in state.info.apis
        if api in closed
    )


def _unit_prices(state: OperationState) -> str:
    info = state.info
    return "".join(
        sample(UNIT_PRICE.name, {"operation": info.name, "api": api, "currency": info.currency}, price)
        for api, price in info.prices
        if api in info.apis
    )


def _token_info(state: OperationState, index: int) -> float | None:
    """The token's limit (0) or today's use (1), from its last token_info read."""
    return state.token_info[index] if state.token_info is not None else None


def _last_errors(state: OperationState) -> str:
    info = state.info
    failures = [
        (api, report.last_failure)
        for api in info.apis
        if (report := state.reports.get(api)) is not None
        and report.last_reason is not None
        and report.last_failure is not None
    ]
    lines = []
    for api, (reason, _, detail) in failures:
        # The detail was redacted where it was made (the client knows the token); the log scrubber is
        # the last defence here as on every log line.
        message = one_line(scrub(detail), limit=LAST_ERROR_MESSAGE_CHARS)
        labels = {"operation": info.name, "api": api, "reason": reason, "host": info.host, "message": message}
        lines.append(sample(LAST_ERROR.name, labels, 1))
    return "".join(lines)


def _intervals(state: OperationState) -> dict[str, float]:
    return {api: r.pace.interval for api, r in state.reports.items() if r.pace is not None}


def _errors(state: OperationState) -> str:
    name, counts = state.info.name, state.errors
    # Every reason, 0 until it happens: a counter that appears late loses its first increase in rate().
    return "".join(
        sample(ERRORS.name, {"operation": name, "reason": reason}, counts.get(reason, 0))
        for reason in (*REASONS, *(r for r in counts if r not in REASONS))
    )


def _operation_info(state: OperationState) -> str:
    info = state.info
    labels = {"operation": info.name, "server": info.server, **dict(info.labels)}
    return sample(OPERATION_INFO.name, labels, 1)


OPERATION_FAMILIES: tuple[OperationFamily, ...] = (
    OperationFamily(OPERATION_INFO, _operation_info),
    OperationFamily(STEREO_REC_MINUTES, lambda s: _one(STEREO_REC_MINUTES, s, s.current().get(STEREO_REC))),
    OperationFamily(BILLING_USAGE, lambda s: _per_api(BILLING_USAGE, s, s.current())),
    OperationFamily(STEREO_REC_PREVIOUS_MONTH, _stereo_rec_previous_month),
    OperationFamily(BILLING_USAGE_PREVIOUS_MONTH, _billing_previous_month),
    OperationFamily(UNIT_PRICE, _unit_prices),
    OperationFamily(
        COST_BUDGET, lambda s: _one(COST_BUDGET, s, s.info.cost_budget, currency=s.info.currency)
    ),
    OperationFamily(TOKEN_LIMIT, lambda s: _one(TOKEN_LIMIT, s, _token_info(s, 0))),
    OperationFamily(TOKEN_USED, lambda s: _one(TOKEN_USED, s, _token_info(s, 1))),
    OperationFamily(BUDGET, lambda s: _one(BUDGET, s, s.info.budget_minutes)),
    OperationFamily(UP, lambda s: _one(UP, s, 1 if s.up else 0)),
    OperationFamily(LAST_ERROR, _last_errors),
    OperationFamily(ERRORS, _errors),
    OperationFamily(REQUESTS, lambda s: _one(REQUESTS, s, s.requests)),
    OperationFamily(LAST_SUCCESS, lambda s: _one(LAST_SUCCESS, s, s.last_success)),
    OperationFamily(DURATION, lambda s: _one(DURATION, s, s.last_duration)),
    OperationFamily(
        REFRESH_INTERVAL,
        lambda s: _per_api(REFRESH_INTERVAL, s, _intervals(s)),
    ),
)

GLOBAL_FAMILIES: tuple[tuple[Family, Callable[[GlobalFacts], str]], ...] = (
    (BUILD_INFO, lambda g: sample(BUILD_INFO.name, {"version": __version__}, 1)),
    (RELOAD_OK, lambda g: sample(RELOAD_OK.name, {}, 1 if g.reload_ok else 0)),
    (RELOAD_TIME, lambda g: sample(RELOAD_TIME.name, {}, g.reload_time)),
    (PLANNED_REQUESTS, lambda g: sample(PLANNED_REQUESTS.name, {}, g.schedule.planned_requests_per_day)),
    (DAILY_LIMIT, lambda g: sample(DAILY_LIMIT.name, {}, g.schedule.daily_request_limit)),
    (CONFIGURED_INTERVAL, lambda g: sample(CONFIGURED_INTERVAL.name, {}, g.schedule.refresh_interval)),
    (CONNECTIONS_REJECTED, lambda g: sample(CONNECTIONS_REJECTED.name, {}, g.connections_rejected)),
    (
        STATE_WRITE_ERRORS,
        lambda g: (
            "" if g.state_write_errors is None else sample(STATE_WRITE_ERRORS.name, {}, g.state_write_errors)
        ),
    ),
    (
        STATE_LAST_WRITE,
        lambda g: (
            "" if g.state_write_errors is None else sample(STATE_LAST_WRITE.name, {}, g.state_last_write or 0)
        ),
    ),
)


# An operation's rendered lines are cached (until it changes) as one small bytes object: a table of
# where each entry's lines start and end (little-endian uint32, 0 first), then the lines, all deflated
# with a preset dictionary of the lines every operation has: the lines that repeat across operations cost
# almost nothing, so the cache of 10,000 operations stays small at the price of a little CPU per re-render
# (the figures are in benchmarks/README.md, memory).
_ENDS = struct.Struct(f"<{len(OPERATION_FAMILIES) + 1}I")


def _lines(state: OperationState) -> bytes:
    parts = [entry.render(state).encode() for entry in OPERATION_FAMILIES]
    return _ENDS.pack(0, *itertools.accumulate(len(part) for part in parts)) + b"".join(parts)


# What deflate may refer back to: an operation that has every family's usual lines.
_PRESET = _lines(OperationState(OperationInfo("operation"), errors={reason: 0 for reason in REASONS}))


def render_operation(state: OperationState) -> bytes:
    """The operation's lines of every entry of OPERATION_FAMILIES, compressed; ``lines_by_family``
    reads them back."""
    deflate = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS, 9, zlib.Z_DEFAULT_STRATEGY, _PRESET)
    return deflate.compress(_lines(state)) + deflate.flush()


def lines_by_family(rendered: bytes) -> list[bytes]:
    """What ``render_operation`` returned, as the lines of each entry of OPERATION_FAMILIES."""
    inflate = zlib.decompressobj(-zlib.MAX_WBITS, zdict=_PRESET)
    packed = inflate.decompress(rendered) + inflate.flush()
    ends = _ENDS.unpack_from(packed)
    return [packed[_ENDS.size + start : _ENDS.size + end] for start, end in itertools.pairwise(ends)]


def render_global(facts: GlobalFacts) -> bytes:
    rendered = ((family, render(facts)) for family, render in GLOBAL_FAMILIES)
    return "".join(family.header().decode() + lines for family, lines in rendered if lines).encode()
