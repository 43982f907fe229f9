"""AdapterStager: one read per adapter however many requests ask at once, one read at a time, no thread hop
for an adapter already in host memory, one report a read (its error too), and a failed read is tried again."""

from __future__ import annotations

import logging
import threading
import time

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


class Stager:
    """An AdapterStager and what its `done` callback reported, in order."""

    def __init__(self, manager: FakeManager):
        self.stats = StepStats(logging.getLogger("test"))
        self.reports: list[tuple[str, BaseException | None]] = []
        self.all_done = threading.Condition()
        self.stager = AdapterStager(manager, self.stats, self._done)

    def _done(self, key, error) -> None:
        with self.all_done:
            self.reports.append((key[0], error))
            self.all_done.notify_all()

    def wait(self, n: int, timeout: float = 10) -> None:
        with self.all_done:
            assert self.all_done.wait_for(lambda: len(self.reports) >= n, timeout), self.reports


def test_concurrent_requests_share_one_read_and_reads_run_one_at_a_time():
    m = FakeManager()
    s = Stager(m)
    answers = [s.stager.stage(lora(f"a{i % 3}")) for i in range(12)]
    s.wait(3)
    time.sleep(0.1)  # no other read follows
    s.stager.close()
    assert not any(answers)  # all cold: each waits for the read
    assert sorted(m.reads) == ["a0", "a1", "a2"]  # 12 requests, 3 adapters, 3 reads
    assert sorted(name for name, _ in s.reports) == ["a0", "a1", "a2"]  # one report a read
    assert m.most_busy == 1 and all(t.startswith("adapter-stage") for t in m.threads)
    assert s.stats._staged == 3 and s.stats._stage_s >= 3 * m.read_s * 0.9
    assert all(s.stager.stage(lora(f"a{i}")) for i in range(3))  # now in host memory: go ahead at once


def test_a_staged_adapter_costs_no_thread_hop_and_no_wait():
    m = FakeManager(read_s=0.3)
    m.staged.add("warm")
    s = Stager(m)
    assert s.stager.stage(lora("cold")) is False
    time.sleep(0.01)  # the cold read is under way on the stage thread
    t0 = time.perf_counter()
    assert s.stager.stage(lora("warm")) is True
    waited = time.perf_counter() - t0
    s.wait(1)
    s.stager.close()
    assert waited < 0.05, f"a warm adapter waited {waited:.3f}s behind a cold one"
    assert m.reads == ["cold"] and s.reports == [("cold", None)]


def test_an_error_is_reported_and_the_next_request_tries_again():
    m = FakeManager(fail={"bad"})
    s = Stager(m)
    assert [s.stager.stage(lora("bad")) for _ in range(3)] == [False] * 3
    s.wait(1)
    (name, error), = s.reports
    assert name == "bad" and isinstance(error, ValueError) and "unreadable" in str(error)
    m.fail = set()
    assert s.stager.stage(lora("bad")) is False  # nothing cached from the failure: read again, now fine
    s.wait(2)
    s.stager.close()
    assert m.reads == ["bad"] and s.reports[1] == ("bad", None)
