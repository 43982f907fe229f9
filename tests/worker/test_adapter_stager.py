"""AdapterStager: one read per adapter however many requests ask at once, one read at a time, no thread hop
for an adapter already in host memory, errors to every waiter, a cancelled waiter cancels nothing."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

from gpu_worker.adapter_stager import AdapterStager
from gpu_worker.engine.lora_request import LoRARequest
from gpu_worker.step_stats import StepStats


class FakeManager:
    """Reads take `read_s`; records who read what, on which thread, and how many read at once."""

    def __init__(self, read_s: float = 0.05, fail: set[str] = frozenset()):
        self.read_s, self.fail = read_s, fail
        self.staged: set[str] = set()
        self.reads: list[str] = []
        self.threads: set[str] = set()
        self.busy = self.most_busy = 0
        self._lock = threading.Lock()

    def is_staged(self, request: LoRARequest) -> bool:
        return request.lora_name in self.staged

    def stage(self, request: LoRARequest) -> bool:
        with self._lock:
            self.busy += 1
            self.most_busy = max(self.most_busy, self.busy)
        self.threads.add(threading.current_thread().name)
        time.sleep(self.read_s)
        with self._lock:
            self.busy -= 1
        if request.lora_name in self.fail:
            raise ValueError(f"{request.lora_name} is unreadable")
        self.reads.append(request.lora_name)
        self.staged.add(request.lora_name)
        return True


def lora(name: str) -> LoRARequest:
    return LoRARequest(name, 1, f"/adapters/{name}")


def stager(manager: FakeManager) -> tuple[AdapterStager, StepStats]:
    stats = StepStats(logging.getLogger("test"))
    return AdapterStager(manager, stats), stats


def test_concurrent_requests_share_one_read_and_reads_run_one_at_a_time():
    m = FakeManager()
    s, stats = stager(m)

    async def main():
        await asyncio.gather(*(s.stage(lora(f"a{i % 3}")) for i in range(12)))

    asyncio.run(main())
    s.close()
    assert sorted(m.reads) == ["a0", "a1", "a2"]  # 12 requests, 3 adapters, 3 reads
    assert m.most_busy == 1 and all(t.startswith("adapter-stage") for t in m.threads)
    assert stats._staged == 3 and stats._stage_s >= 3 * m.read_s * 0.9


def test_a_staged_adapter_costs_no_thread_hop_and_no_wait():
    m = FakeManager(read_s=0.3)
    m.staged.add("warm")
    s, _ = stager(m)

    async def main():
        cold = asyncio.create_task(s.stage(lora("cold")))
        await asyncio.sleep(0.01)  # the cold read is under way on the stage thread
        t0 = time.perf_counter()
        await s.stage(lora("warm"))
        waited = time.perf_counter() - t0
        await cold
        return waited

    waited = asyncio.run(main())
    s.close()
    assert waited < 0.05, f"a warm adapter waited {waited:.3f}s behind a cold one"
    assert m.reads == ["cold"]


def test_an_error_reaches_every_waiter_and_the_next_request_tries_again():
    m = FakeManager(fail={"bad"})
    s, _ = stager(m)

    async def main():
        results = await asyncio.gather(*(s.stage(lora("bad")) for _ in range(3)), return_exceptions=True)
        assert all(isinstance(r, ValueError) and "unreadable" in str(r) for r in results)
        m.fail = set()
        await s.stage(lora("bad"))  # nothing cached from the failure: read again, now fine

    asyncio.run(main())
    s.close()
    assert m.reads == ["bad"]


def test_a_cancelled_waiter_does_not_cancel_the_read_others_wait_for():
    m = FakeManager(read_s=0.2)
    s, _ = stager(m)

    async def main():
        first = asyncio.create_task(s.stage(lora("a")))
        second = asyncio.create_task(s.stage(lora("a")))
        await asyncio.sleep(0.05)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        await second

    asyncio.run(main())
    s.close()
    assert m.reads == ["a"] and "a" in m.staged
