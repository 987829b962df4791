"""Logging set-up: logfmt or JSON lines on stderr, with every known token masked as a last defence.

Code never logs a token on purpose (tokens are ``Secret`` objects); the redaction here catches the
unforeseen, e.g. an upstream that echoes a token inside an error message or a traceback.

Structured fields: a call site passes them with ``extra=`` (``log.warning("fetch failed",
extra=fields(operation=name, api=api, reason=reason))``); they become JSON keys with ``--log.format json``
and ``key=value`` pairs after ``msg`` with logfmt. Every field is scrubbed like the message.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from exporter.secret import Redactor

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR}
FORMATS = ("logfmt", "json")
redact = Redactor()  # app.py sets the configured tokens


def _timestamp(record: logging.LogRecord) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


# What every LogRecord has (and `message`, `asctime` that formatters add): anything else came in `extra=`.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}
_BASE_KEYS = ("ts", "level", "logger", "msg", "exc")


def fields(**values: Any) -> dict[str, Any]:
    """Structured fields for a log call: ``log.info("...", extra=fields(operation=..., api=...))``. A
    field named like a base key (``msg``, ``level``...) or an attribute of the log record (``name``,
    ``args``..., which ``logging`` refuses to overwrite) is renamed with a ``field_`` prefix."""
    taken = _BASE_KEYS + tuple(_RECORD_ATTRIBUTES)
    return {f"field_{key}" if key in taken else key: value for key, value in values.items()}


def _extra(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a call site passed with ``extra=``, scrubbed: strings (and anything rendered as one)
    pass through the redactor; numbers, booleans and null stay as they are unless they hold a token."""
    extra: dict[str, Any] = {}
    for key, value in vars(record).items():
        if key in _RECORD_ATTRIBUTES or key.startswith("_"):
            continue
        name = f"field_{key}" if key in _BASE_KEYS else key
        if value is None or isinstance(value, bool | int | float):
            text = redact(json.dumps(value))
            extra[name] = value if text == json.dumps(value) else text
        else:
            extra[name] = redact(str(value))
    return extra


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    out: dict[str, Any] = {
        "ts": _timestamp(record),
        "level": "warn" if record.levelname == "WARNING" else record.levelname.lower(),
        "logger": record.name,
        "msg": redact(record.getMessage()),
    }
    out.update(_extra(record))
    if record.exc_info:
        out["exc"] = redact(logging.Formatter().formatException(record.exc_info))
    return out


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{key}={_logfmt_value(value)}" for key, value in _fields(record).items())


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_fields(record), ensure_ascii=False)


def _logfmt_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    value = str(value)
    if value and not any(c in value for c in ' "=\n\t\\'):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def setup_logging(level: str = "info", fmt: str = "logfmt") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(LEVELS[level])
    # Third-party chatter (urllib3 connection pool lines) only at debug.
    logging.getLogger("urllib3").setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
