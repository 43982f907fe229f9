"""Worker servers in this process, on a free loopback port, driven by ordinary (sync) gRPC clients.

Every server runs on one event loop in one background thread (grpc.aio wants one loop); tests call it
over real gRPC, as the router will.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from gpu_worker.adapters import LoRAModule
from gpu_worker.config import WorkerConfig
from gpu_worker.engine import LLM, LoRARequest, SamplingParams
from gpu_worker.server import WorkerServer
from loraserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from tests.loop_thread import LoopThread

NUM_KV_BLOCKS = 256


@pytest.fixture(scope="session")
def aio_loop() -> Iterator[LoopThread]:
    lt = LoopThread("test-aio-loop")
    yield lt
    lt.close()


def worker_config(model_dir: Path, **overrides) -> WorkerConfig:
    values = dict(model_dir=str(model_dir), host="127.0.0.1", port=0, worker_id="test-worker",
                  num_kv_blocks=NUM_KV_BLOCKS, max_loras=2, max_lora_rank=16, drain_timeout_s=0)
    values.update(overrides)
    return WorkerConfig(**values)


@contextlib.contextmanager
def running_worker(aio_loop: LoopThread, config: WorkerConfig) -> Iterator[WorkerServer]:
    server = WorkerServer(config)
    aio_loop.run(server.start())
    try:
        yield server
    finally:
        aio_loop.run(server.shutdown(0))


@contextlib.contextmanager
def stub_for(port: int) -> Iterator[worker_pb2_grpc.WorkerServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield worker_pb2_grpc.WorkerServiceStub(channel)


@pytest.fixture(scope="module", params=["off", "on"], ids=["engine-thread", "engine-process"])
def worker(request, aio_loop, tiny_model_dir, tiny_adapters) -> Iterator[WorkerServer]:
    """The main worker: every fixture adapter pre-loaded, 2 slots, rank <= 16, room for all 4 in host memory; its
    engine on a thread of the server's process, then in a process of its own (every test that uses it runs
    against both)."""
    modules = tuple(LoRAModule(name, str(path)) for name, path in tiny_adapters.items())
    config = worker_config(tiny_model_dir, lora_modules=modules, max_cpu_loras=4, engine_process=request.param)
    with running_worker(aio_loop, config) as server:
        yield server


@pytest.fixture(scope="module")
def channel(worker) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{worker.port}") as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel) -> worker_pb2_grpc.WorkerServiceStub:
    return worker_pb2_grpc.WorkerServiceStub(channel)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tiny_adapters) -> Callable:
    """reference(prompts, adapter_names, max_tokens) -> RequestOutputs of an in-process LLM, greedy."""
    llm = LLM(str(tiny_model_dir), enable_lora=True, max_loras=2, max_lora_rank=16, num_kv_blocks=NUM_KV_BLOCKS)
    ids = {name: i + 1 for i, name in enumerate(sorted(tiny_adapters))}

    def run(prompts: list[str], names: list[str | None], max_tokens: int):
        loras = [None if n is None else LoRARequest(n, ids[n], str(tiny_adapters[n])) for n in names]
        return llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0), lora_request=loras)

    return run


def generate_request(prompt: str, adapter: str | None = None, content_hash: str = "", **sampling):
    sampling.setdefault("temperature", 0.0)
    req = worker_pb2.StreamGenerateRequest(request_id="t", prompt=common_pb2.Prompt(text=prompt),
                                           sampling=common_pb2.SamplingParams(**sampling))
    if adapter is not None:
        req.adapter.name, req.adapter.content_hash = adapter, content_hash
    return req

