"""Output: progress bars on a terminal, aligned tables, JSON."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

__all__ = ["ProgressBar", "print_json", "table"]


class ProgressBar:
    """Draws ``stage  [#####.....]  done/total`` (or a running count when the total is
    unknown) on ``stream``, redrawn at most ten times a second; silent unless the stream is a
    terminal, so that logs and pipes get only the result."""

    WIDTH = 30

    def __init__(self, stream: TextIO | None = None, *, enabled: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self._stage = ""
        self._drawn = 0.0
        self._line = ""

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        """Report progress (the :data:`idempay.operations.Progress` signature)."""
        if not self.enabled:
            return
        now = time.monotonic()
        finished = total is not None and done >= total
        if stage == self._stage and now - self._drawn < 0.1 and not finished:
            return
        if stage != self._stage and self._line:
            self.stream.write("\n")
        self._stage, self._drawn = stage, now
        if total:
            filled = self.WIDTH * min(done, total) // total
            bar = "#" * filled + "." * (self.WIDTH - filled)
            self._line = f"{stage:<10} [{bar}] {done}/{total}"
        else:
            self._line = f"{stage:<10} {done}"
        self.stream.write("\r" + self._line)
        self.stream.flush()

    def close(self) -> None:
        """End the last line."""
        if self.enabled and self._line:
            self.stream.write("\n")
            self.stream.flush()
            self._line = ""


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Rows aligned under their headers, one line each."""
    cells = [[str(h) for h in headers], *[["-" if v is None else str(v) for v in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines) + "\n"


def print_json(document: Any, stream: TextIO | None = None) -> None:
    """Write ``document`` as indented JSON."""
    (stream or sys.stdout).write(json.dumps(document, indent=2, sort_keys=False) + "\n")
