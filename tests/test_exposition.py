"""exporter/exposition.py: escaping, numbers, family headers and the gzip member with a tail, checked
against prometheus_client's own parser and Python's gzip reader."""

from __future__ import annotations

import gzip
import math
import zlib

import pytest
from prometheus_client.parser import text_string_to_metric_families

from exporter.exposition import Family, GzipWithTail, escape_help, escape_label_value, format_value, sample


def parsed(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples
    ]


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        ("plain", "plain"),
        ('say "hi"', 'say \\"hi\\"'),
        ("back\\slash", "back\\\\slash"),
        ("two\nlines", "two\\nlines"),
        ('\\n is not a newline"', '\\\\n is not a newline\\"'),
        ("São Paulo ñandú", "São Paulo ñandú"),
    ],
)
def test_label_values_are_escaped_and_read_back_whole(raw: str, escaped: str) -> None:
    assert escape_label_value(raw) == escaped
    line = sample("wolkvox_up", {"operation": raw}, 1)
    assert line == f'wolkvox_up{{operation="{escaped}"}} 1\n'
    assert parsed(line) == [("wolkvox_up", {"operation": raw}, 1.0)]


def test_help_escapes_backslash_and_newline_but_not_quotes() -> None:
    assert escape_help('a "quoted" back\\slash\nnext') == 'a "quoted" back\\\\slash\\nnext'


def test_family_header_is_help_then_type() -> None:
    family = Family("wolkvox_x_total", "counter", "Counts x.\nSecond line \\ here.")
    header = family.header().decode()
    assert header == (
        "# HELP wolkvox_x_total Counts x.\\nSecond line \\\\ here.\n# TYPE wolkvox_x_total counter\n"
    )
    (read,) = text_string_to_metric_families(header + "wolkvox_x_total 3\n")
    assert (read.name, read.type, read.documentation) == ("wolkvox_x", "counter", family.help)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0"),
        (7, "7"),
        (-3, "-3"),
        (1234.0, "1234"),
        (1234.5, "1234.5"),
        (0.1, "0.1"),
        (1e15, "1000000000000000.0"),
        (1e20, "1e+20"),
        (1_800_000_000.25, "1800000000.25"),
        (math.inf, "+Inf"),
        (-math.inf, "-Inf"),
        (math.nan, "NaN"),
    ],
)
def test_numbers_are_written_as_the_format_reads_them(value: float, text: str) -> None:
    assert format_value(value) == text
    (read,) = parsed(f"m {text}\n")
    assert read[2] == value or (math.isnan(value) and math.isnan(read[2]))


def test_labels_keep_their_order_and_no_labels_means_no_braces() -> None:
    assert sample("m", {"b": "1", "a": "2"}, 1) == 'm{b="1",a="2"} 1\n'
    assert sample("m", {}, 2.5) == "m 2.5\n"


def one_member(data: bytes) -> bytes:
    """The content of ``data``, which must be exactly one complete gzip member."""
    reader = zlib.decompressobj(16 + zlib.MAX_WBITS)
    content = reader.decompress(data)
    assert reader.eof, "the gzip member is not complete"
    assert reader.unused_data == b"", "more than one gzip member (some clients read only the first)"
    return content


def test_gzip_with_tail_is_one_member_of_head_then_tail_for_every_tail() -> None:
    head = [b"# HELP a x\n", bytearray(b"a 1\n" * 5000), b"", b"b 2\n"]
    joined = b"".join(head)
    page = GzipWithTail(head)
    for tail in (b"", b"tail 1\n", b"tail 2\n" * 1000):
        data = page.with_tail(tail)
        assert one_member(data) == joined + tail
        assert gzip.decompress(data) == joined + tail  # CRC and size in the trailer are checked here
    # A tail never changes the compressed head: the second call starts from the same copy.
    assert page.with_tail(b"x\n") == page.with_tail(b"x\n")


def test_gzip_with_an_empty_head() -> None:
    assert one_member(GzipWithTail([]).with_tail(b"only the tail\n")) == b"only the tail\n"
