"""A fake wolkvox billing API, for tests, benchmarks, the demo and newcomers without a token.

Run it with ``python -m exporter.simulator`` and point an operation's ``base_url`` at it
(``base_url: http://127.0.0.1:19727``); any token works. It answers like the real API as far as
it is documented: same URLs, same JSON documents, same errors, with the HTTP status equal to the
body ``code``. It is built on asyncio (aiohttp), so it holds tens of thousands
of hanging connections cheaply.

Flags
-----
``--web.listen-address HOST:PORT``
    Where to listen (default ``127.0.0.1:19727``). Port 0 picks a free port; ``:PORT`` listens on
    every interface. Once bound it writes exactly one line to stderr,
    ``simulator listening on http://HOST:PORT``, with the real port.
``--latency DURATION``
    Added to every API answer (``250ms``, ``2s``, ``1m``, ``0``; default ``0``). Not to ``/-/`` endpoints.
``--minutes-per-hour N``
    Growth rate of ``stereo_rec`` minutes (default 600, so a demo sees it move). The other counters
    grow at a fixed fraction of it; ``0`` freezes every value.
``--daily-limit N``
    Requests per token per ``--day-length`` before ``403 TOKEN LIMIT EXCEEDED`` (default 0 = no limit,
    so a demo never runs into a limit it does not model; wolkvox's is about 1000 a day).
``--day-length DURATION``
    The window the daily count is taken over (default ``1d``; e.g. ``10s`` to test a whole "day"
    quickly). It is a ROLLING window: a request counts until one day-length after it was made, so a
    client that keeps to N requests in any day-length never sees the limit, and one that does not is
    caught wherever its burst falls (stricter than the calendar day the vendor most likely counts).
    Every request that reaches the simulator counts, refused ones included.
``--report-interval DURATION``
    A report (token, ``wolkvox_server``, api) requested again sooner than this counts in
    ``report_violations`` (default ``0``: not checked). It is still answered normally: the vendor's
    "a consumption every 5 minutes" comes with no documented error.
``--hang-fraction F``
    0..1: tokens whose stable hash falls in this fraction hang on every request until the client
    goes away (for the benchmark; default 0).
``--items-format {int,dot,comma}``
    How ``items`` is written: ``1234``, ``1234.56`` or ``1234,56`` (default ``int``).
``--log.level {debug,info,warning,error}``
    Default ``info``. No access log; ``debug`` logs one line per request, with the token's key
    (``exporter.secret.token_key``, the exporter's too), never the token.

API endpoints
-------------
``GET /api/v2/billing.php?api=NAME`` with header ``wolkvox-token``, checked in this order (the API's
rules, one request at a time, the daily limit and the report interval, are ``ApiRules`` in api.py):

1. no or empty token: 401 ``PLEASE ENTER THE WOLKVOX-TOKEN``;
2. another request of the same token still in flight: 403
   ``EXCEEDS THE LIMIT OF SIMULTANEOUS REQUESTS PER TOKEN (2)``, counted as a *violation*;
3. a fault set for the token (or for ``*``), see below;
4. a token in ``--hang-fraction``: no answer, ever;
5. more than ``--daily-limit`` requests by the token in the last ``--day-length``: 403
   ``TOKEN LIMIT EXCEEDED``;
6. no ``api``: 400 ``SOME PARAMETERS ARE REQUIRED``; unknown api: 400
   ``THE API YOU WANT TO CONSULT DOES NOT EXIST``;
7. 200 ``{"code": "200", "error": null, "msg": "Information found for the current month",
   "data": [{"operation", "description", "items", "date"}]}``, every field a string.

The operation is the ``wolkvox_server`` header (or ``wolkvox-server``), else the first label of the
Host header (the whole address when Host is an IP address). Values are month-to-date (UTC) and
stable across restarts: ``stereo_rec`` is ``offset(token, server) + minutes_per_hour * hours since the
start of the month``, with ``offset`` a hash-derived number in [0, 500); licence apis are a stable
small integer; the other counters grow at their ``simulated_rate``. The known apis, their kinds,
row descriptions and rates are the exporter's table of billing services, ``exporter.model.BILLING_APIS``.

``GET /api/v2/information.php?api=token_info``: same rules (and it counts as a request); answers
``data: [{"token_limit", "token_use_today", "all_token_today"}]`` (``token_limit`` is ``"0"`` when
there is no limit; "today" is the last ``--day-length``).

Control endpoints
-----------------
``POST /-/faults`` with JSON ``{"mode": M, "token": T, "count": N, "seconds": S, "location": URL}``
    Sets the fault of token ``T`` (``*`` = every token; a token's own fault wins over ``*``).
    ``count`` (optional): apply to the next N requests, then clear. ``seconds``: for ``slow``
    (default 1) and ``hang``. ``location``: for ``redirect`` (required). Faulted requests still
    count in the stats and the daily budget.
``GET /-/faults`` lists the faults; ``DELETE /-/faults`` clears them (``?token=T``: only that one).
``GET /-/stats``
    ``{"tokens": {T: {"requests", "requests_today", "in_flight", "max_in_flight", "violations",
    "report_violations", "apis": {api: n}, "reports": {"SERVER/API": {"requests", "min_gap_seconds"}},
    "last_request_unix"}}, "total_requests", "total_violations", "total_report_violations"}``.
    ``requests_today`` is the count in the last ``--day-length``. A report is one (token, server,
    api); ``min_gap_seconds`` is the shortest time between the arrivals of two of its requests (null
    until there are two). Reading the stats is not a request.
``POST /-/stats/reset`` zeroes the counters (requests still in flight stay in flight).
``GET /-/healthy`` answers 200 ``OK``.
``POST /-/clock`` with JSON ``{"at": T}``
    Answers as if it were T from now on, to play a month change without waiting for one: the
    month-to-date values and the rows' ``date`` are computed at T, which stands still until set again.
    T is an ISO 8601 time with a zone (``2026-11-30T23:55:00Z``) or Unix seconds; ``{"at": null}`` or
    ``DELETE /-/clock`` goes back to the real clock. The daily limit, the stats and the report gaps keep
    the real clock. ``GET /-/clock`` answers ``{"at": ISO time or null}``.

Fault modes
-----------
One table, ``FAULTS`` in exporter/simulator/faults.py, maps each mode to what it plays; ``python -m
exporter.simulator --help`` prints it. ``none`` answers normally (to exempt one token from a ``*``
fault) and ``slow`` answers normally after ``seconds``; the others answer in the ways a client must
survive: hangs, resets, HTTP errors, HTML, broken or oversized JSON, odd rows and every documented error.

SIGTERM and SIGINT stop it within a second or two, even with hanging connections (they get a 503).
In-process: ``build_app(SimulatorOptions(...))`` or ``await start_server(options)``.
"""

from __future__ import annotations

from exporter.simulator.api import KNOWN_APIS, LICENCE_APIS, stable_unit, usage_value
from exporter.simulator.app import SIMULATOR_KEY, Simulator, SimulatorOptions, build_app, start_server
from exporter.simulator.faults import FAULT_MODES, FAULTS, Fault, parse_fault

__all__ = [
    "FAULTS",
    "FAULT_MODES",
    "KNOWN_APIS",
    "LICENCE_APIS",
    "SIMULATOR_KEY",
    "Fault",
    "Simulator",
    "SimulatorOptions",
    "build_app",
    "parse_fault",
    "stable_unit",
    "start_server",
    "usage_value",
]
