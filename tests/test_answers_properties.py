"""Property tests of exporter/answers.py: whatever the bytes, a sane Reading or a FetchError."""

from __future__ import annotations

import json
import math
from datetime import date, datetime, time
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from exporter.answers import ItemsError, month_of, parse_body, parse_items
from exporter.model import MAX_DETAIL_CHARS, REASONS, FetchError, Reading
from exporter.secret import Secret

STATUSES = st.sampled_from([200, 200, 200, 204, 301, 302, 400, 401, 403, 404, 429, 500, 502, 503])

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
items_values = (
    json_values
    | st.text(alphabet="0123456789.,+- eE_\tnaif", max_size=12)
    | st.integers(min_value=0).map(str)
    | st.floats(min_value=0, allow_infinity=False).map(repr)
)
codes = st.sampled_from(["200", 200, 200.0, "403", 403, 401, "400", "OK", None, True, " 200 "]) | json_scalars
texts = st.sampled_from(
    [
        "Information found for the current month",
        "TOKEN LIMIT EXCEEDED",
        "PLEASE VALIDATE TOKEN",
        "PLEASE ENTER THE WOLKVOX-TOKEN",
        "THE API YOU WANT TO CONSULT DOES NOT EXIST",
        "EXCEEDS THE LIMIT OF SIMULTANEOUS REQUESTS PER TOKEN (2)",
    ]
) | st.text(max_size=40)
rows = (
    st.fixed_dictionaries(
        {"items": items_values}, optional={"operation": st.text(max_size=10), "date": st.text(max_size=10)}
    )
    | json_values
)
envelopes = st.fixed_dictionaries(
    {},
    optional={
        "code": codes,
        "error": st.none() | texts,
        "msg": st.none() | texts,
        "data": st.lists(rows, max_size=5) | json_values,
    },
)


def check_outcome(body: bytes, status: int) -> Reading | FetchError:
    try:
        reading = parse_body(body, status)
    except FetchError as err:
        assert err.reason in REASONS
        assert "\n" not in err.detail
        assert 0 < len(err.detail) <= MAX_DETAIL_CHARS
        return err
    assert isinstance(reading, Reading)
    assert math.isfinite(reading.value) and reading.value >= 0
    assert reading.rows >= 0
    assert reading.month is None or (len(reading.month) == 7 and reading.month[4] == "-")
    return reading


@given(st.one_of(json_values, items_values, st.lists(st.integers()), st.floats()))
def test_parse_items_gives_a_non_negative_float_or_items_error(raw: Any) -> None:
    try:
        value = parse_items(raw)
    except ItemsError:
        return
    assert type(value) is float
    assert math.isfinite(value) and value >= 0


@given(st.binary(max_size=300), STATUSES)
def test_parse_body_on_arbitrary_bytes(body: bytes, status: int) -> None:
    check_outcome(body, status)


@given(json_values, STATUSES)
def test_parse_body_on_arbitrary_json(doc: Any, status: int) -> None:
    check_outcome(json.dumps(doc).encode(), status)


@given(envelopes, STATUSES)
def test_parse_body_on_wolkvox_like_documents(doc: dict[str, Any], status: int) -> None:
    outcome = check_outcome(json.dumps(doc).encode(), status)
    if isinstance(outcome, Reading):
        assert status == 200
        assert outcome.rows == len(doc["data"])


@given(
    st.integers(min_value=0, max_value=10**30),
    st.sampled_from(["", "+"]),
    st.sampled_from(["", " ", "  ", "\t"]),
    st.sampled_from(["", " ", "\n"]),
)
def test_integers_round_trip(number: int, sign: str, before: str, after: str) -> None:
    assert parse_items(f"{before}{sign}{number}{after}") == float(number)
    assert parse_items(number) == float(number)


@given(st.integers(min_value=0, max_value=10**12), st.text(alphabet="0123456789", min_size=1, max_size=8))
def test_decimals_round_trip(whole: int, fraction: str) -> None:
    expected = float(f"{whole}.{fraction}")
    assert parse_items(f"{whole}.{fraction}") == expected
    if len(fraction) == 3:
        try:
            parse_items(f"{whole},{fraction}")
        except ItemsError:
            pass
        else:
            raise AssertionError("a comma followed by three digits must not be guessed")
    else:
        assert parse_items(f"{whole},{fraction}") == expected


@given(st.lists(st.integers(min_value=0, max_value=10**6), max_size=10))
def test_rows_are_summed(values: list[int]) -> None:
    data = [{"items": str(value)} for value in values]
    body = json.dumps({"code": "200", "error": None, "msg": "ok", "data": data}).encode()
    assert parse_body(body, 200) == Reading(value=float(sum(values)), rows=len(values))


TOKEN_TEXT = "CANARY-tok-123"


@given(
    st.text(max_size=400),
    st.text(max_size=400),
    st.sampled_from([str.upper, str.lower, lambda s: s]),
    st.sampled_from(["msg", "error"]),
    st.sampled_from([200, 403, 500]),
    st.sampled_from(["403", "400", 401]),
)
def test_an_echoed_token_is_always_redacted(
    before: str, after: str, case: Any, field: str, status: int, code: str | int
) -> None:
    doc = {"code": code, "error": "FORBIDDEN", "msg": "TOKEN LIMIT EXCEEDED"}
    doc[field] = before + case(TOKEN_TEXT) + after
    try:
        parse_body(json.dumps(doc).encode(), status, secret=Secret(TOKEN_TEXT))
    except FetchError as err:
        for text in (err.detail, str(err), repr(err)):
            assert TOKEN_TEXT.casefold() not in text.casefold()
    else:
        raise AssertionError("an error document must raise")


@given(
    st.binary(max_size=600),
    st.binary(max_size=600),
    st.sampled_from([TOKEN_TEXT, TOKEN_TEXT.upper(), TOKEN_TEXT.lower()]),
    STATUSES,
)
def test_a_token_anywhere_in_a_body_is_redacted(before: bytes, after: bytes, token: str, status: int) -> None:
    body = before + token.encode() + after
    try:
        parse_body(body, status, secret=Secret(TOKEN_TEXT))
    except FetchError as err:
        for text in (err.detail, str(err), repr(err)):
            assert TOKEN_TEXT.casefold() not in text.casefold()
            assert "canary-tok" not in text.casefold()


@given(
    st.dates(min_value=date(1000, 1, 1)),
    st.sampled_from(["%Y-%m-%d", "%Y/%m/%d", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S"]),
    st.times(),
)
def test_year_first_dates_give_their_month(day: date, layout: str, moment: time) -> None:
    text = datetime.combine(day, moment).strftime(layout)
    assert month_of(text) == f"{day.year:04d}-{day.month:02d}"


@given(st.dates(min_value=date(1000, 1, 1)), st.sampled_from(["%d/%m/%Y", "%m/%d/%Y", "%d-%m-%Y"]))
def test_other_date_orders_are_never_guessed(day: date, layout: str) -> None:
    assert month_of(day.strftime(layout)) is None
