"""The worker with --adapter-store: names it does not hold locally resolve through the store, their files
are fetched (verified) into its adapter cache and served; the store's refusals reach the client as the
worker's status codes; local adapters keep working beside it."""

from __future__ import annotations

import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from gpu_worker.adapters import LoRAModule
from gpu_worker.engine import LLM, LoRARequest, SamplingParams
from gpu_worker.engine.lora.peft_adapter import content_hash
from gpu_worker.store_client import StoreClient
from loraserve.v1 import common_pb2, worker_pb2
from tests.services import free_port
from tests.worker.conftest import NUM_KV_BLOCKS, generate_request, running_worker, stub_for, worker_config

from .conftest import running_store, store_config

PROMPT = "SELECT * FROM users WHERE"


@pytest.fixture(scope="module")
def stack(store_loop, tmp_path_factory, tiny_adapters, tiny_model_dir):
    """A store over the fixture adapters (plus a broken one), and a worker using it, with one local module."""
    root = tmp_path_factory.mktemp("store-root")
    for name, path in tiny_adapters.items():
        shutil.copytree(path, root / name)
    shutil.copytree(tiny_adapters["sql-lora"], root / "broken")
    (root / "broken" / "adapter_config.json").write_text('{"peft_type": "LORA", "use_dora": true}')
    cache = tmp_path_factory.mktemp("worker-adapters")
    with running_store(store_loop, store_config(tmp_path_factory.mktemp("store-cache"), lora_root=str(root))) as store:
        local = (LoRAModule("local-chat", str(tiny_adapters["chat-lora"])),)
        config = worker_config(tiny_model_dir, adapter_store=f"127.0.0.1:{store.port}", adapter_cache_dir=str(cache),
                               max_cpu_loras=4, lora_modules=local)
        with running_worker(store_loop, config) as worker, stub_for(worker.port) as stub:
            yield store, worker, stub, cache


def tokens(stream) -> tuple[list, list[int]]:
    messages = list(stream)
    return messages, [t for m in messages for t in m.token_ids]


def test_an_adapter_from_the_store_generates_what_the_engine_does(stack, tiny_model_dir, tiny_adapters):
    _, _, stub, cache = stack
    messages, got = tokens(stub.StreamGenerate(generate_request(PROMPT, "sql-lora", max_tokens=10)))
    digest = content_hash(tiny_adapters["sql-lora"])
    assert messages[0].adapter.content_hash == digest
    assert (cache / "sql-lora" / digest / "adapter_model.safetensors").read_bytes() == (
        tiny_adapters["sql-lora"] / "adapter_model.safetensors").read_bytes()
    llm = LLM(str(tiny_model_dir), enable_lora=True, max_loras=2, max_lora_rank=16, num_kv_blocks=NUM_KV_BLOCKS)
    params = SamplingParams(max_tokens=10, temperature=0.0)
    want = llm.generate([PROMPT], params, lora_request=[LoRARequest("sql-lora", 1, str(tiny_adapters["sql-lora"]))])
    base = llm.generate([PROMPT], params)
    assert got == want[0].outputs[0].token_ids != base[0].outputs[0].token_ids
    # the local module still comes from the worker's own disk
    messages, _ = tokens(stub.StreamGenerate(generate_request(PROMPT, "local-chat", max_tokens=2)))
    assert messages[0].adapter.content_hash == content_hash(tiny_adapters["chat-lora"])
    assert not (cache / "local-chat").exists()


def test_concurrent_requests_for_a_cold_adapter_fetch_it_once(stack, monkeypatch):
    _, _, stub, _ = stack
    calls = []
    original = StoreClient.download
    gate = threading.Event()

    def counted(self, name, root):
        calls.append(name)
        gate.wait(5)
        return original(self, name, root)

    monkeypatch.setattr(StoreClient, "download", counted)
    req = worker_pb2.PrefetchAdapterRequest(adapter=common_pb2.AdapterRef(name="math-lora"),
                                            target=common_pb2.RESIDENCY_HOST_MEMORY)
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(stub.PrefetchAdapter, req, timeout=30) for _ in range(6)]
        threading.Timer(0.3, gate.set).start()
        replies = [f.result() for f in futures]
    assert calls == ["math-lora"]
    assert {r.adapter.ref.name for r in replies} == {"math-lora"}


@pytest.mark.parametrize("name, content_hash_, code, words", [
    ("no-such-lora", "", grpc.StatusCode.NOT_FOUND, "is unknown"),
    ("broken", "", grpc.StatusCode.FAILED_PRECONDITION, "DoRA"),
    ("code-lora", "ab" * 32, grpc.StatusCode.FAILED_PRECONDITION, "version mismatch"),
])
def test_store_refusals_reach_the_client(stack, name, content_hash_, code, words):
    _, _, stub, _ = stack
    with pytest.raises(grpc.RpcError) as info:
        list(stub.StreamGenerate(generate_request("hi", name, content_hash_, max_tokens=2)))
    assert info.value.code() == code and words in info.value.details()


def test_store_down_is_unavailable(store_loop, tmp_path, tiny_model_dir):
    config = worker_config(tiny_model_dir, adapter_store=f"127.0.0.1:{free_port()}",
                           adapter_cache_dir=str(tmp_path / "w"))
    with running_worker(store_loop, config) as worker, stub_for(worker.port) as stub:
        with pytest.raises(grpc.RpcError) as info:
            list(stub.StreamGenerate(generate_request("hi", "sql-lora", max_tokens=2), timeout=30))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        messages, _ = tokens(stub.StreamGenerate(generate_request("hi", max_tokens=2)))  # base requests still work
        assert messages[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
