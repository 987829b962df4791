"""Tests of exporter/client.py: HTTP mocked with `responses`, plus a few real loopback servers."""

from __future__ import annotations

import gzip
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests
import responses

from exporter import __version__
from exporter.client import (
    MAX_DETAIL_CHARS,
    REASONS,
    FetchError,
    ItemsError,
    Reading,
    TokenInfo,
    WolkvoxClient,
    parse_body,
    parse_items,
)
from exporter.secret import Secret

CANARY = "CANARY-tok-123"
TOKEN = Secret(CANARY)
SERVER = "wv9901"
BASE = "https://wv9901.wolkvox.com"
BILLING_URL = f"{BASE}/api/v2/billing.php"
INFO_URL = f"{BASE}/api/v2/information.php"
CAP = 4096


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


@pytest.fixture
def mock() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


@pytest.fixture
def client() -> Iterator[WolkvoxClient]:
    with WolkvoxClient(connect_timeout=2, read_timeout=5, max_body_bytes=CAP) as c:
        yield c


def fetch(client: WolkvoxClient, token: Secret = TOKEN, **kwargs: Any) -> Reading:
    return client.fetch(base_url=BASE, server=SERVER, token=token, api="stereo_rec", **kwargs)


def fetch_error(client: WolkvoxClient, **kwargs: Any) -> FetchError:
    with pytest.raises(FetchError) as info:
        fetch(client, **kwargs)
    err = info.value
    assert err.reason in REASONS
    assert_safe(err)
    return err


def assert_safe(err: FetchError) -> None:
    """The token never shows, not even a cut-off head of it; the detail is one short line."""
    for text in (err.detail, str(err), repr(err)):
        assert CANARY.casefold() not in text.casefold()
        assert "canary" not in text.casefold()
    assert "\n" not in err.detail and "\r" not in err.detail
    assert len(err.detail) <= MAX_DETAIL_CHARS


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
def test_success(
    mock: responses.RequestsMock, client: WolkvoxClient, code: str | int, items: Any, expected: float
) -> None:
    mock.get(BILLING_URL, body=wolkvox_body(code=code, items=items), content_type="application/json")
    assert fetch(client) == Reading(value=expected, rows=1)


def test_request_shape(
    mock: responses.RequestsMock, client: WolkvoxClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):  # requests would put them in place of True
        monkeypatch.delenv(name, raising=False)
    mock.get(BILLING_URL, body=wolkvox_body())
    fetch(client)
    fetch(client, ca_file="/etc/ssl/wolkvox-ca.pem")
    assert len(mock.calls) == 2
    first = mock.calls[0].request
    assert first.method == "GET"
    assert first.url == f"{BILLING_URL}?api=stereo_rec"
    assert first.headers["wolkvox-token"] == CANARY
    assert first.headers["wolkvox_server"] == SERVER
    assert first.headers["User-Agent"] == f"wolkvox-exporter/{__version__}"
    assert first.headers["Accept"] == "application/json"
    assert first.req_kwargs["timeout"] == (2.0, 5.0)
    assert first.req_kwargs["stream"] is True
    assert first.req_kwargs["verify"] is True
    assert mock.calls[1].request.req_kwargs["verify"] == "/etc/ssl/wolkvox-ca.pem"


def test_base_url_trailing_slash_and_custom_user_agent(mock: responses.RequestsMock) -> None:
    mock.get(BILLING_URL, body=wolkvox_body())
    with WolkvoxClient(1, 1, CAP, user_agent="probe/9") as c:
        c.fetch(base_url=BASE + "/", server=SERVER, token=TOKEN, api="ivr_minutes")
    assert mock.calls[0].request.url == f"{BILLING_URL}?api=ivr_minutes"
    assert mock.calls[0].request.headers["User-Agent"] == "probe/9"


def test_cookies_are_neither_kept_nor_sent(mock: responses.RequestsMock, client: WolkvoxClient) -> None:
    mock.get(BILLING_URL, body=wolkvox_body(), headers={"Set-Cookie": "PHPSESSID=abc; Path=/"})
    fetch(client)
    fetch(client, token=Secret("other-token"))
    assert "Cookie" not in mock.calls[1].request.headers


def test_several_rows_are_summed(mock: responses.RequestsMock, client: WolkvoxClient) -> None:
    rows = [
        {"operation": "demo", "description": "Stereo Rec", "items": "100", "date": "2024-05-01"},
        {"operation": "demo", "description": "Stereo Rec", "items": "20,5", "date": "2024-05-02"},
        {"operation": "demo", "description": "Stereo Rec", "items": 3, "date": "2024-05-03"},
    ]
    mock.get(BILLING_URL, body=wolkvox_body(data=rows))
    assert fetch(client) == Reading(value=123.5, rows=3)


def test_empty_data_is_zero(mock: responses.RequestsMock, client: WolkvoxClient) -> None:
    mock.get(BILLING_URL, body=wolkvox_body(data=[]))
    assert fetch(client) == Reading(value=0.0, rows=0)


def test_utf8_bom_is_accepted(client: WolkvoxClient, mock: responses.RequestsMock) -> None:
    mock.get(BILLING_URL, body=b"\xef\xbb\xbf" + wolkvox_body(items="5").encode())
    assert fetch(client).value == 5.0


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
    mock: responses.RequestsMock,
    client: WolkvoxClient,
    code: str,
    error: str,
    msg: str,
    reason: str,
    code_as_number: bool,
    http_matches_code: bool,
) -> None:
    status = int(code) if http_matches_code else 200
    mock.get(BILLING_URL, status=status, body=error_body(int(code) if code_as_number else code, error, msg))
    err = fetch_error(client)
    assert err.reason == reason
    assert msg in err.detail
    assert f"code {code}" in err.detail


@pytest.mark.parametrize(
    ("msg", "reason"),
    [
        ("Token limit exceeded", "token_limit"),
        ("ERROR: token limit exceeded for today", "token_limit"),
        ("please validate token", "auth"),
        ("The api you want to consult does not exist.", "unknown_api"),
    ],
)
def test_error_texts_match_case_insensitively_as_substrings(
    mock: responses.RequestsMock, client: WolkvoxClient, msg: str, reason: str
) -> None:
    mock.get(BILLING_URL, body=error_body(403, "FORBIDDEN", msg))
    assert fetch_error(client).reason == reason


def test_error_text_in_error_field_is_matched(mock: responses.RequestsMock, client: WolkvoxClient) -> None:
    mock.get(BILLING_URL, body=json.dumps({"code": 403, "error": "TOKEN LIMIT EXCEEDED", "msg": None}))
    assert fetch_error(client).reason == "token_limit"


def test_unknown_error_code_is_api_error(mock: responses.RequestsMock, client: WolkvoxClient) -> None:
    mock.get(BILLING_URL, body=error_body("500", "INTERNAL SERVER ERROR", "DATABASE NOT AVAILABLE"))
    err = fetch_error(client)
    assert err.reason == "api_error"
    assert "DATABASE NOT AVAILABLE" in err.detail


def test_code_401_with_unknown_text_is_auth(mock: responses.RequestsMock, client: WolkvoxClient) -> None:
    mock.get(BILLING_URL, body=error_body(401, "UNAUTHORIZED", "SOMETHING NEW"))
    assert fetch_error(client).reason == "auth"


def test_http_200_with_code_403_body(mock: responses.RequestsMock, client: WolkvoxClient) -> None:
    mock.get(BILLING_URL, status=200, body=error_body("403", "FORBIDDEN", "TOKEN LIMIT EXCEEDED"))
    err = fetch_error(client)
    assert err.reason == "token_limit"
    assert "HTTP" not in err.detail  # the HTTP status was fine, the body decided


def test_http_403_with_wolkvox_body_is_classified_by_body(
    mock: responses.RequestsMock, client: WolkvoxClient
) -> None:
    mock.get(BILLING_URL, status=403, body=error_body("403", "FORBIDDEN", "PLEASE VALIDATE TOKEN"))
    err = fetch_error(client)
    assert err.reason == "auth"
    assert "HTTP 403" in err.detail


# ----------------------------------------------------------------------------------------- http_status


def test_http_403_empty_body_is_maintenance(mock: responses.RequestsMock, client: WolkvoxClient) -> None:
    mock.get(BILLING_URL, status=403, body=b"")
    err = fetch_error(client)
    assert err.reason == "http_status"
    assert "HTTP 403" in err.detail
    assert "maintenance" in err.detail


def test_http_5xx_html_page(mock: responses.RequestsMock, client: WolkvoxClient) -> None:
    page = "<html>\n<head><title>502 Bad Gateway</title></head>\n<body>nginx</body>\n</html>\n"
    mock.get(BILLING_URL, status=502, body=page, content_type="text/html")
    err = fetch_error(client)
    assert err.reason == "http_status"
    assert "HTTP 502" in err.detail
    assert "502 Bad Gateway" in err.detail


def test_http_500_with_code_200_body(mock: responses.RequestsMock, client: WolkvoxClient) -> None:
    mock.get(BILLING_URL, status=500, body=wolkvox_body())
    err = fetch_error(client)
    assert err.reason == "http_status"
    assert "HTTP 500" in err.detail


def test_http_500_with_json_that_is_not_wolkvox(mock: responses.RequestsMock, client: WolkvoxClient) -> None:
    mock.get(BILLING_URL, status=500, body=json.dumps({"message": "Internal server error"}))
    assert fetch_error(client).reason == "http_status"


def test_http_401_html_is_auth(mock: responses.RequestsMock, client: WolkvoxClient) -> None:
    mock.get(BILLING_URL, status=401, body="<html>Unauthorized</html>", content_type="text/html")
    err = fetch_error(client)
    assert err.reason == "auth"
    assert "HTTP 401" in err.detail


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_redirect_is_not_followed(mock: responses.RequestsMock, client: WolkvoxClient, status: int) -> None:
    target = "https://collector.example.net/steal"
    mock.get(BILLING_URL, status=status, headers={"Location": target}, body=wolkvox_body())
    mock.get(target, body=wolkvox_body())
    err = fetch_error(client)
    assert err.reason == "http_status"
    assert f"HTTP {status}" in err.detail
    assert target in err.detail
    assert len(mock.calls) == 1
    assert all(not call.request.url.startswith(target) for call in mock.calls)


# ----------------------------------------------------------------------------------------- body size


class EndlessRaw(io.RawIOBase):
    """A (practically) endless body that counts what was read from it."""

    def __init__(self, fill: bytes = b" ") -> None:
        self.served = 0
        self.fill = fill

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.served >= 4 * 1024 * 1024:  # a client without a cap fails the test instead of hanging
            return 0
        size = len(buffer)
        buffer[:size] = self.fill * size
        self.served += size
        return size


def test_endless_body_is_cut_at_the_cap_and_closed(
    mock: responses.RequestsMock, client: WolkvoxClient
) -> None:
    raw = EndlessRaw()
    reader = io.BufferedReader(raw)
    mock.get(BILLING_URL, body=reader)
    err = fetch_error(client)
    assert err.reason == "invalid_response"
    assert err.detail == f"body larger than {CAP} bytes"
    assert raw.served <= CAP + 1 + io.DEFAULT_BUFFER_SIZE
    assert reader.closed


def test_declared_oversized_body_is_not_read(mock: responses.RequestsMock, client: WolkvoxClient) -> None:
    raw = EndlessRaw()
    mock.get(BILLING_URL, body=io.BufferedReader(raw), headers={"Content-Length": str(CAP + 1)})
    err = fetch_error(client)
    assert err.reason == "invalid_response"
    assert f"larger than {CAP} bytes" in err.detail
    assert raw.served == 0


def test_body_exactly_at_the_cap_is_read(mock: responses.RequestsMock) -> None:
    body = wolkvox_body(items="77").encode()
    body += b" " * (CAP - len(body))
    mock.get(BILLING_URL, body=body)
    with WolkvoxClient(1, 1, CAP) as c:
        assert fetch(c).value == 77.0
    mock.replace(responses.GET, BILLING_URL, body=body + b" ")
    with WolkvoxClient(1, 1, CAP) as c, pytest.raises(FetchError) as info:
        fetch(c)
    assert info.value.reason == "invalid_response"


def test_gzip_body_is_decoded_even_though_identity_was_asked(
    mock: responses.RequestsMock, client: WolkvoxClient
) -> None:
    body = gzip.compress(wolkvox_body(items="8,25").encode())
    mock.get(BILLING_URL, body=body, headers={"Content-Encoding": "gzip"})
    assert fetch(client) == Reading(8.25, 1)
    assert mock.calls[0].request.headers["Accept-Encoding"] == "identity"


def test_corrupt_gzip_is_invalid_response(mock: responses.RequestsMock, client: WolkvoxClient) -> None:
    mock.get(BILLING_URL, body=b"\x1f\x8b\x08 this is not gzip", headers={"Content-Encoding": "gzip"})
    err = fetch_error(client)
    assert err.reason == "invalid_response"
    assert "DecodeError" in err.detail


def test_cap_applies_to_decoded_bytes(mock: responses.RequestsMock, client: WolkvoxClient) -> None:
    bomb = gzip.compress(b" " * (CAP * 50))
    assert len(bomb) < CAP
    mock.get(BILLING_URL, body=bomb, headers={"Content-Encoding": "gzip"})
    err = fetch_error(client)
    assert err.detail == f"body larger than {CAP} bytes"


# ----------------------------------------------------------------------------------------- transport errors


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (requests.exceptions.ReadTimeout("read timed out"), "timeout"),
        (requests.exceptions.ConnectTimeout("connect timed out"), "timeout"),
        (requests.exceptions.ConnectionError("connection refused"), "connection"),
        (requests.exceptions.ChunkedEncodingError("connection broken"), "connection"),
        (requests.exceptions.SSLError("certificate verify failed"), "connection"),
        (requests.exceptions.ContentDecodingError("bad gzip"), "invalid_response"),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else str(value),
)
def test_transport_errors(
    mock: responses.RequestsMock, client: WolkvoxClient, exc: Exception, reason: str
) -> None:
    mock.get(BILLING_URL, body=exc)
    err = fetch_error(client)
    assert err.reason == reason
    assert type(exc).__name__ in err.detail
    # no reference to the requests exception (its .request holds the token header)
    assert err.__cause__ is None
    assert err.__context__ is None


def test_exception_text_with_the_token_is_not_copied(
    mock: responses.RequestsMock, client: WolkvoxClient
) -> None:
    mock.get(
        BILLING_URL, body=requests.exceptions.ConnectionError(f"headers: {{'wolkvox-token': '{CANARY}'}}")
    )
    err = fetch_error(client)
    assert err.reason == "connection"


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
def test_invalid_response(
    mock: responses.RequestsMock, client: WolkvoxClient, body: bytes, expected: str
) -> None:
    mock.get(BILLING_URL, body=body)
    with WolkvoxClient(1, 1, 1_000_000) as big:
        err = fetch_error(big)
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
def test_unparsable_items_is_parse(mock: responses.RequestsMock, client: WolkvoxClient, items: Any) -> None:
    mock.get(BILLING_URL, body=wolkvox_body(items=items))
    err = fetch_error(client)
    assert err.reason == "parse"
    assert "data[0].items" in err.detail
    assert repr(items)[:20] in err.detail


def test_parse_error_names_the_row(mock: responses.RequestsMock, client: WolkvoxClient) -> None:
    rows = [{"items": "1"}, {"items": "2"}, {"items": "x" * 500}]
    mock.get(BILLING_URL, body=wolkvox_body(data=rows))
    err = fetch_error(client)
    assert err.reason == "parse"
    assert err.detail.startswith("data[2].items: 'xxx")


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
def test_echoed_token_is_redacted(
    mock: responses.RequestsMock, client: WolkvoxClient, status: int, body: str, reason: str
) -> None:
    mock.get(BILLING_URL, status=status, body=body)
    err = fetch_error(client)  # asserts the canary is nowhere, not even cut off
    assert err.reason == reason


def test_redirect_location_with_token_is_redacted(
    mock: responses.RequestsMock, client: WolkvoxClient
) -> None:
    mock.get(BILLING_URL, status=302, headers={"Location": f"https://other.example/?t={CANARY}"})
    err = fetch_error(client)
    assert err.reason == "http_status"
    assert "<redacted>" in err.detail


def test_parse_body_without_a_secret_keeps_the_text() -> None:
    with pytest.raises(FetchError) as info:
        parse_body(error_body(403, "FORBIDDEN", f"PLEASE VALIDATE TOKEN {CANARY}").encode(), 200)
    assert CANARY in info.value.detail
    with pytest.raises(FetchError) as info:
        parse_body(
            error_body(403, "FORBIDDEN", f"PLEASE VALIDATE TOKEN {CANARY}").encode(), 200, secret=TOKEN
        )
    assert info.value.detail == "wolkvox answered code 403: FORBIDDEN: PLEASE VALIDATE TOKEN <redacted>"


@pytest.mark.parametrize("bad", ["", f"{CANARY}\n", f" {CANARY}", f"{CANARY}\r\nX-Evil: 1", "tök"])
def test_token_that_cannot_be_sent_is_auth_without_a_request(
    mock: responses.RequestsMock, client: WolkvoxClient, bad: str
) -> None:
    err = fetch_error(client, token=Secret(bad))
    assert err.reason == "auth"
    assert len(mock.calls) == 0


# ----------------------------------------------------------------------------------------- FetchError


def test_fetch_error_is_one_short_line() -> None:
    err = FetchError("api_error", "first line\nsecond\tline\x00" + "z" * 1000)
    assert err.detail.startswith("first line second line?zzz")
    assert len(err.detail) == MAX_DETAIL_CHARS
    assert err.detail.endswith("...")
    assert str(err) == f"api_error: {err.detail}"
    assert err.args == ("api_error", err.detail)


def test_fetch_error_rejects_unknown_reasons() -> None:
    with pytest.raises(ValueError, match="unknown"):
        FetchError("nope", "x")


def test_reasons_are_fixed() -> None:
    assert REASONS == (
        "timeout",
        "connection",
        "http_status",
        "api_error",
        "auth",
        "token_limit",
        "unknown_api",
        "invalid_response",
        "parse",
    )


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


def test_parse_items_explains_ambiguity() -> None:
    with pytest.raises(ItemsError, match="ambiguous"):
        parse_items("12,500")
    with pytest.raises(ItemsError, match="negative"):
        parse_items("-3")


# ----------------------------------------------------------------------------------------- token_info


def fetch_info(client: WolkvoxClient) -> TokenInfo:
    return client.fetch_token_info(base_url=BASE, server=SERVER, token=TOKEN)


@pytest.mark.parametrize(
    "data",
    [
        {"token_limit": "1000", "token_use_today": "17", "all_token_today": "250"},
        [{"token_limit": 1000, "token_use_today": 17, "all_token_today": 250.0}],
    ],
    ids=["object", "list"],
)
def test_token_info(mock: responses.RequestsMock, client: WolkvoxClient, data: Any) -> None:
    mock.get(INFO_URL, body=json.dumps({"code": "200", "error": None, "msg": "ok", "data": data}))
    assert fetch_info(client) == TokenInfo(limit=1000.0, used_today=17.0, all_today=250.0)
    request = mock.calls[0].request
    assert request.url == f"{INFO_URL}?api=token_info"
    assert request.headers["wolkvox-token"] == CANARY
    assert request.headers["wolkvox_server"] == SERVER


def test_token_info_missing_fields_are_none(mock: responses.RequestsMock, client: WolkvoxClient) -> None:
    mock.get(
        INFO_URL, body=json.dumps({"code": 200, "data": {"token_limit": "1000", "all_token_today": None}})
    )
    assert fetch_info(client) == TokenInfo(limit=1000.0, used_today=None, all_today=None)


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
def test_token_info_errors(
    mock: responses.RequestsMock, client: WolkvoxClient, status: int, body: str, reason: str
) -> None:
    mock.get(INFO_URL, status=status, body=body)
    with pytest.raises(FetchError) as info:
        fetch_info(client)
    assert info.value.reason == reason
    assert_safe(info.value)


# ----------------------------------------------------------------------------------------- threads


def test_concurrent_fetches_do_not_mix_tokens(mock: responses.RequestsMock, client: WolkvoxClient) -> None:
    def answer(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        number = request.headers["wolkvox-token"].removeprefix("tok-")
        return 200, {}, wolkvox_body(items=number)

    mock.add_callback(responses.GET, BILLING_URL, callback=answer)
    results: dict[int, list[float]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker(index: int) -> None:
        try:
            start.wait(timeout=10)
            token = Secret(f"tok-{index}")
            results[index] = [fetch(client, token=token).value for _ in range(20)]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors
    assert results == {i: [float(i)] * 20 for i in range(8)}


def test_fetch_works_after_close(mock: responses.RequestsMock) -> None:
    mock.get(BILLING_URL, body=wolkvox_body(items="3"))
    c = WolkvoxClient(1, 1, CAP)
    assert fetch(c).value == 3.0
    c.close()
    c.close()
    assert fetch(c).value == 3.0
    c.close()


def test_constructor_validates() -> None:
    with pytest.raises(ValueError):
        WolkvoxClient(0, 1, CAP)
    with pytest.raises(ValueError):
        WolkvoxClient(1, -1, CAP)
    with pytest.raises(ValueError):
        WolkvoxClient(1, 1, 0)


# ------------------------------------------------------------------------------------- real HTTP on loopback


class LoopbackHandler(BaseHTTPRequestHandler):
    stop: threading.Event
    seen_headers: list[dict[str, str]]

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.seen_headers.append(dict(self.headers.items()))
        try:
            if self.path.startswith("/drip/"):
                self._drip()
            elif self.path.startswith("/cut/"):
                self._cut()
            else:
                body = wolkvox_body(items="12,5").encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _drip(self) -> None:
        body = wolkvox_body().encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        for index in range(len(body)):
            if self.stop.wait(0.2):
                return
            self.wfile.write(body[index : index + 1])

    def _cut(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b'{"code": "200", "data": [')
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def loopback(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, list[dict[str, str]]]]:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    stop = threading.Event()
    seen: list[dict[str, str]] = []
    handler = type("Handler", (LoopbackHandler,), {"stop": stop, "seen_headers": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        stop.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_loopback_success_and_real_headers(loopback: tuple[str, list[dict[str, str]]]) -> None:
    base, seen = loopback
    with WolkvoxClient(2, 2, CAP) as c:
        reading = c.fetch(base_url=f"{base}/ok", server=SERVER, token=TOKEN, api="stereo_rec")
    assert reading == Reading(12.5, 1)
    assert seen[0]["wolkvox-token"] == CANARY
    assert seen[0]["wolkvox_server"] == SERVER


def test_loopback_dripping_body_hits_the_total_deadline(loopback: tuple[str, list[dict[str, str]]]) -> None:
    base, _ = loopback
    with WolkvoxClient(connect_timeout=0.5, read_timeout=0.5, max_body_bytes=CAP) as c:
        started = time.monotonic()
        with pytest.raises(FetchError) as info:
            c.fetch(base_url=f"{base}/drip", server=SERVER, token=TOKEN, api="stereo_rec")
        elapsed = time.monotonic() - started
    assert info.value.reason == "timeout"
    assert 0.9 <= elapsed < 3.0
    assert_safe(info.value)


def test_loopback_connection_closed_mid_body(loopback: tuple[str, list[dict[str, str]]]) -> None:
    base, _ = loopback
    with WolkvoxClient(2, 2, CAP) as c, pytest.raises(FetchError) as info:
        c.fetch(base_url=f"{base}/cut", server=SERVER, token=TOKEN, api="stereo_rec")
    assert info.value.reason == "connection"
    assert "IncompleteRead" in info.value.detail
    assert_safe(info.value)


def test_loopback_connection_refused() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # nothing listens on the port any more
    with WolkvoxClient(2, 2, CAP) as c, pytest.raises(FetchError) as info:
        c.fetch(base_url=f"http://127.0.0.1:{port}", server=SERVER, token=TOKEN, api="stereo_rec")
    assert info.value.reason == "connection"
    assert "refused" in info.value.detail.lower()
    assert_safe(info.value)
