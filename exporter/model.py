"""Values passed between the scheduler and the store: what one upstream request came to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# The pseudo-api of a token_info read (information.php): it takes a turn like any billing api.
TOKEN_INFO = "token_info"  # noqa: S105 (an api name, not a password)


@dataclass(frozen=True)
class FetchResult:
    """The outcome of one request for one (operation, api).

    ``value`` is set on success (a float; a ``client.TokenInfo`` for a token_info read); ``reason``
    (one of ``client.REASONS``) on failure.
    ``finished_at`` is wall-clock time (seconds since the epoch), ``duration`` in seconds.
    """

    operation: str
    api: str
    finished_at: float
    duration: float
    value: Any = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None
