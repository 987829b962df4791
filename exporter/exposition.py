"""Prometheus text exposition format (version 0.0.4): escaping, number formatting, metric families.

Only the pieces this exporter needs, kept small so that a full page can be assembled from cached
per-operation fragments without re-rendering every series on each change.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def sample(name: str, labels: dict[str, str], value: float) -> str:
    """One exposition line, newline included. Label order follows the dict."""
    if labels:
        inner = ",".join(f'{key}="{escape_label_value(val)}"' for key, val in labels.items())
        return f"{name}{{{inner}}} {format_value(value)}\n"
    return f"{name} {format_value(value)}\n"


@dataclass(frozen=True)
class Family:
    """A metric family: its sample name, type and HELP text."""

    name: str
    type: str
    help: str

    def header(self) -> bytes:
        return f"# HELP {self.name} {escape_help(self.help)}\n# TYPE {self.name} {self.type}\n".encode()


class GzipWithTail:
    """A gzip member whose large head is compressed once and whose small tail is compressed per call.

    The /metrics page is the operations' samples (large, changes only when a value does) followed by the
    exporter's own and process metrics (small, change every few seconds). The head is deflated once and
    flushed to a byte boundary; each ``with_tail`` continues a copy of that compressor. The result is one
    ordinary gzip member (not two concatenated ones, which some clients read only the first of).
    """

    _HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # deflate, no name, mtime 0, unknown OS

    def __init__(self, head: Iterable[bytes | bytearray], level: int = 6) -> None:
        """``head``: the large part, in pieces (compressed one after the other, never joined)."""
        self._compressor = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
        compressed = [self._HEADER]
        self._crc, self._size = 0, 0
        for piece in head:
            compressed.append(self._compressor.compress(piece))
            self._crc = zlib.crc32(piece, self._crc)
            self._size += len(piece)
        compressed.append(self._compressor.flush(zlib.Z_SYNC_FLUSH))
        self._head = b"".join(compressed)

    def with_tail(self, tail: bytes) -> bytes:
        compressor = self._compressor.copy()
        rest = compressor.compress(tail) + compressor.flush(zlib.Z_FINISH)
        trailer = struct.pack("<II", zlib.crc32(tail, self._crc), (self._size + len(tail)) & 0xFFFFFFFF)
        return b"".join((self._head, rest, trailer))
