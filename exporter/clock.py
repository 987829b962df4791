"""Noticing steps of the wall clock.

Every schedule, pause, budget and age in the exporter runs on the monotonic clock; the wall clock (Unix
time) is only for what is shown, exported and saved. NTP correcting a clock that was off, a VM resumed
after a pause or an operator's ``date -s`` make the wall clock jump against the monotonic one. ``WallSteps``
notices such a jump (the difference wall - monotonic moving by more than ``SHIFT_SECONDS`` between two
readings), so that the owner of wall times (the store) can move them with the clock: then an exported
timestamp never lies ahead of the exporter's own now, and an age (now - then) stays the monotonic one. A
step of more than ``LOG_SECONDS`` either way is logged once, with its size. Slow slewing is not a step: it
is taken up a second at a time, without a log line.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from exporter.config import format_duration

log = logging.getLogger(__name__)

LOG_SECONDS = 60.0  # a step of more than this is logged (WARNING, one line per step)
SHIFT_SECONDS = 1.0  # a step of more than this moves the wall times held


def about(seconds: float) -> str:
    """A size of time for a log line: to the second under an hour, to the minute above (2d, not
    1d23h59m55s)."""
    unit = 60 if abs(seconds) >= 3600 else 1
    return format_duration(round(seconds / unit) * unit)


class WallSteps:
    """Reads both clocks; thread-safe."""

    def __init__(
        self,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._wall = wall
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._offset = wall() - monotonic()

    def read(self) -> tuple[float, float]:
        """(wall now, step): ``step`` is how far the wall clock moved against the monotonic one since the
        last reading that moved it (positive: forward), when that is more than SHIFT_SECONDS; else 0."""
        with self._lock:
            monotonic, wall = self._monotonic(), self._wall()
            step = (wall - monotonic) - self._offset
            if abs(step) <= SHIFT_SECONDS:
                return wall, 0.0
            self._offset += step
        if abs(step) > LOG_SECONDS:
            log.warning(
                "the wall clock stepped %s by %s (%+.0f s against the monotonic clock): schedules, pauses "
                "and the budget are unaffected; the times shown and exported move with it",
                "forward" if step > 0 else "back",
                about(abs(step)),
                step,
            )
        return wall, step
