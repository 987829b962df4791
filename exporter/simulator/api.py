"""The simulator's model of the wolkvox API: paths, documented errors, and month-to-date values that
are stable per (token, server) and grow through the month."""

from __future__ import annotations

import hashlib
import math
from datetime import UTC, datetime
from typing import Any

from exporter.model import BILLING_APIS

SUCCESS_MSG = "Information found for the current month"
OVERSIZE_BYTES = 5 * 1024 * 1024
STOP_GRACE_SECONDS = 2.0
SWEEP_INTERVAL_SECONDS = 0.5
MAX_OFFSET = 500.0
ITEMS_FORMATS = ("int", "dot", "comma")

# The exporter's table of billing services (model.BILLING_APIS) is the simulator's too: its apis, kinds,
# row descriptions and growth rates.
KNOWN_APIS = tuple(BILLING_APIS)
LICENCE_APIS = frozenset(name for name, api in BILLING_APIS.items() if api.kind == "level")
DEFAULT_RATE = 0.1  # of an api the table does not know (a fault answers any api)

# (status, error, msg) of the documented error answers.
ERR_NO_TOKEN = (401, "UNAUTHORIZED", "PLEASE ENTER THE WOLKVOX-TOKEN")
ERR_MISSING = (400, "BAD REQUEST", "SOME PARAMETERS ARE REQUIRED")
ERR_UNKNOWN_API = (400, "BAD REQUEST", "THE API YOU WANT TO CONSULT DOES NOT EXIST")
ERR_LIMIT = (403, "FORBIDDEN", "TOKEN LIMIT EXCEEDED")
ERR_SIMULTANEOUS = (403, "FORBIDDEN", "EXCEEDS THE LIMIT OF SIMULTANEOUS REQUESTS PER TOKEN (2)")
ERR_INVALID_TOKEN = (403, "FORBIDDEN", "PLEASE VALIDATE TOKEN")
ERR_STOPPING = (503, "SERVICE UNAVAILABLE", "THE SIMULATOR IS STOPPING")
ERR_GONE = (503, "SERVICE UNAVAILABLE", "THE CLIENT WENT AWAY")
HTML_502 = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)

DAY_SECONDS = 86400.0


def stable_unit(*parts: str) -> float:
    """A number in [0, 1) derived from ``parts`` only: the same in every run, on every machine."""
    digest = hashlib.sha256("\x00".join(parts).encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def month_start(now_unix: float) -> datetime:
    now = datetime.fromtimestamp(now_unix, UTC)
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def hours_into_month(now_unix: float) -> float:
    """Hours since 00:00 UTC on the first day of the current month."""
    return max(0.0, (now_unix - month_start(now_unix).timestamp()) / 3600.0)


def usage_value(api: str, token: str, server: str, now_unix: float, minutes_per_hour: float) -> float:
    """Month-to-date value of ``api``: stable per (token, server), monotonic within a month."""
    if api in LICENCE_APIS:
        return float(1 + int(40 * stable_unit("licences", api, token, server)))
    if api == "stereo_rec":  # kept free of the api name: the documented formula
        offset = MAX_OFFSET * stable_unit("offset", token, server)
    else:
        offset = MAX_OFFSET * stable_unit("offset", api, token, server)
    known = BILLING_APIS.get(api)
    rate = minutes_per_hour * (known.simulated_rate if known is not None else DEFAULT_RATE)
    return offset + rate * hours_into_month(now_unix)


def format_items(value: float, items_format: str) -> str:
    """``int``: floor as an integer; ``dot``/``comma``: two decimals with that separator."""
    if items_format == "int":
        return str(math.floor(value))
    text = f"{value:.2f}"
    return text.replace(".", ",") if items_format == "comma" else text


def description(api: str) -> str:
    """The row description wolkvox sends for ``api`` (the api's name for one it does not know)."""
    known = BILLING_APIS.get(api)
    return known.description if known is not None else api


def utc_stamp(now_unix: float) -> str:
    return datetime.fromtimestamp(now_unix, UTC).strftime("%Y-%m-%d %H:%M:%S")


def parse_clock(body: Any) -> float | None:
    """Validates a ``POST /-/clock`` document: the Unix time to answer at, or None for the real clock."""
    if not isinstance(body, dict) or set(body) != {"at"}:
        raise ValueError('body must be a JSON object {"at": ISO 8601 time, Unix seconds or null}')
    at = body["at"]
    if at is None:
        return None
    if isinstance(at, str):
        try:
            moment = datetime.fromisoformat(at.strip())
        except ValueError:
            raise ValueError(f"at: {at!r} is not an ISO 8601 time") from None
        if moment.tzinfo is None:
            raise ValueError(f"at: {at!r} has no time zone (add Z or +00:00)")
        return moment.timestamp()
    if isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at) or at < 0:
        raise ValueError("at must be an ISO 8601 time, Unix seconds >= 0, or null")
    return float(at)
