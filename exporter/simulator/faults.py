"""The faults the simulator can play, per token: what ``POST /-/faults`` accepts."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from exporter.simulator.api import (
    ERR_INVALID_TOKEN,
    ERR_LIMIT,
    ERR_NO_TOKEN,
    ERR_SIMULTANEOUS,
    ERR_UNKNOWN_API,
)

FAULT_MODES = (
    "none",
    "hang",
    "slow",
    "reset",
    "http_500",
    "html",
    "badjson",
    "wrongshape",
    "oversize",
    "garbage_items",
    "multi_rows",
    "empty_data",
    "token_limit",
    "invalid_token",
    "busy",
    "unknown_api",
    "maintenance",
    "no_token",
    "redirect",
    "correction",
    "no_date",
)
WILDCARD = "*"
DEFAULT_SLOW_SECONDS = 1.0

ERROR_FAULTS = {
    "token_limit": ERR_LIMIT,
    "invalid_token": ERR_INVALID_TOKEN,
    "busy": ERR_SIMULTANEOUS,
    "unknown_api": ERR_UNKNOWN_API,
    "no_token": ERR_NO_TOKEN,
}


@dataclass
class Fault:
    mode: str
    token: str
    count: int | None = None
    seconds: float | None = None
    location: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "token": self.token,
            "count": self.count,
            "seconds": self.seconds,
            "location": self.location,
        }


def parse_fault(body: Any) -> Fault:
    """Validates a ``POST /-/faults`` document; raises ValueError with a one-line message."""
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    unknown = set(body) - {"mode", "token", "count", "seconds", "location"}
    if unknown:
        raise ValueError(f"unknown keys: {', '.join(sorted(unknown))}")
    mode = body.get("mode")
    if mode not in FAULT_MODES:
        raise ValueError(f"mode must be one of: {', '.join(FAULT_MODES)}")
    token = body.get("token")
    if not isinstance(token, str) or not token.strip():
        raise ValueError("token must be a non-empty string ('*' for every token)")
    count = body.get("count")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ValueError("count must be an integer >= 1")
    seconds = body.get("seconds")
    if seconds is not None:
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            raise ValueError("seconds must be a number")
        seconds = float(seconds)
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError("seconds must be a finite number >= 0")
    location = body.get("location")
    if mode == "redirect":
        if not isinstance(location, str) or not re.match(r"^https?://", location):
            raise ValueError("redirect needs a location (http or https URL)")
    elif location is not None:
        raise ValueError("location is only for mode redirect")
    return Fault(mode=mode, token=token.strip(), count=count, seconds=seconds, location=location)
