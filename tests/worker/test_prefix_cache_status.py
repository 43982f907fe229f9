"""A worker with --enable-prefix-caching reports its prefix cache's queried and hit tokens in its status, and the
router's vLLM-named counters sum them over the workers."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from loraserve.v1 import worker_pb2
from router.domain import WorkerStatus
from router.vllm_metrics import gauges

from .conftest import generate_request, running_worker, stub_for, worker_config

SYSTEM = "You are a careful assistant who answers in one short line, without any preamble at all. Q: "


def test_worker_status_counts_prefix_cache_hits(aio_loop, tiny_model_dir):
    config = worker_config(tiny_model_dir, enable_prefix_caching=True, lora_modules=())
    with running_worker(aio_loop, config) as server, stub_for(server.port) as stub:
        for question in ("one?", "two?"):
            list(stub.StreamGenerate(generate_request(SYSTEM + question, max_tokens=2)))
        st = stub.GetStatus(worker_pb2.GetStatusRequest()).status
    assert st.prefix_cache_queried_tokens >= 2 * 20
    # The second prompt found the first one's full blocks of the shared system prompt (16-token blocks).
    assert st.prefix_cache_hit_tokens >= 16 and st.prefix_cache_hit_tokens % 16 == 0


def test_router_sums_the_workers_prefix_cache_counters():
    statuses = (WorkerStatus("w0", base_model="m", prefix_cache_queried_tokens=100, prefix_cache_hit_tokens=48),
                WorkerStatus("w1", base_model="m", prefix_cache_queried_tokens=50, prefix_cache_hit_tokens=16))
    registry = CollectorRegistry()
    registry.register(type("Workers", (), {"collect": lambda self: gauges(statuses)})())  # as router.metrics does
    text = generate_latest(registry).decode()
    assert 'vllm:prefix_cache_queries_total{model_name="m"} 150.0' in text
    assert 'vllm:prefix_cache_hits_total{model_name="m"} 64.0' in text
