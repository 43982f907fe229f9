"""AdapterStager: cold adapters read into host memory off the step loop, one at a time.

Reading and packing an adapter (~100 ms of CPU for 22 MB) runs on a thread of its own so the step loop
never waits for it. Three rules keep that from hurting the requests already running (measured on an H200
with 64 adapters churning through 32 host slots: without them, staging took up to 4 s an adapter and the
step loop's p90 step went from 6 to 68 ms, starved of the GIL by a dozen threads packing at once):
- one thread stages, so the step loop competes with one reader at most;
- concurrent requests for one adapter share one read (a hot adapter's first seconds bring many);
- an adapter already in host memory (or staged) is answered at once, with no thread hop and no wait behind
  another adapter's read.
The engine's step loop (engine_core.py) parks the commands that need an adapter being read and runs them when
`done(key, error)` reports the read's end.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from gpu_worker.engine.lora_request import LoRARequest
from gpu_worker.step_stats import StepStats


class Stageable(Protocol):
    def stage(self, request: LoRARequest) -> bool:
        """Read and pack the adapter unless it is there; True when it read it."""

    def is_staged(self, request: LoRARequest) -> bool:
        """Whether stage() would do nothing (cheap: no read, no hashing)."""


class AdapterStager:
    def __init__(self, manager: Stageable, stats: StepStats,
                 done: Callable[[tuple[str, str], BaseException | None], None]):
        self._manager = manager
        self._stats = stats
        self._done = done
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="adapter-stage")
        self._lock = threading.Lock()
        self._inflight: set[tuple[str, str]] = set()

    def stage(self, request: LoRARequest) -> bool:
        """True when the adapter is in host memory or staged (go ahead now). Otherwise its read is under way
        (started now, or by an earlier call, which it shares) and `done((name, path), error)` reports its end,
        once a read, from the stager's thread."""
        if self._manager.is_staged(request):
            return True
        key = (request.lora_name, request.lora_path)
        with self._lock:
            if key in self._inflight:
                return False
            self._inflight.add(key)
        self._pool.submit(self._stage, key, request)
        return False

    def _stage(self, key: tuple[str, str], request: LoRARequest) -> None:
        t0 = time.perf_counter()
        error = None
        try:
            if self._manager.stage(request):
                self._stats.staged(time.perf_counter() - t0)
        except Exception as e:  # the waiters' error: reported to them, and the next request reads again
            error = e
        with self._lock:
            self._inflight.discard(key)
        self._done(key, error)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
