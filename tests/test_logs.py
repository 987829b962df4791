"""Log lines: fields are keys of their own (JSON) or key=value pairs after msg (logfmt), every field is
scrubbed of tokens, and ``--help`` shows each flag's default. In-process: formatters on a real logger,
and the refresher's own call site on a fetch that fails against the simulator."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest
from harness import Exporter, Simulator, value

from exporter.cli import build_parser
from exporter.logs import JsonFormatter, LogfmtFormatter, fields, redact

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
