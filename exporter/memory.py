"""How the process uses glibc's allocator: memory freed after a burst goes back to the OS.

At 10,000 operations the start-up burst (10,000 answers, the page rendered again and again) frees tens
of megabytes in pieces; glibc keeps such memory for reuse unless told otherwise, and the exporter's
resident memory would stay at its peak. No-op where glibc is not the allocator.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable

M_MMAP_THRESHOLD = -3  # glibc mallopt parameters
M_ARENA_MAX = -8
TRIM_EVERY_SECONDS = 10.0


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def tune_malloc() -> None:
    """Call before any thread starts. Serve big buffers (the page before compression: ~8 MB at 10,000
    operations) from mmap, so freeing one gives the memory back to the OS: glibc otherwise raises its
    mmap threshold after the first such free, and every later page grows the heap instead. And keep one
    malloc arena: glibc gives each thread that allocates an arena of its own, and the serving, refresher
    and publisher threads would each keep a partly used one. Python
    allocates under the GIL, so the threads take turns anyway."""
    if _LIBC is None:
        return
    try:
        # 1 MiB: above asyncio's 256 KiB read buffer (allocated per socket read), below the page.
        _LIBC.mallopt(M_MMAP_THRESHOLD, 1024 * 1024)
        _LIBC.mallopt(M_ARENA_MAX, 1)
    except AttributeError:
        pass


class Trimmer:
    """Gives the free pages inside the heap back to the OS (``malloc_trim``), at most every
    ``TRIM_EVERY_SECONDS``: a call walks the whole heap (without the GIL), so not after every render."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last = -TRIM_EVERY_SECONDS

    def after_burst(self) -> bool:
        """Call after freeing much memory; True if it trimmed."""
        now = self._clock()
        if _LIBC is None or now - self._last < TRIM_EVERY_SECONDS:
            return False
        self._last = now
        try:
            _LIBC.malloc_trim(0)
        except AttributeError:
            return False
        return True
