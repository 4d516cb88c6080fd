"""Progress lines for long stages: `embed: 12,000/35,331 rows (34%), 150 rows/s, ETA 0:02:35`, at most one
per period and one at the end, through the stage's logger (the command line decides where they go)."""

from __future__ import annotations

import logging
import time


class Progress:
    def __init__(self, log: logging.Logger, what: str, total: int | None, unit: str = "rows", every_s: float = 10.0):
        self.log, self.what, self.total, self.unit, self.every_s = log, what, total, unit, every_s
        self.done = self.logged = 0
        self.start = self.last = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last, self.logged = now, self.done
            self.log.info(self.line(now))

    def finish(self) -> None:
        """The end line, unless the last periodic line already said the same count."""
        if self.done != self.logged or self.done == 0:
            self.log.info(self.line(time.perf_counter()))

    def line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        if not self.total:
            return f"{self.what}: {self.done:,} {self.unit}, {rate:,.0f} {self.unit}/s, {elapsed:.0f} s"
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta != float("inf") else "?"
        return (f"{self.what}: {self.done:,}/{self.total:,} {self.unit} ({100 * self.done / self.total:.0f}%), "
                f"{rate:,.0f} {self.unit}/s, ETA {eta_text}")
