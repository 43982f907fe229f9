"""Download progress in the log: a line at most once a second while bytes arrive, and one at the end."""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("adapter_store.download")
MiB = 1 << 20


class Progress:
    """Counts bytes for one download; thread-safe (boto3's transfer manager calls back from its threads)."""

    def __init__(self, label: str, interval_s: float = 1.0):
        self.label = label
        self.interval_s = interval_s
        self.total = 0
        self.done = 0
        self._lock = threading.Lock()
        self._t0 = self._last = time.monotonic()

    def start(self, total: int) -> None:
        with self._lock:
            self.total = total
        log.debug("%s: downloading %.1f MiB", self.label, total / MiB)

    def advance(self, nbytes: int) -> None:
        with self._lock:
            self.done += nbytes
            now = time.monotonic()
            if now - self._last < self.interval_s:
                return
            self._last = now
            done, total, elapsed = self.done, self.total, now - self._t0
        pct = f" ({100 * done / total:.0f}%)" if total else ""
        log.info("%s: %.1f / %.1f MiB%s, %.0f MiB/s", self.label, done / MiB, total / MiB, pct,
                 done / MiB / max(elapsed, 1e-9))

    def finish(self) -> None:
        elapsed = time.monotonic() - self._t0
        log.info("%s: downloaded %.1f MiB in %.2fs (%.0f MiB/s)", self.label, self.done / MiB, elapsed,
                 self.done / MiB / max(elapsed, 1e-9))
