"""The router over real processes: two `python -m gpu_worker` (tiny model, CPU) and `python -m adapter_store`,
started once for the module. Affinity for four adapters, failover when a worker is killed (before the first
token: retried; mid-stream: UNAVAILABLE), the Redis registry shared by two routers, admin RPCs through the
store with an in-place reload, NOT_FOUND."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraserve.v1 import common_pb2, inference_pb2, worker_pb2, worker_pb2_grpc
from router.policy import preference
from tests import services
from tests.router.conftest import (
    ADMIN_TOKEN,
    admin_metadata,
    gen_request,
    router_config,
    router_stub,
    running_router,
    stream_request,
)
from tests.router.processes import Proc, ready, spawn, worker_cmd
from tests.services import wait_until

ADAPTERS = ("sql-lora", "chat-lora", "code-lora", "math-lora")
EXTRA = tuple(f"extra-{i}" for i in range(8))  # more names the store resolves from its root (copies of sql-lora)


@pytest.fixture(scope="module")
def stack(tiny_model_dir, tiny_adapters, tmp_path_factory, redis_url):
    """The store and two workers, which register themselves in Redis under a prefix of the module's own."""
    tmp = tmp_path_factory.mktemp("router-cluster")
    prefix = f"test:{uuid.uuid4().hex}:"
    root = tmp / "adapters"
    for name, path in tiny_adapters.items():
        shutil.copytree(path, root / name)
    for name in EXTRA:
        shutil.copytree(tiny_adapters["sql-lora"], root / name)
    store, store_lines = spawn("store", [
        sys.executable, "-m", "adapter_store", "--host", "127.0.0.1", "--port", "0", "--cache-dir", str(tmp / "cache"),
        "--lora-root", str(root), "--resolvers", "registered,filesystem", "--enable-admin", "--drain-timeout-s", "0",
        "--log-level", "warning"], tmp, env={"LORASERVE_ADMIN_TOKEN": ADMIN_TOKEN})
    procs = [store]
    try:
        ready(store, store_lines, tmp)
        started = [spawn(wid, worker_cmd(wid, tiny_model_dir, store.address, tmp / f"cache-{wid}", "--redis-url",
                                          redis_url, "--registry-prefix", prefix, "--registry-ttl-s", "3"), tmp)
                   for wid in ("wk-a", "wk-b")]
        procs += [p for p, _ in started]
        workers = [ready(p, lines, tmp) for p, lines in started]
        yield Stack(tmp, tiny_model_dir, store, workers, root, redis_url, prefix)
    finally:
        for p in procs:
            p.stop()
        client = services.connect_redis(redis_url)
        services.delete_prefix(client, prefix)
        client.close()


@dataclass
class Stack:
    tmp: Path
    model_dir: Path
    store: Proc
    workers: list[Proc]
    root: Path
    redis_url: str
    registry_prefix: str

    def config(self, workers: tuple[str, ...] | None = None, **kw):
        kw.setdefault("enable_runtime_lora_updating", True)
        kw.setdefault("admin_token", ADMIN_TOKEN)
        return router_config(workers=workers if workers is not None else tuple(w.address for w in self.workers),
                             store_address=self.store.address, **kw)

    def cold_adapter_on(self, worker_id: str) -> str:
        """A new adapter name (a copy of sql-lora in the store's root) that no worker has seen, which the
        policy's hash places on `worker_id` first, against wk-a: earlier tests leave names resident on wk-a,
        and affinity would follow them."""
        name = next(n for n in (f"cold-{uuid.uuid4().hex[:8]}" for _ in range(100))
                    if preference(n, ("wk-a", worker_id))[0] == worker_id)
        shutil.copytree(self.root / "sql-lora", self.root / name)
        return name

    @contextlib.contextmanager
    def victim(self, worker_id: str, *extra: str):
        proc, lines = spawn(worker_id, worker_cmd(worker_id, self.model_dir, self.store.address,
                                                  self.tmp / f"cache-{worker_id}", *extra), self.tmp)
        try:
            yield ready(proc, lines, self.tmp)
        finally:
            proc.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def router(loop, stack):
    with running_router(loop, stack.config()) as server:
        assert wait_until(lambda: len(server.registry.routable()) == 2, 30)
        yield server


@pytest.fixture
def stub(router):
    with router_stub(router) as s:
        yield s


def resident(router, worker_id: str, name: str) -> bool:
    return any(s.worker_id == worker_id and any(a.ref.name == name for a in s.adapters)
               for s in router.registry.published)


def test_four_adapters_land_with_affinity(router, stub):
    before = router.metrics.hit_ratio(), router.metrics._lookups
    served = {}
    for name in ADAPTERS:
        first = stub.Generate(gen_request(name, max_tokens=3), timeout=60)
        worker = first.served_by.worker_id
        assert first.served_by.adapter.name == name and len(first.served_by.adapter.content_hash) == 64
        assert wait_until(lambda n=name, w=worker: resident(router, w, n), 10)  # the status shows it there
        again = {stub.Generate(gen_request(name, max_tokens=3), timeout=60).served_by.worker_id for _ in range(2)}
        served[name] = {worker} | again
    assert all(len(ws) == 1 for ws in served.values()), served
    assert {w for ws in served.values() for w in ws} == {"wk-a", "wk-b"}  # both workers took some
    status = stub.GetClusterStatus(inference_pb2.GetClusterStatusRequest(), timeout=5)
    assert sorted(w.worker_id for w in status.workers) == ["wk-a", "wk-b"]
    for name, ws in served.items():
        holder = next(w for w in status.workers if w.worker_id in ws)
        assert any(a.ref.name == name for a in holder.adapters), (name, holder)
    # 4 cold placements, then 8 affinity hits
    lookups = router.metrics._lookups - before[1]
    assert lookups == 12
    text = router.metrics.exposition().decode()
    assert 'loraserve_router_adapter_requests_total{adapter="code-lora"} 3.0' in text


def test_base_model_and_token_prompts(stub):
    a = stub.Generate(gen_request("", prompt="The cat", max_tokens=5), timeout=60)
    assert a.usage.completion_tokens == 5 and a.finish_reason == common_pb2.FINISH_REASON_LENGTH
    b = stub.Generate(inference_pb2.GenerateRequest(prompt=common_pb2.Prompt(token_ids=common_pb2.TokenIds(
        ids=[5, 6, 7])), sampling=common_pb2.SamplingParams(max_tokens=2, temperature=0.0)), timeout=60)
    assert b.usage.prompt_tokens == 3 and len(b.token_ids) == 2


def test_errors_of_the_request_come_back_as_they_are(stub):
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(gen_request("no-such-lora"), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "known adapters" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(gen_request("sql-lora", temperature=-1.0), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_worker_killed_before_the_first_token_is_retried(loop, stack):
    with stack.victim("wk-v") as victim, \
            running_router(loop, stack.config((stack.workers[0].address, victim.address))) as router, \
            router_stub(router) as stub:
        assert wait_until(lambda: len(router.registry.routable()) == 2, 30)
        name = next(n for n in EXTRA if preference(n, ("wk-a", "wk-v"))[0] == "wk-v")
        victim.popen.send_signal(signal.SIGSTOP)  # frozen: the router still sees it serving
        try:
            call = stub.Generate.future(gen_request(name, max_tokens=3), timeout=60)
            time.sleep(0.5)  # the request is on its way to the victim
            assert not call.done()
        finally:
            victim.popen.kill()
        reply = call.result()
        assert reply.served_by.worker_id == "wk-a" and reply.usage.completion_tokens == 3
        assert 'retries_total{reason="worker_lost"} 1.0' in router.metrics.exposition().decode()
        assert wait_until(lambda: [s.worker_id for s in router.registry.published] == ["wk-a"], 10)
        status = stub.GetClusterStatus(inference_pb2.GetClusterStatusRequest(), timeout=5)
        assert [w.worker_id for w in status.workers] == ["wk-a"]  # the dead worker left


def test_a_worker_killed_mid_stream_ends_it_with_unavailable(loop, stack):
    with stack.victim("wk-m") as victim, running_router(loop, stack.config((victim.address,))) as router, \
            router_stub(router) as stub:
        req = stream_request("sql-lora", max_tokens=400)
        req.sampling.ignore_eos = True
        got = []
        with pytest.raises(grpc.RpcError) as info:
            for m in stub.GenerateStream(req, timeout=60):
                got.append(m)
                if len(got) == 3:
                    victim.popen.kill()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "wk-m was lost after" in info.value.details() and "incomplete" in info.value.details()
        assert got[0].served_by.worker_id == "wk-m" and got[-1].finish_reason == common_pb2.FINISH_REASON_ERROR


def test_a_worker_killed_under_concurrent_streams(loop, stack):
    """#8's fault: SIGKILL a worker while 6 streams run (the policy puts most on it) and 4 requests that have
    not started wait on it (it is frozen first). Counted: the 4 finish on the other worker (retried), the
    streams on the victim end with UNAVAILABLE and those elsewhere finish, none outlives its deadline, the
    router drops the worker and takes it back when it returns on its address, and the surviving worker holds
    nothing afterwards."""
    with stack.victim("wk-k") as victim, \
            running_router(loop, stack.config((stack.workers[0].address, victim.address))) as router, \
            router_stub(router) as stub:
        assert wait_until(lambda: len(router.registry.routable()) == 2, 30)
        name = stack.cold_adapter_on("wk-k")  # one adapter: affinity keeps its requests on the victim
        outcomes: dict[str, list] = {"streams": [], "queued": []}
        streaming = threading.Semaphore(0)

        def stream(i: int) -> None:
            req = stream_request(name, max_tokens=400)
            req.sampling.ignore_eos = True
            got, worker = 0, ""
            try:
                for m in stub.GenerateStream(req, timeout=60):
                    got += 1
                    if got == 1:
                        worker = m.served_by.worker_id
                        streaming.release()
                outcomes["streams"].append(("OK", worker, got))
            except grpc.RpcError as e:
                outcomes["streams"].append((e.code().name, worker, got))

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        assert all(streaming.acquire(timeout=30) for _ in threads)
        victim.popen.send_signal(signal.SIGSTOP)
        queued = [stub.Generate.future(gen_request(name, max_tokens=3), timeout=60) for _ in range(4)]
        time.sleep(0.5)
        t0 = time.monotonic()
        victim.popen.kill()
        victim.popen.wait()
        for t in threads:
            t.join(60)
        for f in queued:
            try:
                outcomes["queued"].append(("OK", f.result(timeout=60).served_by.worker_id))
            except grpc.RpcError as e:
                outcomes["queued"].append((e.code().name, ""))
        assert time.monotonic() - t0 < 30 and not any(t.is_alive() for t in threads)
        assert outcomes["queued"] == [("OK", "wk-a")] * 4, outcomes  # retried on the survivor
        # every stream was running; those on the victim end UNAVAILABLE, those the policy put on wk-a finish
        assert all(got >= 1 for *_, got in outcomes["streams"]), outcomes
        assert sorted((code, worker) for code, worker, _ in outcomes["streams"]) == sorted(
            ("UNAVAILABLE" if worker == "wk-k" else "OK", worker) for _, worker, _ in outcomes["streams"]), outcomes
        assert any(worker == "wk-k" for _, worker, _ in outcomes["streams"]), outcomes
        assert wait_until(lambda: [w.worker_id for w in router.registry.published] == ["wk-a"], 10)

        # back on the same address: the router dials it again
        port = victim.address.rsplit(":", 1)[1]
        proc, lines = spawn("wk-k2", worker_cmd("wk-k", stack.model_dir, stack.store.address,
                                                stack.tmp / "cache-wk-k", "--port", port), stack.tmp)
        try:
            ready(proc, lines, stack.tmp)
            assert wait_until(lambda: sorted(w.worker_id for w in router.registry.published) == ["wk-a", "wk-k"], 30)
            assert len(router.registry.routable()) == 2
        finally:
            proc.stop(signal.SIGKILL)
        survivor = next(s for s in router.registry.published if s.worker_id == "wk-a")
        assert wait_until(lambda: all(
            s.running_requests == s.waiting_requests == 0 and s.kv_blocks_free == s.kv_blocks_total
            for s in router.registry.published if s.worker_id == "wk-a"), 10), survivor


def test_a_hung_worker_holds_up_only_its_own_requests(loop, stack):
    """#8's slow or hung worker (frozen with SIGSTOP while it holds a running stream): the request stuck on it
    ends within its deadline, requests for an adapter on the other worker are served meanwhile, and the
    router's keepalive pings (1 s here) mark the frozen worker down, so new requests avoid it."""
    config = stack.config((stack.workers[0].address,), worker_keepalive_s=1.0)
    with stack.victim("wk-h") as victim, \
            running_router(loop, replace(config, workers=(stack.workers[0].address, victim.address))) as router, \
            router_stub(router) as stub:
        assert wait_until(lambda: len(router.registry.routable()) == 2, 30)
        stuck = stack.cold_adapter_on("wk-h")
        req = stream_request(stuck, max_tokens=400)
        req.sampling.ignore_eos = True
        stream = stub.GenerateStream(req, timeout=5)
        first = next(stream)
        assert first.served_by.worker_id == "wk-h"
        victim.popen.send_signal(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            others = [stub.Generate(gen_request("sql-lora", max_tokens=2), timeout=20) for _ in range(3)]
            assert all(r.served_by.worker_id == "wk-a" for r in others)
            assert time.monotonic() - t0 < 10
            with pytest.raises(grpc.RpcError) as info:
                list(stream)  # the rest of the stream: it must end in an error, not run to 400 tokens
            # cut by the keepalive (the worker is lost mid-stream) or by its own 5 s deadline, whichever first
            assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            assert time.monotonic() - t0 < 7
            assert wait_until(lambda: [e.worker_id for e in router.registry.routable()] == ["wk-a"], 10)
            # the frozen worker's adapter now goes to the other one
            assert stub.Generate(gen_request(stuck, max_tokens=2), timeout=30).served_by.worker_id == "wk-a"
        finally:
            victim.popen.send_signal(signal.SIGCONT)


def test_two_routers_share_the_redis_registry(loop, stack):
    """The workers registered themselves (--redis-url): two routers with only the registry see both, and
    place a cold adapter alike."""
    config = stack.config(workers=(), redis_url=stack.redis_url, redis_prefix=stack.registry_prefix)
    with running_router(loop, config) as r1, running_router(loop, config) as r2, \
            router_stub(r1) as s1, router_stub(r2) as s2:
        ids = lambda s: sorted(w.worker_id for w in s.GetClusterStatus(  # noqa: E731
            inference_pb2.GetClusterStatusRequest(), timeout=5).workers)
        assert wait_until(lambda: ids(s1) == ids(s2) == ["wk-a", "wk-b"], 15)
        name = "extra-7"
        want = s1.Generate(gen_request(name, max_tokens=2), timeout=60).served_by.worker_id
        assert s2.Generate(gen_request(name, max_tokens=2), timeout=60).served_by.worker_id == want


def test_a_draining_worker_leaves_the_registry_at_once(loop, stack, redis_prefix, redis_client):
    """Registered with its advertised address and base model while it serves; on SIGTERM the record goes
    at once (the TTL is 60 s: expiry cannot explain it), and the worker exits 0."""
    extra = ("--redis-url", stack.redis_url, "--registry-prefix", redis_prefix, "--registry-ttl-s", "60")
    with stack.victim("wk-r", *extra) as worker:
        key = f"{redis_prefix}worker:wk-r"
        assert wait_until(lambda: redis_client.get(key) is not None, 10)
        record = json.loads(redis_client.get(key))
        assert record["address"] == worker.address and record["base_model"]
        assert redis_client.smembers(f"{redis_prefix}workers") == {b"wk-r"}
        assert 0 < redis_client.pttl(key) <= 60_000
        t0 = time.monotonic()
        worker.popen.send_signal(signal.SIGTERM)
        assert worker.popen.wait(15) == 0
        assert redis_client.get(key) is None and not redis_client.smembers(f"{redis_prefix}workers")
        assert time.monotonic() - t0 < 15


def test_sigterm_under_streams_truncates_none_and_leaves_the_registry(loop, stack, redis_prefix, redis_client):
    """SIGTERM to a worker serving N streams: health NOT_SERVING at once, new work refused, every stream runs
    to its last token within the drain timeout, the registry record goes, exit 0."""
    extra = ("--redis-url", stack.redis_url, "--registry-prefix", redis_prefix, "--registry-ttl-s", "60",
             "--drain-timeout-s", "60")
    n, tokens = 6, 160  # long enough that every stream is still running when SIGTERM comes
    with stack.victim("wk-drain", *extra) as worker, grpc.insecure_channel(worker.address) as channel:
        key = f"{redis_prefix}worker:wk-drain"
        assert wait_until(lambda: redis_client.get(key) is not None, 10)
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        calls = [stub.StreamGenerate(worker_pb2.StreamGenerateRequest(
            request_id=f"drain-{i}", prompt=common_pb2.Prompt(text=f"stream {i}"),
            sampling=common_pb2.SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)), timeout=120)
            for i in range(n)]
        firsts = [next(c) for c in calls]  # every stream is running
        worker.popen.send_signal(signal.SIGTERM)
        health = health_pb2_grpc.HealthStub(channel)
        assert wait_until(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                          == health_pb2.HealthCheckResponse.NOT_SERVING, 10)
        with pytest.raises(grpc.RpcError) as refused:  # no new work while draining
            next(stub.StreamGenerate(worker_pb2.StreamGenerateRequest(prompt=common_pb2.Prompt(text="late")),
                                     timeout=10))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        for first, call in zip(firsts, calls):
            rest = list(call)
            got = len(first.token_ids) + sum(len(m.token_ids) for m in rest)
            assert got == tokens and rest[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert worker.popen.wait(30) == 0
        assert redis_client.get(key) is None


def test_admin_rpcs_refused_when_disabled_or_without_the_token(loop, stack, stub):
    with running_router(loop, stack.config(enable_runtime_lora_updating=False, admin_token="")) as off, \
            router_stub(off) as off_stub:
        with pytest.raises(grpc.RpcError) as info:
            off_stub.LoadAdapter(inference_pb2.LoadAdapterRequest(name="x", source_uri="/tmp/x"),
                                 metadata=admin_metadata(), timeout=10)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    for metadata in (None, admin_metadata("wrong")):
        with pytest.raises(grpc.RpcError) as info:
            stub.UnloadAdapter(inference_pb2.UnloadAdapterRequest(name="sql-lora"), metadata=metadata, timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_load_reload_in_place_and_unload_through_the_store(router, stub, stack, tiny_adapters):
    v1, v2 = stack.tmp / "reload-v1", stack.tmp / "reload-v2"
    shutil.copytree(tiny_adapters["chat-lora"], v1)
    shutil.copytree(tiny_adapters["math-lora"], v2)
    load = lambda src, inplace=False, warm=(): stub.LoadAdapter(inference_pb2.LoadAdapterRequest(  # noqa: E731
        name="live-lora", source_uri=str(src), load_inplace=inplace, warm_worker_ids=list(warm)),
        metadata=admin_metadata(), timeout=60).adapter
    first = load(v1, warm=["wk-b"])
    assert first.id == "live-lora" and len(first.content_hash) == 64 and first.parent == router.catalog.base_model()
    assert wait_until(lambda: resident(router, "wk-b", "live-lora"), 10)
    assert any(m.id == "live-lora" for m in stub.ListModels(inference_pb2.ListModelsRequest(), timeout=10).models)
    with pytest.raises(grpc.RpcError) as info:
        load(v2)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS

    # a long request on v1 is running while v2 replaces it
    req = stream_request("live-lora", max_tokens=300)
    req.sampling.ignore_eos = True
    running = stub.GenerateStream(req, timeout=120)
    head = next(running)
    assert head.served_by.adapter.content_hash == first.content_hash
    second = load(v2, inplace=True)
    assert second.content_hash != first.content_hash
    after = stub.Generate(gen_request("live-lora", max_tokens=2), timeout=60)
    assert after.served_by.adapter.content_hash == second.content_hash
    rest = list(running)  # the old version finishes its request
    assert rest[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert len(head.token_ids) + sum(len(m.token_ids) for m in rest) == 300
    # once idle, the old version leaves every worker
    old = first.content_hash
    assert wait_until(lambda: not any((a.ref.name, a.ref.content_hash) == ("live-lora", old)
                                      for s in router.registry.published for a in s.adapters), 15)

    stub.UnloadAdapter(inference_pb2.UnloadAdapterRequest(name="live-lora"), metadata=admin_metadata(), timeout=10)
    assert wait_until(lambda: not any(a.ref.name == "live-lora" for s in router.registry.published
                                      for a in s.adapters), 15)
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(gen_request("live-lora"), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
