"""The training loop's progress on the console: tqdm's bar on a terminal; in a file (a batch job's
log, where each redraw of a bar stays as a line) a plain line every ``every_s`` seconds instead.

Whether stderr, where tqdm draws, is a terminal decides.
"""
from __future__ import annotations

import math
import sys
import time
from typing import IO, Any

from tqdm import tqdm

PLAIN_LINE_EVERY_S = 30.0  # a day-long job's log: ~3,000 lines


def duration(seconds: float) -> str:
    """ETA text: 45s, 12m05s, 3h07m."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Steps done of ``total``, and the latest metrics (rank 0: ``shown``)."""

    def __init__(self, total: int, initial: int, shown: bool, every_s: float = PLAIN_LINE_EVERY_S,
                 terminal: IO[str] | None = None) -> None:
        terminal = terminal or sys.stderr
        self.total, self.every_s = total, every_s
        self.plain = shown and not terminal.isatty()
        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", disable=not shown or self.plain,
                        dynamic_ncols=True, file=terminal)
        self._first_step, self._start, self._last_line = initial, time.monotonic(), -math.inf

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.close()

    def update(self) -> None:
        self.bar.update(1)

    def status(self, step: int, text: str) -> None:
        """After a logged step: the bar's postfix, or a plain line when one is due (and at the last step)."""
        if not self.plain:
            self.bar.set_postfix_str(text)
            return
        now = time.monotonic()
        if now - self._last_line < self.every_s and step < self.total:
            return
        self._last_line = now
        per_step = (now - self._start) / max(1, step - self._first_step)
        print(f"train: step {step}/{self.total} | {text} | eta {duration(per_step * (self.total - step))}", flush=True)

    def write(self, text: str) -> None:
        """A line of its own (stdout), the bar redrawn under it."""
        self.bar.write(text)
