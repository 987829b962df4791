"""What a wolkvox answer comes to: a value, or a failure with its reason. Pure code, no I/O.

``parse_body`` classifies a billing answer (its bytes and HTTP status) into a :class:`Reading`, and
``parse_token_info`` a ``token_info`` answer into a :class:`TokenInfo`; anything else is a
:class:`FetchError` whose ``reason`` is one of :data:`REASONS` and whose ``detail`` is one line, safe to
log, with the token redacted. The transport (exporter/client.py) raises the first two reasons below;
this module raises the others. This docstring is the source of docs/fetching.md's table of reasons.

The value of a reading is the SUM of ``items`` over all rows of ``data``. The API documents one row
per operation; if it ever splits the month into several rows, the total is what is billed. An empty
``data`` list with code 200 is a reading of 0 (no usage recorded yet this month). ``Reading.month`` is
the month (``"YYYY-MM"``) of the rows' ``date`` when every row has a year-first date (``2024-05-14``,
``2024/05/14``, optionally followed by a time after a space or ``T``) and all rows agree; otherwise
None, never an error (the format of ``date`` is not documented, so nothing is guessed from it).

Failure reasons (``REASONS``, in this order) and when each is raised:

``timeout``
    Connect timeout; read timeout (no byte for read_timeout seconds); or the whole answer not received
    within connect_timeout + read_timeout (the total deadline).
``connection``
    Connection refused or reset (also mid-body), DNS failure, TLS failure (certificate, handshake),
    broken chunked encoding, a body shorter than its Content-Length.
``http_status``
    HTTP status not 200 and the body is not a wolkvox error document: any 3xx (redirects are never
    followed), 5xx HTML pages, 403 with an empty body (wolkvox maintenance or backup); also an HTTP
    status not 200 with a body that says code 200.
``api_error``
    A wolkvox error document (``code`` not 200) not covered below, e.g. "EXCEEDS THE LIMIT OF
    SIMULTANEOUS REQUESTS PER TOKEN (2)" or "SOME PARAMETERS ARE REQUIRED".
``auth``
    HTTP 401 or code 401, "PLEASE ENTER THE WOLKVOX-TOKEN", "PLEASE VALIDATE TOKEN"; also a token that
    cannot be sent in an HTTP header (empty, or with whitespace or control characters).
``token_limit``
    "TOKEN LIMIT EXCEEDED": the token's daily request budget is spent.
``unknown_api``
    "THE API YOU WANT TO CONSULT DOES NOT EXIST".
``invalid_response``
    HTTP 200 but the body is empty, not UTF-8, not JSON, or of the wrong shape (not an object, no
    numeric ``code``, ``data`` missing or not a list, a row not an object, a row without ``items``); a
    body larger than max_body_bytes; a Content-Encoding that cannot be decoded.
``parse``
    An ``items`` value that is not a plain non-negative decimal number (see ``parse_items``), or a sum
    too large for a float.

Error texts are matched case-insensitively as substrings of the body's ``error`` and ``msg``. ``code``
may be the string ``"200"`` or the number ``200``. When the HTTP status is not 200 but the body is a
wolkvox error document, the body decides the reason.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Mapping
from datetime import date
from typing import Any

from exporter.model import FetchError, Reading, TokenInfo
from exporter.secret import Secret, one_line, redact

__all__ = ["ItemsError", "month_of", "parse_body", "parse_items", "parse_token_info"]

_REPR_CHARS = 80
_SNIPPET_CHARS = 120

# (substring of error/msg, reason), checked in this order. Everything else with a code other than 200
# is "api_error" (401 is "auth").
_ERROR_TEXTS: tuple[tuple[str, str], ...] = (
    ("token limit exceeded", "token_limit"),
    ("api you want to consult does not exist", "unknown_api"),
    ("please enter the wolkvox-token", "auth"),
    ("please validate token", "auth"),
)

_NUMBER_RE = re.compile(r"\+?(?P<int>[0-9]+)(?:(?P<sep>[.,])(?P<frac>[0-9]+))?")
_CODE_RE = re.compile(r"[0-9]{1,4}")
_WHITESPACE_RE = re.compile(r"\s+")
# A year-first date with one separator used twice, then optionally a time (and a zone) that is ignored.
_DATE_RE = re.compile(
    r"(?P<y>[0-9]{4})(?P<sep>[-/])(?P<m>[0-9]{2})(?P=sep)(?P<d>[0-9]{2})"
    r"(?:[ T][0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]{1,9})?)?(?:Z|[+-][0-9]{2}:?[0-9]{2})?)?"
)


class ItemsError(ValueError):
    """An ``items`` value that is not a plain non-negative decimal number.

    ``raw`` is the rejected value and ``problem`` what is wrong with it; ``str()`` shows both, the value
    as a shortened repr.
    """

    def __init__(self, raw: object, problem: str) -> None:
        super().__init__(f"{_short_repr(raw)} {problem}")
        self.raw = raw
        self.problem = problem


# --------------------------------------------------------------------------------------------- helpers


def _short_repr(value: object, limit: int = _REPR_CHARS, secret: Secret | None = None) -> str:
    """repr(value), the secret redacted BEFORE shortening (so no cut-off head of it survives)."""
    try:
        return one_line(repr(value), secret, limit)
    except RecursionError:
        return f"<deeply nested {type(value).__name__}>"


def _snippet(body: bytes, secret: Secret | None) -> str:
    """The start of a body as one short line, the secret redacted before shortening."""
    # Redact the whole body (at most max_body_bytes) before cutting anything: a cut made first could
    # end inside the token, and whitespace collapsed later could pull that cut-off head into view.
    text = redact(body.decode("utf-8", errors="replace"), secret)
    return one_line(_WHITESPACE_RE.sub(" ", text).strip(), secret, _SNIPPET_CHARS)


def month_of(raw: object) -> str | None:
    """``"YYYY-MM"`` of a row's ``date`` written year first (``2024-05-14``, ``2024/05/14 08:00:00``,
    ``2024-05-14T08:00:00Z``), or None for anything else (day-first and month-first forms are never
    guessed: ``05/06/2024`` could be either)."""
    if not isinstance(raw, str):
        return None
    match = _DATE_RE.fullmatch(raw.strip())
    if match is None:
        return None
    year, month, day = int(match["y"]), int(match["m"]), int(match["d"])
    try:
        date(year, month, day)
    except ValueError:
        return None
    return sys.intern(f"{year:04d}-{month:02d}")  # one string per month, not one per reading


def _month_of_rows(rows: list[dict[str, Any]]) -> str | None:
    months = {month_of(row.get("date")) for row in rows}
    if len(months) != 1:
        return None  # no rows, or rows that disagree
    return months.pop()


# --------------------------------------------------------------------------------------------- parsing


def parse_items(raw: object) -> float:
    """Parse one ``items`` value into a finite float >= 0, or raise ItemsError.

    Accepted: JSON numbers (not booleans), and strings of ASCII digits with an optional leading ``+``,
    surrounding whitespace and at most one decimal separator, ``.`` or ``,``, with digits on both sides
    (``"1234"``, ``" 1234 "``, ``"12.5"``, ``"12,5"``, ``"+3"``, ``"1.234"`` = 1.234).
    Rejected: empty or blank strings, letters, signs other than a leading ``+`` (so every negative),
    NaN and infinities, exponents, underscores, thousands separators (``"1.234,5"``, ``"1 234"``), and a
    comma followed by exactly three digits (``"12,500"`` could be 12.5 or 12500: never guessed).
    """
    if isinstance(raw, bool):
        raise ItemsError(raw, "is a boolean, not a number")
    if isinstance(raw, int):
        if raw < 0:
            raise ItemsError(raw, "is negative")
        try:
            return float(raw)
        except OverflowError:
            raise ItemsError(raw, "is too large") from None
    if isinstance(raw, float):
        if not math.isfinite(raw):
            raise ItemsError(raw, "is not a finite number")
        if raw < 0:
            raise ItemsError(raw, "is negative")
        return raw + 0.0  # -0.0 -> 0.0
    if not isinstance(raw, str):
        raise ItemsError(raw, f"is a {type(raw).__name__}, not a number or a numeric string")
    text = raw.strip()
    if not text:
        raise ItemsError(raw, "is empty")
    match = _NUMBER_RE.fullmatch(text)
    if match is None:
        if text.startswith("-") and _NUMBER_RE.fullmatch(text[1:]) is not None:
            raise ItemsError(raw, "is negative")
        raise ItemsError(
            raw,
            "is not a plain decimal number (digits, at most one '.' or ',' decimal separator, "
            "no thousands separators)",
        )
    frac = match.group("frac")
    if match.group("sep") == "," and len(frac) == 3:
        raise ItemsError(
            raw,
            "is ambiguous: a comma followed by three digits may be a decimal comma or a thousands separator",
        )
    number = match.group("int") + ("." + frac if frac is not None else "")
    value = float(number)
    if not math.isfinite(value):
        raise ItemsError(raw, "is too large")
    return value


def _code_of(doc: Mapping[str, Any]) -> int | None:
    """The numeric ``code`` of a document, or None when it is missing or not a number."""
    code = doc.get("code")
    if isinstance(code, bool):
        return None
    if isinstance(code, int):
        return code
    if isinstance(code, float):
        return int(code) if code.is_integer() else None
    if isinstance(code, str) and _CODE_RE.fullmatch(code.strip()):
        return int(code.strip())
    return None


def _text_field(doc: Mapping[str, Any], key: str) -> str:
    value = doc.get(key)
    return value if isinstance(value, str) else ""


def _error_from_document(
    doc: Mapping[str, Any], code: int, http_status: int, secret: Secret | None
) -> FetchError:
    """Classify a wolkvox error document (a JSON object whose code is not 200)."""
    error = _text_field(doc, "error").strip()
    msg = _text_field(doc, "msg").strip()
    haystack = f"{error} {msg}".casefold()
    reason = "api_error"
    for needle, candidate in _ERROR_TEXTS:
        if needle in haystack:
            reason = candidate
            break
    else:
        if code == 401:
            reason = "auth"
    where = f"code {code}" if http_status == 200 else f"code {code} (HTTP {http_status})"
    said = ": ".join(part for part in (error, msg) if part) or "no error text"
    return FetchError(reason, f"wolkvox answered {where}: {said}", secret=secret)


def _decode_json(body: bytes, secret: Secret | None) -> tuple[Any, str | None]:
    """(document, None) or (None, problem)."""
    if not body.strip():
        return None, "empty body"
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return None, f"body is not UTF-8 (invalid byte at offset {exc.start})"
    try:
        return json.loads(text), None
    except RecursionError:
        return None, "body is not usable JSON (nested too deeply)"
    except ValueError as exc:  # json.JSONDecodeError, and too many digits in an integer
        problem = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        return (
            None,
            f"body is not JSON ({problem} at char {getattr(exc, 'pos', '?')}): {_snippet(body, secret)}",
        )


def _check_document(body: bytes, http_status: int, secret: Secret | None) -> dict[str, Any]:
    """The JSON object of a successful answer (HTTP 200, code 200), or raise the classified FetchError."""
    if 300 <= http_status < 400:
        raise FetchError("http_status", f"HTTP {http_status} redirect (not followed)", secret=secret)
    doc, problem = _decode_json(body, secret)
    code = _code_of(doc) if isinstance(doc, dict) else None

    if http_status != 200:
        if code is not None and code != 200:
            raise _error_from_document(doc, code, http_status, secret)
        if http_status == 401:
            raise FetchError("auth", f"HTTP 401: {_snippet(body, secret) or 'empty body'}", secret=secret)
        if code == 200:
            detail = f"HTTP {http_status} although the body says code 200"
        elif not body.strip():
            detail = f"HTTP {http_status} with an empty body"
            if http_status == 403:
                detail += " (wolkvox maintenance or backup?)"
        else:
            detail = f"HTTP {http_status}: {_snippet(body, secret)}"
        raise FetchError("http_status", detail, secret=secret)

    if problem is not None:
        raise FetchError("invalid_response", problem, secret=secret)
    if not isinstance(doc, dict):
        raise FetchError(
            "invalid_response", f"body is a JSON {type(doc).__name__}, not an object", secret=secret
        )
    if "code" not in doc:
        raise FetchError("invalid_response", "body has no 'code'", secret=secret)
    if code is None:
        raise FetchError(
            "invalid_response",
            f"'code' is not a number: {_short_repr(doc['code'], secret=secret)}",
            secret=secret,
        )
    if code != 200:
        raise _error_from_document(doc, code, http_status, secret)
    return doc


def _items_problem(exc: ItemsError, secret: Secret | None) -> str:
    return f"{_short_repr(exc.raw, secret=secret)} {exc.problem}"


def _reading_from_document(doc: Mapping[str, Any], secret: Secret | None) -> Reading:
    data = doc.get("data")
    if not isinstance(data, list):
        what = "missing" if "data" not in doc else f"a {type(data).__name__}, not a list"
        raise FetchError("invalid_response", f"'data' is {what}", secret=secret)
    values: list[float] = []
    for index, row in enumerate(data):
        if not isinstance(row, dict):
            raise FetchError(
                "invalid_response", f"data[{index}] is a {type(row).__name__}, not an object", secret=secret
            )
        if "items" not in row:
            raise FetchError("invalid_response", f"data[{index}] has no 'items'", secret=secret)
        try:
            values.append(parse_items(row["items"]))
        except ItemsError as exc:
            raise FetchError(
                "parse", f"data[{index}].items: {_items_problem(exc, secret)}", secret=secret
            ) from None
    try:
        total = math.fsum(values)
    except OverflowError:
        total = math.inf
    if not math.isfinite(total):
        raise FetchError("parse", f"the sum of items over {len(values)} rows is too large", secret=secret)
    return Reading(value=total, rows=len(values), month=_month_of_rows(data))


_TOKEN_INFO_FIELDS = (
    ("limit", "token_limit"),
    ("used_today", "token_use_today"),
    ("all_today", "all_token_today"),
)


def _token_info_from_document(doc: Mapping[str, Any], secret: Secret | None) -> TokenInfo:
    data = doc.get("data")
    if isinstance(data, list) and len(data) == 1:
        data = data[0]
    if not isinstance(data, dict):
        what = "missing" if "data" not in doc else _short_repr(data, secret=secret)
        raise FetchError(
            "invalid_response", f"'data' is not an object or a list of one object: {what}", secret=secret
        )
    if not any(key in data for _, key in _TOKEN_INFO_FIELDS):
        keys = ", ".join(key for _, key in _TOKEN_INFO_FIELDS)
        raise FetchError("invalid_response", f"'data' has none of {keys}", secret=secret)
    values: dict[str, float | None] = {}
    for attr, key in _TOKEN_INFO_FIELDS:
        raw = data.get(key)
        if raw is None:
            values[attr] = None
            continue
        try:
            values[attr] = parse_items(raw)
        except ItemsError as exc:
            raise FetchError("parse", f"data.{key}: {_items_problem(exc, secret)}", secret=secret) from None
    return TokenInfo(**values)


def parse_body(body: bytes, http_status: int, *, secret: Secret | None = None) -> Reading:
    """Classify a billing answer: a Reading, or FetchError (never another exception).

    ``secret``, when given, is redacted from every error detail.
    """
    return _reading_from_document(_check_document(body, http_status, secret), secret)


def parse_token_info(body: bytes, http_status: int, *, secret: Secret | None = None) -> TokenInfo:
    """Classify a ``token_info`` answer. ``data`` may be an object or a list holding one object; a field
    that is missing or null is None. Same error classification as parse_body."""
    return _token_info_from_document(_check_document(body, http_status, secret), secret)
