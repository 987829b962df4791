#!/usr/bin/env python3
"""Budget rows per request with reservations (exporter/reservation.py), at the state store benchmark's
scale, on a simulated clock: ``--tokens`` tokens of 14 reports each at ``daily_request_limit`` 1,000 (the
pace stretches 14 reports at 5m to ~20m, ~113 requests a second at 10,000 tokens), every report due at
a random time of its interval at the start, each answer 0.25 s after its request.

The real planner and the real reservations; the store is a stand-in that commits what it was handed in
order, as ``StateStore`` does: a transaction a second after the previous one when a request waits for
its row, else five seconds after it. Every token starts with a committed row of its bucket (as after a
restart), so its first request commits.

    python3 benchmarks/reservation_bench.py                  # 10,000 tokens, 30 simulated minutes
    python3 benchmarks/reservation_bench.py --tokens 1000    # a quick look

Prints, per five simulated minutes, requests, budget rows and the rows per request, and the requests
that waited for a commit; JSON of the whole run on stdout's last line.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import heapq
import json
import math
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from exporter.model import BILLING_APIS  # noqa: E402
from exporter.planner import Job, Planner, SavedPacing  # noqa: E402
from exporter.reservation import Reservations  # noqa: E402

APIS = sorted(BILLING_APIS)[:14]
LIMIT = 1000
WALL = 1_796_083_800.0
LATENCY = 0.25


class Store:
    """Commits in the order handed: a transaction 1 s after the previous one when a row is waited for,
    else 5 s after it."""

    def __init__(self) -> None:
        self.handed: list[concurrent.futures.Future[None] | None] = []
        self.rows = 0
        self.urgent_rows = 0
        self.urgent = False
        self.last = 0.0
        self.transactions = 0
        self.urgent_transactions = 0

    def spend(
        self, token: str, level: float, at: float, paused: float, extra: object = None
    ) -> concurrent.futures.Future[None]:
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.handed.append(future)
        self.rows += 1
        self.urgent_rows += 1
        self.urgent = True
        return future

    def put_token(self, token: str, level: float, at: float, paused: float, extra: object = None) -> None:
        self.handed.append(None)
        self.rows += 1

    def tick(self, now: float) -> None:
        if self.handed and now >= self.last + (1.0 if self.urgent else 5.0):
            for future in self.handed:
                if future is not None:
                    future.set_result(None)
            self.handed.clear()
            self.transactions += 1
            self.urgent_transactions += self.urgent
            self.urgent, self.last = False, now


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=10_000)
    parser.add_argument("--minutes", type=float, default=30.0)
    args = parser.parse_args()
    rng = random.Random(1)
    now = [0.0]
    planner = Planner(clock=lambda: now[0], wall=lambda: WALL + now[0], rng=rng)
    keys = [f"{i:016x}" for i in range(args.tokens)]
    jobs = {key: [Job(f"op-{i}", api, "s", 300.0) for api in APIS] for i, key in enumerate(keys)}
    # Restored state, as a running exporter leaves it: buckets low, reports due over their interval.
    interval = 300.0 * planner.configure({keys[0]: jobs[keys[0]]}, LIMIT)[keys[0]].stretch
    saved = SavedPacing(
        tokens={
            key: {"level": 0.5, "at": WALL, "paused_until": 0.0, "burst": 14.0, "limit": float(LIMIT)}
            for key in keys
        },
        reports={
            key: {f"op-{i}/{api}": WALL + rng.uniform(0, interval) for api in APIS}
            for i, key in enumerate(keys)
        },
    )
    planner = Planner(clock=lambda: now[0], wall=lambda: WALL + now[0], rng=rng)
    planner.restore(saved)
    planner.configure(jobs, LIMIT)
    store = Store()
    reservations = Reservations(store)
    reservations.restore(saved.tokens)
    reservations.paced(planner.save(reports=False).tokens)
    heap = [(0.0, 0, key) for key in keys]  # (time, kind 0 take / 1 answer, key)
    heapq.heapify(heap)
    waiting: dict[str, tuple[float, Job, concurrent.futures.Future[None]]] = {}
    answering: dict[str, Job] = {}
    end = args.minutes * 60
    window, requests, waits = 300.0, 0, 0
    previous = {"requests": 0, "rows": 0, "transactions": 0, "urgent": 0}
    windows: list[dict[str, float]] = []
    mark = window
    while heap and heap[0][0] < end:
        when, kind, key = heapq.heappop(heap)
        now[0] = when
        store.tick(when)
        while when >= mark:
            windows.append(
                {
                    "minute": mark / 60,
                    "requests": requests - previous["requests"],
                    "budget_rows": store.rows - previous["rows"],
                    "transactions": store.transactions - previous["transactions"],
                    "urgent_transactions": store.urgent_transactions - previous["urgent"],
                }
            )
            print(json.dumps(windows[-1]), file=sys.stderr)
            previous = {
                "requests": requests,
                "rows": store.rows,
                "transactions": store.transactions,
                "urgent": store.urgent_transactions,
            }
            mark += window
        if kind == 1:
            job = answering.pop(key)
            planner.finished(key, job, None)
            heapq.heappush(heap, (when + 1.0, 0, key))
            continue
        if key in waiting:  # waiting for its row's commit
            _, job, future = waiting[key]
            if not future.done():
                heapq.heappush(heap, (when + 0.1, 0, key))
                continue
            del waiting[key]
        else:
            job, wait = planner.take(key)
            if job is None:
                if math.isfinite(wait):
                    heapq.heappush(heap, (when + wait, 0, key))
                continue
            requests += 1
            durable = reservations.spend(key, planner.save((key,), reports=False).tokens[key])
            if durable is not None and not durable.done():
                waits += 1
                waiting[key] = (when, job, durable)
                heapq.heappush(heap, (when + 0.1, 0, key))
                continue
        answering[key] = job
        heapq.heappush(heap, (when + LATENCY, 1, key))
    result = {
        "tokens": args.tokens,
        "simulated_minutes": args.minutes,
        "requests": requests,
        "budget_rows": store.rows,
        "rows_per_request": round(store.rows / max(1, requests), 3),
        "urgent_rows": store.urgent_rows,
        "transactions": store.transactions,
        "urgent_transactions": store.urgent_transactions,
        "waited": waits,
        "windows": windows,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
