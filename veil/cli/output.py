"""CLI output: aligned tables and key/value blocks for humans, one JSON document for scripts,
and a progress bar on stderr for bulk work."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO


def emit_json(document: Any, stream: TextIO | None = None) -> None:
    """Print one JSON document."""
    print(json.dumps(document, indent=2, sort_keys=True), file=stream or sys.stdout)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], stream: TextIO | None = None) -> None:
    """Print rows under headers, columns padded to their widest cell."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    out = stream or sys.stdout
    for index, row in enumerate(cells):
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip(), file=out
        )
        if index == 0:
            print("  ".join("-" * width for width in widths), file=out)


def fields(pairs: Mapping[str, object], stream: TextIO | None = None) -> None:
    """Print "key: value" lines with the values aligned."""
    width = max((len(k) for k in pairs), default=0)
    for key, value in pairs.items():
        print(f"{key.rjust(width)}: {value}", file=stream or sys.stdout)


class Progress:
    """A one-line progress bar on stderr: `[#####-----]  50/100  12.3/s`."""

    def __init__(self, total: int, label: str = "", stream: TextIO | None = None, width: int = 30) -> None:
        self.total = max(total, 0)
        self.done = 0
        self.label = label
        self._stream = stream or sys.stderr
        self._width = width
        self._started = time.monotonic()
        self._last_draw = 0.0

    def advance(self, count: int = 1) -> None:
        """Record `count` more items and redraw (at most ten times a second, and at the end)."""
        self.done += count
        now = time.monotonic()
        if self.done >= self.total or now - self._last_draw >= 0.1:
            self._last_draw = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        fraction = self.done / self.total if self.total else 1.0
        filled = int(fraction * self._width)
        rate = self.done / max(now - self._started, 1e-9)
        bar = "#" * filled + "-" * (self._width - filled)
        prefix = f"{self.label} " if self.label else ""
        self._stream.write(f"\r{prefix}[{bar}] {self.done}/{self.total} {rate:.1f}/s")
        self._stream.flush()

    def finish(self) -> None:
        """Draw the final state and end the line."""
        self._draw(time.monotonic())
        self._stream.write("\n")
        self._stream.flush()
