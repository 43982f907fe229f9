"""The engine's step loop apart from the gRPC server: EngineCore's commands and Batches, a cold adapter's read
off the loop (requests for it wait, parked; the others run), errors and outputs across the process boundary, and
a worker whose engine process dies or whose step loop fails (its streams end UNAVAILABLE, it stops serving,
`python -m gpu_worker` exits 1), and an engine process that does not outlive its worker.

The worker tests that use the `worker` fixture run against an engine process too (conftest.py)."""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from gpu_worker import ipc_codec
from gpu_worker.engine.config import EngineArgs
from gpu_worker.engine.errors import AdapterError, InvalidRequestError
from gpu_worker.engine.llm_engine import LLMEngine
from gpu_worker.engine.lora_request import LoRARequest
from gpu_worker.engine.outputs import RequestOutput
from gpu_worker.engine.sampling_params import SamplingParams
from gpu_worker.engine_core import (
    Abort,
    Add,
    Batch,
    EngineCore,
    Prefetch,
    Stop,
    UnavailableError,
    from_wire,
    portable,
)
from gpu_worker.server import WorkerServer
from loraserve.v1 import common_pb2
from tests.child_env import child_env
from tests.services import wait_until

from .conftest import generate_request, running_worker, stub_for, worker_config
from .test_lifecycle import LONG, status

ROOT = Path(__file__).resolve().parents[2]
GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


def test_the_step_loop_runs_where_configured(worker):
    in_process = worker.engine.engine_pid != os.getpid()
    assert in_process == (worker.config.engine_process == "on")


# -- EngineCore on a thread, its inbox and Batches by hand ---------------------------------------------------------


class Core:
    """An EngineCore over the tiny model whose adapter reads wait for `gate`; its Batches collected."""

    def __init__(self, model_dir: Path):
        self.gate = threading.Event()
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.batches: queue.Queue[Batch] = queue.Queue()
        self.results: dict[int, tuple] = {}
        self.outputs: dict[str, list[RequestOutput]] = {}
        self.load = None
        args = EngineArgs(model=str(model_dir), device="cpu", enable_lora=True, max_loras=2, max_lora_rank=16,
                          num_kv_blocks=64)
        self.thread = threading.Thread(target=EngineCore(functools.partial(self._engine, args), [], self.inbox,
                                                         self.batches.put).run, daemon=True)
        self.thread.start()
        self.info = self.next().ready

    def _engine(self, args: EngineArgs) -> LLMEngine:
        engine = LLMEngine(args)
        read = engine.lora.stage

        def gated(request):
            assert self.gate.wait(30)
            return read(request)

        engine.lora.stage = gated
        return engine

    def next(self, timeout: float = 30) -> Batch:
        batch = self.batches.get(timeout=timeout)
        self.load = batch.load or self.load
        for call, result, error in batch.results:
            self.results[call] = (result, error)
        for out in batch.outputs:
            self.outputs.setdefault(out.request_id, []).append(out)
        return batch

    def until(self, done, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            self.next(max(0.01, deadline - time.monotonic()))

    def finished(self, rid: str) -> bool:
        return bool(self.outputs.get(rid)) and self.outputs[rid][-1].finished

    def stop(self) -> Batch:
        self.inbox.put(Stop())
        batch = self.next()
        while not batch.stopped:
            batch = self.next()
        self.thread.join(10)
        return batch


@pytest.fixture
def core(tiny_model_dir):
    c = Core(tiny_model_dir)
    yield c
    c.gate.set()
    if c.thread.is_alive():
        c.stop()


def test_what_start_up_built_is_frozen_out_of_the_collectors_reach_while_the_loop_runs(core):
    """Once ready, the loop's heap of start-up objects sits in the permanent generation (a full collection while
    serving then scans only what serving made); stopped, it is handed back to the collector."""
    assert gc.get_freeze_count() > 10_000
    core.stop()
    assert gc.get_freeze_count() == 0


def test_a_cold_adapter_is_read_off_the_loop_while_other_requests_run(core, tiny_adapters):
    sql = LoRARequest("sql-lora", 1, str(tiny_adapters["sql-lora"]))
    core.inbox.put(Add(1, "a", [1, 5, 9, 13], GREEDY, sql, ""))
    core.inbox.put(Prefetch(2, sql, ""))
    core.inbox.put(Add(3, "base", [1, 5, 9, 13], GREEDY, None, ""))
    core.until(lambda: core.finished("base"))  # the base request ran to its end while the read waits
    assert 1 not in core.results and 2 not in core.results and "a" not in core.outputs
    core.gate.set()
    core.until(lambda: core.finished("a") and 2 in core.results)
    key, error = core.results[1]
    assert error is None and key[0] == "sql-lora" and len(key[1]) >= 16  # (name, content hash)
    residency, error = core.results[2]
    assert error is None and (residency.name, residency.content_hash) == key
    assert [len(o.outputs[0].delta_token_ids) for o in core.outputs["a"]] == [1, 1, 1, 1]
    core.stop()
    assert (core.load.waiting, core.load.running) == (0, 0)
    assert core.load.kv_blocks_free == core.info.kv_blocks_total


def test_an_abort_while_its_adapter_is_read_drops_the_request(core, tiny_adapters):
    chat = LoRARequest("chat-lora", 2, str(tiny_adapters["chat-lora"]))
    core.inbox.put(Add(1, "kept", [1, 5, 9], GREEDY, chat, ""))
    core.inbox.put(Add(2, "dropped", [1, 5, 9], GREEDY, chat, ""))
    core.inbox.put(Abort("dropped"))
    core.until(lambda: 2 in core.results)
    _, error = core.results[2]
    assert isinstance(error, UnavailableError) and "cancelled" in str(error)
    assert 1 not in core.results  # still waiting for the read
    core.gate.set()
    core.until(lambda: core.finished("kept"))
    time.sleep(0.05)
    while not core.batches.empty():
        core.next()
    assert "dropped" not in core.outputs
    core.stop()
    assert core.load.kv_blocks_free == core.info.kv_blocks_total  # the dropped request took nothing


def test_a_failed_read_reaches_every_request_waiting_for_it(core, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    (broken / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    bad = LoRARequest("broken", 3, str(broken))
    core.gate.set()
    for call in (1, 2):
        core.inbox.put(Add(call, f"r{call}", [1, 5], GREEDY, bad, ""))
    core.until(lambda: 1 in core.results and 2 in core.results)
    for call in (1, 2):
        result, error = core.results[call]
        assert result is None and isinstance(error, AdapterError) and error.kind == "invalid", error
    core.stop()
    assert core.load.kv_blocks_free == core.info.kv_blocks_total


def test_stop_ends_running_requests_and_commands_waiting_for_a_read(core, tiny_adapters):
    code = LoRARequest("code-lora", 4, str(tiny_adapters["code-lora"]))
    core.inbox.put(Add(1, "long", [1, 5], SamplingParams(max_tokens=500, ignore_eos=True), None, ""))
    core.inbox.put(Add(2, "parked", [1, 5], GREEDY, code, ""))
    core.until(lambda: core.outputs.get("long"))
    last = core.stop()
    assert [rid for rid, _ in last.failed] == ["long"] and isinstance(last.failed[0][1], UnavailableError)
    assert isinstance(core.results[2][1], UnavailableError)


def test_decode_steps_alone_take_the_load_at_most_every_interval(core, monkeypatch):
    import gpu_worker.engine_core as engine_core

    taken = []
    real = engine_core._load
    monkeypatch.setattr(engine_core, "LOAD_INTERVAL_S", 60.0)
    monkeypatch.setattr(engine_core, "_load", lambda *a: taken.append(1) or real(*a))
    core.inbox.put(Add(1, "long", [1, 5], SamplingParams(max_tokens=60, ignore_eos=True), None, ""))
    core.until(lambda: core.finished("long"))
    assert len(core.outputs["long"]) == 60
    assert len(taken) <= 3, len(taken)  # the Add's, the end's (and an idle wake's): none a decode step
    assert core.load.running == 0 and core.load.kv_blocks_free == core.info.kv_blocks_total  # taken at the end


# -- what crosses the process boundary ----------------------------------------------------------------------------


class _Local(Exception):
    def __init__(self, a, b):  # not one of the classes that cross, and not built from its args
        super().__init__(f"{a}/{b}")


def test_errors_cross_whole_or_as_a_runtime_error_that_names_them():
    for error in (AdapterError("mismatch", "made for another base"), InvalidRequestError("bad prompt"),
                  UnavailableError("stopped"), ValueError("v")):
        back = ipc_codec.decode(ipc_codec.encode(portable(error)))
        assert type(back) is type(error) and str(back) == str(error)
        assert getattr(back, "kind", None) == getattr(error, "kind", None)
    back = ipc_codec.decode(ipc_codec.encode(portable(_Local(1, 2))))
    assert type(back) is RuntimeError and str(back) == "_Local: 1/2"


def test_streamed_outputs_travel_slim_and_final_ones_whole(tiny_model_dir, tiny_adapters):
    """An engine process's engine builds a streamed output before the last as a slim tuple (`wire_deltas`: no
    prompt, no totals), which encodes small and comes back as the RequestOutput the engine gives without it; the
    final output, and every output of a request that asks for cumulative ones, stay whole."""
    def run(wire: bool) -> dict[str, list]:
        engine = LLMEngine(EngineArgs(model=str(tiny_model_dir), enable_lora=True, max_loras=2, max_lora_rank=16,
                                      num_kv_blocks=64, block_size=8, seed=0))
        engine.wire_deltas = wire
        prompt = list(range(10, 210))
        engine.add_request("delta", prompt, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True,
                                                           logprobs=2, output_kind="delta"),
                           lora_request=LoRARequest("sql-lora", 1, str(tiny_adapters["sql-lora"])))
        engine.add_request("cumulative", prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True,
                                                                output_kind="cumulative"))
        seen: dict[str, list] = {"delta": [], "cumulative": []}
        while engine.has_unfinished_requests():
            for out in engine.step():
                seen[out[0] if type(out) is tuple else out.request_id].append(out)
        return seen

    plain, wire = run(False), run(True)
    *deltas, last = wire["delta"]
    assert len(deltas) == 5 and all(type(w) is tuple for w in deltas)
    assert isinstance(last, RequestOutput) and last.finished
    assert all(isinstance(o, RequestOutput) for o in wire["cumulative"])
    full = plain["delta"][0]
    assert len(ipc_codec.encode(deltas[0])) < len(ipc_codec.encode(full)) / 4  # no prompt, no text so far
    key = last.adapter_key
    crossed = [from_wire(ipc_codec.decode(ipc_codec.encode(w)), key) for w in deltas]
    for got, want in zip(crossed, plain["delta"], strict=False):
        c, w = got.outputs[0], want.outputs[0]
        assert (got.request_id, got.finished, got.adapter_key) == (want.request_id, False, want.adapter_key)
        assert (c.delta_text, c.delta_token_ids, c.delta_logprobs) == (w.delta_text, w.delta_token_ids,
                                                                        w.delta_logprobs)
        assert c.delta_token_ids and c.delta_logprobs and got.adapter_key[0] == "sql-lora"
    assert last.outputs[0].token_ids == plain["delta"][-1].outputs[0].token_ids
    assert [o.outputs[0].token_ids for o in wire["cumulative"]] == [o.outputs[0].token_ids for o in plain["cumulative"]]


# -- a worker whose engine process dies ----------------------------------------------------------------------------


def test_a_dead_engine_process_ends_streams_unavailable_and_the_worker_stops_serving(aio_loop, tiny_model_dir):
    with running_worker(aio_loop, worker_config(tiny_model_dir, engine_process="on")) as server, \
            stub_for(server.port) as stub:
        running = stub.StreamGenerate(generate_request("Hello world", **LONG))
        assert next(running).token_ids
        os.kill(server.engine.engine_pid, signal.SIGKILL)
        with pytest.raises(grpc.RpcError) as info:
            list(running)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "engine process exited" in info.value.details()
        assert wait_until(lambda: server.failed.is_set())
        assert status(stub).state == common_pb2.WORKER_STATE_DRAINING  # stopped: routers send nothing more
        with pytest.raises(grpc.RpcError) as info:
            list(stub.StreamGenerate(generate_request("hi", max_tokens=2)))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_command_that_does_not_decode_ends_the_engine_process_and_the_worker_reports_it(aio_loop, tiny_model_dir):
    with running_worker(aio_loop, worker_config(tiny_model_dir, engine_process="on")) as server, \
            stub_for(server.port) as stub:
        running = stub.StreamGenerate(generate_request("Hello world", **LONG))
        assert next(running).token_ids
        server.engine._link._commands.send_bytes(b"\xc1 not MessagePack")
        with pytest.raises(grpc.RpcError) as info:
            list(running)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "exit code 1" in info.value.details()
        assert wait_until(lambda: server.failed.is_set())


def test_python_m_gpu_worker_exits_1_when_its_engine_process_dies(tiny_model_dir):
    with worker_process(tiny_model_dir) as proc:
        os.kill(_engine_pid(proc.pid), signal.SIGKILL)
        assert proc.wait(timeout=30) == 1
        assert "engine process exited unexpectedly" in proc.stderr.read()


def test_the_engine_process_exits_when_the_worker_is_killed(tiny_model_dir):
    with worker_process(tiny_model_dir) as proc:
        engine = _engine_pid(proc.pid)
        proc.kill()  # no drain, no Stop: the engine sees its command pipe close
        proc.wait(10)

        def gone() -> bool:
            try:
                return Path(f"/proc/{engine}/stat").read_text().split(") ")[1][0] == "Z"  # exited, not reaped
            except FileNotFoundError:
                return True

        assert wait_until(gone, timeout=15), f"engine process {engine} outlived its worker"


@contextlib.contextmanager
def worker_process(model_dir: Path) -> Iterator[subprocess.Popen]:
    """`python -m gpu_worker` with its engine in a process of its own, once it serves; killed at the end."""
    cmd = [sys.executable, "-m", "gpu_worker", "--model-dir", str(model_dir), "--host", "127.0.0.1",
           "--port", "0", "--num-kv-blocks", "64", "--engine-process", "on"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert " serving on 127.0.0.1:" in line, proc.stderr.read() if proc.poll() is not None else line
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _engine_pid(worker_pid: int) -> int:
    """The worker's engine process (multiprocessing may add its resource tracker beside it)."""
    children = Path(f"/proc/{worker_pid}/task/{worker_pid}/children").read_text().split()
    engines = [c for c in children if b"resource_tracker" not in Path(f"/proc/{c}/cmdline").read_bytes()]
    assert len(engines) == 1, children
    return int(engines[0])


def test_a_bug_in_the_step_loop_ends_streams_unavailable_and_the_worker_stops_serving(aio_loop, tiny_model_dir):
    config = worker_config(tiny_model_dir, engine_process="off")
    broken = threading.Event()

    class BuggyEngine(LLMEngine):
        def has_unfinished_requests(self) -> bool:  # outside the step's own error handling
            if broken.is_set():
                raise KeyError("a bug")
            return super().has_unfinished_requests()

    server = WorkerServer(config, engine_factory=lambda: BuggyEngine(config.engine_args()))
    aio_loop.run(server.start())
    try:
        with stub_for(server.port) as stub:
            running = stub.StreamGenerate(generate_request("Hello world", **LONG))
            assert next(running).token_ids
            broken.set()
            with pytest.raises(grpc.RpcError) as info:
                list(running)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "step loop failed" in info.value.details()
            assert wait_until(lambda: server.failed.is_set())
    finally:
        aio_loop.run(server.shutdown(0))
