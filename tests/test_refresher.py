"""The refresher's cap on young requests: a start-up burst is spread out, hanging upstreams never hold
back healthy ones. A fake client in the refresher's own loop; no network."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from harness import wait_until

from exporter.app import operation_infos
from exporter.config import Config, load_config
from exporter.model import FetchError, FetchResult, Reading
from exporter.planner import SavedPacing
from exporter.refresher import Refresher, plan_jobs, token_key
from exporter.store import Store

ANSWER_SECONDS = 0.05


class FakeClient:
    """Tokens starting with ``hang`` never answer; the others answer after ANSWER_SECONDS."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started: list[tuple[float, str]] = []  # (monotonic time, token) of every request

    async def fetch(self, *, token: Any, **_: Any) -> Reading:
        secret = token.reveal()
        with self.lock:
            self.started.append((time.monotonic(), secret))
        if secret.startswith("hang"):
            await asyncio.Event().wait()
        await asyncio.sleep(ANSWER_SECONDS)
        return Reading(value=1.0, rows=1)

    async def fetch_token_info(self, **_: Any) -> None:
        raise AssertionError("token_info is not configured in these tests")

    async def close(self) -> None:
        pass


def config(tmp_path: Path, tokens: list[str]) -> Config:
    lines = ["refresh_interval: 1h", "operations:"]
    for i, token in enumerate(tokens):
        lines += [f"  - server: op{i}", f"    token: {token}", "    base_url: http://127.0.0.1:9"]
    path = tmp_path / "config.yml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return load_config(path)


def run(
    tmp_path: Path, tokens: list[str], max_young: int, young_seconds: float
) -> tuple[FakeClient, list[FetchResult], Refresher]:
    """A started refresher over ``tokens`` (one operation each) with the fake client; stop() it."""
    client = FakeClient()
    results: list[FetchResult] = []
    refresher = Refresher(
        config(tmp_path, tokens),
        results.append,
        client=client,  # type: ignore[arg-type]  (duck-typed stand-in for WolkvoxClient)
        max_young=max_young,
        young_seconds=young_seconds,
    )
    refresher.start()
    return client, results, refresher


def test_no_more_than_max_young_requests_start_within_young_seconds(tmp_path: Path) -> None:
    tokens = [f"hang-{i}" for i in range(12)]
    client, _, refresher = run(tmp_path, tokens, max_young=3, young_seconds=0.3)
    try:
        # Every hanging request gives its place up after young_seconds: all 12 end up in flight.
        wait_until(lambda: len(client.started) == 12, timeout=10, what="12 hanging requests in flight")
        with client.lock:
            starts = sorted(t for t, _ in client.started)
        # ...but never more than 3 of them started inside any 0.3 s.
        for first, fourth in zip(starts, starts[3:], strict=False):
            assert fourth - first >= 0.3 * 0.9, starts
    finally:
        refresher.stop(timeout=0.5)


def test_hanging_upstreams_do_not_hold_back_healthy_ones(tmp_path: Path) -> None:
    tokens = [f"hang-{i}" for i in range(6)] + [f"ok-{i}" for i in range(6)]
    _, results, refresher = run(tmp_path, tokens, max_young=2, young_seconds=0.2)
    try:
        # Two places for six hanging and six healthy tokens: the healthy ones are all answered anyway.
        wait_until(lambda: len(results) == 6, timeout=10, what="the six healthy answers")
        assert {r.operation for r in results} == {f"op{i}" for i in range(6, 12)}
        assert all(r.ok for r in results)
    finally:
        refresher.stop(timeout=0.5)


def test_timeouts_are_scoped_to_the_wolkvox_server_not_to_a_shared_base_url(tmp_path: Path) -> None:
    # Three operations behind one base URL (a proxy, the simulator): op0 and op1 are different wolkvox
    # servers, op2 is op0's server again with another token.
    path = tmp_path / "config.yml"
    path.write_text(
        "operations:\n"
        + "".join(
            f"  - name: op{i}\n    server: {server}\n    token: t{i}\n    base_url: http://proxy:8080\n"
            for i, server in enumerate(["wv1", "wv2", "wv1"])
        ),
        encoding="utf-8",
    )
    servers = {job.operation: job.server for jobs in plan_jobs(load_config(path)).values() for job in jobs}
    assert servers["op0"] != servers["op1"]  # a hanging wv1 does not pause wv2
    assert servers["op0"] == servers["op2"]  # but pauses every operation on wv1


class RevokedOnTokenInfo:
    """A token that answers its reports until its first token_info read, and is refused (auth) from then."""

    def __init__(self) -> None:
        self.revoked = False

    async def fetch(self, **_: Any) -> Reading:
        if self.revoked:
            raise FetchError("auth", "wolkvox answered code 403: PLEASE VALIDATE TOKEN")
        return Reading(value=1.0, rows=1)

    async def fetch_token_info(self, **_: Any) -> None:
        self.revoked = True
        raise FetchError("auth", "wolkvox answered code 403: PLEASE VALIDATE TOKEN")

    async def close(self) -> None:
        pass


def test_a_token_refused_on_its_token_info_read_fails_its_operations_and_still_probes_its_reports(
    tmp_path: Path,
) -> None:
    path = tmp_path / "config.yml"
    path.write_text(
        "refresh_interval: 0.5s\ntoken_info_interval: 1h\ndaily_request_limit: 10000000\noperations:\n"
        + "".join(
            f"  - server: {name}\n    token: shared\n    base_url: http://127.0.0.1:9\n" for name in "ab"
        ),
        encoding="utf-8",
    )
    loaded = load_config(path)
    store = Store(operation_infos(loaded), max_age=3600)
    results: list[FetchResult] = []

    def record(result: FetchResult) -> None:
        store.record(result)
        results.append(result)

    refresher = Refresher(loaded, record, client=RevokedOnTokenInfo())  # type: ignore[arg-type]
    refresher.start()
    try:
        # The start-up burst: a, b, then token_info, refused: both operations are down at once...
        wait_until(lambda: any(r.api == "token_info" for r in results), timeout=10, what="token_info read")
        assert [(r.operation, r.api, r.reason) for r in results[:3]] == [
            ("a", "stereo_rec", None),
            ("b", "stereo_rec", None),
            ("a", "token_info", "auth"),
        ]
        assert not any(row.api == "stereo_rec" and not row.failing for row in store.report_rows())
        # ...and the pause (one report interval at most) ends with a probe of a report, not token_info.
        wait_until(lambda: len(results) >= 5, timeout=10, what="two probes after the refusal")
        assert {(r.operation, r.api, r.reason) for r in results[3:5]} == {
            ("a", "stereo_rec", "auth"),
            ("b", "stereo_rec", "auth"),
        }
    finally:
        refresher.stop(timeout=0.5)


def test_the_restored_due_times_are_not_kept_once_used(tmp_path: Path) -> None:
    """The due times restored from a state store (140,000 of them at 10,000 operations x 14 services, ~15
    MB) serve the first configure only: nothing keeps them while the refresher runs."""
    loaded = config(tmp_path, ["t0", "t1"])
    keys = [token_key(op.token) for op in loaded.operations]
    saved = SavedPacing(
        tokens={key: {"level": 1.0, "at": time.time(), "paused_until": 0.0} for key in keys},
        reports={key: {f"op{i}/stereo_rec": time.time() + 600} for i, key in enumerate(keys)},
    )
    refresher = Refresher(loaded, lambda result: None, client=FakeClient(), saved=saved)  # type: ignore[arg-type]
    watched = weakref.ref(saved)
    del saved
    refresher.start()
    try:
        gc.collect()
        assert watched() is None, [type(r).__name__ for r in gc.get_referrers(watched())]
    finally:
        refresher.stop(timeout=0.5)
