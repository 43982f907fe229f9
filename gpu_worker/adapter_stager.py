"""AdapterStager: cold adapters read into host memory off the step loop, one at a time.

Reading and packing an adapter (~100 ms of CPU for 22 MB) runs on a thread of its own so the step loop
never waits for it. Three rules keep that from hurting the requests already running (measured on an H200
with 64 adapters churning through 32 host slots: without them, staging took up to 4 s an adapter and the
step loop's p90 step went from 6 to 68 ms, starved of the GIL by a dozen threads packing at once):
- one thread stages, so the step loop competes with one reader at most;
- concurrent requests for one adapter share one read (a hot adapter's first seconds bring many);
- an adapter already in host memory (or staged) is answered on the event loop, with no thread hop and no
  wait behind another adapter's read.
"""

from __future__ import annotations

import asyncio
import time
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
    def __init__(self, manager: Stageable, stats: StepStats):
        self._manager = manager
        self._stats = stats
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="adapter-stage")
        self._inflight: dict[tuple[str, str], asyncio.Future] = {}

    async def stage(self, request: LoRARequest) -> None:
        """Return once the adapter is in host memory or staged; raises what reading it raised."""
        if self._manager.is_staged(request):
            return
        key = (request.lora_name, request.lora_path)
        future = self._inflight.get(key)
        if future is None:
            future = asyncio.get_running_loop().run_in_executor(self._pool, self._stage, request)
            self._inflight[key] = future
            future.add_done_callback(lambda done: self._done(key, done))
        # shield: one caller giving up (a cancelled request) does not cancel the read the others wait for
        await asyncio.shield(future)

    def _stage(self, request: LoRARequest) -> None:
        t0 = time.perf_counter()
        if self._manager.stage(request):
            self._stats.staged(time.perf_counter() - t0)

    def _done(self, key: tuple[str, str], future: asyncio.Future) -> None:
        self._inflight.pop(key, None)
        if not future.cancelled():
            future.exception()  # retrieved: every waiter may have gone; the error is theirs, not the loop's

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
