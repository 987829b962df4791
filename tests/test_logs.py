"""exporter/logs.py: every configured token scrubbed from every log line (message, traceback and every
field), the two line formats readable by their usual readers, fields passed with ``extra=`` as JSON keys
or logfmt pairs after msg (also from the refresher's own call site), and ``--help`` showing each flag's
default."""

from __future__ import annotations

import io
import json
import logging
import re
import shlex
import sys
from collections.abc import Iterator

import pytest
from harness import Exporter, Simulator, value

from exporter.cli import build_parser
from exporter.logs import JsonFormatter, LogfmtFormatter, fields, redact
from exporter.secret import REDACTED, Redactor

TOKEN = "Tok3nWithCaps-0123456789"
SHORT = "Tok3n"


@pytest.fixture(autouse=True)
def tokens() -> Iterator[None]:
    """The configured tokens, as app.py sets them; none again afterwards."""
    redact.set([SHORT, TOKEN])
    yield
    redact.set([])


def record(message: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError(f"upstream echoed {TOKEN.lower()}")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord("exporter.test", logging.WARNING, __file__, 1, message, args, exc_info)


@pytest.mark.parametrize("formatter", [LogfmtFormatter(), JsonFormatter()], ids=["logfmt", "json"])
def test_a_token_is_scrubbed_from_message_arguments_and_traceback_in_any_case(
    formatter: logging.Formatter,
) -> None:
    line = formatter.format(record("fetch for %s failed: %s", TOKEN.upper(), f"<{TOKEN}>", exc=True))
    for form in (TOKEN, TOKEN.upper(), TOKEN.lower(), SHORT, SHORT.lower()):
        assert form not in line
    assert line.count(REDACTED) >= 3  # the argument, the echoed detail and the traceback's message
    assert "\n" not in line  # the traceback stays inside the one line


def test_the_longest_token_is_masked_first() -> None:
    # The short token is a prefix of the long one: masking it first would leave the long one's tail.
    assert redact(f"a {TOKEN} b {SHORT} c") == f"a {REDACTED} b {REDACTED} c"


def test_setting_the_tokens_replaces_the_old_ones() -> None:
    redact.set(["new-token-value"])
    assert redact(f"{TOKEN} new-token-value") == f"{TOKEN} {REDACTED}"
    redact.set([])
    assert redact("new-token-value") == "new-token-value"


def test_a_redactor_ignores_empty_tokens_and_text_without_one() -> None:
    fresh = Redactor()
    fresh.set(["", "x-token"])
    assert fresh("nothing to hide here") == "nothing to hide here"
    assert fresh("X-TOKEN") == REDACTED


def test_logfmt_is_key_value_pairs_with_quoted_values() -> None:
    line = LogfmtFormatter().format(record('said "hi" = here\\there'))
    fields = dict(pair.split("=", 1) for pair in shlex.split(line))
    assert fields["level"] == "warn"
    assert fields["logger"] == "exporter.test"
    assert fields["msg"] == 'said "hi" = here\\there'
    assert fields["ts"].endswith("Z")


def test_json_is_one_object_per_line() -> None:
    line = JsonFormatter().format(record("plain message ñ", exc=True))
    doc = json.loads(line)
    assert doc["level"] == "warn" and doc["msg"] == "plain message ñ"
    assert "ValueError" in doc["exc"] and REDACTED in doc["exc"]


CANARY = "CANARY-logs-5d1c0e9f"
Lines = tuple[logging.Logger, io.StringIO, logging.Handler]


@pytest.fixture
def lines() -> Iterator[Lines]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("test_logs")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    redact.set([CANARY])
    try:
        yield logger, stream, handler
    finally:
        logger.removeHandler(handler)
        redact.set([])


def test_json_fields_are_keys_of_their_own_with_their_types(lines: Lines) -> None:
    logger, stream, handler = lines
    handler.setFormatter(JsonFormatter())
    logger.warning(
        "fetch failed",
        extra=fields(operation="lima", api="stereo_rec", reason="auth", attempts=3, value=None),
    )
    line = json.loads(stream.getvalue())
    assert line["msg"] == "fetch failed" and line["level"] == "warn"
    assert line["operation"] == "lima" and line["api"] == "stereo_rec" and line["reason"] == "auth"
    assert line["attempts"] == 3 and line["value"] is None
    # The record's own attributes (module, lineno...) are not fields.
    assert set(line) == {"ts", "level", "logger", "msg", "operation", "api", "reason", "attempts", "value"}


def test_logfmt_fields_are_pairs_after_msg_and_quoted_when_needed(lines: Lines) -> None:
    logger, stream, handler = lines
    handler.setFormatter(LogfmtFormatter())
    logger.warning(
        "fetch failed",
        extra=fields(operation="medellin norte", api="ivr_calls", reason="timeout", detail='no "answer"'),
    )
    line = stream.getvalue().strip()
    assert re.search(
        r' msg="fetch failed" operation="medellin norte" api=ivr_calls reason=timeout '
        r'detail="no \\"answer\\""$',
        line,
    ), line


@pytest.mark.parametrize("formatter", [JsonFormatter(), LogfmtFormatter()], ids=["json", "logfmt"])
def test_every_field_is_scrubbed_of_tokens(lines: Lines, formatter: logging.Formatter) -> None:
    logger, stream, handler = lines
    handler.setFormatter(formatter)
    logger.error("echoed %s", CANARY, extra=fields(detail=f"upstream said {CANARY}", token=CANARY, n=7))
    output = stream.getvalue()
    assert CANARY not in output and output.count("<redacted>") == 3, output


def test_a_field_named_like_a_base_key_or_a_record_attribute_does_not_replace_it(lines: Lines) -> None:
    logger, stream, handler = lines
    handler.setFormatter(JsonFormatter())
    logger.info("the message", extra=fields(msg="other", level="x", name="lima", args=1))
    line = json.loads(stream.getvalue())
    assert line["msg"] == "the message" and line["level"] == "info" and line["logger"] == "test_logs"
    assert line["field_msg"] == "other" and line["field_level"] == "x"
    assert line["field_name"] == "lima" and line["field_args"] == 1


def test_a_failed_fetch_logs_operation_api_and_reason_as_fields(
    simulator: Simulator, run_exporter, caplog: pytest.LogCaptureFixture
) -> None:
    simulator.fault("invalid_token", token="tok-lima")
    config = {
        "refresh_interval": "5m",
        "operations": [{"name": "lima", "server": "wv0042", "token": "tok-lima", "base_url": simulator.url}],
    }
    with caplog.at_level(logging.WARNING, logger="exporter.refresher"):
        exporter: Exporter = run_exporter(config)
        exporter.wait_for(
            lambda s: value(s, "wolkvox_scrape_errors_total", operation="lima", reason="auth") == 1,
            what="the auth failure",
        )
    record = next(r for r in caplog.records if r.getMessage() == "fetch failed")
    line = json.loads(JsonFormatter().format(record))
    assert (line["operation"], line["api"], line["reason"]) == ("lima", "stereo_rec", "auth")
    assert "PLEASE VALIDATE TOKEN" in line["detail"]


def test_help_shows_each_flags_default() -> None:
    help_text = build_parser().format_help()
    text = " ".join(help_text[help_text.index("options:") :].split())  # the flags' part, unwrapped
    for flag, default in [
        ("--config.file FILE", "config.yml"),
        ("--web.listen-address ADDRESS", ":19726"),
        ("--web.telemetry-path PATH", "/metrics"),
        ("--web.max-connections N", "512"),
        ("--log.level", "info"),
        ("--log.format", "logfmt"),
    ]:
        after = text[text.index(flag) :]
        shown = re.search(r"\(default: ([^)]*)\)", after)
        assert shown and shown.group(1) == default, (flag, after[:200])
    assert "(default: None)" not in text and "(default: False)" not in text
