"""Wall-clock steps: exporter/clock.py on a fake clock, and once end to end, a real exporter restarted
from a state saved while its clock was two days ahead (the planner's and the store's own fake-clock
tests are in test_planner.py and test_store.py)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import Exporter, Simulator, value, wait_until

from exporter.clock import WallSteps
from exporter.refresher import token_key
from exporter.secret import Secret


class Clocks:
    def __init__(self) -> None:
        self.mono = 100.0
        self.wall = 1.8e9

    def steps(self) -> WallSteps:
        return WallSteps(lambda: self.wall, lambda: self.mono)


def test_a_step_is_reported_once_with_its_size_and_direction(caplog: pytest.LogCaptureFixture) -> None:
    clocks = Clocks()
    steps = clocks.steps()
    caplog.set_level(logging.INFO, logger="exporter.clock")
    clocks.mono += 10
    clocks.wall += 10
    assert steps.read() == (clocks.wall, 0.0)
    clocks.wall -= 90_000  # 25 hours back
    assert steps.read() == (clocks.wall, -90_000)
    assert steps.read() == (clocks.wall, 0.0)  # the same step is not reported twice
    clocks.wall += 120
    assert steps.read()[1] == 120
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and all(r.levelname == "WARNING" for r in caplog.records)
    assert messages[0].startswith("the wall clock stepped back by 1d1h (-90000 s")
    assert messages[1].startswith("the wall clock stepped forward by 2m (+120 s")


def test_slewing_is_taken_up_a_second_at_a_time_without_a_line(caplog: pytest.LogCaptureFixture) -> None:
    clocks = Clocks()
    steps = clocks.steps()
    caplog.set_level(logging.INFO, logger="exporter.clock")
    moved = 0.0
    for _ in range(3000):
        clocks.mono += 1
        clocks.wall += 1.0005  # 500 ppm, the kernel's fastest slew
        moved += steps.read()[1]
    assert moved == pytest.approx(1.5, abs=1.0)  # the 1.5 s of drift, in steps of about a second
    assert caplog.records == []


# ----- end to end: a restart after the clock was two days ahead --------------------------------------


def test_a_restart_from_a_state_saved_two_days_ahead_fetches_is_ready_and_says_so(
    simulator: Simulator, start_exporter: Callable[..., Exporter], tmp_path: Path
) -> None:
    # Written as the exporter wrote it while its clock ran two days ahead: "main" with a value and a
    # TOKEN LIMIT pause of an hour, "other" with only a pause (so only its fetch makes the exporter ready).
    ahead = time.time() + 2 * 86_400
    keys = {name: token_key(Secret(f"tok-clock-{name}")) for name in ("main", "other")}
    state = tmp_path / "state.json"
    state.write_text(
        json.dumps(
            {
                "version": 2,
                "values": {"main": {"stereo_rec": [41.0, ahead - 5]}},
                "pacing": {
                    "tokens": {
                        key: {"level": 1.0, "at": ahead, "paused_until": ahead + 3_600}
                        for key in keys.values()
                    },
                    "reports": {key: {f"{name}/stereo_rec": ahead} for name, key in keys.items()},
                },
            }
        ),
        encoding="utf-8",
    )
    exporter = start_exporter(
        {
            "refresh_interval": "250ms",  # a token_limit pause is capped at 12 intervals: 3 s
            "max_age": "1h",
            "daily_request_limit": 1_000_000,  # enough for every 250 ms: no stretch
            "state_file": str(state),
            "operations": [
                {"name": name, "server": f"wv{i}", "token": f"tok-clock-{name}", "base_url": simulator.url}
                for i, name in enumerate(keys)
            ],
        }
    )
    first = exporter.samples()
    last_success = value(first, "wolkvox_last_success_timestamp_seconds", operation="main")
    assert last_success is not None and last_success <= time.time()  # restored as of now, not 2 days on
    wait_until(lambda: exporter.get("/-/ready").status_code == 200, timeout=20, what="ready")
    stats = simulator.stats()["tokens"]
    assert all(stats.get(f"tok-clock-{name}", {}).get("requests", 0) >= 1 for name in keys), stats
    log = exporter.process.log() if exporter.process is not None else ""
    capped = [line for line in log.splitlines() if "restored pacing capped" in line]
    assert len(capped) == 1 and "level=warn" in capped[0], capped
    assert "2 token state(s) saved ahead of this clock" in capped[0]
    assert "2 pause(s) longer than their rule allows" in capped[0]
    assert "restored value(s) lay up to 2d ahead" in log
