"""exporter/page.py: the /metrics page rendered once per change (``Pages``) and the thread that drives it
(``Publisher``), on a store with a fake clock and no process metrics."""

from __future__ import annotations

import gzip
import logging
import threading
from collections.abc import Iterable

import pytest
from harness import parse_samples, value, wait_until

import exporter.page
from exporter import memory
from exporter.model import FetchResult, Reading
from exporter.page import Pages, Publisher
from exporter.store import OperationInfo, Store

AT = 1_800_000_000.0


class Clock:
    def __init__(self, now: float = AT) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def ok(op: str, minutes: float, at: float = AT) -> FetchResult:
    return FetchResult(
        operation=op, api="stereo_rec", finished_at=at, duration=0.25, value=Reading(minutes, 1)
    )


def paged(*names: str, clock: Clock | None = None) -> tuple[Store, Pages]:
    store = Store([OperationInfo(name) for name in names], max_age=3600, wall=clock or Clock())
    return store, Pages(store, include_process_metrics=False)


def operations_on(pages: Pages) -> set[str]:
    return {
        labels["operation"]
        for (_, frozen) in parse_samples(pages.page.plain.decode())
        for labels in [dict(frozen)]
        if "operation" in labels
    }


def test_a_removed_operation_leaves_the_page() -> None:
    store, pages = paged("bogota", "quito")
    store.record(ok("quito", 5))
    pages.render()
    assert operations_on(pages) == {"bogota", "quito"}
    store.reconfigure([OperationInfo("bogota")], max_age=3600)
    pages.render()
    assert operations_on(pages) == {"bogota"}
    # The last one too: nothing is left to re-render, yet the page must drop it.
    store.reconfigure([], max_age=3600)
    pages.render()
    assert operations_on(pages) == set()
    assert b"wolkvox_exporter_build_info" in pages.page.plain  # the exporter's own lines stay


def test_the_page_follows_the_configured_order_and_each_family_is_headed_once() -> None:
    store, pages = paged("zeta", "alpha")
    store.record(ok("zeta", 1))
    store.record(ok("alpha", 2))
    text = pages.render().plain.decode()
    minutes = [line for line in text.splitlines() if line.startswith("wolkvox_stereo_rec_minutes{")]
    assert minutes == [
        'wolkvox_stereo_rec_minutes{operation="zeta"} 1',
        'wolkvox_stereo_rec_minutes{operation="alpha"} 2',
    ]
    assert text.count("# HELP wolkvox_up ") == 1 and text.count("# TYPE wolkvox_up ") == 1
    # No operation has a budget: no samples, so no header either.
    assert "wolkvox_stereo_rec_budget_minutes" not in text


def test_an_unchanged_state_is_not_compressed_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Idle CPU stays near zero: a render with nothing new compresses only the small tail."""
    heads: list[int] = []

    class Counting(exporter.page.GzipWithTail):
        def __init__(self, head: Iterable[bytes | bytearray], level: int = 6) -> None:
            heads.append(1)
            super().__init__(head, level)

    monkeypatch.setattr(exporter.page, "GzipWithTail", Counting)
    clock = Clock()
    store, pages = paged("bogota", clock=clock)
    store.record(ok("bogota", 1))
    first = pages.render()
    compressed = len(heads)
    clock.now += 1
    second = pages.render()
    assert len(heads) == compressed  # nothing changed: the operations' part was reused
    operations_part = gzip.decompress(first.gzipped).split(b"# HELP wolkvox_exporter_build_info")[0]
    assert gzip.decompress(second.gzipped).startswith(operations_part)
    assert second.rendered_at == clock.now
    store.record(ok("bogota", 2))
    pages.render()
    assert len(heads) == compressed + 1


def test_the_publisher_renders_a_change_and_survives_a_failing_render(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store, pages = paged("bogota")
    publisher = Publisher(pages, store, min_interval=0.01, max_interval=0.05)
    real_render = pages.render
    broken = threading.Event()

    def render() -> exporter.page.RenderedPage:
        if broken.is_set():
            raise RuntimeError("boom")
        return real_render()

    monkeypatch.setattr(pages, "render", render)
    publisher.start()
    try:
        store.record(ok("bogota", 42))
        wait_until(
            lambda: (
                value(
                    parse_samples(pages.page.plain.decode()), "wolkvox_stereo_rec_minutes", operation="bogota"
                )
                == 42
            ),
            what="the publisher to render the new value",
        )
        with caplog.at_level(logging.ERROR, logger="exporter.page"):
            broken.set()
            store.record(ok("bogota", 43))
            wait_until(
                lambda: "rendering /metrics failed" in caplog.text, what="the failed render to be logged"
            )
        served = pages.page
        assert b"} 42\n" in served.plain  # the previous page is still served
        broken.clear()
        wait_until(lambda: b"} 43\n" in pages.page.plain, what="the publisher to recover")
    finally:
        publisher.stop()
    assert not publisher._thread.is_alive()


def test_the_page_gives_memory_back_at_most_every_ten_seconds() -> None:
    clock = Clock(0.0)
    trimmer = memory.Trimmer(clock)
    available = memory._LIBC is not None  # glibc: Debian, CI
    assert trimmer.after_burst() is available
    clock.now = 9.9
    assert trimmer.after_burst() is False
    clock.now = 10.0
    assert trimmer.after_burst() is available
