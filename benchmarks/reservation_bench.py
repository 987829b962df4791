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
    python3 benchmarks/reservation_bench.py --state-store /tmp/x.db   # the real store: bytes written

With ``--state-store`` the rows (and each answer's report row) go to the real ``StateStore`` at that
path, committed on the same simulated cadence (``StateStore.flush``): the bytes it writes (write_bytes of
/proc/self/io), the journals' turnovers included. ``benchmarks/store_bench.py`` runs it so.

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
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from exporter.model import BILLING_APIS  # noqa: E402
from exporter.monthclose import Seen, utc_month  # noqa: E402
from exporter.planner import Job, Planner, SavedPacing  # noqa: E402
from exporter.reservation import Reservations  # noqa: E402
from exporter.statestore import StateStore  # noqa: E402

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


class RealStore(Store):
    """The stand-in's cadence and counts, the rows written by the real StateStore (its writer thread is
    not started: ``tick`` flushes on the simulated clock)."""

    def __init__(self, state: StateStore) -> None:
        super().__init__()
        self.state = state

    def spend(
        self, token: str, level: float, at: float, paused: float, extra: object = None
    ) -> concurrent.futures.Future[None]:
        super().spend(token, level, at, paused, extra)
        return self.state.spend(token, level, at, paused, extra if isinstance(extra, dict) else None)

    def put_token(self, token: str, level: float, at: float, paused: float, extra: object = None) -> None:
        super().put_token(token, level, at, paused, extra)
        self.state.put_token(token, level, at, paused, extra if isinstance(extra, dict) else None)

    def tick(self, now: float) -> None:
        if self.handed and now >= self.last + (1.0 if self.urgent else 5.0):
            self.state.flush()  # resolves the spends' futures
        super().tick(now)


def written_bytes() -> int:
    with open("/proc/self/io", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    raise RuntimeError("no write_bytes in /proc/self/io")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=10_000)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--state-store", help="write to the real state store at this path")
    args = parser.parse_args()
    print(json.dumps(simulate(args.tokens, args.minutes, args.state_store)))


def simulate(tokens: int, minutes: float, state_store: str | None = None) -> dict[str, Any]:
    """The run (see the module's docstring); with ``state_store``, also the bytes it wrote."""
    rng = random.Random(1)
    now = [0.0]
    planner = Planner(clock=lambda: now[0], wall=lambda: WALL + now[0], rng=rng)
    keys = [f"{i:016x}" for i in range(tokens)]
    jobs = {key: [Job(f"op-{i:05d}", api, "s", 300.0) for api in APIS] for i, key in enumerate(keys)}
    # Restored state, as a running exporter leaves it: buckets low, reports due over their interval.
    interval = 300.0 * planner.configure({keys[0]: jobs[keys[0]]}, LIMIT)[keys[0]].stretch
    saved = SavedPacing(
        tokens={
            key: {"level": 0.5, "at": WALL, "paused_until": 0.0, "burst": 14.0, "limit": float(LIMIT)}
            for key in keys
        },
        reports={
            key: {f"op-{i:05d}/{api}": WALL + rng.uniform(0, interval) for api in APIS}
            for i, key in enumerate(keys)
        },
    )
    planner = Planner(clock=lambda: now[0], wall=lambda: WALL + now[0], rng=rng)
    planner.restore(saved)
    planner.configure(jobs, LIMIT)
    state = StateStore(state_store, wall=lambda: WALL + now[0]) if state_store else None
    if state is not None:
        state.load()
        # What a running exporter leaves: every token's bucket, every report's value and due time (and
        # so every name: a new store writes its names tables once, at random places of their index).
        month = utc_month(WALL)
        for i, key in enumerate(keys):
            token = saved.tokens[key]
            state.put_token(key, token["level"], token["at"], token["paused_until"], token)
            for api in APIS:
                due = saved.reports[key][f"op-{i:05d}/{api}"]
                state.put_report(f"op-{i:05d}", api, key, due, (1.0, WALL), Seen(1.0, WALL, month))
        state.flush()
        state.compact()  # as a store is left after a restart: one generation of newest rows
    store = RealStore(state) if state is not None else Store()
    before = written_bytes()
    reservations = Reservations(store)
    reservations.restore(saved.tokens)
    reservations.paced(planner.save(reports=False).tokens)
    heap = [(0.0, 0, key) for key in keys]  # (time, kind 0 take / 1 answer, key)
    heapq.heapify(heap)
    waiting: dict[str, tuple[float, Job, concurrent.futures.Future[None]]] = {}
    answering: dict[str, Job] = {}
    end = minutes * 60
    window, requests, waits = 300.0, 0, 0
    previous = {"requests": 0, "rows": 0, "transactions": 0, "urgent": 0, "written": 0}
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
            if state is not None:
                windows[-1]["written_mb"] = round((written_bytes() - before - previous["written"]) / 1e6, 2)
            print(json.dumps(windows[-1]), file=sys.stderr)
            previous = {
                "requests": requests,
                "rows": store.rows,
                "transactions": store.transactions,
                "urgent": store.urgent_transactions,
                "written": written_bytes() - before if state is not None else 0,
            }
            mark += window
        if kind == 1:
            job = answering.pop(key)
            planner.finished(key, job, None)
            if state is not None:
                due = planner.save((key,)).reports[key][f"{job.operation}/{job.api}"]
                value = float(requests % 100_000)
                seen = Seen(value, WALL + when, utc_month(WALL + when))
                state.put_report(job.operation, job.api, key, due, (value, WALL + when), seen)
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
    result: dict[str, Any] = {
        "tokens": tokens,
        "simulated_minutes": minutes,
        "requests": requests,
        "budget_rows": store.rows,
        "rows_per_request": round(store.rows / max(1, requests), 3),
        "urgent_rows": store.urgent_rows,
        "transactions": store.transactions,
        "urgent_transactions": store.urgent_transactions,
        "waited": waits,
        "windows": windows,
    }
    if state is not None:
        state.stop()
        written = written_bytes() - before
        result["state_store"] = {
            "written_mb_per_minute": round(written / 1e6 / minutes, 3),
            "written_bytes_per_request": round(written / max(1, requests)),
            "turnovers": dict(state.turnovers),
        }
    return result


if __name__ == "__main__":
    main()
