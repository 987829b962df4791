"""The optional ``state_file``: the last good values and the pacing (each report's next due time, each
token's budget), across restarts.

So a crash-looping exporter neither re-fetches everything, nor spends more than its daily budget, nor
starts with an empty page. Tokens are never written: a token is named by a truncated SHA-256 of it
(``refresher.token_key``). The file is JSON, replaced atomically (write to a temporary file, then rename).
Version 1 files (values and each token's last use) are still read: their values are kept.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporter.planner import SavedPacing

log = logging.getLogger(__name__)

VERSION = 2
Values = dict[str, dict[str, tuple[float, float]]]


@dataclass
class SavedState:
    values: Values = field(default_factory=dict)
    pacing: SavedPacing = field(default_factory=SavedPacing)


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

    def save(self, values: Values, pacing: SavedPacing) -> None:
        document = {
            "version": VERSION,
            "values": {op: {api: list(pair) for api, pair in apis.items()} for op, apis in values.items()},
            "pacing": {"tokens": pacing.tokens, "reports": pacing.reports},
        }
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
    return SavedState(values=values, pacing=pacing)


class StateSaver:
    """Saves the state every ``interval`` seconds (only when it changed) until stopped."""

    def __init__(
        self,
        state_file: StateFile,
        snapshot: Callable[[], tuple[Values, SavedPacing]],
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
