"""The optional ``state_file``: the last good values, the pacing (each report's next due time, each
token's budget) and the month close (each report's last reading and its last closed month), across restarts.

So a crash-looping exporter neither re-fetches everything, nor spends more than its daily budget, nor
starts with an empty page. Tokens are never written: a token is named by a truncated SHA-256 of it
(``secret.token_key``). The file is JSON, replaced atomically (write to a temporary file, then rename).
Version 1 files (values and each token's last use) are still read: their values are kept. The
``month_close`` section is optional (version 2 files written before it existed have none, and an older
exporter reading a newer file ignores it); entries are ``[value, fetched at, "YYYY-MM" or null]``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporter.monthclose import SavedMonths, Seen
from exporter.planner import SavedPacing

log = logging.getLogger(__name__)

VERSION = 2
Values = dict[str, dict[str, tuple[float, float]]]
Snapshot = tuple[Values, SavedPacing] | tuple[Values, SavedPacing, SavedMonths]
_MONTH_RE = re.compile(r"\d{4}-(0[1-9]|1[0-2])")


@dataclass
class SavedState:
    values: Values = field(default_factory=dict)
    pacing: SavedPacing = field(default_factory=SavedPacing)
    months: SavedMonths = field(default_factory=SavedMonths)


class StateFile:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._last_written: bytes | None = None

    def load(self) -> SavedState | None:
        """The saved state, or None if there is none or it cannot be used (logged, never fatal)."""
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, RecursionError) as error:
            log.warning("state_file %s: ignored, cannot read it: %s", self.path, type(error).__name__)
            return None
        try:
            return _parse(raw)
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as error:
            log.warning("state_file %s: ignored, unexpected content: %s", self.path, error)
            return None

    def save(self, values: Values, pacing: SavedPacing, months: SavedMonths | None = None) -> None:
        document: dict[str, Any] = {
            "version": VERSION,
            "values": {op: {api: list(pair) for api, pair in apis.items()} for op, apis in values.items()},
            "pacing": {"tokens": pacing.tokens, "reports": pacing.reports},
        }
        if months is not None:
            document["month_close"] = {"seen": _dump(months.seen), "closed": _dump(months.closed)}
        data = json.dumps(document, sort_keys=True).encode()
        if data == self._last_written:
            return
        tmp: str | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".state-", suffix=".tmp")
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
            tmp = None
            self._last_written = data
        except OSError as error:
            log.warning("state_file %s: cannot write it: %s", self.path, error.strerror or error)
        finally:
            if tmp is not None:  # the rename did not happen: leave no temporary file behind
                with contextlib.suppress(OSError):
                    os.unlink(tmp)


def _parse(raw: Any) -> SavedState:
    if not isinstance(raw, dict) or raw.get("version") not in (1, VERSION):
        raise ValueError(f"not a version 1 or {VERSION} state file")
    values: Values = {}
    for op, apis in raw["values"].items():
        values[str(op)] = {str(api): (float(pair[0]), float(pair[1])) for api, pair in apis.items()}
    pacing = SavedPacing()
    if raw["version"] == VERSION:
        for section, target in (("tokens", pacing.tokens), ("reports", pacing.reports)):
            for key, entries in raw["pacing"][section].items():
                target[str(key)] = {str(name): float(when) for name, when in entries.items()}
    months = SavedMonths()
    month_close = raw.get("month_close")
    if month_close is not None:
        months.seen = _load(month_close["seen"], closed=False)
        months.closed = _load(month_close["closed"], closed=True)
    return SavedState(values=values, pacing=pacing, months=months)


def _dump(per_operation: dict[str, dict[str, Seen]]) -> dict[str, dict[str, list[Any]]]:
    return {
        op: {api: [seen.value, seen.at, seen.month] for api, seen in apis.items()}
        for op, apis in per_operation.items()
    }


def _load(raw: Any, *, closed: bool) -> dict[str, dict[str, Seen]]:
    """Entries ``[value, at, month]``; a closed month must name its month."""
    loaded: dict[str, dict[str, Seen]] = {}
    for op, apis in raw.items():
        entries: dict[str, Seen] = {}
        for api, (value, at, month) in apis.items():
            if month is None and closed:
                raise ValueError(f"month_close: {op}/{api}: a closed month without its month")
            if month is not None and not (isinstance(month, str) and _MONTH_RE.fullmatch(month)):
                raise ValueError(f"month_close: {op}/{api}: month {month!r} is not YYYY-MM")
            entries[str(api)] = Seen(float(value), float(at), month)
        loaded[str(op)] = entries
    return loaded


class StateSaver:
    """Saves the state every ``interval`` seconds (only when it changed) until stopped."""

    def __init__(
        self,
        state_file: StateFile,
        snapshot: Callable[[], Snapshot],
        interval: float = 1.0,
    ) -> None:
        self._state_file = state_file
        self._snapshot = snapshot
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="state-saver", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._state_file.save(*self._snapshot())

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._state_file.save(*self._snapshot())
