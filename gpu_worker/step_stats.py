"""What the step loop did lately, logged every `interval_s` while it is busy, in the spirit of vLLM's periodic
"Avg prompt throughput ... Running: N reqs" line: steps per second, step time (median, p90, max), time spent
on commands (adding requests, resolving adapters) between steps, tokens out, requests waiting and running,
and adapters read and packed (staged) off the loop, with their time. An operator reading the log sees where
a slow worker's time goes without a profiler."""

from __future__ import annotations

import logging
import threading
import time


class StepStats:
    def __init__(self, log: logging.Logger, interval_s: float = 10.0):
        self.log = log
        self.interval_s = interval_s
        self._since = time.monotonic()
        self._steps: list[float] = []
        self._commands_s = 0.0
        self._commands_max_s = 0.0
        self._tokens = 0
        # staged adapters: written from pool threads
        self._stage_lock = threading.Lock()
        self._staged = 0
        self._stage_s = 0.0
        self._stage_max_s = 0.0

    def commands(self, seconds: float) -> None:
        self._commands_s += seconds
        self._commands_max_s = max(self._commands_max_s, seconds)

    def step(self, seconds: float, tokens: int) -> None:
        self._steps.append(seconds)
        self._tokens += tokens

    def staged(self, seconds: float) -> None:
        with self._stage_lock:
            self._staged += 1
            self._stage_s += seconds
            self._stage_max_s = max(self._stage_max_s, seconds)

    def maybe_log(self, waiting: int, running: int) -> None:
        """Log and start a new window once `interval_s` has passed (nothing when no step ran)."""
        now = time.monotonic()
        span = now - self._since
        if span < self.interval_s:
            return
        if self._steps and self.log.isEnabledFor(logging.INFO):
            steps = sorted(self._steps)
            n = len(steps)
            with self._stage_lock:
                staged, stage_s, stage_max = self._staged, self._stage_s, self._stage_max_s
            self.log.info(
                "engine: %.0f steps/s, step ms p50 %.1f p90 %.1f max %.1f (busy %.0f%%); commands %.0f ms (max %.1f); "
                "%.0f tokens/s out; waiting %d, running %d; adapters staged %d (%.0f ms, max %.0f)",
                n / span, 1e3 * steps[n // 2], 1e3 * steps[int(n * 0.9)], 1e3 * steps[-1],
                100 * sum(steps) / span, 1e3 * self._commands_s, 1e3 * self._commands_max_s, self._tokens / span,
                waiting, running, staged, 1e3 * stage_s, 1e3 * stage_max)
        self._since = now
        self._steps = []
        self._commands_s = self._commands_max_s = 0.0
        self._tokens = 0
        with self._stage_lock:
            self._staged, self._stage_s, self._stage_max_s = 0, 0.0, 0.0
