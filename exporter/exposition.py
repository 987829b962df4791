"""Prometheus text exposition format (version 0.0.4): escaping, number formatting, metric families.

Only the pieces this exporter needs, kept small so that a full page can be assembled from cached
per-operation fragments without re-rendering every series on each change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def sample(name: str, labels: dict[str, str], value: float) -> str:
    """One exposition line, newline included. Label order follows the dict."""
    if labels:
        inner = ",".join(f'{key}="{escape_label_value(val)}"' for key, val in labels.items())
        return f"{name}{{{inner}}} {format_value(value)}\n"
    return f"{name} {format_value(value)}\n"


@dataclass(frozen=True)
class Family:
    """A metric family: its sample name, type and HELP text."""

    name: str
    type: str
    help: str

    def header(self) -> bytes:
        return f"# HELP {self.name} {escape_help(self.help)}\n# TYPE {self.name} {self.type}\n".encode()
