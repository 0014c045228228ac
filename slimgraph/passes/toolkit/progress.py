"""Progress lines for long per-layer work (sensitivity searches, training), through logging.

Quiet for work that finishes within ``after_s``; past that, one INFO line on the ``slimgraph``
logger at most every ``every_s`` (the CLI prints them as ``slimgraph:   ...`` lines on stderr;
``-q`` hides them), and a last line when the work ends, so a person at the terminal sees which
layer a pass is on instead of minutes of silence.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("slimgraph")


class Progress:
    def __init__(self, what: str, total: int | None = None, *, after_s: float = 3.0,
                 every_s: float = 5.0, clock=time.monotonic) -> None:
        self.what, self.total, self.after_s, self.every_s, self.clock = what, total, after_s, every_s, clock
        self.start = self.last = clock()
        self.done = 0
        self.said = False

    def step(self, detail: str = "") -> None:
        """One unit done (``detail``: e.g. the layer's name or a loss)."""
        self.done += 1
        now = self.clock()
        if now - self.start >= self.after_s and now - self.last >= self.every_s:
            self._say(detail, now)

    def close(self, detail: str = "") -> None:
        if self.said and (self.total is None or self.done):
            self._say(detail or "done", self.clock())

    def _say(self, detail: str, now: float) -> None:
        count = f"{self.done}/{self.total}" if self.total else str(self.done)
        log.info("  %s %s%s (%.0f s)", self.what, count, f": {detail}" if detail else "", now - self.start)
        self.last, self.said = now, True
