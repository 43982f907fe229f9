"""Health, reflection, status, adapter residency, cancellation, draining, and the real `python -m gpu_worker`."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gpu_worker.adapters import LoRAModule
from gpu_worker.engine.llm_engine import LLMEngine
from gpu_worker.engine.lora.peft_adapter import content_hash
from gpu_worker.server import StartupError, WorkerServer
from loraserve.v1 import common_pb2, worker_pb2
from tests.child_env import child_env
from tests.services import wait_until

from .conftest import NUM_KV_BLOCKS, generate_request, running_worker, stub_for, worker_config

ROOT = Path(__file__).resolve().parents[2]
SERVICE = "loraserve.v1.WorkerService"
# ~3 s on 2 CPU cores when not aborted: three times the FREED_WITHIN_S a test waits for its blocks to come back.
LONG = dict(max_tokens=500, ignore_eos=True)
FREED_WITHIN_S = 1.0


def status(stub) -> common_pb2.WorkerStatus:
    return stub.GetStatus(worker_pb2.GetStatusRequest()).status


def idle(stub) -> bool:
    st = status(stub)
    return st.running_requests == 0 and st.waiting_requests == 0 and st.kv_blocks_free == st.kv_blocks_total


def health_of(channel, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_health_serving_and_reflection(channel):
    assert health_of(channel) == health_pb2.HealthCheckResponse.SERVING
    assert health_of(channel, SERVICE) == health_pb2.HealthCheckResponse.SERVING
    replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names


def test_status_describes_the_worker(stub, worker):
    st = status(stub)
    assert st.worker_id == "test-worker" and st.address == f"127.0.0.1:{worker.port}"
    assert st.state == common_pb2.WORKER_STATE_SERVING
    assert st.device == "cpu" and st.base_model
    assert (st.kv_blocks_total, st.kv_block_size, st.max_loras, st.max_cpu_loras, st.max_lora_rank) == (
        NUM_KV_BLOCKS, 16, 2, 4, 16)
    assert st.max_model_len == 512
    assert sys.getswitchinterval() == pytest.approx(0.0005)  # the worker's GIL switch interval, set at start


def test_cancelled_stream_frees_its_blocks(stub):
    assert wait_until(lambda: idle(stub))
    call = stub.StreamGenerate(generate_request("Hello world", "chat-lora", **LONG))
    first = next(call)
    assert first.token_ids and first.adapter.name == "chat-lora"
    assert status(stub).running_requests == 1
    call.cancel()
    assert wait_until(lambda: idle(stub), timeout=FREED_WITHIN_S), status(stub)
    chat = [a for a in status(stub).adapters if a.ref.name == "chat-lora"]
    assert chat and chat[0].active_requests == 0  # its hold on the adapter slot is released too


def test_deadline_exceeded_frees_its_blocks(stub):
    assert wait_until(lambda: idle(stub))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.StreamGenerate(generate_request("Hello world", "sql-lora", **LONG), timeout=0.3))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: idle(stub), timeout=FREED_WITHIN_S), status(stub)


def test_prefetch_then_evict(stub, tiny_adapters):
    def resident(name):
        return {a.ref.name: a for a in status(stub).adapters}.get(name)

    stub.EvictAdapter(worker_pb2.EvictAdapterRequest(name="math-lora"))
    assert resident("math-lora") is None
    want = content_hash(tiny_adapters["math-lora"])
    reply = stub.PrefetchAdapter(worker_pb2.PrefetchAdapterRequest(
        adapter=common_pb2.AdapterRef(name="math-lora"), target=common_pb2.RESIDENCY_HOST_MEMORY))
    assert (reply.adapter.ref.name, reply.adapter.ref.content_hash) == ("math-lora", want)
    assert reply.adapter.residency == common_pb2.RESIDENCY_HOST_MEMORY and reply.adapter.rank == 8
    got = resident("math-lora")
    assert got.residency == common_pb2.RESIDENCY_HOST_MEMORY and got.ref.content_hash == want
    # Idempotent; a GPU_SLOT target reports honestly where the adapter is (host memory until scheduled).
    again = stub.PrefetchAdapter(worker_pb2.PrefetchAdapterRequest(
        adapter=common_pb2.AdapterRef(name="math-lora", content_hash=want), target=common_pb2.RESIDENCY_GPU_SLOT))
    assert again.adapter.residency in (common_pb2.RESIDENCY_HOST_MEMORY, common_pb2.RESIDENCY_GPU_SLOT)
    assert again.adapter.residency == resident("math-lora").residency

    assert stub.EvictAdapter(worker_pb2.EvictAdapterRequest(name="math-lora", content_hash="f" * 64)).evicted == 0
    assert stub.EvictAdapter(worker_pb2.EvictAdapterRequest(name="math-lora", content_hash=want)).evicted == 1
    assert resident("math-lora") is None
    assert stub.EvictAdapter(worker_pb2.EvictAdapterRequest(name="math-lora")).evicted == 0
    with pytest.raises(grpc.RpcError) as info:
        stub.EvictAdapter(worker_pb2.EvictAdapterRequest(name="../x"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_watch_status_pushes_changes(stub):
    call = stub.WatchStatus(worker_pb2.WatchStatusRequest(interval_ms=20), timeout=10)
    try:
        first = next(call).status
        assert first.state == common_pb2.WORKER_STATE_SERVING
        stub.EvictAdapter(worker_pb2.EvictAdapterRequest(name="sql-lora"))
        stub.PrefetchAdapter(worker_pb2.PrefetchAdapterRequest(adapter=common_pb2.AdapterRef(name="sql-lora")))
        for msg in call:
            if any(a.ref.name == "sql-lora" for a in msg.status.adapters):
                break
    finally:
        call.cancel()


def test_drain_finishes_running_streams_and_refuses_new_ones(aio_loop, tiny_model_dir):
    with running_worker(aio_loop, worker_config(tiny_model_dir, worker_id="drainer")) as server, \
            stub_for(server.port) as stub, grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        running = stub.StreamGenerate(generate_request("Hello world", max_tokens=200, ignore_eos=True))  # ~1.2 s
        first = next(running)
        drained = aio_loop.submit(server.shutdown(30))
        assert wait_until(lambda: status(stub).state == common_pb2.WORKER_STATE_DRAINING)
        assert health_of(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as info:
            list(stub.StreamGenerate(generate_request("hi", max_tokens=2)))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in info.value.details()
        rest = list(running)
        assert rest[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert len(first.token_ids) + sum(len(m.token_ids) for m in rest) == 200
        drained.result(10)


def test_python_m_gpu_worker_serves_and_exits_0_on_sigterm(tiny_model_dir, tiny_adapters):
    env = child_env(LORASERVE_WORKER_WORKER_ID="sub-worker", LORASERVE_WORKER_MAX_LORAS="3",
                    LORASERVE_WORKER_NUM_KV_BLOCKS="64")
    cmd = [sys.executable, "-m", "gpu_worker", "--model-dir", str(tiny_model_dir), "--host", "127.0.0.1",
           "--port", "0", "--lora-modules", f"sql-lora={tiny_adapters['sql-lora']}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        try:
            line = lines.get(timeout=60)
        except queue.Empty:
            pytest.fail("no ready line within 60 s")
        assert line.startswith("worker sub-worker serving on 127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert health_of(channel) == health_pb2.HealthCheckResponse.SERVING
            assert health_of(channel, SERVICE) == health_pb2.HealthCheckResponse.SERVING
            with stub_for(port) as stub:
                st = status(stub)
                assert (st.worker_id, st.max_loras, st.kv_blocks_total) == ("sub-worker", 3, 64)
                msgs = list(stub.StreamGenerate(generate_request("hi", "sql-lora", max_tokens=3)))
                assert msgs[-1].usage.completion_tokens == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_lora_module_fails_fast(aio_loop, tiny_model_dir, tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text("{not json")
    (tmp_path / "broken" / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    config = worker_config(tiny_model_dir, lora_modules=(LoRAModule("broken", str(tmp_path / "broken")),))
    server = WorkerServer(config)
    with pytest.raises(StartupError, match="pre-loaded adapter 'broken' .* not valid JSON"):
        aio_loop.run(server.start())
    assert server.engine.state == "stopped"


def test_drain_timeout_ends_streams_still_running(aio_loop, tiny_model_dir):
    with running_worker(aio_loop, worker_config(tiny_model_dir)) as server, stub_for(server.port) as stub:
        running = stub.StreamGenerate(generate_request("Hello world", **LONG))
        next(running)
        aio_loop.run(server.shutdown(0.1))
        messages = []
        with pytest.raises(grpc.RpcError) as info:
            for m in running:
                messages.append(m)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
        assert messages[-1].finish_reason == common_pb2.FINISH_REASON_ERROR


class FlakyEngine(LLMEngine):
    """Fails one step on demand, as a CUDA error would."""

    fail_next_step = False

    def step(self):
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("injected step failure")
        return super().step()


def test_a_failed_step_ends_its_requests_with_error_and_the_worker_serves_on(aio_loop, tiny_model_dir):
    config = worker_config(tiny_model_dir)
    engines = []

    def factory():
        engines.append(FlakyEngine(config.engine_args()))
        return engines[0]

    server = WorkerServer(config, engine_factory=factory)
    aio_loop.run(server.start())
    try:
        with stub_for(server.port) as stub:
            running = stub.StreamGenerate(generate_request("Hello world", **LONG))
            next(running)
            engines[0].fail_next_step = True
            messages = []
            with pytest.raises(grpc.RpcError) as info:
                for m in running:
                    messages.append(m)
            assert info.value.code() == grpc.StatusCode.INTERNAL
            assert "injected step failure" in info.value.details()
            assert messages[-1].finish_reason == common_pb2.FINISH_REASON_ERROR
            assert wait_until(lambda: idle(stub))
            assert list(stub.StreamGenerate(generate_request("hi", max_tokens=2)))[-1].usage.completion_tokens == 2
    finally:
        aio_loop.run(server.shutdown(0))


def test_not_serving_until_the_engine_is_loaded_and_warm(aio_loop, tiny_model_dir):
    config = worker_config(tiny_model_dir)
    release = threading.Event()

    def slow_factory():  # a model that takes a while to load
        release.wait(10)
        return LLMEngine(config.engine_args())

    server = WorkerServer(config, engine_factory=slow_factory)
    started = aio_loop.submit(server.start())
    try:
        assert wait_until(lambda: server.port)
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel, stub_for(server.port) as stub:
            assert wait_until(lambda: _reachable(channel))
            assert health_of(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
            assert health_of(channel, SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
            assert status(stub).state == common_pb2.WORKER_STATE_STARTING
            with pytest.raises(grpc.RpcError) as info:
                list(stub.StreamGenerate(generate_request("hi", max_tokens=2)))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "starting" in info.value.details()
            release.set()
            started.result(30)
            assert health_of(channel) == health_pb2.HealthCheckResponse.SERVING
            assert status(stub).state == common_pb2.WORKER_STATE_SERVING
    finally:
        release.set()
        started.result(30)
        aio_loop.run(server.shutdown(0))


def _reachable(channel) -> bool:
    try:
        health_of(channel)
        return True
    except grpc.RpcError:
        return False
