"""A worker whose engine runs with async scheduling (the default on CUDA; forced here on the CPU): concurrent
streams of mixed adapters still add up to what the in-process LLM generates, and a cancelled stream still
frees its KV blocks and its hold on the adapter slot, with steps in flight."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from gpu_worker.adapters import LoRAModule
from gpu_worker.engine.llm_engine import LLMEngine
from gpu_worker.server import WorkerServer
from tests.services import wait_until

from .conftest import generate_request, stub_for, worker_config
from .test_generate import PROMPTS, check_against, collect
from .test_lifecycle import FREED_WITHIN_S, LONG, idle, status


@pytest.fixture(scope="module")
def async_stub(aio_loop, tiny_model_dir, tiny_adapters):
    modules = tuple(LoRAModule(name, str(path)) for name, path in tiny_adapters.items())
    config = worker_config(tiny_model_dir, lora_modules=modules, max_cpu_loras=4, async_scheduling=True)
    engines = []

    def factory():
        engines.append(LLMEngine(config.engine_args()))
        return engines[-1]

    server = WorkerServer(config, engine_factory=factory)
    aio_loop.run(server.start())
    try:
        assert engines[0].async_scheduling  # the flag reached the engine
        with stub_for(server.port) as stub:
            yield stub
    finally:
        aio_loop.run(server.shutdown(0))


def test_concurrent_mixed_streams(async_stub, reference):
    names = [None, "sql-lora", "chat-lora", "code-lora"]
    cases = [(PROMPTS[i % len(PROMPTS)], names[i % len(names)], 4 + i % 4) for i in range(8)]
    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(
            lambda c: collect(async_stub.StreamGenerate(generate_request(c[0], c[1], max_tokens=c[2]))), cases))
    for (prompt, name, max_tokens), (messages, text, token_ids) in zip(cases, results):
        check_against(messages, text, token_ids, reference([prompt], [name], max_tokens)[0])
    assert wait_until(lambda: idle(async_stub))


def test_cancel_frees_blocks_and_slot(async_stub):
    assert wait_until(lambda: idle(async_stub))
    call = async_stub.StreamGenerate(generate_request("Hello world", "chat-lora", **LONG))
    assert next(call).token_ids
    call.cancel()
    assert wait_until(lambda: idle(async_stub), timeout=FREED_WITHIN_S), status(async_stub)
    chat = [a for a in status(async_stub).adapters if a.ref.name == "chat-lora"]
    assert chat and chat[0].active_requests == 0
