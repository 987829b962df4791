"""The faults the simulator can play, per token: one table, ``FAULTS``, from a mode to what it plays
(as blackbox_exporter maps a prober's name to its function). ``POST /-/faults`` accepts its modes,
``python -m exporter.simulator --help`` lists them, and exporter/simulator/app.py plays them."""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from exporter.simulator.api import (
    ERR_INVALID_TOKEN,
    ERR_LIMIT,
    ERR_NO_TOKEN,
    ERR_SIMULTANEOUS,
    ERR_UNKNOWN_API,
    HTML_502,
    OVERSIZE_BYTES,
    document,
)

WILDCARD = "*"
DEFAULT_SLOW_SECONDS = 1.0


class Interrupted(Exception):
    """A wait ended early: the client went away, the simulator is stopping, or a hang hung up."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------- answers


def json_response(status: int, doc: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=json.dumps(doc).encode(), content_type="application/json", headers=headers
    )


def error_response(err: tuple[int, str, str]) -> web.Response:
    """One of the API's documented errors: ``(status, error, msg)``, the body's ``code`` the status."""
    status, error, msg = err
    return json_response(status, document(status, error, msg, None))


# --------------------------------------------------------------------------- what a fault plays


@dataclass
class Fault:
    mode: str
    token: str
    count: int | None = None
    seconds: float | None = None
    location: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "token": self.token,
            "count": self.count,
            "seconds": self.seconds,
            "location": self.location,
        }


def parse_fault(body: Any) -> Fault:
    """Validates a ``POST /-/faults`` document; raises ValueError with a one-line message."""
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    unknown = set(body) - {"mode", "token", "count", "seconds", "location"}
    if unknown:
        raise ValueError(f"unknown keys: {', '.join(sorted(unknown))}")
    mode = body.get("mode")
    if mode not in FAULTS:
        raise ValueError(f"mode must be one of: {', '.join(FAULT_MODES)}")
    token = body.get("token")
    if not isinstance(token, str) or not token.strip():
        raise ValueError("token must be a non-empty string ('*' for every token)")
    count = body.get("count")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ValueError("count must be an integer >= 1")
    seconds = body.get("seconds")
    if seconds is not None:
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            raise ValueError("seconds must be a number")
        seconds = float(seconds)
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError("seconds must be a finite number >= 0")
    location = body.get("location")
    if mode == "redirect":
        if not isinstance(location, str) or not re.match(r"^https?://", location):
            raise ValueError("redirect needs a location (http or https URL)")
    elif location is not None:
        raise ValueError("location is only for mode redirect")
    return Fault(mode=mode, token=token.strip(), count=count, seconds=seconds, location=location)


@dataclass(frozen=True)
class Play:
    """What a faulted request has to play with."""

    request: web.Request
    fault: Fault
    billing: bool  # billing.php (False: information.php)
    answer: Callable[[float], dict[str, Any]]  # the normal answer's document, its values times a factor
    pause: Callable[[float | None], Awaitable[None]]  # waits (None: for ever); raises Interrupted


# A mode's play: the answer to send, or None to go on and answer normally.
PlayFn = Callable[[Play], Awaitable[web.StreamResponse | None]]


@dataclass(frozen=True)
class Mode:
    plays: str  # what it plays, in one line (the simulator's --help shows it)
    play: PlayFn


async def _normal(play: Play) -> None:
    return None


async def _slow(play: Play) -> None:
    seconds = play.fault.seconds
    await play.pause(DEFAULT_SLOW_SECONDS if seconds is None else seconds)


async def _hang(play: Play) -> web.StreamResponse:
    await play.pause(play.fault.seconds)
    transport = play.request.transport  # `seconds` passed: hang up without an answer
    if transport is not None:
        transport.close()
    raise Interrupted("closed")


def _answer(status: int, body: str | bytes, content_type: str) -> PlayFn:
    async def play(_: Play) -> web.StreamResponse:
        if isinstance(body, str):
            return web.Response(status=status, text=body, content_type=content_type)
        return web.Response(status=status, body=body, content_type=content_type)

    return play


def _error(err: tuple[int, str, str]) -> PlayFn:
    async def play(_: Play) -> web.StreamResponse:
        return error_response(err)

    return play


def _document(edit: Callable[[Play, dict[str, Any]], Any], factor: float = 1.0) -> PlayFn:
    """200 with the normal document changed by ``edit`` (which may return another body to send)."""

    async def play(play: Play) -> web.StreamResponse:
        doc = play.answer(factor)
        sent = edit(play, doc)
        return json_response(200, doc if sent is None else sent)

    return play


def _garbage_items(play: Play, doc: dict[str, Any]) -> None:
    keep = ("operation", "description", "date")
    doc["data"] = [{k: (v if k in keep else "n/a") for k, v in row.items()} for row in doc["data"]]


def _multi_rows(play: Play, doc: dict[str, Any]) -> None:
    row = doc["data"][0]
    doc["data"] = [{**row, "items": "100"}, {**row, "items": "23"}] if play.billing else [row, dict(row)]


async def _oversize(play: Play) -> web.StreamResponse:
    """A valid JSON document of exactly OVERSIZE_BYTES: the answer with a ``padding`` member."""
    base = json.dumps({**play.answer(1.0), "padding": ""}).encode()
    body = base[:-2] + b"x" * max(0, OVERSIZE_BYTES - len(base)) + b'"}'
    return web.Response(status=200, body=body, content_type="application/json")


async def _reset(play: Play) -> web.StreamResponse:
    """The status line, headers announcing more than is sent, half the body, then an abort."""
    request = play.request
    body = json.dumps(play.answer(1.0)).encode()
    response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
    response.content_length = len(body) + 1024
    await response.prepare(request)
    await response.write(body[: len(body) // 2])
    transport = request.transport
    if transport is not None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1.0
        while transport.get_write_buffer_size() and loop.time() < deadline:
            await asyncio.sleep(0.005)
        transport.abort()
    return response


async def _redirect(play: Play) -> web.StreamResponse:
    return web.Response(status=302, headers={"Location": play.fault.location or "/"})


FAULTS: dict[str, Mode] = {
    "none": Mode("answer normally (use it to exempt one token from a * fault)", _normal),
    "hang": Mode(
        "never answer, until the client disconnects; with seconds, close the connection without an "
        "answer after that long",
        _hang,
    ),
    "slow": Mode("answer normally after seconds (default 1)", _slow),
    "reset": Mode(
        "send the status line, headers with a Content-Length larger than the body, part of the body, "
        "then abort the connection",
        _reset,
    ),
    "http_500": Mode("500 with a plain-text body", _answer(500, "Internal Server Error\n", "text/plain")),
    "html": Mode("502 with an HTML error page (a proxy in the way)", _answer(502, HTML_502, "text/html")),
    "badjson": Mode(
        '200, body {"code": "200", "data": [', _answer(200, b'{"code": "200", "data": [', "application/json")
    ),
    "wrongshape": Mode(
        "200, valid JSON of the wrong shape (a list holding the document)", _document(lambda _, doc: [doc])
    ),
    "oversize": Mode("200, a valid JSON document of exactly 5 MiB (padded)", _oversize),
    "garbage_items": Mode('200 with "items": "n/a"', _document(_garbage_items)),
    "multi_rows": Mode('200 with two rows, items "100" and "23"', _document(_multi_rows)),
    "empty_data": Mode('200 with "data": []', _document(lambda _, doc: doc.update(data=[]))),
    "token_limit": Mode("403 TOKEN LIMIT EXCEEDED", _error(ERR_LIMIT)),
    "invalid_token": Mode("403 PLEASE VALIDATE TOKEN", _error(ERR_INVALID_TOKEN)),
    "busy": Mode(
        "403 EXCEEDS THE LIMIT OF SIMULTANEOUS REQUESTS PER TOKEN (2) (not a violation)",
        _error(ERR_SIMULTANEOUS),
    ),
    "unknown_api": Mode("400 THE API YOU WANT TO CONSULT DOES NOT EXIST", _error(ERR_UNKNOWN_API)),
    "maintenance": Mode("403 with an empty body", _answer(403, b"", "text/html")),
    "no_token": Mode("401 as if the token header were missing", _error(ERR_NO_TOKEN)),
    "redirect": Mode("302 to location (to check that a client does not forward the token)", _redirect),
    "correction": Mode(
        "200 with items at half the month-to-date value, same date: the vendor correcting a value "
        "within the month (which is not a month change)",
        _document(lambda _, doc: None, factor=0.5),
    ),
    "no_date": Mode(
        "200 with rows that have no date field",
        _document(
            lambda _, doc: doc.update(data=[{k: v for k, v in r.items() if k != "date"} for r in doc["data"]])
        ),
    ),
}
FAULT_MODES = tuple(FAULTS)


def modes_help() -> str:
    """The table of fault modes as text (for --help)."""
    width = max(map(len, FAULTS))
    return "\n".join(f"  {name:<{width}}  {mode.plays}" for name, mode in FAULTS.items())
