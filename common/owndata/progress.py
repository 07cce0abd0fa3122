"""Progress of a long command: a bar with images/s and an ETA on a terminal, plain periodic lines in a log."""

from __future__ import annotations

import logging
import sys
import time

from common.logger import ProgressBar

log = logging.getLogger("convnets")


class Progress:
    """``update(done)`` as work completes; draws the bar on a terminal, else logs a line every ``every`` seconds."""

    def __init__(self, total: int, what: str, every: float = 10.0):
        self.total, self.what, self.every = total, what, every
        self.bar = ProgressBar(total, what, enabled=True)
        self.start = self.last = time.monotonic()
        self.done = 0

    def rate(self) -> float:
        return self.done / max(1e-9, time.monotonic() - self.start)

    def update(self, done: int) -> None:
        self.done = done
        now = time.monotonic()
        rate = self.rate()
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        text = f"{rate:.1f} images/s, ETA {eta:.0f} s" if eta != float("inf") else ""
        if self.bar.enabled:
            self.bar.update(done, text)
        elif now - self.last >= self.every:
            self.last = now
            log.info("%s: %d/%d (%s)", self.what, done, self.total, text)

    def close(self) -> None:
        self.bar.close()
        elapsed = time.monotonic() - self.start
        if self.total:
            log.info("%s: %d images in %.1f s (%.1f images/s)", self.what, self.done, elapsed, self.rate())
        sys.stdout.flush()
