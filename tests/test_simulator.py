"""Tests of the fake wolkvox API (exporter/simulator/): a fresh simulator per test inside the test process,
on a free loopback port, spoken to over real HTTP. Three tests start the real process, for what only a
process shows: the one line it announces its port with, the exit status when the port is taken, and
stopping on SIGTERM/SIGINT while a request hangs."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests
from harness import (
    REPO,
    InProcessSimulator,
    Simulator,
    free_port,
    start_simulator,
    start_simulator_in_process,
    timed,
    wait_until,
)

from exporter import simulator
from exporter.secret import token_key
from exporter.simulator import cli as simulator_cli
from exporter.simulator.api import ApiRules, format_items

START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
HTTP_TIMEOUT = 5.0
BILLING = "/api/v2/billing.php"
INFORMATION = "/api/v2/information.php"
T = TypeVar("T")

# --------------------------------------------------------------------------- reusable helpers


def api_get(
    base: str,
    token: str | None,
    api: str | None = "stereo_rec",
    path: str = BILLING,
    timeout: float = HTTP_TIMEOUT,
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> requests.Response:
    sent = dict(headers or {})
    if token is not None:
        sent["wolkvox-token"] = token
    params = {"api": api} if api is not None else {}
    return requests.get(base + path, params=params, headers=sent, timeout=timeout, **kwargs)


def token_stats(base: str, token: str) -> dict[str, Any]:
    doc = requests.get(base + "/-/stats", timeout=HTTP_TIMEOUT).json()
    return doc["tokens"].get(token, {})


def set_fault(base: str, **fault: Any) -> requests.Response:
    response = requests.post(base + "/-/faults", json=fault, timeout=HTTP_TIMEOUT)
    assert response.status_code == 200, response.text
    return response


def expected_minutes(now_unix: float, minutes_per_hour: float) -> float:
    """The growth part of the documented formula: minutes_per_hour * hours since the month began (UTC)."""
    now = datetime.fromtimestamp(now_unix, UTC)
    start = datetime(now.year, now.month, 1, tzinfo=UTC)
    return minutes_per_hour * (now - start).total_seconds() / 3600.0


def assert_error(response: requests.Response, status: int, error: str, msg: str) -> None:
    assert response.status_code == status, response.text
    assert response.json() == {"code": str(status), "error": error, "msg": msg, "data": None}


class Background:
    """Runs one call in a thread; ``result()`` joins it (bounded) and returns or re-raises."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self._call = call
        self._outcome: list[Any] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._outcome.append(("ok", self._call()))
        except BaseException as exc:
            self._outcome.append(("error", exc))

    def result(self, timeout: float = 10.0) -> Any:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "background call did not finish"
        kind, value = self._outcome[0]
        if kind == "error":
            raise value
        return value


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def simulators() -> Iterator[Callable[..., InProcessSimulator]]:
    """Factory: a simulator of the test's own, in this process, with these ``SimulatorOptions``."""
    started: list[InProcessSimulator] = []

    def start(**options: Any) -> InProcessSimulator:
        started.append(start_simulator_in_process(**options))
        return started[-1]

    yield start
    for each in started:
        each.stop()


@pytest.fixture
def sim(simulators: Callable[..., InProcessSimulator]) -> str:
    """Base URL of a simulator with the default options."""
    return simulators().url


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Callable[..., Simulator]]:
    """Factory: the real ``python -m exporter.simulator`` with these flags; each must stop cleanly."""
    started: list[Simulator] = []

    def start(*flags: str) -> Simulator:
        started.append(start_simulator(tmp_path / f"simulator-{len(started)}.log", *flags))
        return started[-1]

    yield start
    for each in started:
        assert each.stop(STOP_TIMEOUT) == 0, each.process.log(2000)


@pytest.fixture
def token(request: pytest.FixtureRequest) -> str:
    return "tok-" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- startup and the happy path


def test_listen_line_is_exact_and_has_the_real_port(processes: Callable[..., Simulator]) -> None:
    real = processes()
    base = real.url
    announced = [line for line in real.process.log().splitlines() if "listening" in line]
    assert len(announced) == 1
    match = re.fullmatch(r"simulator listening on http://127\.0\.0\.1:(\d+)", announced[0])
    assert match is not None
    assert int(match.group(1)) > 0
    assert base == f"http://127.0.0.1:{match.group(1)}"
    assert requests.get(base + "/-/healthy", timeout=HTTP_TIMEOUT).text == "OK"


def test_success_shape_and_month_formula(sim: str, token: str) -> None:
    before = time.time()
    response = api_get(sim, token, headers={"wolkvox_server": "wv9901"})
    after = time.time()
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    doc = response.json()
    assert set(doc) == {"code", "error", "msg", "data"}
    assert doc["code"] == "200"
    assert doc["error"] is None
    assert doc["msg"] == "Information found for the current month"
    assert isinstance(doc["data"], list) and len(doc["data"]) == 1
    row = doc["data"][0]
    assert set(row) == {"operation", "description", "items", "date"}
    assert all(isinstance(v, str) for v in row.values())
    assert row["operation"] == "wv9901"
    assert "stereo" in row["description"].lower()
    assert re.fullmatch(r"\d+", row["items"])
    stamp = datetime.strptime(row["date"], "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC).timestamp()
    assert before - 1 <= stamp <= after + 1
    value = int(row["items"])
    # offset in [0, 500) + 600 minutes per hour since the first of the month, floored
    assert expected_minutes(before, 600) - 1 <= value < expected_minutes(after, 600) + 500

    again = api_get(sim, token, headers={"wolkvox_server": "wv9901"}).json()["data"][0]
    if datetime.fromtimestamp(before, UTC).month == datetime.fromtimestamp(time.time(), UTC).month:
        assert int(again["items"]) >= value


def test_operation_comes_from_the_host_header_without_wolkvox_server(sim: str, token: str) -> None:
    response = api_get(sim, token, headers={"Host": "wv1234.wolkvox.com"})
    assert response.status_code == 200
    assert response.json()["data"][0]["operation"] == "wv1234"


@pytest.mark.parametrize("api", simulator.KNOWN_APIS)
def test_every_known_api_answers(sim: str, token: str, api: str) -> None:
    first = api_get(sim, token, api=api, headers={"wolkvox_server": "wv1"})
    second = api_get(sim, token, api=api, headers={"wolkvox_server": "wv1"})
    assert first.status_code == second.status_code == 200
    one, two = first.json()["data"][0], second.json()["data"][0]
    assert re.fullmatch(r"\d+", one["items"]) and one["description"]
    assert int(two["items"]) >= int(one["items"])
    if api in simulator.LICENCE_APIS:
        assert one["items"] == two["items"] and 1 <= int(one["items"]) <= 40
    assert token_stats(sim, token)["apis"] == {api: 2}


def test_sequential_requests_are_never_violations(sim: str, token: str) -> None:
    for _ in range(5):
        assert api_get(sim, token).status_code == 200
    stats = token_stats(sim, token)
    assert stats["requests"] == 5
    assert stats["max_in_flight"] == 1
    assert stats["in_flight"] == 0
    assert stats["violations"] == 0


def test_values_grow_and_use_the_items_format(simulators: Callable[..., InProcessSimulator]) -> None:
    base = simulators(minutes_per_hour=3_600_000, items_format="comma").url
    seen: list[float] = []

    def read() -> float:
        response = api_get(base, "growth-token")
        items = response.json()["data"][0]["items"]
        assert re.fullmatch(r"\d+,\d\d", items), items
        seen.append(float(items.replace(",", ".")))
        return seen[-1]

    first = read()
    wait_until(lambda: read() > first, what="the value to grow")
    assert seen == sorted(seen)


# --------------------------------------------------------------------------- documented errors


@pytest.mark.parametrize("headers", [{}, {"wolkvox-token": ""}])
def test_no_token_is_401(sim: str, headers: dict[str, str]) -> None:
    response = requests.get(
        sim + BILLING, params={"api": "stereo_rec"}, headers=headers, timeout=HTTP_TIMEOUT
    )
    assert response.status_code == 401
    assert response.json() == {
        "code": "401",
        "error": "UNAUTHORIZED",
        "msg": "PLEASE ENTER THE WOLKVOX-TOKEN",
        "data": None,
    }


@pytest.mark.parametrize("path", [BILLING, INFORMATION])
def test_missing_api_parameter_is_400(sim: str, token: str, path: str) -> None:
    assert_error(api_get(sim, token, api=None, path=path), 400, "BAD REQUEST", "SOME PARAMETERS ARE REQUIRED")


@pytest.mark.parametrize(
    ("path", "api"), [(BILLING, "stereo_recs"), (BILLING, "token_info"), (INFORMATION, "x")]
)
def test_unknown_api_is_400(sim: str, token: str, path: str, api: str) -> None:
    response = api_get(sim, token, api=api, path=path)
    assert_error(response, 400, "BAD REQUEST", "THE API YOU WANT TO CONSULT DOES NOT EXIST")


def test_concurrent_requests_on_one_token_are_a_violation(sim: str, token: str) -> None:
    set_fault(sim, mode="slow", token=token, seconds=1.5)
    first = Background(lambda: api_get(sim, token))
    wait_until(lambda: token_stats(sim, token).get("in_flight") == 1, what="the first request in flight")
    second = api_get(sim, token)
    assert_error(second, 403, "FORBIDDEN", "EXCEEDS THE LIMIT OF SIMULTANEOUS REQUESTS PER TOKEN (2)")
    assert first.result().status_code == 200
    stats = token_stats(sim, token)
    assert stats["violations"] == 1
    assert stats["max_in_flight"] == 2
    assert stats["requests"] == 2
    doc = requests.get(sim + "/-/stats", timeout=HTTP_TIMEOUT).json()
    assert doc["total_violations"] == 1


def test_daily_limit(simulators: Callable[..., InProcessSimulator]) -> None:
    base = simulators(daily_limit=3).url
    for _ in range(3):
        assert api_get(base, "limited").status_code == 200
    assert_error(api_get(base, "limited"), 403, "FORBIDDEN", "TOKEN LIMIT EXCEEDED")
    limited_info = api_get(base, "limited", api="token_info", path=INFORMATION)
    assert_error(limited_info, 403, "FORBIDDEN", "TOKEN LIMIT EXCEEDED")
    assert api_get(base, "other").status_code == 200
    info = api_get(base, "other", api="token_info", path=INFORMATION).json()["data"][0]
    assert info == {"token_limit": "3", "token_use_today": "2", "all_token_today": "7"}
    assert token_stats(base, "limited")["requests_today"] == 5


def test_daily_limit_counts_over_a_rolling_day_length(simulators: Callable[..., InProcessSimulator]) -> None:
    base = simulators(daily_limit=2, day_length=1.0).url
    assert [api_get(base, "t").status_code for _ in range(3)] == [200, 200, 403]
    started = time.monotonic()
    # /-/stats is not a request: watch the window empty without adding to it
    wait_until(lambda: token_stats(base, "t")["requests_today"] == 0, timeout=5, what="the window to pass")
    assert time.monotonic() - started > 0.5  # the newest request left the window, not the first
    assert [api_get(base, "t").status_code for _ in range(3)] == [200, 200, 403]
    assert token_stats(base, "t")["requests"] == 6


def test_reports_count_requests_and_the_smallest_gap(simulators: Callable[..., InProcessSimulator]) -> None:
    base = simulators(report_interval=3600.0).url
    for server, api in [
        ("wv1", "stereo_rec"),
        ("wv1", "stereo_rec"),
        ("wv1", "ivr_calls"),
        ("wv2", "stereo_rec"),
    ]:
        assert api_get(base, "t", api=api, headers={"wolkvox_server": server}).status_code == 200
    assert api_get(base, "t", api="token_info", path=INFORMATION, headers={"wolkvox_server": "wv1"}).ok
    stats = token_stats(base, "t")
    reports = stats["reports"]
    assert set(reports) == {"wv1/stereo_rec", "wv1/ivr_calls", "wv2/stereo_rec", "wv1/token_info"}
    assert reports["wv1/stereo_rec"]["requests"] == 2
    assert 0 <= reports["wv1/stereo_rec"]["min_gap_seconds"] < 5
    assert reports["wv1/ivr_calls"] == {"requests": 1, "min_gap_seconds": None}
    assert stats["report_violations"] == 1  # only the second stereo_rec of wv1 came too soon
    assert requests.get(base + "/-/stats", timeout=HTTP_TIMEOUT).json()["total_report_violations"] == 1


def test_token_info_counts_requests(sim: str, token: str) -> None:
    other = token + "-other"
    assert api_get(sim, token).status_code == 200
    assert api_get(sim, token, api="ivr_calls").status_code == 200
    assert api_get(sim, other).status_code == 200
    response = api_get(sim, token, api="token_info", path=INFORMATION)
    assert response.status_code == 200
    doc = response.json()
    assert doc["code"] == "200" and doc["error"] is None
    # token_limit "0": no --daily-limit, the default
    assert doc["data"] == [{"token_limit": "0", "token_use_today": "3", "all_token_today": "4"}]
    assert token_stats(sim, token)["apis"] == {"stereo_rec": 1, "ivr_calls": 1, "token_info": 1}


# --------------------------------------------------------------------------- faults


def _json_of(response: requests.Response) -> Any:
    return json.loads(response.content)


FAULT_CASES: dict[str, tuple[dict[str, Any], Callable[[requests.Response], None]]] = {
    "none": (
        {},
        lambda r: (r.status_code == 200 and re.fullmatch(r"\d+", r.json()["data"][0]["items"])) or _fail(r),
    ),
    "http_500": (
        {},
        lambda r: (r.status_code == 500 and r.headers["Content-Type"].startswith("text/plain")) or _fail(r),
    ),
    "html": (
        {},
        lambda r: (
            (r.status_code == 502 and r.headers["Content-Type"].startswith("text/html") and "<html" in r.text)
            or _fail(r)
        ),
    ),
    "badjson": (
        {},
        lambda r: (r.status_code == 200 and r.content == b'{"code": "200", "data": [') or _fail(r),
    ),
    "wrongshape": ({}, lambda r: (r.status_code == 200 and isinstance(_json_of(r), list)) or _fail(r)),
    "oversize": (
        {},
        lambda r: (
            (
                r.status_code == 200
                and len(r.content) == 5 * 1024 * 1024
                and _json_of(r)["data"][0]["operation"] == "wv9901"
            )
            or _fail(r)
        ),
    ),
    "garbage_items": (
        {},
        lambda r: (r.status_code == 200 and r.json()["data"][0]["items"] == "n/a") or _fail(r),
    ),
    "multi_rows": (
        {},
        lambda r: (
            (r.status_code == 200 and [row["items"] for row in r.json()["data"]] == ["100", "23"]) or _fail(r)
        ),
    ),
    "empty_data": (
        {},
        lambda r: (r.status_code == 200 and r.json()["code"] == "200" and r.json()["data"] == []) or _fail(r),
    ),
    "correction": (
        {},
        lambda r: (r.status_code == 200 and re.fullmatch(r"\d+", r.json()["data"][0]["items"])) or _fail(r),
    ),
    "no_date": (
        {},
        lambda r: (
            (r.status_code == 200 and "date" not in r.json()["data"][0] and r.json()["data"][0]["items"])
            or _fail(r)
        ),
    ),
    "token_limit": ({}, lambda r: assert_error(r, 403, "FORBIDDEN", "TOKEN LIMIT EXCEEDED")),
    "invalid_token": ({}, lambda r: assert_error(r, 403, "FORBIDDEN", "PLEASE VALIDATE TOKEN")),
    "busy": (
        {},
        lambda r: assert_error(
            r, 403, "FORBIDDEN", "EXCEEDS THE LIMIT OF SIMULTANEOUS REQUESTS PER TOKEN (2)"
        ),
    ),
    "unknown_api": (
        {},
        lambda r: assert_error(r, 400, "BAD REQUEST", "THE API YOU WANT TO CONSULT DOES NOT EXIST"),
    ),
    "maintenance": ({}, lambda r: (r.status_code == 403 and r.content == b"") or _fail(r)),
    "no_token": ({}, lambda r: assert_error(r, 401, "UNAUTHORIZED", "PLEASE ENTER THE WOLKVOX-TOKEN")),
    "redirect": (
        {"location": "http://127.0.0.1:9/elsewhere"},
        lambda r: (
            (r.status_code == 302 and r.headers["Location"] == "http://127.0.0.1:9/elsewhere") or _fail(r)
        ),
    ),
}


def _fail(response: requests.Response) -> None:
    raise AssertionError(f"unexpected answer {response.status_code}: {response.content[:200]!r}")


def test_every_fault_mode_is_covered() -> None:
    covered = set(FAULT_CASES) | {"slow", "reset", "hang"}  # these three have their own tests below
    assert covered == set(simulator.FAULT_MODES)


@pytest.mark.parametrize("mode", sorted(FAULT_CASES))
def test_fault_mode_answers_as_specified(sim: str, token: str, mode: str) -> None:
    extra, check = FAULT_CASES[mode]
    set_fault(sim, mode=mode, token=token, **extra)
    response = api_get(sim, token, headers={"wolkvox_server": "wv9901"}, allow_redirects=False)
    check(response)
    stats = token_stats(sim, token)
    assert stats["requests"] == 1  # faulted requests still count
    assert stats["violations"] == 0
    # the fault stays until cleared (no count given)
    assert [f["mode"] for f in requests.get(sim + "/-/faults", timeout=HTTP_TIMEOUT).json()["faults"]] == [
        mode
    ]


def test_slow_fault_answers_correctly_after_the_delay(sim: str, token: str) -> None:
    set_fault(sim, mode="slow", token=token, seconds=0.3)
    started = time.monotonic()
    response = api_get(sim, token)
    assert time.monotonic() - started >= 0.3
    assert response.status_code == 200 and response.json()["data"][0]["items"].isdigit()


def _raw_get(base: str, target: str, token: str, timeout: float = HTTP_TIMEOUT) -> bytes:
    """One HTTP/1.1 request on a plain socket; everything received until the server closes or resets."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    received = bytearray()
    with socket.create_connection((host, int(port)), timeout=timeout) as conn:
        conn.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nwolkvox-token: {token}\r\n\r\n".encode())
        try:
            while chunk := conn.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    return bytes(received)


def test_reset_fault_sends_headers_and_part_of_the_body_then_aborts(sim: str, token: str) -> None:
    set_fault(sim, mode="reset", token=token, count=1)
    raw = _raw_get(sim, BILLING + "?api=stereo_rec", token)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    length = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
    assert length is not None
    assert 0 < len(body) < int(length.group(1))
    assert body.startswith(b'{"code": "200"')

    set_fault(sim, mode="reset", token=token, count=1)
    with pytest.raises((requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError)):
        api_get(sim, token)


def test_hang_fault_never_answers_until_the_client_gives_up(sim: str, token: str) -> None:
    set_fault(sim, mode="hang", token=token)
    with pytest.raises(requests.exceptions.ReadTimeout):
        api_get(sim, token, timeout=0.3)
    wait_until(lambda: token_stats(sim, token)["in_flight"] == 0, what="the hung request to be released")


def test_hang_fault_with_seconds_closes_without_answering(sim: str, token: str) -> None:
    set_fault(sim, mode="hang", token=token, seconds=0.2)
    with pytest.raises(requests.exceptions.ConnectionError):
        api_get(sim, token, timeout=HTTP_TIMEOUT)


def test_hang_does_not_block_other_tokens_and_releases_on_client_timeout(sim: str, token: str) -> None:
    other = token + "-other"
    set_fault(sim, mode="hang", token=token)
    hung = Background(lambda: api_get(sim, token, timeout=2.0))
    wait_until(lambda: token_stats(sim, token).get("in_flight") == 1, what="the hanging request in flight")
    started = time.monotonic()
    assert api_get(sim, other).status_code == 200
    assert time.monotonic() - started < 1.0
    assert token_stats(sim, token)["in_flight"] == 1  # still hanging while the other token was served
    with pytest.raises(requests.exceptions.ReadTimeout):
        hung.result()
    wait_until(lambda: token_stats(sim, token)["in_flight"] == 0, what="the hung request to be released")
    requests.delete(sim + "/-/faults", timeout=HTTP_TIMEOUT).raise_for_status()
    assert api_get(sim, token).status_code == 200
    assert token_stats(sim, token)["violations"] == 0


def test_retry_right_after_a_client_timeout_is_not_a_violation(sim: str, token: str) -> None:
    for _ in range(3):
        set_fault(sim, mode="hang", token=token, count=1)
        with pytest.raises(requests.exceptions.ReadTimeout):
            api_get(sim, token, timeout=0.2)
        assert api_get(sim, token).status_code == 200  # immediately, on a new connection
    stats = token_stats(sim, token)
    assert stats["violations"] == 0
    assert stats["requests"] == 6


def test_fault_count_expires(sim: str, token: str) -> None:
    set_fault(sim, mode="http_500", token=token, count=2)

    def faults() -> list[dict[str, Any]]:
        return requests.get(sim + "/-/faults", timeout=HTTP_TIMEOUT).json()["faults"]

    assert [(f["mode"], f["token"], f["count"]) for f in faults()] == [("http_500", token, 2)]
    assert api_get(sim, token).status_code == 500
    assert faults()[0]["count"] == 1
    assert api_get(sim, token).status_code == 500
    assert faults() == []
    assert api_get(sim, token).status_code == 200
    assert token_stats(sim, token)["requests"] == 3


def test_token_fault_wins_over_wildcard_and_delete_clears(sim: str, token: str) -> None:
    other = token + "-other"
    set_fault(sim, mode="http_500", token="*")
    set_fault(sim, mode="none", token=token)
    assert api_get(sim, token).status_code == 200
    assert api_get(sim, other).status_code == 500
    assert api_get(sim, other, api="token_info", path=INFORMATION).status_code == 500
    requests.delete(sim + "/-/faults", params={"token": token}, timeout=HTTP_TIMEOUT).raise_for_status()
    assert api_get(sim, token).status_code == 500
    cleared = requests.delete(sim + "/-/faults", timeout=HTTP_TIMEOUT)
    assert cleared.json() == {"faults": []}
    assert api_get(sim, other).status_code == 200


def test_faults_apply_to_token_info(sim: str, token: str) -> None:
    set_fault(sim, mode="garbage_items", token=token)
    response = api_get(sim, token, api="token_info", path=INFORMATION)
    assert response.status_code == 200
    assert set(response.json()["data"][0].values()) == {"n/a"}


@pytest.mark.parametrize(
    "body",
    [
        {"mode": "bogus", "token": "*"},
        {"mode": "hang"},
        {"mode": "hang", "token": ""},
        {"mode": "http_500", "token": "*", "count": 0},
        {"mode": "http_500", "token": "*", "count": "2"},
        {"mode": "slow", "token": "*", "seconds": -1},
        {"mode": "redirect", "token": "*"},
        {"mode": "redirect", "token": "*", "location": "ftp://x"},
        {"mode": "http_500", "token": "*", "colour": "red"},
        ["hang", "*"],
    ],
)
def test_invalid_fault_is_rejected(sim: str, body: Any) -> None:
    response = requests.post(sim + "/-/faults", json=body, timeout=HTTP_TIMEOUT)
    assert response.status_code == 400
    assert response.json()["error"]
    assert requests.get(sim + "/-/faults", timeout=HTTP_TIMEOUT).json() == {"faults": []}


def test_non_json_fault_is_rejected(sim: str) -> None:
    response = requests.post(sim + "/-/faults", data=b"{nope", timeout=HTTP_TIMEOUT)
    assert response.status_code == 400


# --------------------------------------------------------------------------- the clock: a month change


def set_clock(base: str, at: Any) -> requests.Response:
    return requests.post(base + "/-/clock", json={"at": at}, timeout=HTTP_TIMEOUT)


def row(base: str, token: str, api: str = "stereo_rec") -> dict[str, str]:
    response = api_get(base, token, api=api, headers={"wolkvox_server": "wv9901"})
    assert response.status_code == 200, response.text
    return response.json()["data"][0]


def test_the_clock_plays_a_month_change(sim: str, token: str) -> None:
    end = datetime(2026, 11, 30, 23, 55, tzinfo=UTC).timestamp()
    assert set_clock(sim, "2026-11-30T23:55:00Z").json() == {"at": "2026-11-30T23:55:00+00:00"}
    last = row(sim, token)
    assert last["date"] == "2026-11-30 23:55:00"
    assert int(last["items"]) == int(simulator.usage_value("stereo_rec", token, "wv9901", end, 600))
    assert row(sim, token) == last  # the clock stands still
    licences = row(sim, token, "chat_licenses")
    # Unix seconds work too; the first answer of December is small, the licences do not drop.
    assert set_clock(sim, end + 600).status_code == 200
    first = row(sim, token)
    assert first["date"] == "2026-12-01 00:05:00"
    assert int(first["items"]) < 550 < int(last["items"])
    assert row(sim, token, "chat_licenses")["items"] == licences["items"]
    assert requests.get(sim + "/-/clock", timeout=HTTP_TIMEOUT).json() == {"at": "2026-12-01T00:05:00+00:00"}
    # Back to real time (the daily window and stats never left it).
    assert requests.delete(sim + "/-/clock", timeout=HTTP_TIMEOUT).json() == {"at": None}
    assert row(sim, token)["date"][:7] == datetime.now(UTC).strftime("%Y-%m")
    assert token_stats(sim, token)["requests"] == 6


def test_a_correction_halves_the_value_and_keeps_the_month(sim: str, token: str) -> None:
    set_clock(sim, "2026-11-15T12:00:00-05:00")
    normal = row(sim, token)
    set_fault(sim, mode="correction", token=token, count=1)
    corrected = row(sim, token)
    assert corrected["date"] == normal["date"] == "2026-11-15 17:00:00"
    moment = datetime(2026, 11, 15, 17, tzinfo=UTC).timestamp()
    assert int(corrected["items"]) == int(
        0.5 * simulator.usage_value("stereo_rec", token, "wv9901", moment, 600)
    )
    assert 0 < int(corrected["items"]) < int(normal["items"])
    assert row(sim, token) == normal


@pytest.mark.parametrize(
    "body",
    [{"at": "2026-11-30 23:55"}, {"at": "yesterday"}, {"at": -1}, {"at": True}, {"when": 1}, {}, [1], "x"],
)
def test_invalid_clock_is_rejected(sim: str, body: Any) -> None:
    response = requests.post(sim + "/-/clock", json=body, timeout=HTTP_TIMEOUT)
    assert response.status_code == 400
    assert response.json()["error"]
    assert requests.get(sim + "/-/clock", timeout=HTTP_TIMEOUT).json() == {"at": None}


# --------------------------------------------------------------------------- stats, logging


def test_stats_shape_and_reset(sim: str, token: str) -> None:
    before = time.time()
    assert api_get(sim, token).status_code == 200
    assert api_get(sim, None).status_code == 401
    doc = requests.get(sim + "/-/stats", timeout=HTTP_TIMEOUT).json()
    assert doc["total_requests"] == 2
    assert doc["total_violations"] == 0
    stats = doc["tokens"][token]
    assert set(stats) == {
        "requests",
        "requests_today",
        "in_flight",
        "max_in_flight",
        "violations",
        "report_violations",
        "apis",
        "reports",
        "last_request_unix",
    }
    assert (stats["requests"], stats["requests_today"], stats["apis"]) == (1, 1, {"stereo_rec": 1})
    # no report_interval by default: gaps are measured, never counted as violations
    assert stats["reports"] == {"127.0.0.1/stereo_rec": {"requests": 1, "min_gap_seconds": None}}
    assert stats["report_violations"] == 0
    assert before - 1 <= stats["last_request_unix"] <= time.time() + 1
    reset = requests.post(sim + "/-/stats/reset", timeout=HTTP_TIMEOUT)
    assert reset.status_code == 200
    assert requests.get(sim + "/-/stats", timeout=HTTP_TIMEOUT).json() == {
        "tokens": {},
        "total_requests": 0,
        "total_violations": 0,
        "total_report_violations": 0,
    }


def test_debug_log_names_the_token_key_never_the_token(sim: str, caplog: pytest.LogCaptureFixture) -> None:
    secret = "s3cr3t-token-value-0123456789"
    short = token_key(secret)
    with caplog.at_level(logging.DEBUG, logger="exporter.simulator"):
        set_fault(sim, mode="none", token=secret)
        assert api_get(sim, secret).status_code == 200
        wait_until(
            lambda: any(f"token={short}" in m and "status=200" in m for m in caplog.messages),
            what="the debug line of the request",
        )
    assert caplog.messages and not any(secret in message for message in caplog.messages)


def test_latency_is_added_to_api_answers(simulators: Callable[..., InProcessSimulator]) -> None:
    base = simulators(latency=0.3).url
    started = time.monotonic()
    response = api_get(base, "latency-token")
    assert time.monotonic() - started >= 0.3
    assert response.status_code == 200


def test_port_in_use_exits_non_zero() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", free_port()))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "exporter.simulator", "--web.listen-address", f"127.0.0.1:{port}"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
            check=False,
        )
    assert done.returncode == 1
    assert "cannot listen" in done.stderr
    assert "listening on" not in done.stderr


# --------------------------------------------------------------------------- stopping


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_quickly_while_a_request_hangs(sig: int, processes: Callable[..., Simulator]) -> None:
    hanging = processes("--hang-fraction", "1")  # every token hangs, no fault needed
    hung = Background(lambda: api_get(hanging.url, "hanging-token", timeout=30.0))
    wait_until(
        lambda: token_stats(hanging.url, "hanging-token").get("in_flight") == 1, what="the hanging request"
    )
    status, took = timed(lambda: hanging.process.stop(STOP_TIMEOUT, sig=sig))
    assert status == 0 and took < 4.0, (status, took)
    try:
        answer = hung.result(timeout=STOP_TIMEOUT)
    except requests.exceptions.ConnectionError:
        pass  # dropped: acceptable, it was not left hanging
    else:
        assert answer.status_code == 503


# --------------------------------------------------------------------------- in-process pieces


@pytest.mark.parametrize(
    "argv",
    [
        ["--latency", "abc"],
        ["--items-format", "xml"],
        ["--hang-fraction", "2"],
        ["--daily-limit", "-1"],
        ["--day-length", "0"],
        ["--day-length", "soon"],
        ["--report-interval", "-5m"],
        ["--web.listen-address", "nope"],
        ["--web.listen-address", "127.0.0.1:70000"],
    ],
)
def test_main_rejects_bad_flags(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert simulator_cli.main(argv) == 2
    assert "error" in capsys.readouterr().err


def test_format_items() -> None:
    assert format_items(1234.567, "int") == "1234"
    assert format_items(1234.567, "dot") == "1234.57"
    assert format_items(1234.567, "comma") == "1234,57"


def test_usage_value_is_stable_monotonic_and_restarts_each_month() -> None:
    start = datetime(2025, 3, 1, tzinfo=UTC).timestamp()
    at_start = simulator.usage_value("stereo_rec", "tok", "wv1", start, 600)
    assert 0 <= at_start < 500
    assert simulator.usage_value("stereo_rec", "tok", "wv1", start, 600) == at_start  # no randomness
    moments = [start + hours * 3600 for hours in (0.5, 1, 24, 24 * 30)]
    values = [simulator.usage_value("stereo_rec", "tok", "wv1", t, 600) for t in moments]
    assert values == sorted(values)
    assert values[1] == pytest.approx(at_start + 600)
    next_month = datetime(2025, 4, 1, tzinfo=UTC).timestamp()
    assert simulator.usage_value("stereo_rec", "tok", "wv1", next_month, 600) == at_start
    assert simulator.usage_value("stereo_rec", "tok", "wv1", next_month, 600) < values[-1]


# --------------------------------------------------------------------------- the API's rules, on a fake clock


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rules_one_request_at_a_time_until_the_first_leaves_or_its_client_goes() -> None:
    rules = ApiRules(clock=FakeClock())
    connected = {"first": True}
    first, violation = rules.arrive("t", "wv1", "stereo_rec", lambda: connected["first"], 0.0)
    assert not violation and rules.in_flight("t") == 1
    _, violation = rules.arrive("t", "wv1", "ivr_calls", lambda: True, 0.0)
    assert violation  # a second request while the first is in flight, whatever its report
    assert rules.arrive("other", "wv1", "stereo_rec", lambda: True, 0.0)[1] is False
    connected["first"] = False  # the first one's client went away: no longer in flight
    assert rules.in_flight("t") == 1
    rules.leave("t", first)  # leaving after that changes nothing
    snapshot = rules.snapshot()["tokens"]["t"]
    assert (snapshot["violations"], snapshot["max_in_flight"]) == (1, 2)


def test_rules_daily_limit_is_a_rolling_window() -> None:
    clock = FakeClock()
    rules = ApiRules(daily_limit=2, day_length=100.0, clock=clock)

    def request() -> bool:
        flight, _ = rules.arrive("t", "wv1", "stereo_rec", lambda: True, 0.0)
        rules.leave("t", flight)
        return rules.over_daily_limit("t")

    assert [request(), request()] == [False, False]
    clock.now += 60
    assert request() is True  # the third within 100 s, refused ones count too
    clock.now += 40  # the first two have left the window, the refused third has not
    assert rules.requests_today("t") == 1
    assert request() is False
    assert request() is True


def test_rules_count_a_report_asked_again_within_the_interval() -> None:
    clock = FakeClock()
    rules = ApiRules(report_interval=300.0, clock=clock)
    for server, api, advance in [
        ("wv1", "stereo_rec", 0),
        ("wv1", "stereo_rec", 299),
        ("wv1", "stereo_rec", 300),
    ]:
        clock.now += advance
        rules.leave("t", rules.arrive("t", server, api, lambda: True, 0.0)[0])
    rules.leave("t", rules.arrive("t", "wv2", "stereo_rec", lambda: True, 0.0)[0])  # another report
    stats = rules.snapshot()["tokens"]["t"]
    assert stats["report_violations"] == 1
    assert stats["reports"]["wv1/stereo_rec"] == {"requests": 3, "min_gap_seconds": 299.0}
    assert stats["reports"]["wv2/stereo_rec"] == {"requests": 1, "min_gap_seconds": None}
