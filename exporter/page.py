"""The /metrics page: rendered from the state once per change, by a thread of its own, and served as
bytes that already exist.

``Pages.render`` re-renders the operations that changed (their lines are cached per family), joins the
cached lines family by family, compresses that once, and appends the small tail (the exporter's own and
the process metrics) by continuing a copy of the compressor. It swaps in a new immutable
``RenderedPage``: a scrape reads ``Pages.page`` and never sees half an update or waits for upstream.
``Publisher`` calls it when the state changed (at most once a second) and at least every 5 s.
"""

from __future__ import annotations

import gzip
import logging
import threading
import time
from dataclasses import dataclass

from prometheus_client import REGISTRY, generate_latest

from exporter.exposition import GzipWithTail
from exporter.families import OPERATION_FAMILIES, lines_by_family, render_global, render_operation
from exporter.memory import Trimmer
from exporter.store import Store

log = logging.getLogger(__name__)

YIELD_EVERY = (
    100  # operations read back between two hand-overs of the GIL (well under the 5 ms switch interval)
)


@dataclass(frozen=True)
class RenderedPage:
    """One immutable /metrics page, kept gzip-compressed only: Prometheus always asks for gzip, and the
    plain text (~10 MB at 10,000 operations) is decompressed on demand for the rare client that does not."""

    gzipped: bytes
    rendered_at: float

    @property
    def plain(self) -> bytes:
        return gzip.decompress(self.gzipped)


class Pages:
    """The latest page of one store. ``render`` runs on one thread at a time (the publisher's)."""

    def __init__(self, store: Store, *, include_process_metrics: bool = True) -> None:
        self._store = store
        self._include_process_metrics = include_process_metrics
        self._rendered: dict[str, bytes] = {}  # per operation: render_operation's lines
        self._head: GzipWithTail | None = None  # the operations' part, compressed
        self.rebuilds = 0  # how many times the operations' part was rendered again
        self.page = RenderedPage(gzip.compress(b"", mtime=0), 0.0)
        self.render()

    def render(self) -> RenderedPage:
        """Re-render what changed and swap in a new page. The operations' part is compressed again only
        when an operation changed; the exporter's own lines and the process metrics every time."""
        changes = self._store.changes(render_operation)
        changed = bool(changes.rendered) or changes.removed or self._head is None
        if changed:
            rendered = {
                name: changes.rendered.get(name) or self._rendered.get(name, b"") for name in changes.order
            }
            self._rendered = rendered
            # Operation by operation, each cached entry read back once, its lines appended to their
            # family's buffer (~8 MB in all at 10,000 operations, above the mmap threshold: freed, it
            # goes back to the OS); then the families are compressed one after the other.
            families = [bytearray() for _ in OPERATION_FAMILIES]
            for count, lines in enumerate(rendered.values(), start=1):
                if lines:
                    for buffer, family_lines in zip(families, lines_by_family(lines), strict=True):
                        buffer += family_lines
                if count % YIELD_EVERY == 0:
                    # Hand the GIL to the serving thread now and then: it would otherwise wait up to
                    # the 5 ms switch interval for it, on every send of every scrape during a render.
                    time.sleep(0)
            self._head = GzipWithTail(
                part
                for entry, buffer in zip(OPERATION_FAMILIES, families, strict=True)
                if buffer  # no samples: no header either
                for part in (entry.family.header(), buffer)
            )
            del families
            self.rebuilds += 1
        tail = render_global(changes.facts)
        if self._include_process_metrics:
            tail += generate_latest(REGISTRY)
        assert self._head is not None
        page = RenderedPage(self._head.with_tail(tail), changes.now)
        self.page = page
        return page


class Publisher:
    """A thread that re-renders the page when the store changed (at most every ``min_interval``)
    and at least every ``max_interval`` (so process metrics and expiries stay current)."""

    def __init__(
        self, pages: Pages, store: Store, *, min_interval: float = 1.0, max_interval: float = 5.0
    ) -> None:
        self._pages = pages
        self._store = store
        self._min_interval = min_interval
        self._max_interval = max_interval
        self._stop = threading.Event()
        self._trimmer = Trimmer()
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._store.changed.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._store.changed.wait(timeout=self._max_interval)
            if self._stop.is_set():
                return
            self._store.changed.clear()
            rebuilds = self._pages.rebuilds
            try:
                self._pages.render()
            except Exception:  # never let a rendering bug stop the page from being served
                log.exception("rendering /metrics failed; serving the previous page")
            if self._pages.rebuilds != rebuilds:
                self._trimmer.after_burst()  # the previous operations' part and its buffers were freed
            # Coalesce bursts of results (thousands at start-up) into one render per interval.
            self._stop.wait(self._min_interval)
