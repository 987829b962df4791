"""Command line: flags in the Prometheus style, start-up, reload (SIGHUP, POST /-/reload), shutdown."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from collections.abc import Sequence

from exporter import __version__
from exporter.app import DEFAULT_PORT, App, StartError, WebSettings, use_config
from exporter.config import ConfigError, load_config
from exporter.configproc import load_config_isolated
from exporter.fdlimit import raise_fd_limit
from exporter.logs import FORMATS, LEVELS, setup_logging
from exporter.memory import tune_malloc
from exporter.monthclose import utc_month
from exporter.statuspage import DEFAULT_RUNBOOK_URL
from exporter.webconfig import WebConfigError
from exporter.weblive import load_web_config

log = logging.getLogger("exporter")


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where there is none to show (off switches, unset files)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or isinstance(action, argparse._VersionAction):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wolkvox-exporter",
        formatter_class=_DefaultsFormatter,
        description="Prometheus exporter for wolkvox billing usage. Values are fetched in the background, "
        "within the API's limits, and served from a cache.",
        epilog="wolkvox-exporter statement --help: print a month's statement from the state store.",
    )
    parser.add_argument(
        "--config.file", dest="config_file", metavar="FILE", default="config.yml", help="YAML configuration"
    )
    parser.add_argument(
        "--config.check", dest="config_check", action="store_true", help="validate the config file and exit"
    )
    parser.add_argument(
        "--web.listen-address",
        dest="listen_address",
        metavar="ADDRESS",
        default=f":{DEFAULT_PORT}",
        help="address to listen on, host:port (:port listens on all interfaces)",
    )
    parser.add_argument(
        "--web.telemetry-path",
        dest="telemetry_path",
        metavar="PATH",
        default="/metrics",
        help="path of the metrics page",
    )
    parser.add_argument(
        "--web.config.file",
        dest="web_config_file",
        metavar="FILE",
        default=None,
        help="TLS and basic-auth settings, in the exporter-toolkit format (default: none, plain HTTP)",
    )
    parser.add_argument(
        "--web.max-connections",
        dest="max_connections",
        metavar="N",
        type=int,
        default=512,
        help="open HTTP connections beyond this are closed at once",
    )
    parser.add_argument(
        "--web.runbook-url",
        dest="runbook_url",
        metavar="URL",
        default=DEFAULT_RUNBOOK_URL,
        help="the runbook the landing page's hints link to (#reason-<reason>, #config-reload)",
    )
    parser.add_argument(
        "--log.level",
        dest="log_level",
        choices=list(LEVELS),
        default="info",
        help="least severe level logged",
    )
    parser.add_argument(
        "--log.format",
        dest="log_format",
        choices=FORMATS,
        default="logfmt",
        help="log lines as logfmt key=value pairs or JSON objects; fields such as operation, api and reason "
        "are keys of their own in both",
    )
    parser.add_argument("--version", action="version", version=f"wolkvox-exporter {__version__}")
    return parser


async def serve(app: App) -> int:
    """Run ``app`` until SIGTERM or SIGINT; SIGHUP reloads the configuration."""
    # Signals first, so a SIGTERM that arrives while starting still shuts down cleanly.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    reloads: set[asyncio.Task[tuple[bool, str]]] = set()

    def on_sighup() -> None:
        task = loop.create_task(app.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    try:
        await app.start()
    except StartError as error:
        log.error("%s", error)
        return 1
    await stop.wait()
    log.info("shutting down")
    await app.stop()
    log.info("stopped")
    return 0


def statement_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wolkvox-exporter statement",
        formatter_class=_DefaultsFormatter,
        description="Print a month's statement (usage and cost per operation and service) from the state "
        "store (state_store), without a running exporter and without the tokens. The same output as "
        "/statement (docs/statement.md).",
    )
    parser.add_argument(
        "--config.file", dest="config_file", metavar="FILE", default="config.yml", help="YAML configuration"
    )
    parser.add_argument(
        "--month", metavar="YYYY-MM", default=None, help="the month (default: this month, UTC)"
    )
    parser.add_argument("--format", default="csv", help="csv, json or html")
    parser.add_argument("--group", metavar="LABEL", default=None, help="a subtotal per value of this label")
    return parser


def statement_main(argv: Sequence[str]) -> int:
    """``wolkvox-exporter statement ...``: the statement on stdout; one line on stderr and exit 1 when
    something is wrong or the month has no data."""
    from exporter import statement
    from exporter.statestore import StoreError, read_month_totals  # SQLite, only for the statement

    args = statement_parser().parse_args(argv)

    def fail(problem: str) -> int:
        print(f"wolkvox-exporter statement: {problem}", file=sys.stderr)
        return 1

    try:
        config = load_config(args.config_file, tokens=False)  # a statement needs no token
        month = statement.parse_month(args.month or utc_month(time.time()))
        fmt = statement.pick_format(args.format, None)
        if config.state_store is None:
            return fail(f"{args.config_file}: state_store is not set; the statement reads the state store")
        try:
            totals = read_month_totals(config.state_store, month)  # read only: the exporter may run
        except StoreError as error:
            return fail(str(error))  # names the path
        built = statement.build(totals, statement.terms_of(config), month, args.group or None)
    except (ConfigError, statement.StatementError) as error:
        return fail(str(error))
    if not built.lines:
        return fail(f"no data for month {month} in {config.state_store}")
    sys.stdout.write(statement.render(built, fmt))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["statement"]:
        return statement_main(argv[1:])
    tune_malloc()
    raise_fd_limit()
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    try:
        config = load_config_isolated(args.config_file)
    except ConfigError as error:
        for line in error.lines():  # every problem of the file, one line each
            log.error("%s", line)
        return 1
    use_config(config)
    if args.config_check:
        warned = f", {len(config.warnings)} warning(s) above" if config.warnings else ""
        print(f"{args.config_file}: OK, {len(config.operations)} operation(s){warned}")
        if args.web_config_file:  # empty: no web config, as in the exporter-toolkit
            try:
                web_config = load_web_config(args.web_config_file)
            except WebConfigError as error:
                log.error("%s", error)
                return 1
            for warning in web_config.warnings:
                log.warning("%s", warning)
            print(f"{args.web_config_file}: OK")
        return 0
    if args.max_connections < 1:
        log.error("--web.max-connections: must be at least 1")
        return 1
    settings = WebSettings(
        listen_address=args.listen_address,
        telemetry_path=args.telemetry_path,
        web_config_file=args.web_config_file,
        max_connections=args.max_connections,
        runbook_url=args.runbook_url,
    )
    try:
        app = App(config, settings, load_config=lambda: load_config_isolated(args.config_file))
    except StartError as error:
        log.error("%s", error)
        return 1
    return asyncio.run(serve(app))


if __name__ == "__main__":
    sys.exit(main())
