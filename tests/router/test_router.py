"""The router over fake workers (tests/router/fakes.py): the public API, routing, failover, deadlines and
cancellation, health, admin refusals, metrics. Real workers are in test_cluster.py."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from loraserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from router.policy import preference
from tests.child_env import child_env
from tests.router.conftest import (
    ADMIN_TOKEN,
    admin_metadata,
    fake_workers,
    gen_request,
    router_config,
    router_stub,
    running_router,
    stream_request,
)
from tests.router.fakes import FakeWorker, fake_hash, serving
from tests.services import free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
ADAPTERS = {"sql-lora": 1, "chat-lora": 1, "code-lora": 1, "math-lora": 1}


@pytest.fixture
def cluster(loop):
    """Two fake workers knowing the four adapters, and a router over them (admin on)."""
    workers = [FakeWorker("w-a", adapters=dict(ADAPTERS)), FakeWorker("w-b", adapters=dict(ADAPTERS))]
    with fake_workers(loop, *workers):
        config = router_config(workers=tuple(w.address for w in workers), enable_runtime_lora_updating=True,
                               admin_token=ADMIN_TOKEN)
        with running_router(loop, config) as router, router_stub(router) as stub:
            wait_until(lambda: len(router.registry.routable()) == 2)
            yield router, stub, workers


def home(name: str) -> str:
    return preference(name, ("w-a", "w-b"))[0]


def test_generate_and_stream_through_the_router(cluster):
    router, stub, workers = cluster
    reply = stub.Generate(gen_request("sql-lora", request_id="r1"), timeout=10)
    assert reply.request_id == "r1" and reply.text == "t0 t1 t2 t3 " and list(reply.token_ids) == [100, 101, 102, 103]
    assert reply.finish_reason == common_pb2.FINISH_REASON_LENGTH and reply.usage.completion_tokens == 4
    assert reply.served_by.worker_id == home("sql-lora")
    assert reply.served_by.adapter.name == "sql-lora"
    assert reply.served_by.adapter.content_hash == fake_hash("sql-lora")
    messages = list(stub.GenerateStream(stream_request("chat-lora"), timeout=10))
    assert [m.text_delta for m in messages] == ["t0 ", "t1 ", "t2 ", "t3 "]
    assert messages[0].served_by.worker_id == home("chat-lora") and messages[0].request_id  # one was assigned
    assert messages[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH and messages[-1].usage.completion_tokens == 4
    base = stub.Generate(gen_request(""), timeout=10)
    assert not base.served_by.HasField("adapter")
    assert stub.Generate(gen_request("tiny-base"), timeout=10).served_by.worker_id  # the base model by name


def test_each_adapter_sticks_to_one_worker(cluster):
    router, stub, workers = cluster
    served = {name: {stub.Generate(gen_request(name), timeout=10).served_by.worker_id for _ in range(5)}
              for name in ADAPTERS}
    assert served == {name: {home(name)} for name in ADAPTERS}
    status = lambda: stub.GetClusterStatus(inference_pb2.GetClusterStatusRequest(), timeout=5)  # noqa: E731
    holders = lambda: {a.ref.name: w.worker_id for w in status().workers for a in w.adapters}  # noqa: E731
    assert wait_until(lambda: holders() == {name: home(name) for name in ADAPTERS})
    assert status().base_model == "tiny-base"


def test_unknown_adapter_is_not_found_with_the_known_names(cluster):
    _, stub, _ = cluster
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(gen_request("nope-lora"), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "nope-lora" in info.value.details() and "tiny-base" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(gen_request("../etc/passwd"), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(inference_pb2.GenerateRequest(model="sql-lora"), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in info.value.details()


def test_a_worker_failing_before_the_first_token_is_retried_invisibly(cluster):
    router, stub, workers = cluster
    first = next(w for w in workers if w.worker_id == home("math-lora"))
    other = next(w for w in workers if w is not first)
    first.faults.unavailable_before_first = 1
    messages = list(stub.GenerateStream(stream_request("math-lora"), timeout=10))
    assert messages[0].served_by.worker_id == other.worker_id
    assert messages[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    # now it is resident on the other worker, which goes first: its queue is full, back to the first
    assert wait_until(lambda: any(s.worker_id == other.worker_id and s.adapters for s in router.registry.published))
    other.faults.exhausted_before_first = 1
    assert stub.Generate(gen_request("math-lora"), timeout=10).served_by.worker_id == first.worker_id
    text = router.metrics.exposition().decode()
    assert 'loraserve_router_retries_total{reason="unavailable"} 1.0' in text
    assert 'loraserve_router_retries_total{reason="resource_exhausted"} 1.0' in text


def test_a_worker_lost_mid_stream_ends_the_stream_with_unavailable(cluster):
    _, stub, workers = cluster
    worker = next(w for w in workers if w.worker_id == home("code-lora"))
    worker.faults.fail_after_first = 1
    got = []
    with pytest.raises(grpc.RpcError) as info:
        for m in stub.GenerateStream(stream_request("code-lora"), timeout=10):
            got.append(m)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "incomplete" in info.value.details() and worker.worker_id in info.value.details()
    assert got[0].text_delta == "t0 " and got[-1].finish_reason == common_pb2.FINISH_REASON_ERROR
    # the unary Generate has shown the client nothing yet: it is retried, on the other worker
    worker.faults.fail_after_first = 1
    reply = stub.Generate(gen_request("code-lora"), timeout=10)
    assert reply.text == "t0 t1 t2 t3 " and reply.served_by.worker_id != worker.worker_id


def test_client_errors_are_not_retried(cluster):
    _, stub, workers = cluster
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(gen_request("nope-lora"), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert sum(1 for w in workers for s in w.seen if s.adapter and s.adapter[0] == "nope-lora") == 1


def test_the_deadline_reaches_the_worker(cluster):
    _, stub, workers = cluster
    stub.Generate(gen_request("sql-lora", request_id="with-deadline"), timeout=3)
    seen = next(s for w in workers for s in w.seen if s.request_id == "with-deadline")
    assert seen.time_remaining is not None and 1.0 < seen.time_remaining <= 3.1  # grpc rounds deadlines up
    worker = next(w for w in workers if w.worker_id == home("sql-lora"))
    worker.faults.hold = asyncio.Event()  # never set: the request hangs on the worker
    try:
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(gen_request("sql-lora"), timeout=0.5)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert wait_until(lambda: worker.cancelled == 1, 5)
    finally:
        worker.faults.hold = None


def test_a_cancelled_client_cancels_the_workers_call(cluster, loop):
    router, stub, workers = cluster
    worker = next(w for w in workers if w.worker_id == home("chat-lora"))
    hold = loop.call(asyncio.Event)
    worker.faults.hold = hold
    try:
        call = stub.GenerateStream(stream_request("chat-lora"), timeout=10)
        assert wait_until(lambda: worker.active[("chat-lora", fake_hash("chat-lora"))] == 1, 5)
        call.cancel()
        assert wait_until(lambda: worker.cancelled == 1, 5)
        assert wait_until(lambda: all(e.inflight == 0 for e in router.registry.entries()), 5)
    finally:
        worker.faults.hold = None
        loop.call(hold.set)


def test_every_worker_at_its_cap_is_resource_exhausted(loop):
    w = FakeWorker("solo", adapters=dict(ADAPTERS))
    with fake_workers(loop, w), running_router(loop, router_config(workers=(w.address,), max_load=1)) as router, \
            router_stub(router) as stub:
        hold = loop.call(asyncio.Event)
        w.faults.hold = hold
        call = stub.GenerateStream(stream_request("sql-lora"), timeout=10)
        thread = threading.Thread(target=lambda: list(call), daemon=True)
        thread.start()
        assert wait_until(lambda: sum(w.active.values()) == 1, 5)
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(gen_request("chat-lora"), timeout=5)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "load cap" in info.value.details()
        loop.call(hold.set)
        thread.join(5)


def test_no_live_worker_is_unavailable_and_health_follows_the_workers(loop):
    w = FakeWorker("flaky", adapters=dict(ADAPTERS))
    with fake_workers(loop, w):
        address = w.address
    port = int(address.rsplit(":", 1)[1])
    # the worker is gone: the router starts NOT_SERVING and answers UNAVAILABLE
    with running_router(loop, router_config(workers=(address,)), wait=False) as router, \
            router_stub(router) as stub, grpc.insecure_channel(f"127.0.0.1:{router.port}") as ch:
        health = health_pb2_grpc.HealthStub(ch)
        check = lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5).status  # noqa: E731
        assert check() == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(gen_request("sql-lora"), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "no live worker" in info.value.details()
        # the worker comes back on the same address: SERVING
        back = FakeWorker("flaky", adapters=dict(ADAPTERS))
        with contextlib.ExitStack() as stack:
            stack.callback(lambda: None)
            server_cm = serving(back, port=port)
            loop.run(server_cm.__aenter__())
            stack.callback(lambda: loop.run(server_cm.__aexit__(None, None, None)))
            assert wait_until(lambda: check() == health_pb2.HealthCheckResponse.SERVING, 10)
            assert stub.Generate(gen_request("sql-lora"), timeout=5).served_by.worker_id == "flaky"
            # a draining worker takes no new requests: NOT_SERVING again
            loop.call(back.set_state, common_pb2.WORKER_STATE_DRAINING)
            assert wait_until(lambda: check() == health_pb2.HealthCheckResponse.NOT_SERVING, 10)


def test_reflection_lists_the_services(cluster):
    router, _, _ = cluster
    with grpc.insecure_channel(f"127.0.0.1:{router.port}") as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                            timeout=5)
        names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"loraserve.v1.InferenceService", "grpc.health.v1.Health"} <= names


def test_list_models_without_a_store(cluster):
    _, stub, _ = cluster
    stub.Generate(gen_request("sql-lora"), timeout=10)  # a worker now holds it: the router learns it
    list_models = lambda: stub.ListModels(inference_pb2.ListModelsRequest(), timeout=5).models  # noqa: E731
    models = wait_until(lambda: (ms := list_models()) and any(m.id == "sql-lora" for m in ms) and ms)
    base = next(m for m in models if m.kind == inference_pb2.MODEL_KIND_BASE)
    assert base.id == "tiny-base" and base.max_model_len == 512
    sql = next(m for m in models if m.id == "sql-lora")
    assert sql.kind == inference_pb2.MODEL_KIND_ADAPTER and sql.parent == "tiny-base" and sql.created > 0


def test_admin_rpcs_refused_when_disabled(loop):
    w = FakeWorker("w", adapters=dict(ADAPTERS))
    with fake_workers(loop, w), running_router(loop, router_config(workers=(w.address,))) as router, \
            router_stub(router) as stub:
        for call, req in ((stub.LoadAdapter, inference_pb2.LoadAdapterRequest(name="sql-lora")),
                          (stub.UnloadAdapter, inference_pb2.UnloadAdapterRequest(name="sql-lora"))):
            with pytest.raises(grpc.RpcError) as info:
                call(req, metadata=admin_metadata(), timeout=5)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "--enable-runtime-lora-updating" in info.value.details()


@pytest.mark.parametrize("metadata", [None, admin_metadata("wrong"), (("authorization", ADMIN_TOKEN),)])
def test_admin_rpcs_need_the_token(cluster, metadata):
    _, stub, _ = cluster
    with pytest.raises(grpc.RpcError) as info:
        stub.LoadAdapter(inference_pb2.LoadAdapterRequest(name="sql-lora"), metadata=metadata, timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_load_and_unload_without_a_store(cluster):
    router, stub, workers = cluster
    for w in workers:
        w.adapters["new-lora"] = 1
    reply = stub.LoadAdapter(inference_pb2.LoadAdapterRequest(name="new-lora", warm_worker_ids=["w-b"]),
                             metadata=admin_metadata(), timeout=5)
    assert reply.adapter.id == "new-lora" and reply.adapter.kind == inference_pb2.MODEL_KIND_ADAPTER
    assert workers[1].prefetches == [("new-lora", fake_hash("new-lora"))]
    with pytest.raises(grpc.RpcError) as info:  # taken
        stub.LoadAdapter(inference_pb2.LoadAdapterRequest(name="new-lora"), metadata=admin_metadata(), timeout=5)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.RpcError) as info:  # a source the workers cannot be told about
        stub.LoadAdapter(inference_pb2.LoadAdapterRequest(name="x-lora", source_uri="s3://b/x/"),
                         metadata=admin_metadata(), timeout=5)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as info:  # the workers do not find it
        stub.LoadAdapter(inference_pb2.LoadAdapterRequest(name="ghost-lora"), metadata=admin_metadata(), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    stub.UnloadAdapter(inference_pb2.UnloadAdapterRequest(name="new-lora"), metadata=admin_metadata(), timeout=5)
    assert wait_until(lambda: all(("new-lora", "") in w.evictions for w in workers))
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(gen_request("new-lora"), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "unloaded" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        stub.UnloadAdapter(inference_pb2.UnloadAdapterRequest(name="never-lora"), metadata=admin_metadata(),
                           timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_metrics(loop):
    workers = [FakeWorker("w-a", adapters=dict(ADAPTERS)), FakeWorker("w-b", adapters=dict(ADAPTERS))]
    port = free_port()
    with fake_workers(loop, *workers):
        config = router_config(workers=tuple(w.address for w in workers), metrics_port=port)
        with running_router(loop, config) as router, router_stub(router) as stub:
            wait_until(lambda: len(router.registry.routable()) == 2)
            held = lambda: any(a.ref.name == "sql-lora" for s in router.registry.published  # noqa: E731
                               for a in s.adapters)
            for _ in range(3):
                stub.Generate(gen_request("sql-lora"), timeout=10)
                assert wait_until(held, 5)  # the status shows it resident before the next one
            list(stub.GenerateStream(stream_request(""), timeout=10))
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'loraserve_router_adapter_requests_total{adapter="sql-lora"} 3.0' in text
    assert 'loraserve_router_requests_total{code="OK",kind="adapter",rpc="Generate"} 3.0' in text
    assert 'loraserve_router_requests_total{code="OK",kind="base",rpc="GenerateStream"} 1.0' in text
    assert 'loraserve_router_routing_decisions_total{tier="cold"} 1.0' in text
    assert 'loraserve_router_routing_decisions_total{tier="gpu"} 2.0' in text
    assert "loraserve_router_affinity_hit_ratio 0.666" in text
    assert "loraserve_router_cold_loads_total 1.0" in text
    assert "loraserve_router_generated_tokens_total 16.0" in text
    assert 'loraserve_router_time_to_first_token_seconds_count{kind="adapter"} 3.0' in text
    assert 'loraserve_router_workers{state="serving"} 2.0' in text
    assert f'loraserve_router_worker_lora_info{{gpu_lora_adapters="sql-lora",host_lora_adapters="",max_lora="4",worker="{home("sql-lora")}"}} 1.0' in text  # noqa: E501


def test_a_busy_adapter_is_prefetched_on_its_spill_target(loop):
    workers = [FakeWorker(f"w-{i}", adapters=dict(ADAPTERS)) for i in range(3)]
    with fake_workers(loop, *workers):
        config = router_config(workers=tuple(w.address for w in workers), spill_load=2, prefetch_fraction=0.5)
        with running_router(loop, config) as router, router_stub(router) as stub:
            assert wait_until(lambda: len(router.registry.routable()) == 3)
            order = preference("sql-lora", ("w-0", "w-1", "w-2"))
            first = next(w for w in workers if w.worker_id == order[0])
            hold = loop.call(asyncio.Event)
            first.faults.hold = hold
            try:
                call = stub.GenerateStream(stream_request("sql-lora"), timeout=10)
                thread = threading.Thread(target=lambda: list(call), daemon=True)
                thread.start()
                assert wait_until(lambda: sum(first.active.values()) == 1, 5)
                # its one request there is half the bound (2): the next worker of its order gets it in host memory
                second = next(w for w in workers if w.worker_id == order[1])
                assert wait_until(lambda: second.prefetches == [("sql-lora", fake_hash("sql-lora"))], 5)
                assert wait_until(lambda: 'prefetches_total{outcome="ok"} 1.0' in router.metrics.exposition().decode())
            finally:
                loop.call(hold.set)
                first.faults.hold = None
            thread.join(5)


def test_python_m_router_serves_and_exits_0_on_sigterm(loop):
    w = FakeWorker("cli-w", adapters=dict(ADAPTERS))
    with fake_workers(loop, w):
        env = child_env(LORASERVE_ROUTER_WORKERS=w.address, LORASERVE_ROUTER_METRICS_PORT="0")
        proc = subprocess.Popen([sys.executable, "-m", "router", "--host", "127.0.0.1", "--port", "0"], cwd=ROOT,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = proc.stdout.readline()
            assert line.startswith("router serving on 127.0.0.1:"), (line, proc.stderr.read() if not line else "")
            with grpc.insecure_channel(line.split()[-1]) as ch:
                stub = inference_pb2_grpc.InferenceServiceStub(ch)
                assert stub.Generate(gen_request("sql-lora"), timeout=10).served_by.worker_id == "cli-w"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def refused(address: str) -> bool:
    """Whether a new call to the router on a new channel is turned away."""
    with grpc.insecure_channel(address) as fresh:
        try:
            inference_pb2_grpc.InferenceServiceStub(fresh).Generate(gen_request("sql-lora", max_tokens=1), timeout=2)
        except grpc.RpcError as e:
            return e.code() == grpc.StatusCode.UNAVAILABLE
    return False


def test_sigterm_lets_streams_in_flight_finish_on_both_apis(loop):
    """SIGTERM to a router carrying gRPC and HTTP streams: new calls turned away, every stream runs to its last
    token within the drain timeout, exit 0."""
    w = FakeWorker("drain-w", adapters=dict(ADAPTERS), tokens=20, token_delay_s=0.05)  # ~1 s a stream
    with fake_workers(loop, w):
        http_port = free_port()
        env = child_env(LORASERVE_ROUTER_WORKERS=w.address)
        proc = subprocess.Popen([sys.executable, "-m", "router", "--host", "127.0.0.1", "--port", "0",
                                 "--metrics-port", "0", "--http-port", str(http_port), "--drain-timeout-s", "20"],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            address = proc.stdout.readline().split()[-1]
            with grpc.insecure_channel(address) as ch:
                stub = inference_pb2_grpc.InferenceServiceStub(ch)
                calls = [stub.GenerateStream(stream_request("sql-lora", max_tokens=20), timeout=30) for _ in range(3)]
                firsts = [next(c) for c in calls]
                http = subprocess.Popen(["curl", "-sS", "-N", f"http://127.0.0.1:{http_port}/v1/completions",
                                         "-H", "Content-Type: application/json", "-d",
                                         '{"model": "sql-lora", "prompt": "hi", "max_tokens": 20, "stream": true}'],
                                        stdout=subprocess.PIPE, text=True)
                assert http.stdout.readline().startswith("data: ")  # streaming
                proc.send_signal(signal.SIGTERM)
                assert wait_until(lambda: refused(address), 5)  # new calls: refused (listener closed, or NOT_SERVING)
                for first, call in zip(firsts, calls):
                    rest = list(call)
                    assert len(first.token_ids) + sum(len(m.token_ids) for m in rest) == 20
                    assert rest[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
                body = http.communicate(timeout=30)[0]
                assert body.rstrip().endswith("data: [DONE]") and '"finish_reason":"length"' in body
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
