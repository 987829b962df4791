#!/usr/bin/env python3
"""Speed, capacity, pacing and memory benchmark of the exporter, against the simulator, on loopback only.

    python benchmarks/run.py --steady         # the full run (about 15 minutes on 2 cores)
    python benchmarks/run.py --quick --steady # the smoke run of the test suite (about a minute)

Part 1, /metrics under load, for each size in ``--sizes`` (number of operations, distinct tokens):
  the simulator is told to hang every request (fault ``hang`` for token ``*``) and the exporter
  (read_timeout 60s) is started against it, so every upstream request it makes hangs until its
  timeout while /metrics is measured. Once the page lists every operation (``wolkvox_up``) and the
  upstream sockets are all held by hanging requests, ``wrk`` runs with ``--connections`` connections
  and ``Accept-Encoding: gzip`` against three servers of the same series, one at a time:
    exporter           the exporter's /metrics (aiohttp, pre-rendered page, pre-compressed gzip);
    prometheus_client  reference 1, the straightforward alternative: the same series as plain
                       prometheus_client Gauges served by ``prometheus_client.start_http_server``
                       (benchmarks/reference_server.py), which renders and gzips on every scrape;
    nginx              reference 2, the limit: Debian's nginx (one worker) serving the exporter's
                       exact bytes from a file, with ``gzip_static`` (pre-compressed, as the exporter).
  The exporter's resident memory (VmRSS) is read once the page is complete and again after wrk.
  With ``--steady`` the exporter is measured once more with every operation answered (values on the
  page, as between refreshes in production); at the largest size that exporter's CPU is also read
  over ``--idle`` seconds in which nothing changes (refresh_interval 1h, a scrape every 15 s).
  At ``--active-size`` (1,000) the exporter is measured while its refresher is busy (values arriving
  every second: refresh_interval ``--active-interval``, 250 ms upstream latency, a tenth of the tokens
  hanging) and nginx right after on the page it served (``exporter-refreshing`` / ``nginx-refreshing``).

Part 2, refresh capacity and pacing (skipped with ``--skip-refresh``), at ``--refresh-ops`` (the
  largest size) against a simulator answering after ``--refresh-latency`` (250ms), with the exporter's
  DEFAULT settings (only base_url, refresh_interval = the window, and daily_request_limit when the
  window needs more than the default budget). ``--refresh-runs``:
    healthy  every upstream answers;
    hang     ``--hang-fraction`` (0.1) of the tokens hang for ever (freed by the 60 s read timeout);
    pace     a quarter of the operations with 4 reports each, a tenth hanging, refresh_interval
             ``--pace-window`` (60s) for ``--pace-windows`` (3) windows: each report is fetched at most
             once per window (the simulator's ``--report-interval``), one request at a time per token.
  Healthy and hang poll /metrics every ~2 s until every healthy operation has ``wolkvox_up 1`` (or the
  window is over) and fire bursts of scrapes; every run reads the simulator's ``/-/stats``: requests
  per token and per report, ``max_in_flight`` per token, violations, the smallest gap per report.

Everything listens on 127.0.0.1, every load is bounded in count and time, every child process dies
with this script (PR_SET_PDEATHSIG) and the whole run has a deadline (``--max-minutes``).
Results go to ``--out`` (JSON) and, as Markdown tables, to stdout. The code is the package
``benchmarks/wolkbench/`` (its ``__init__`` names each module's job); this file only puts the
repository and tests/ (for tests/harness.py) on the path and calls ``wolkbench.cli.main``.
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCHMARKS.parent), str(BENCHMARKS.parent / "tests")]  # the exporter, tests/harness.py

from wolkbench.cli import main  # noqa: E402  (needs the paths above)

if __name__ == "__main__":
    sys.exit(main(description=__doc__.split("\n\n")[0]))
