"""Tests of exporter/answers.py: answer bytes and an HTTP status in, a value or a classified failure out.

No network: every case calls the pure functions on canned answers.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from exporter.answers import ItemsError, month_of, parse_body, parse_items, parse_token_info
from exporter.model import MAX_DETAIL_CHARS, REASONS, FetchError, Reading, TokenInfo
from exporter.secret import Secret

CANARY = "CANARY-tok-123"
TOKEN = Secret(CANARY)


def wolkvox_body(
    code: str | int = "200",
    msg: str = "Information found for the current month",
    error: str | None = None,
    data: Any = None,
    items: Any = "1234",
) -> str:
    if data is None and str(code) == "200":
        data = [{"operation": "demo", "description": "Stereo Rec", "items": items, "date": "2024-05-14"}]
    return json.dumps({"code": code, "error": error, "msg": msg, "data": data})


def error_body(code: str | int, error: str, msg: str) -> str:
    return json.dumps({"code": code, "error": error, "msg": msg})


def assert_safe(err: FetchError) -> None:
    """The token never shows, not even a cut-off head of it; the detail is one short line."""
    assert err.reason in REASONS
    for text in (err.detail, str(err), repr(err)):
        assert CANARY.casefold() not in text.casefold()
        assert "canary" not in text.casefold()
    assert "\n" not in err.detail and "\r" not in err.detail
    assert len(err.detail) <= MAX_DETAIL_CHARS


def failure(body: str | bytes, status: int = 200) -> FetchError:
    raw = body.encode() if isinstance(body, str) else body
    with pytest.raises(FetchError) as info:
        parse_body(raw, status, secret=TOKEN)
    assert_safe(info.value)
    return info.value


# ----------------------------------------------------------------------------------------- success


@pytest.mark.parametrize(
    ("code", "items", "expected"),
    [
        ("200", "1234", 1234.0),
        (200, "1234", 1234.0),
        ("200", " 1234 ", 1234.0),
        (200, "12,5", 12.5),
        ("200", "12.75", 12.75),
        (200, 42, 42.0),
        ("200", 7.5, 7.5),
        ("200", "0", 0.0),
    ],
)
def test_success(code: str | int, items: Any, expected: float) -> None:
    reading = parse_body(wolkvox_body(code=code, items=items).encode(), 200)
    assert reading == Reading(value=expected, rows=1, month="2024-05")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            [
                {"items": "100", "date": "2024-05-01"},
                {"items": "20,5", "date": "2024-05-02 10:00:00"},
                {"items": 3, "date": "2024-05-03T23:59:59"},
            ],
            Reading(123.5, 3, "2024-05"),
        ),
        ([], Reading(0.0, 0, None)),  # no usage yet this month; no date to read a month from
    ],
    ids=["rows-summed", "empty-data-is-zero"],
)
def test_rows(data: list[dict[str, Any]], expected: Reading) -> None:
    assert parse_body(wolkvox_body(data=data).encode(), 200) == expected


def test_utf8_bom_is_accepted() -> None:
    assert parse_body(b"\xef\xbb\xbf" + wolkvox_body(items="5").encode(), 200).value == 5.0


# ----------------------------------------------------------------------------------------- month


@pytest.mark.parametrize(
    ("raw", "month"),
    [
        ("2024-05-14", "2024-05"),
        ("2024-05-14 08:30:00", "2024-05"),
        ("2024-05-14T08:30:00", "2024-05"),
        ("2024-05-14T08:30:00.123Z", "2024-05"),
        ("2024-05-14T08:30:00-05:00", "2024-05"),
        ("2024/12/31", "2024-12"),
        (" 2024-05-14 ", "2024-05"),
        ("14/05/2024", None),  # day first
        ("05/14/2024", None),  # month first
        ("05/06/2024", None),  # either: never guessed
        ("2024-05", None),
        ("2024-13-01", None),
        ("2024-02-30", None),
        ("2024-05/14", None),  # mixed separators
        ("2024-05-14 8:30", None),
        ("2024-05-14 tomorrow", None),
        ("", None),
        (None, None),
        (20240514, None),
    ],
)
def test_month_of(raw: object, month: str | None) -> None:
    assert month_of(raw) == month


@pytest.mark.parametrize(
    "dates",
    [
        ["2024-05-31", "2024-06-01"],  # rows that disagree
        ["2024-05-31", "31/05/2024"],  # one unreadable
        ["2024-05-31", None],  # one missing
    ],
)
def test_month_is_none_unless_every_row_agrees(dates: list[str | None]) -> None:
    rows = [{"items": "1"} | ({} if day is None else {"date": day}) for day in dates]
    reading = parse_body(wolkvox_body(data=rows).encode(), 200)
    assert reading == Reading(2.0, 2, None)


# ----------------------------------------------------------------------------------------- documented errors

DOCUMENTED = [
    ("400", "BAD REQUEST", "THE API YOU WANT TO CONSULT DOES NOT EXIST", "unknown_api"),
    ("400", "BAD REQUEST", "SOME PARAMETERS ARE REQUIRED", "api_error"),
    ("401", "UNAUTHORIZED", "PLEASE ENTER THE WOLKVOX-TOKEN", "auth"),
    ("403", "FORBIDDEN", "TOKEN LIMIT EXCEEDED", "token_limit"),
    ("403", "FORBIDDEN", "EXCEEDS THE LIMIT OF SIMULTANEOUS REQUESTS PER TOKEN (2)", "api_error"),
    ("403", "FORBIDDEN", "PLEASE VALIDATE TOKEN", "auth"),
]


@pytest.mark.parametrize(("code", "error", "msg", "reason"), DOCUMENTED)
@pytest.mark.parametrize("code_as_number", [False, True])
@pytest.mark.parametrize("http_matches_code", [False, True], ids=["http200", "http=code"])
def test_documented_errors(
    code: str, error: str, msg: str, reason: str, code_as_number: bool, http_matches_code: bool
) -> None:
    status = int(code) if http_matches_code else 200
    err = failure(error_body(int(code) if code_as_number else code, error, msg), status)
    assert err.reason == reason
    assert msg in err.detail
    assert f"code {code}" in err.detail
    assert ("HTTP" in err.detail) == (status != 200)  # the body decided; the detail says both


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (error_body(403, "FORBIDDEN", "Token limit exceeded"), "token_limit"),
        (error_body(403, "FORBIDDEN", "ERROR: token limit exceeded for today"), "token_limit"),
        (error_body(403, "FORBIDDEN", "please validate token"), "auth"),
        (error_body(400, "BAD", "The api you want to consult does not exist."), "unknown_api"),
        (json.dumps({"code": 403, "error": "TOKEN LIMIT EXCEEDED", "msg": None}), "token_limit"),
        (error_body("500", "INTERNAL SERVER ERROR", "DATABASE NOT AVAILABLE"), "api_error"),
        (error_body(401, "UNAUTHORIZED", "SOMETHING NEW"), "auth"),
    ],
    ids=["case", "substring", "lower", "punctuated", "in-error-field", "unknown-code", "code-401"],
)
def test_error_texts(body: str, reason: str) -> None:
    assert failure(body).reason == reason


# ----------------------------------------------------------------------------------------- http_status


@pytest.mark.parametrize(
    ("status", "body", "reason", "expected"),
    [
        (403, "", "http_status", "HTTP 403 with an empty body (wolkvox maintenance or backup?)"),
        (
            502,
            "<html>\n<head><title>502 Bad Gateway</title></head>\n<body>nginx</body>\n</html>\n",
            "http_status",
            "502 Bad Gateway",
        ),
        (500, wolkvox_body(), "http_status", "HTTP 500 although the body says code 200"),
        (500, json.dumps({"message": "Internal server error"}), "http_status", "HTTP 500"),
        (401, "<html>Unauthorized</html>", "auth", "HTTP 401"),
        (302, "", "http_status", "HTTP 302 redirect"),
    ],
    ids=["403-empty", "5xx-html", "500-code-200", "500-other-json", "401-html", "3xx"],
)
def test_http_status(status: int, body: str, reason: str, expected: str) -> None:
    err = failure(body, status)
    assert err.reason == reason
    assert expected in err.detail


# ----------------------------------------------------------------------------------------- invalid bodies


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"", "empty body"),
        (b"   \n", "empty body"),
        (b"not json at all", "not JSON"),
        (b"<!DOCTYPE html><html><body>Mantenimiento</body></html>", "Mantenimiento"),
        (b'{"code": "200", "msg": "\xff\xfe", "data": []}', "not UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "JSON"),
        (b'["code", 200]', "list, not an object"),
        (b'"200"', "str, not an object"),
        (b"null", "NoneType, not an object"),
        (b'{"msg": "Information found", "data": []}', "no 'code'"),
        (b'{"code": null, "data": []}', "'code' is not a number"),
        (b'{"code": "OK", "data": []}', "'code' is not a number"),
        (b'{"code": true, "data": []}', "'code' is not a number"),
        (b'{"code": "200", "msg": "x"}', "'data' is missing"),
        (b'{"code": "200", "data": null}', "'data' is a NoneType"),
        (b'{"code": 200, "data": {"items": "5"}}', "'data' is a dict"),
        (b'{"code": 200, "data": "5"}', "'data' is a str"),
        (b'{"code": 200, "data": ["5"]}', "data[0] is a str"),
        (b'{"code": 200, "data": [{"items": "1"}, null]}', "data[1] is a NoneType"),
        (b'{"code": 200, "data": [{"operation": "demo", "date": "x"}]}', "data[0] has no 'items'"),
    ],
)
def test_invalid_response(body: bytes, expected: str) -> None:
    err = failure(body)
    assert err.reason == "invalid_response"
    assert expected in err.detail


@pytest.mark.parametrize(
    "items",
    [
        "abc",
        "12,500",
        "-5",
        "1.234,5",
        "1 234",
        "",
        "NaN",
        "inf",
        "1e3",
        None,
        True,
        [1],
        {"v": 1},
        -1,
        "1_000",
    ],
)
def test_unparsable_items_is_parse(items: Any) -> None:
    err = failure(wolkvox_body(items=items))
    assert err.reason == "parse"
    assert "data[0].items" in err.detail
    assert repr(items)[:20] in err.detail


def test_parse_error_names_the_row() -> None:
    err = failure(wolkvox_body(data=[{"items": "1"}, {"items": "2"}, {"items": "x" * 500}]))
    assert err.reason == "parse"
    assert err.detail.startswith("data[2].items: 'xxx")


def test_a_sum_too_large_for_a_float_is_parse() -> None:
    big = "9" * 308  # each about 1e308, a float; four of them are not
    err = failure(wolkvox_body(data=[{"items": big}] * 4))
    assert err.reason == "parse"
    assert "too large" in err.detail


# ------------------------------------------------------------------------------------- the token never leaks


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        (200, error_body(403, "FORBIDDEN", f"PLEASE VALIDATE TOKEN {CANARY}"), "auth"),
        (200, error_body(403, "FORBIDDEN", f"token {CANARY.upper()}: TOKEN LIMIT EXCEEDED"), "token_limit"),
        (200, error_body(400, f"BAD {CANARY}", "SOME PARAMETERS ARE REQUIRED"), "api_error"),
        (
            200,
            error_body(400, "BAD", "x" * 280 + CANARY + " THE API YOU WANT TO CONSULT DOES NOT EXIST"),
            "unknown_api",
        ),
        (200, error_body(400, "BAD", "y" * 292 + CANARY), "api_error"),
        (500, f"<html><body>Fatal error for token {CANARY}</body></html>", "http_status"),
        (200, f"<html><body>your token is {CANARY}</body></html>", "invalid_response"),
        (200, wolkvox_body(items=CANARY), "parse"),
        (200, wolkvox_body(items="z" * 70 + CANARY), "parse"),
        (200, json.dumps({"code": CANARY, "data": []}), "invalid_response"),
        (200, json.dumps({"code": "c" * 70 + CANARY, "data": []}), "invalid_response"),
        (502, " " * 470 + CANARY + " tail", "http_status"),
        (502, "<p>" + "w" * 110 + CANARY + "</p>", "http_status"),
        (401, " \n" * 200 + CANARY, "auth"),
        (200, "\t" * 475 + CANARY + "!", "invalid_response"),
    ],
)
def test_echoed_token_is_redacted(status: int, body: str, reason: str) -> None:
    assert failure(body, status).reason == reason  # failure() asserts the canary is nowhere


def test_parse_body_without_a_secret_keeps_the_text() -> None:
    body = error_body(403, "FORBIDDEN", f"PLEASE VALIDATE TOKEN {CANARY}").encode()
    with pytest.raises(FetchError) as info:
        parse_body(body, 200)
    assert CANARY in info.value.detail
    with pytest.raises(FetchError) as info:
        parse_body(body, 200, secret=TOKEN)
    assert info.value.detail == "wolkvox answered code 403: FORBIDDEN: PLEASE VALIDATE TOKEN <redacted>"


# ----------------------------------------------------------------------------------------- parse_items


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (0, 0.0),
        (1234, 1234.0),
        (12.5, 12.5),
        (-0.0, 0.0),
        ("1234", 1234.0),
        (" 1234 ", 1234.0),
        ("\t42\n", 42.0),
        ("12.5", 12.5),
        ("12,5", 12.5),
        ("+3", 3.0),
        ("1.234", 1.234),
        ("0,05", 0.05),
        ("12,5000", 12.5),
        ("007", 7.0),
    ],
)
def test_parse_items_accepts(raw: object, expected: float) -> None:
    value = parse_items(raw)
    assert value == expected
    assert type(value) is float


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "   ",
        "abc",
        "12a",
        "-3",
        "-0",
        "- 3",
        "NaN",
        " nan",
        "inf",
        "Infinity",
        "1_000",
        "1e3",
        "1.234,5",
        "1,234.5",
        "1 234",
        "1.234.567",
        "12,500",
        "0,500",
        "12.",
        ".5",
        ",5",
        "++3",
        "0x10",
        "\uff11\uff12",  # fullwidth digits
        "9" * 400,
        -1,
        -0.5,
        float("nan"),
        float("inf"),
        10**400,
        True,
        False,
        None,
        [],
        {"items": 1},
    ],
)
def test_parse_items_rejects(raw: object) -> None:
    with pytest.raises(ItemsError):
        parse_items(raw)


@pytest.mark.parametrize(("raw", "problem"), [("12,500", "ambiguous"), ("-3", "negative")])
def test_parse_items_explains(raw: str, problem: str) -> None:
    with pytest.raises(ItemsError, match=problem):
        parse_items(raw)


# ----------------------------------------------------------------------------------------- token_info


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"token_limit": "1000", "token_use_today": "17", "all_token_today": "250"},
            TokenInfo(limit=1000.0, used_today=17.0, all_today=250.0),
        ),
        (
            [{"token_limit": 1000, "token_use_today": 17, "all_token_today": 250.0}],
            TokenInfo(limit=1000.0, used_today=17.0, all_today=250.0),
        ),
        ({"token_limit": "1000", "all_token_today": None}, TokenInfo(1000.0, None, None)),
    ],
    ids=["object", "list", "missing-fields-are-none"],
)
def test_token_info(data: Any, expected: TokenInfo) -> None:
    body = json.dumps({"code": "200", "error": None, "msg": "ok", "data": data}).encode()
    assert parse_token_info(body, 200, secret=TOKEN) == expected


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        (200, error_body(403, "FORBIDDEN", "TOKEN LIMIT EXCEEDED"), "token_limit"),
        (403, error_body("403", "FORBIDDEN", "PLEASE VALIDATE TOKEN"), "auth"),
        (403, "", "http_status"),
        (
            200,
            json.dumps({"code": 200, "data": [{"token_limit": "1"}, {"token_limit": "2"}]}),
            "invalid_response",
        ),
        (200, json.dumps({"code": 200, "data": {"something": "else"}}), "invalid_response"),
        (200, json.dumps({"code": 200, "data": []}), "invalid_response"),
        (200, json.dumps({"code": 200}), "invalid_response"),
        (200, json.dumps({"code": 200, "data": {"token_limit": "lots"}}), "parse"),
        (200, json.dumps({"code": 200, "data": {"token_limit": "l" * 70 + CANARY}}), "parse"),
        (200, json.dumps({"code": 200, "data": "d" * 70 + CANARY}), "invalid_response"),
    ],
)
def test_token_info_errors(status: int, body: str, reason: str) -> None:
    with pytest.raises(FetchError) as info:
        parse_token_info(body.encode(), status, secret=TOKEN)
    assert info.value.reason == reason
    assert_safe(info.value)


# ----------------------------------------------------------------------------------------- FetchError


def test_fetch_error_is_one_short_line() -> None:
    err = FetchError("api_error", "first line\nsecond\tline\x00" + "z" * 1000)
    # One rule for every message shown (exporter/secret.py one_line): what cannot be printed is escaped.
    assert err.detail.startswith("first line\\nsecond\\tline\\x00zzz")
    assert len(err.detail) == MAX_DETAIL_CHARS
    assert err.detail.endswith("...")
    assert str(err) == f"api_error: {err.detail}"
    assert err.args == ("api_error", err.detail)


def test_fetch_error_rejects_unknown_reasons() -> None:
    with pytest.raises(ValueError, match="unknown"):
        FetchError("nope", "x")
