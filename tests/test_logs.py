"""exporter/logs.py: every configured token scrubbed from every log line (message and traceback), and the
two line formats readable by their usual readers."""

from __future__ import annotations

import json
import logging
import shlex
import sys
from collections.abc import Iterator

import pytest

from exporter.logs import JsonFormatter, LogfmtFormatter, redact
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
