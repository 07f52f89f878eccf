"""Progress lines for logs: `xc-prep shard` and `validate` under Slurm, nohup or Kubernetes.

A terminal gets tqdm's bars; when stderr is not a terminal, bars would be carriage-return noise in a
log file, so `ProgressLines` prints one plain line every few seconds instead:

    xc-prep shard: 1,234/10,000 samples (12.3%) | 41.2 samples/s | ETA 3m33s

The rate is measured over the last minute, so work an earlier run finished (counted at once when a
resumed run starts) does not inflate it for long.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable
from typing import TextIO

LINE_EVERY_S = 5.0
RATE_WINDOW_S = 60.0


def format_duration(seconds: float) -> str:
    """3725 -> '1h02m', 213 -> '3m33s', 9.4 -> '9s'."""
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class ProgressLines:
    """`done/total unit (pct) | rate | ETA` on `stream` every `every_s` seconds while work goes on,
    and a last line at `close()` if any was printed."""

    def __init__(
        self,
        label: str,
        total: int,
        unit: str,
        *,
        every_s: float | None = None,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.label, self.total, self.unit = label, total, unit
        self.every_s = LINE_EVERY_S if every_s is None else every_s
        self.stream = stream or sys.stderr
        self.clock = clock
        self.done = 0
        self.started = self._last_line = clock()
        self.printed = 0
        self._history: deque[tuple[float, int]] = deque([(self.started, 0)])

    def set(self, done: int) -> None:
        """Report the count so far; prints when `every_s` has passed since the last line."""
        self.done = done
        now = self.clock()
        self._history.append((now, done))
        while len(self._history) > 2 and self._history[1][0] <= now - RATE_WINDOW_S:
            self._history.popleft()
        if now - self._last_line >= self.every_s:
            self._last_line = now
            self._print(now)

    def add(self, n: int) -> None:
        self.set(self.done + n)

    def line(self, now: float) -> str:
        then, done_then = self._history[0]
        rate = (self.done - done_then) / (now - then) if now > then else 0.0
        pct = 100.0 * self.done / self.total if self.total else 100.0
        text = (
            f"{self.label}: {self.done:,}/{self.total:,} {self.unit} ({pct:.1f}%) | {rate:,.1f} {self.unit}/s"
        )
        if self.done < self.total:
            text += f" | ETA {format_duration((self.total - self.done) / rate)}" if rate > 0 else " | ETA ?"
        else:
            text += f" | done in {format_duration(now - self.started)}"
        return text

    def _print(self, now: float) -> None:
        print(self.line(now), file=self.stream, flush=True)
        self.printed += 1

    def close(self) -> None:
        if self.printed:
            self._print(self.clock())
