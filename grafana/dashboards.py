"""The Grafana dashboards as code (grafana-foundation-sdk); writes grafana/dashboards/*.json.

    .venv/bin/pip install -e '.[test]' && .venv/bin/python grafana/dashboards.py

- ``wolkvox-overview``: stereo-recording minutes and the exporter's health. Every panel has data with
  the smallest useful config (stereo_rec only, no prices, no token_info); the budget panels need
  ``budget_minutes`` on at least one operation and say so.
- ``wolkvox-billing``: the rest of the bill (other services, prices, cost, cost budgets) and the
  token's daily requests from ``token_info``; each panel names the config key it needs.

tests/test_dashboards.py fails when a committed JSON file is not what this script writes.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import bargauge, common, dashboard, prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import prometheus as mp

from exporter.model import BILLING_APIS

OUT = Path(__file__).resolve().parent / "dashboards"
DS = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
OP = 'operation=~"$operation"'
MINUTES = "suffix: min"
# Units per billing api, shown next to its name in "Usage per service": the exporter's table of billing
# services (exporter/model.py), which its HELP text is written from too.
API_UNITS = {api.name: api.unit for api in BILLING_APIS.values()}
NEEDS_BUDGET = " Needs budget_minutes on the operation (config); empty for operations without one."
NEEDS_PRICES = " Needs prices (config: prices or operations[].prices)."
NEEDS_COST_BUDGET = " Needs prices and cost_budget on the operation (config)."
NEEDS_TOKEN_INFO = " Needs token_info_interval (config)."  # noqa: S105 (a config key, not a secret)
NEEDS_CLOSED_MONTH = (
    " Empty until the exporter has seen a month close (the first answer of a new month); kept across "
    "restarts only with state_store."
)
LAST_MONTH = "the last value fetched before the first answer of the next month"
NEEDS_LABELS = (
    " Needs labels on the operations (config: labels or operations[].labels); the Group by variable lists "
    "their names, and server, which every operation has. Operations without the label form the group with "
    "an empty name."
)
# Each operation's value of the chosen label, once per operation: max by drops job and instance, so an HA
# pair of Prometheus servers (or two jobs) scraping the same exporter does not double the sums below.
GROUP_JOIN = (
    f"* on (operation) group_left ($group) max by (operation, $group) (wolkvox_operation_info{{{OP}}})"
)
# The labels of the info metric that are not a grouping: one per operation, or added by Prometheus.
NOT_A_GROUP = "/^(?!(operation|job|instance|__name__)$).+$/"
NEEDS_APIS = (
    " Services beyond stereo_rec need apis on the operation (config); the price and cost columns need prices."
)


# ----- small builders ----------------------------------------------------------------------------------


def query(expr: str, legend: str = "", ref: str = "A", table_format: bool = False) -> prometheus.Dataquery:
    """A PromQL target: a range query, or an instant query in table format for a table column."""
    q = prometheus.Dataquery().expr(expr).ref_id(ref).legend_format(legend).datasource(DS)
    q = q.editor_mode(mp.QueryEditorMode.CODE)
    return q.instant().format(mp.PromQueryFormat.TABLE) if table_format else q.range()


def steps(*pairs: tuple[str, float | None]) -> dashboard.ThresholdsConfig:
    return (
        dashboard.ThresholdsConfig()
        .mode(dm.ThresholdsMode.ABSOLUTE)
        .steps([dm.Threshold(value=value, color=color) for color, value in pairs])
    )


GREEN_ORANGE_RED = (("green", None), ("orange", 0.8), ("red", 1.0))


def ratio_cells(decimals: int | None = None) -> list[dm.DynamicConfigValue]:
    """A table column of shares: percent, coloured green / orange from 80 % / red from 100 %."""
    props = [dm.DynamicConfigValue(id_val="unit", value="percentunit")]
    if decimals is not None:
        props.append(dm.DynamicConfigValue(id_val="decimals", value=decimals))
    props += [
        dm.DynamicConfigValue(
            id_val="custom.cellOptions", value={"type": "color-background", "mode": "basic"}
        ),
        dm.DynamicConfigValue(id_val="thresholds", value=steps(*GREEN_ORANGE_RED).build()),
    ]
    return props


def value_texts(texts: dict[str, tuple[str, str | None]]) -> list[dm.ValueMapping]:
    return [
        dm.ValueMap(
            options={
                key: dm.ValueMappingResult(text=text, color=color, index=i)
                for i, (key, (text, color)) in enumerate(texts.items())
            }
        )
    ]


def stat_panel(
    title: str,
    description: str,
    unit: str,
    targets: Iterable[prometheus.Dataquery],
    color: str = "blue",
    size: tuple[int, int] = (6, 4),
    text_mode: cm.BigValueTextMode = cm.BigValueTextMode.AUTO,
    color_mode: cm.BigValueColorMode = cm.BigValueColorMode.VALUE,
) -> stat.Panel:
    panel = (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DS)
        .unit(unit)
        .span(size[0])
        .height(size[1])
        .thresholds(steps((color, None)))
        .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).fields("").values(False))
        .color_mode(color_mode)
        .graph_mode(cm.BigValueGraphMode.NONE)
        .justify_mode(cm.BigValueJustifyMode.AUTO)
        .text_mode(text_mode)
        .orientation(cm.VizOrientation.AUTO)
    )
    for target in targets:
        panel = panel.with_target(target)
    return panel


def up_down_stat(
    title: str, description: str, target: prometheus.Dataquery, bad: str, good: str
) -> stat.Panel:
    return (
        stat_panel(
            title, description, "none", [target], size=(8, 5), color_mode=cm.BigValueColorMode.BACKGROUND
        )
        .thresholds(steps(("red", None), ("green", 1)))
        .mappings(value_texts({"0": (bad, "red"), "1": (good, "green")}))
    )


def series_panel(
    title: str,
    description: str,
    unit: str,
    targets: Iterable[prometheus.Dataquery],
    calcs: list[str],
    fill: int = 0,
    size: tuple[int, int] = (12, 8),
) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DS)
        .unit(unit)
        .span(size[0])
        .height(size[1])
        .thresholds(steps(("green", None)))
        .color_scheme(dashboard.FieldColor().mode(dm.FieldColorModeId.PALETTE_CLASSIC))
        .draw_style(cm.GraphDrawStyle.LINE)
        .line_width(1)
        .fill_opacity(fill)
        .show_points(cm.VisibilityMode.NEVER)
        .span_nulls(False)
        .stacking(common.StackingConfig().mode(cm.StackingMode.NONE).group("A"))
        .legend(
            common.VizLegendOptions()
            .display_mode(cm.LegendDisplayMode.TABLE)
            .placement(cm.LegendPlacement.BOTTOM)
            .show_legend(True)
            .calcs(calcs)
        )
        .tooltip(common.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI).sort(cm.SortOrder.DESCENDING))
    )
    for target in targets:
        panel = panel.with_target(target)
    return panel


def against_limit(panel: timeseries.Panel) -> timeseries.Panel:
    """Series B (a budget or a limit) dashed, under the solid series A."""
    dashed = [
        dm.DynamicConfigValue(id_val="custom.lineStyle", value={"fill": "dash", "dash": [10, 10]}),
        dm.DynamicConfigValue(id_val="custom.fillOpacity", value=0),
    ]
    return panel.override_by_query("B", dashed)


def ratio_bars(
    title: str,
    description: str,
    expr: str,
    no_value: str,
    legend: str = "{{operation}}",
    more: tuple[tuple[str, str], ...] = (),
) -> bargauge.Panel:
    """Shares (1 = 100 %) as horizontal bars; ``more`` adds (expr, legend) targets to the first."""
    panel = (
        bargauge.Panel()
        .title(title)
        .description(description)
        .datasource(DS)
        .unit("percentunit")
        .thresholds(steps(*GREEN_ORANGE_RED))
        .min(0)
        .max(1.2)
        .decimals(1)
        .no_value(no_value)
        .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).fields("").values(False))
        .orientation(cm.VizOrientation.HORIZONTAL)
        .display_mode(cm.BarGaugeDisplayMode.GRADIENT)
        .show_unfilled(True)
        .value_mode(cm.BarGaugeValueMode.COLOR)
        .name_placement(cm.BarGaugeNamePlacement.LEFT)
        .min_viz_width(0)
        .min_viz_height(16)
        .with_target(query(expr, legend).instant())
    )
    for ref, (extra, extra_legend) in zip("BCDEF", more, strict=False):
        panel = panel.with_target(query(extra, extra_legend, ref).instant())
    return panel


def table_panel(
    title: str,
    description: str,
    unit: str,
    labels: dict[str, str],
    columns: dict[str, str],
    sort_by: str,
    size: tuple[int, int] = (24, 7),
) -> table.Panel:
    """One instant query per column (A, B, ...), merged on ``labels`` (label -> column name)."""
    panel = (
        table.Panel()
        .title(title)
        .description(description)
        .datasource(DS)
        .unit(unit)
        .span(size[0])
        .height(size[1])
        .thresholds(steps(("text", None)))
        .show_header(True)
        .cell_height(cm.TableCellHeight.SM)
        .footer(common.TableFooterOptions().show(False))
        .sort_by([common.TableSortByFieldState().display_name(sort_by).desc(True)])
    )
    index: dict[str, int] = {label: i for i, label in enumerate(labels)}
    rename = dict(labels)
    for i, (name, expr) in enumerate(columns.items()):
        ref = chr(ord("A") + i)
        panel = panel.with_target(query(expr, ref=ref, table_format=True))
        index[f"Value #{ref}"] = len(labels) + i
        rename[f"Value #{ref}"] = name
    organize = {"excludeByName": {"Time": True}, "indexByName": index, "renameByName": rename}
    return panel.with_transformation(
        dm.DataTransformerConfig(id_val="merge", options={})
    ).with_transformation(dm.DataTransformerConfig(id_val="organize", options=organize))


def variables(board: dashboard.Dashboard, with_api: bool) -> dashboard.Dashboard:
    board = board.with_variable(
        dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus")
    ).with_variable(
        dashboard.QueryVariable("operation")
        .label("Operation")
        .datasource(DS)
        .query("label_values(wolkvox_up, operation)")
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dm.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
    )
    if with_api:
        board = board.with_variable(
            dashboard.QueryVariable("api")
            .label("Service")
            .datasource(DS)
            .query(f"label_values(wolkvox_billing_usage{{{OP}}}, api)")
            .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(dm.VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
        )
    return board.with_variable(
        dashboard.QueryVariable("group")
        .label("Group by")
        .description(
            "A label of the operations (config: labels), from wolkvox_operation_info: the 'By group' "
            "panels sum per value of it. server is always there."
        )
        .datasource(DS)
        .query("label_names(wolkvox_operation_info)")
        .regex(NOT_A_GROUP)
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dm.VariableSort.ALPHABETICAL_ASC)
        .multi(False)
        .include_all(False)
    )


def base(uid: str, title: str, description: str, tags: list[str]) -> dashboard.Dashboard:
    return (
        dashboard.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(tags)
        .editable()
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .refresh("5m")
        .timezone("utc")
        .time("now/M", "now")
        .link(
            dashboard.DashboardLink("wolkvox dashboards")
            .type(dm.DashboardLinkType.DASHBOARDS)
            .tags(["wolkvox"])
            .as_dropdown(False)
            .include_vars(True)
            .keep_time(True)
        )
        .annotation(
            dashboard.AnnotationQuery()
            .name("wolkvox alerts")
            .datasource(DS)
            .enable(True)
            .hide(False)
            .icon_color("red")
            .expr('ALERTS{alertname=~"Wolkvox.*", alertstate="firing"}')
        )
    )


# ----- the dashboards ---------------------------------------------------------------------------------


def overview() -> dashboard.Dashboard:
    board = base(
        "wolkvox-overview",
        "wolkvox: stereo-recording minutes",
        "Month-to-date stereo-recording minutes per wolkvox operation, budgets and month-end forecast, "
        "and the health of wolkvox-exporter. The rest of the bill (other services, prices, cost, the "
        "token's daily requests) is in the dashboard 'wolkvox: billing and cost'.",
        ["wolkvox", "contact-center"],
    )
    board = variables(board, with_api=False)
    board = board.with_row(dashboard.Row("Stereo-recording minutes"))
    board = board.with_panel(
        stat_panel(
            "Month-to-date minutes (selected operations)",
            "Stereo-recording minutes used so far this month, summed over the selected operations. The "
            "value is month-to-date: it drops to about 0 when the vendor's month starts.",
            MINUTES,
            [query(f"sum(operation:wolkvox_stereo_rec_minutes:max{{{OP}}})", "month to date")],
        )
    )
    board = board.with_panel(
        stat_panel(
            "Month-end forecast (selected operations)",
            "Linear forecast of the minutes at the end of the month (month-to-date / elapsed share of the "
            "UTC month), summed over the selected operations. Not computed on the 1st of the month.",
            MINUTES,
            [query(f"sum(operation:wolkvox_stereo_rec_minutes:forecast_month_end{{{OP}}})", "forecast")],
            color="purple",
        ).no_value("no forecast on the 1st of the month")
    )
    board = board.with_panel(
        stat_panel(
            "Monthly budget (selected operations)",
            "Sum of the configured monthly budgets (budget_minutes) of the selected operations that have "
            "one." + NEEDS_BUDGET,
            MINUTES,
            [query(f"sum(operation:wolkvox_stereo_rec_budget_minutes:max{{{OP}}})", "budget")],
            color="text",
        ).no_value("no budget_minutes configured")
    )
    board = board.with_panel(
        stat_panel(
            "Minutes used in the last 24 hours (selected operations)",
            "Stereo-recording minutes used in the last 24 hours, summed over the selected operations "
            "(increase of the month-to-date value; correct across the month rollover).",
            MINUTES,
            [query(f"sum(operation:wolkvox_stereo_rec_minutes:increase1d{{{OP}}})", "last 24h")],
        )
    )
    board = board.with_panel(
        series_panel(
            "Month-to-date minutes per operation",
            "wolkvox_stereo_rec_minutes per operation: stereo-recording minutes used since the start of "
            "the vendor's month (fetched every refresh_interval, 5m by default, and cached by the exporter).",
            MINUTES,
            [query(f"operation:wolkvox_stereo_rec_minutes:max{{{OP}}}", "{{operation}}")],
            ["lastNotNull", "max"],
            fill=10,
        )
    )
    board = board.with_panel(
        ratio_bars(
            "Budget used",
            "Month-to-date minutes as a share of each operation's monthly budget. Orange from 80 % "
            "(warning alert), red from 100 % (critical alert)." + NEEDS_BUDGET,
            f"operation:wolkvox_stereo_rec_budget_used:ratio{{{OP}}}",
            "no budget_minutes configured",
        )
        .span(12)
        .height(8)
    )
    board = board.with_panel(
        against_limit(
            series_panel(
                "Month-end forecast vs budget",
                "Solid: linear forecast of each operation's minutes at the end of the month (month-to-date "
                "divided by the elapsed share of the UTC month; absent on the 1st, when it is noise). "
                "Dashed: the configured budget. A forecast above its budget for an hour raises "
                "WolkvoxStereoRecForecastOverBudget. The dashed line" + NEEDS_BUDGET.lower(),
                MINUTES,
                [
                    query(
                        f"operation:wolkvox_stereo_rec_minutes:forecast_month_end{{{OP}}}",
                        "{{operation}} forecast",
                    ),
                    query(
                        f"operation:wolkvox_stereo_rec_budget_minutes:max{{{OP}}}",
                        "{{operation}} budget",
                        "B",
                    ),
                ],
                ["lastNotNull", "max"],
            )
        )
    )
    board = board.with_panel(
        series_panel(
            "Minutes used per day (rolling 24 hours)",
            "Stereo-recording minutes used in the 24 hours before each point, per operation: increase() of "
            "the month-to-date value, so the monthly drop counts as a reset and never shows as negative "
            "usage.",
            MINUTES,
            [query(f"operation:wolkvox_stereo_rec_minutes:increase1d{{{OP}}}", "{{operation}}")],
            ["mean", "max"],
            fill=10,
        )
    )
    board = board.with_panel(
        table_panel(
            "Per-operation summary",
            "One line per operation: month-to-date minutes, budget, share used, month-end forecast and the "
            "forecast as a share of the budget (the forecast is empty on the 1st)." + NEEDS_BUDGET,
            MINUTES,
            {"operation": "Operation"},
            {
                "Month to date": f"operation:wolkvox_stereo_rec_minutes:max{{{OP}}}",
                "Budget": f"operation:wolkvox_stereo_rec_budget_minutes:max{{{OP}}}",
                "Used": f"operation:wolkvox_stereo_rec_budget_used:ratio{{{OP}}}",
                "Forecast month end": f"operation:wolkvox_stereo_rec_minutes:forecast_month_end{{{OP}}}",
                "Forecast / budget": f"operation:wolkvox_stereo_rec_forecast_budget:ratio{{{OP}}}",
            },
            sort_by="Used",
        )
        .override_by_name("Used", ratio_cells())
        .override_by_name("Forecast / budget", ratio_cells())
    )
    board = board.with_row(dashboard.Row("By group: $group"))
    board = board.with_panel(
        table_panel(
            "Minutes per $group",
            "Stereo-recording minutes per value of the Group by label (a label of the operations; server "
            "is always there), over the selected operations: month to date, month-end forecast (empty on "
            "the 1st), the last 24 hours, and the sum of the budget_minutes of its operations that have one "
            "with their month-to-date minutes as a share of it. The cost per group is in the dashboard "
            "'wolkvox: billing and cost'." + NEEDS_LABELS + " The budget columns need budget_minutes on "
            "the operations (config).",
            MINUTES,
            {},
            {
                "Month to date": grouped(f"operation:wolkvox_stereo_rec_minutes:max{{{OP}}}", "$group"),
                "Forecast month end": grouped(
                    f"operation:wolkvox_stereo_rec_minutes:forecast_month_end{{{OP}}}", "$group"
                ),
                "Last 24 hours": grouped(
                    f"operation:wolkvox_stereo_rec_minutes:increase1d{{{OP}}}", "$group"
                ),
                "Budget": grouped(f"operation:wolkvox_stereo_rec_budget_minutes:max{{{OP}}}", "$group"),
                "Budget used": grouped(
                    f"(operation:wolkvox_stereo_rec_minutes:max{{{OP}}} "
                    f"and on (operation) operation:wolkvox_stereo_rec_budget_minutes:max{{{OP}}})",
                    "$group",
                )
                + "\n/ on ($group)\n"
                + grouped(f"operation:wolkvox_stereo_rec_budget_minutes:max{{{OP}}}", "$group"),
            },
            sort_by="Month to date",
            size=(24, 7),
        )
        .decimals(0)
        .override_by_name("Budget used", ratio_cells(decimals=1))
    )
    board = board.with_row(dashboard.Row("Exporter health"))
    board = board.with_panel(
        up_down_stat(
            "Fetch status per operation",
            "wolkvox_up: OK when the exporter's last fetch from the wolkvox API for the operation "
            "succeeded. FAILING for 15 minutes raises WolkvoxFetchFailing, whose description names the "
            "reason.",
            query(f"max by (operation) (wolkvox_up{{{OP}}})", "{{operation}}"),
            "FAILING",
            "OK",
        )
    )
    board = board.with_panel(
        stat_panel(
            "Age of the last successful fetch",
            "Seconds since each operation's last successful fetch (time() - "
            "wolkvox_last_success_timestamp_seconds). Red above 30 minutes, where WolkvoxDataStale fires.",
            "s",
            [
                query(
                    f"time() - max by (operation) (wolkvox_last_success_timestamp_seconds{{{OP}}})",
                    "{{operation}}",
                )
            ],
            size=(8, 5),
        ).thresholds(steps(("green", None), ("orange", 900), ("red", 1800)))
    )
    board = board.with_panel(
        up_down_stat(
            "Exporter targets",
            "Prometheus' up for the wolkvox job, per exporter instance: DOWN means Prometheus cannot scrape "
            "it (WolkvoxExporterDown after 5 minutes).",
            query('up{job="wolkvox"}', "{{instance}}"),
            "DOWN",
            "UP",
        ).span(4)
    )
    board = board.with_panel(
        up_down_stat(
            "Config reload",
            "wolkvox_config_last_reload_successful per exporter instance: FAILED means the last reload of "
            "the configuration file failed and the previous configuration is still in use.",
            query("wolkvox_config_last_reload_successful", "{{instance}}"),
            "FAILED",
            "OK",
        ).span(4)
    )
    board = board.with_panel(
        series_panel(
            "Fetch errors by reason",
            "Failed fetches from the wolkvox API per hour, by operation and reason (timeout, connection, "
            "http_status, api_error, auth, token_limit, unknown_api, invalid_response, parse). token_limit "
            "means the token's daily request budget is spent.",
            "suffix: errors/h",
            [
                query(
                    "sum by (operation, reason) "
                    f"(rate(wolkvox_scrape_errors_total{{{OP}}}[$__rate_interval])) * 3600",
                    "{{operation}} {{reason}}",
                )
            ],
            ["max"],
            fill=10,
        )
    )
    board = board.with_panel(
        series_panel(
            "Fetch duration",
            "Duration of the last fetch from the wolkvox API per operation "
            "(wolkvox_scrape_duration_seconds). The vendor allows up to 60 seconds per call.",
            "s",
            [query(f"max by (operation) (wolkvox_scrape_duration_seconds{{{OP}}})", "{{operation}}")],
            ["mean", "max"],
        ).thresholds(steps(("green", None), ("orange", 30), ("red", 60)))
    )
    board = board.with_panel(
        series_panel(
            "Requests to the wolkvox API",
            "Fetches sent to the wolkvox API per hour, per operation (wolkvox_scrape_requests_total). Each "
            "token has a daily request budget (1,000 a day per licence); 12 per hour is the 5m default.",
            "suffix: req/h",
            [
                query(
                    "sum by (operation) "
                    f"(rate(wolkvox_scrape_requests_total{{{OP}}}[$__rate_interval])) * 3600",
                    "{{operation}}",
                )
            ],
            ["mean"],
        )
    )
    board = board.with_panel(
        stat_panel(
            "Planned requests per token per day vs daily limit",
            "Per exporter: the requests a day its configuration asks of its busiest token (one per report, "
            "operation x api, per refresh interval: reports x 86400 / refresh_interval, plus token_info "
            "reads), its daily_request_limit, the ratio of the two (red above 100 %: "
            "WolkvoxRequestPlanOverDailyLimit) and the longest refresh interval in use (above "
            "refresh_interval when a token's reports are stretched to fit the limit). wolkvox allows about "
            "1,000 requests per licence per day.",
            "suffix: req/day",
            [
                query("max by (instance) (wolkvox_token_planned_requests_per_day)", "{{instance}} planned"),
                query("max by (instance) (wolkvox_token_daily_request_limit)", "{{instance}} limit", "B"),
                query(
                    "max by (instance) (wolkvox_token_planned_requests_per_day"
                    " / wolkvox_token_daily_request_limit)",
                    "{{instance}} planned / limit",
                    "C",
                ),
                query(
                    "max by (instance) (wolkvox_refresh_interval_seconds)",
                    "{{instance}} refresh interval",
                    "D",
                ),
            ],
            size=(12, 7),
            text_mode=cm.BigValueTextMode.VALUE_AND_NAME,
        )
        .decimals(0)
        .override_by_query(
            "C",
            [
                dm.DynamicConfigValue(id_val="unit", value="percentunit"),
                dm.DynamicConfigValue(id_val="decimals", value=1),
                dm.DynamicConfigValue(
                    id_val="thresholds",
                    value=steps(("green", None), ("orange", 0.8), ("red", 1.0001)).build(),
                ),
            ],
        )
        .override_by_query(
            "D",
            [
                dm.DynamicConfigValue(id_val="unit", value="s"),
                dm.DynamicConfigValue(id_val="decimals", value=1),
            ],
        )
    )
    board = board.with_panel(
        series_panel(
            "Connections rejected",
            "Connections each exporter instance closed unserved per minute because --web.max-connections "
            "were open (wolkvox_exporter_connections_rejected_total): a scrape or a request that comes then "
            "fails at once. Anything above 0 means clients were turned away; in every 10 minutes for 15 "
            "minutes it raises WolkvoxExporterRejectingConnections (the runbook says how to find the "
            "client). Per instance: max, so a target scraped by two jobs is not counted twice.",
            "suffix: /min",
            [
                query(
                    "max by (instance) "
                    "(rate(wolkvox_exporter_connections_rejected_total[$__rate_interval])) * 60",
                    "{{instance}}",
                )
            ],
            ["max", "mean"],
            fill=10,
            size=(16, 6),
        )
    )
    board = board.with_panel(
        stat_panel(
            "Exporter version",
            "wolkvox_exporter_build_info: the version each exporter instance runs.",
            "none",
            [query("max by (instance, version) (wolkvox_exporter_build_info)", "{{instance}}: {{version}}")],
            color="text",
            size=(8, 6),
            text_mode=cm.BigValueTextMode.NAME,
            color_mode=cm.BigValueColorMode.NONE,
        )
    )
    return board


def billing() -> dashboard.Dashboard:
    board = base(
        "wolkvox-billing",
        "wolkvox: billing and cost",
        "The whole wolkvox bill: usage of every configured billing service, unit prices, month-to-date "
        "and forecast cost per operation, cost budgets, the expected invoice, and the token's requests "
        "today from token_info. Each panel says which setting it needs: prices, cost_budget, apis or "
        "token_info_interval; without it the panel stays empty.",
        ["wolkvox", "billing", "contact-center"],
    )
    board = variables(board, with_api=True)
    board = board.with_row(dashboard.Row("Cost"))
    money = (("locale", 2),)
    board = board.with_panel(
        stat_panel(
            "Expected invoice this month",
            "What this month's wolkvox invoice should come to, per currency: the month-end forecast of the "
            "cost of every priced service of the selected operations (configured unit prices times usage). "
            "Usage-based services (minutes, calls, detections, files, interactions) are extrapolated "
            "linearly from the month so far (month-to-date / elapsed share of the UTC month); licences and "
            "connectors count at their current number, not extrapolated. Services without a configured "
            "price are not included. Not computed on the 1st of the month (UTC), when the month so far says "
            "nothing yet." + NEEDS_PRICES,
            money[0][0],
            [
                query(
                    f"sum by (currency) (operation:wolkvox_billing_cost:forecast_month_end{{{OP}}})",
                    "{{currency}}",
                )
            ],
            color="purple",
            size=(8, 6),
            text_mode=cm.BigValueTextMode.VALUE_AND_NAME,
        )
        .decimals(2)
        .no_value("no forecast on the 1st of the month, or no prices configured")
    )
    board = board.with_panel(
        stat_panel(
            "Cost so far this month",
            "Month-to-date cost of every priced service of the selected operations, per currency: usage so "
            "far times the configured unit prices (licences: current number times their monthly price). "
            "Drops when the vendor's month starts." + NEEDS_PRICES,
            "locale",
            [
                query(
                    f"sum by (currency) (operation:wolkvox_billing_cost:month_to_date{{{OP}}})",
                    "{{currency}}",
                )
            ],
            size=(8, 6),
            text_mode=cm.BigValueTextMode.VALUE_AND_NAME,
        )
        .decimals(2)
        .no_value("no prices configured")
    )
    board = board.with_panel(
        ratio_bars(
            "Cost budget used",
            "Month-to-date cost as a share of each operation's monthly cost_budget. Red from 100 % "
            "(WolkvoxCostBudgetExhausted, critical)." + NEEDS_COST_BUDGET,
            f"operation:wolkvox_billing_cost_budget_used:ratio{{{OP}}}",
            "no cost_budget configured",
        )
        .span(8)
        .height(6)
    )
    board = board.with_panel(
        table_panel(
            "Cost per operation",
            "One line per operation with priced services, in its currency: month-to-date cost, month-end "
            "forecast (usage-based services extrapolated, licences at their current number; empty on the "
            "1st), the configured cost_budget, and both as a share of it. A forecast over the budget for an "
            "hour raises WolkvoxCostForecastOverBudget (warning); a month-to-date cost at the budget raises "
            "WolkvoxCostBudgetExhausted (critical)." + NEEDS_PRICES + " The budget columns need cost_budget.",
            "locale",
            {"operation": "Operation", "currency": "Currency"},
            {
                "Month to date": f"operation:wolkvox_billing_cost:month_to_date{{{OP}}}",
                "Forecast month end": f"operation:wolkvox_billing_cost:forecast_month_end{{{OP}}}",
                "Cost budget": f"operation:wolkvox_billing_cost_budget:max{{{OP}}}",
                "Budget used": f"operation:wolkvox_billing_cost_budget_used:ratio{{{OP}}}",
                "Forecast / budget": f"operation:wolkvox_billing_cost_forecast_budget:ratio{{{OP}}}",
            },
            sort_by="Forecast month end",
        )
        .decimals(2)
        .override_by_name("Budget used", ratio_cells(decimals=1))
        .override_by_name("Forecast / budget", ratio_cells(decimals=1))
    )
    board = board.with_panel(
        against_limit(
            series_panel(
                "Month-end cost forecast vs cost budget",
                "Solid: each operation's month-end cost forecast, in its currency (usage-based services "
                "extrapolated linearly, licences at their current number; absent on the 1st). Dashed: its "
                "configured cost_budget. A forecast above the budget for an hour raises "
                "WolkvoxCostForecastOverBudget." + NEEDS_PRICES + " The dashed line needs cost_budget.",
                "locale",
                [
                    query(
                        f"operation:wolkvox_billing_cost:forecast_month_end{{{OP}}}",
                        "{{operation}} forecast ({{currency}})",
                    ),
                    query(
                        f"operation:wolkvox_billing_cost_budget:max{{{OP}}}",
                        "{{operation}} budget ({{currency}})",
                        "B",
                    ),
                ],
                ["lastNotNull", "max"],
            ).decimals(2)
        )
    )
    board = board.with_panel(
        series_panel(
            "Cost so far this month per operation",
            "Month-to-date cost of each operation's priced services, in its currency. It grows with usage, "
            "steps with licence changes, and drops when the vendor's month starts." + NEEDS_PRICES,
            "locale",
            [query(f"operation:wolkvox_billing_cost:month_to_date{{{OP}}}", "{{operation}} ({{currency}})")],
            ["lastNotNull", "max"],
        ).decimals(2)
    )
    board = board.with_row(dashboard.Row("Services and requests"))
    api = f'{OP}, api=~"$api"'
    board = board.with_panel(
        table_panel(
            "Usage per service",
            "One line per operation and billing service (api) configured in the exporter, filtered by the "
            "Service variable. Month to date and Last 24 hours are in the unit of the service, given next "
            "to its name (licences and connectors: the number active now, which has no usage per day). Unit "
            "price, cost and forecast are in the operation's currency (see Cost per operation); empty for "
            "services without a configured price, and the forecast is empty on the 1st." + NEEDS_APIS,
            "locale",
            {"operation": "Operation", "api": "Service (unit)"},
            {
                "Month to date": f"operation_api:wolkvox_billing_usage:max{{{api}}}",
                "Last 24 hours": f"operation_api:wolkvox_billing_usage:increase1d{{{api}}}",
                "Unit price": (
                    f"max by (operation, api) (operation_api:wolkvox_billing_unit_price:max{{{api}}})"
                ),
                "Cost month to date": (
                    f"max by (operation, api) (operation_api:wolkvox_billing_cost:month_to_date{{{api}}})"
                ),
                "Cost forecast month end": (
                    "max by (operation, api) "
                    f"(operation_api:wolkvox_billing_cost:forecast_month_end{{{api}}})"
                ),
            },
            sort_by="Cost month to date",
            size=(24, 10),
        )
        .override_by_name(
            "Service (unit)",
            [
                dm.DynamicConfigValue(
                    id_val="mappings",
                    value=value_texts({api: (f"{api} ({unit})", None) for api, unit in API_UNITS.items()}),
                )
            ],
        )
        .override_by_regexp("Cost.*", [dm.DynamicConfigValue(id_val="decimals", value=2)])
        .override_by_name("Unit price", [dm.DynamicConfigValue(id_val="decimals", value=4)])
    )
    board = board.with_panel(
        table_panel(
            "Token requests today vs daily limit",
            "From wolkvox's token_info (read every token_info_interval, at least hourly, so up to that old): "
            "requests made today with each operation's token, by this exporter and anyone else using the "
            "token, and the token's daily limit. Operations sharing a token show the same numbers. At 80 % "
            "WolkvoxTokenBudgetNearlySpent warns; at 100 % wolkvox answers TOKEN LIMIT EXCEEDED until its "
            "day ends." + NEEDS_TOKEN_INFO,
            "locale",
            {"operation": "Operation"},
            {
                "Requests today": f"operation:wolkvox_token_used_today:max{{{OP}}}",
                "Daily limit": f"operation:wolkvox_token_limit:max{{{OP}}}",
                "Used": f"operation:wolkvox_token_budget_used:ratio{{{OP}}}",
            },
            sort_by="Used",
            size=(24, 8),
        )
        .decimals(0)
        .override_by_name("Used", ratio_cells(decimals=1))
    )
    return last_month(by_group(board))


def grouped(expr: str, by: str) -> str:
    """``expr`` (per operation) joined to each operation's value of $group, summed ``by`` ($group, ...)."""
    return f"sum by ({by}) (\n  {expr}\n  {GROUP_JOIN}\n)"


def by_group(board: dashboard.Dashboard) -> dashboard.Dashboard:
    """The bill split by a label of the operations (client, team, cost centre): the chosen $group."""
    board = board.with_row(dashboard.Row("By group: $group"))
    cost_now = grouped(f"operation:wolkvox_billing_cost:month_to_date{{{OP}}}", "$group, currency")
    board = board.with_panel(
        bargauge.Panel()
        .title("Cost by $group this month")
        .description(
            "Month-to-date cost of the selected operations' priced services, summed per value of the Group "
            "by label, in each currency: what each client, team or cost centre has used so far this month "
            "(usage times the configured unit prices; licences at their current number)."
            + NEEDS_PRICES
            + NEEDS_LABELS
        )
        .datasource(DS)
        .unit("locale")
        .decimals(2)
        .thresholds(steps(("blue", None)))
        .no_value("no prices configured")
        .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).fields("").values(False))
        .orientation(cm.VizOrientation.HORIZONTAL)
        .display_mode(cm.BarGaugeDisplayMode.BASIC)
        .show_unfilled(True)
        .value_mode(cm.BarGaugeValueMode.COLOR)
        .name_placement(cm.BarGaugeNamePlacement.LEFT)
        .min_viz_width(0)
        .min_viz_height(16)
        .span(10)
        .height(8)
        .with_target(query(cost_now, "{{$group}} ({{currency}})").instant())
    )
    budgeted = (
        f"(operation:wolkvox_billing_cost:month_to_date{{{OP}}} "
        f"and on (operation, currency) operation:wolkvox_billing_cost_budget:max{{{OP}}})"
    )
    board = board.with_panel(
        table_panel(
            "Cost per $group",
            "One line per value of the Group by label and currency, over the selected operations: cost so "
            "far this month, month-end forecast (usage-based services extrapolated, licences at their "
            "current number; empty on the 1st), the sum of the cost_budgets of its operations that have "
            "one, the month-to-date cost of those operations as a share of it, and the cost of the last "
            "closed month (with the prices configured now)."
            + NEEDS_PRICES
            + " The budget columns need cost_budget; Last month needs a month closed."
            + NEEDS_LABELS,
            "locale",
            {"currency": "Currency"},
            {
                "Month to date": cost_now,
                "Forecast month end": grouped(
                    f"operation:wolkvox_billing_cost:forecast_month_end{{{OP}}}", "$group, currency"
                ),
                "Cost budget": grouped(
                    f"operation:wolkvox_billing_cost_budget:max{{{OP}}}", "$group, currency"
                ),
                "Budget used": grouped(budgeted, "$group, currency")
                + "\n/ on ($group, currency)\n"
                + grouped(f"operation:wolkvox_billing_cost_budget:max{{{OP}}}", "$group, currency"),
            },
            sort_by="Month to date",
            size=(14, 8),
        )
        .decimals(2)
        .override_by_name("Budget used", ratio_cells(decimals=1))
    )
    api = f'{OP}, api=~"$api"'
    board = board.with_panel(
        table_panel(
            "Usage per $group and service",
            "One line per value of the Group by label and billing service (api), over the selected "
            "operations and services: month-to-date usage, usage in the last 24 hours (not for licences "
            "and connectors), and the final usage of the last closed month, in the unit of the service."
            + NEEDS_APIS
            + NEEDS_LABELS,
            "locale",
            {"api": "Service (unit)"},
            {
                "Month to date": grouped(f"operation_api:wolkvox_billing_usage:max{{{api}}}", "$group, api"),
                "Last 24 hours": grouped(
                    f"operation_api:wolkvox_billing_usage:increase1d{{{api}}}", "$group, api"
                ),
            },
            sort_by="Month to date",
            size=(14, 8),
        )
        .decimals(0)
        .override_by_name(
            "Service (unit)",
            [
                dm.DynamicConfigValue(
                    id_val="mappings",
                    value=value_texts({api: (f"{api} ({unit})", None) for api, unit in API_UNITS.items()}),
                )
            ],
        )
    )
    board = board.with_panel(
        table_panel(
            "Last month per $group",
            "Per value of the Group by label, month and currency: the cost of the last closed month "
            f"({LAST_MONTH}), with the unit prices configured now."
            + NEEDS_CLOSED_MONTH
            + NEEDS_PRICES
            + NEEDS_LABELS,
            "locale",
            {"month": "Month", "currency": "Currency"},
            {
                "Cost": grouped(
                    f"operation:wolkvox_billing_cost:previous_month{{{OP}}}", "$group, month, currency"
                ),
            },
            sort_by="Cost",
            size=(10, 8),
        ).decimals(2)
    )
    return board


def last_month(board: dashboard.Dashboard) -> dashboard.Dashboard:
    """The invoice to check against: the totals of the last closed month, kept after the API forgot it."""
    board = board.with_row(dashboard.Row("Last month (the invoice to check)"))
    board = board.with_panel(
        stat_panel(
            "Last month: stereo-recording minutes",
            f"Final stereo-recording minutes of the last closed month ({LAST_MONTH}), per month label, for "
            "the selected operations." + NEEDS_CLOSED_MONTH,
            "none",
            [
                query(
                    f"sum by (month) (operation:wolkvox_stereo_rec_minutes_previous_month:max{{{OP}}})",
                    "{{month}}",
                )
            ],
            color="blue",
            size=(8, 5),
            text_mode=cm.BigValueTextMode.VALUE_AND_NAME,
        )
        .decimals(0)
        .no_value("no month closed yet")
    )
    board = board.with_panel(
        stat_panel(
            "Last month: invoice to check",
            f"Cost of the last closed month per currency: its final usage ({LAST_MONTH}) times the unit "
            "prices configured now; services without a price are not counted."
            + NEEDS_CLOSED_MONTH
            + NEEDS_PRICES,
            "locale",
            [
                query(
                    f"sum by (month, currency) (operation:wolkvox_billing_cost:previous_month{{{OP}}})",
                    "{{month}} {{currency}}",
                )
            ],
            color="purple",
            size=(8, 5),
            text_mode=cm.BigValueTextMode.VALUE_AND_NAME,
        )
        .decimals(2)
        .no_value("no month closed yet, or no prices configured")
    )
    board = board.with_panel(
        ratio_bars(
            "Last month against budget",
            "The last closed month's minutes against budget_minutes and its cost against cost_budget (the "
            "budgets and unit prices configured now), one bar each. Orange from 80 %, red from 100 %."
            + NEEDS_CLOSED_MONTH
            + NEEDS_BUDGET
            + NEEDS_COST_BUDGET,
            f"operation:wolkvox_stereo_rec_budget_used_previous_month:ratio{{{OP}}}",
            "no month closed yet, or no budget_minutes or cost_budget configured",
            legend="{{operation}} minutes",
            more=(
                (
                    f"operation:wolkvox_billing_cost_budget_used_previous_month:ratio{{{OP}}}",
                    "{{operation}} cost ({{currency}})",
                ),
            ),
        )
        .span(8)
        .height(5)
    )
    board = board.with_panel(
        table_panel(
            "Last month per operation",
            f"Per operation and month: final minutes ({LAST_MONTH}), share of the minutes budget, cost with "
            "the unit prices configured now, share of the cost budget."
            + NEEDS_CLOSED_MONTH
            + NEEDS_COST_BUDGET
            + NEEDS_BUDGET,
            "locale",
            {"operation": "Operation", "month": "Month"},
            {
                "Minutes": f"operation:wolkvox_stereo_rec_minutes_previous_month:max{{{OP}}}",
                "Of minutes budget": f"operation:wolkvox_stereo_rec_budget_used_previous_month:ratio{{{OP}}}",
                "Cost": f"operation:wolkvox_billing_cost:previous_month{{{OP}}}",
                "Of cost budget": f"operation:wolkvox_billing_cost_budget_used_previous_month:ratio{{{OP}}}",
            },
            sort_by="Minutes",
            size=(24, 7),
        )
        .decimals(2)
        .override_by_name("Of minutes budget", ratio_cells(decimals=1))
        .override_by_name("Of cost budget", ratio_cells(decimals=1))
    )
    return board


DASHBOARDS = {"wolkvox-overview.json": overview, "wolkvox-billing.json": billing}


def _number_ids(panels: list[dict[str, Any]]) -> None:
    """Panel ids 1, 2, ... in layout order (Grafana keys panel links and state by them)."""
    for number, panel in enumerate(panels, start=1):
        panel["id"] = number


def render(build: Any) -> str:
    doc = json.loads(json.dumps(build().build(), cls=JSONEncoder))
    _number_ids(doc["panels"])
    # Prometheus annotation fields the SDK's AnnotationQuery does not model.
    for annotation in doc["annotations"]["list"]:
        annotation.update(
            {
                "step": "1m",
                "titleFormat": "{{alertname}}",
                "textFormat": "{{operation}} {{instance}} ({{severity}})",
            }
        )
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    for name, build in DASHBOARDS.items():
        (OUT / name).write_text(render(build), encoding="utf-8")
        print(f"wrote {OUT / name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
