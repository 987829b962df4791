"""``python -m exporter.simulator``: flags, start-up and shutdown."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import signal
import sys
from collections.abc import Sequence
from typing import Any

from exporter.config import ConfigError, parse_duration, parse_listen_address
from exporter.fdlimit import raise_fd_limit
from exporter.simulator.api import ITEMS_FORMATS
from exporter.simulator.app import SimulatorOptions, start_server, url_of
from exporter.simulator.faults import modes_help

logger = logging.getLogger("exporter.simulator")

# --------------------------------------------------------------------------- command line


def _arg(convert: Any, what: str) -> Any:
    def parse(text: str) -> Any:
        try:
            return convert(text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(exc.problem) from None
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{what}: {exc}") from None

    return parse


def _duration(text: str) -> float:
    """The exporter's durations (250ms, 2s, 1m30s), and 0 for "none"."""
    if text.strip() in {"0", "0s"}:
        return 0.0
    return parse_duration(text, "duration")


def _listen_address(text: str) -> tuple[str, int]:
    host, port = parse_listen_address(text)
    return host or "", port  # "" is every interface


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError("must be within 0..1")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be >= 0")
    return value


def _positive_duration(text: str) -> float:
    value = _duration(text)
    if value <= 0:
        raise ValueError("must be > 0")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError("must be a finite number >= 0")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m exporter.simulator",
        description="A fake wolkvox billing API (see the module docstring for the /-/ endpoints).",
        epilog="fault modes (POST /-/faults):\n" + modes_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--web.listen-address",
        dest="listen",
        default="127.0.0.1:19727",
        type=_arg(_listen_address, "listen address"),
        help="host:port to listen on; port 0 picks a free port (default %(default)s)",
    )
    parser.add_argument(
        "--latency",
        default="0",
        type=_arg(_duration, "latency"),
        help="added to every API answer, e.g. 250ms, 2s (default %(default)s)",
    )
    parser.add_argument(
        "--minutes-per-hour",
        default=600.0,
        type=_arg(_non_negative_float, "minutes per hour"),
        help="growth rate of stereo_rec minutes (default %(default)s)",
    )
    parser.add_argument(
        "--daily-limit",
        default=0,
        type=_arg(_non_negative_int, "daily limit"),
        help="requests per token per --day-length before 403 TOKEN LIMIT EXCEEDED; 0 = none "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--day-length",
        default="1d",
        type=_arg(_positive_duration, "day length"),
        help="the rolling window --daily-limit counts over, e.g. 1d, 10s (default %(default)s)",
    )
    parser.add_argument(
        "--report-interval",
        default="0",
        type=_arg(_duration, "report interval"),
        help="a report (token, server, api) fetched again sooner counts in report_violations; "
        "0 = not checked (default %(default)s)",
    )
    parser.add_argument(
        "--hang-fraction",
        default=0.0,
        type=_arg(_fraction, "hang fraction"),
        help="fraction (0..1) of tokens, by stable hash, that hang on every request (default %(default)s)",
    )
    parser.add_argument(
        "--items-format",
        default="int",
        choices=ITEMS_FORMATS,
        help="how items is written (default %(default)s)",
    )
    parser.add_argument(
        "--log.level",
        dest="log_level",
        default="info",
        choices=("debug", "info", "warn", "warning", "error"),
        help="log level (default %(default)s)",
    )
    return parser


def _announce(url: str) -> None:
    """The one line a test, a benchmark or a human waits for; printed whatever --log.level says."""
    announcer = logging.getLogger(f"{logger.name}.listen")
    if not announcer.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        announcer.addHandler(handler)
        announcer.propagate = False
        announcer.setLevel(logging.INFO)
    announcer.info("simulator listening on %s", url)  # StreamHandler flushes after every record


async def _serve(options: SimulatorOptions) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    try:
        runner, url = await start_server(options)
    except OSError as exc:
        logger.error("cannot listen on %s: %s", url_of(options.host or "0.0.0.0", options.port), exc)
        return 1
    _announce(url)
    await stop.wait()
    logger.info("stopping")
    await runner.cleanup()
    logger.info("stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a bad flag (argparse printed why)
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    host, port = args.listen
    options = SimulatorOptions(
        host=host,
        port=port,
        latency=args.latency,
        minutes_per_hour=args.minutes_per_hour,
        daily_limit=args.daily_limit,
        hang_fraction=args.hang_fraction,
        items_format=args.items_format,
        day_length=args.day_length,
        report_interval=args.report_interval,
    )
    raise_fd_limit()  # lets one process hold 10,000+ connections (the soft limit is often 1024)
    try:
        return asyncio.run(_serve(options))
    except KeyboardInterrupt:  # a second Ctrl-C while stopping
        return 130


if __name__ == "__main__":
    sys.exit(main())
