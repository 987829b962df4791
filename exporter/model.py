"""Values passed between the scheduler and the store: what one upstream request came to."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FetchResult:
    """The outcome of one request for one (operation, api).

    ``value`` is set on success; ``reason`` (one of ``client.REASONS``) on failure.
    ``finished_at`` is wall-clock time (seconds since the epoch), ``duration`` in seconds.
    """

    operation: str
    api: str
    finished_at: float
    duration: float
    value: float | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None
