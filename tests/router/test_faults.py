"""#8's faults that need a fresh cluster of their own (real processes: the adapter store, a worker, a
router in-process): the store killed and restarted; Redis stopped and restarted under a router and a
worker that registers itself."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import grpc
import pytest

from tests.router.conftest import gen_request, router_config, router_stub, running_router
from tests.router.processes import ready as ready_line
from tests.router.processes import spawn, worker_cmd
from tests.services import wait_until


def store_cmd(root, cache, port: str = "0") -> list[str]:
    return [sys.executable, "-m", "adapter_store", "--host", "127.0.0.1", "--port", port, "--cache-dir", str(cache),
            "--lora-root", str(root), "--resolvers", "registered,filesystem", "--drain-timeout-s", "0",
            "--log-level", "warning"]


def test_the_store_killed_and_restarted(loop, tiny_model_dir, tiny_adapters, tmp_path):
    """Resident adapters keep serving while the store is down, a cold one fails fast with UNAVAILABLE, and the
    restarted store serves from its cache without its sources (they were deleted meanwhile)."""
    root = tmp_path / "adapters"
    for name in ("sql-lora", "chat-lora", "code-lora"):
        shutil.copytree(tiny_adapters[name], root / name)
    store, lines = spawn("store", store_cmd(root, tmp_path / "cache"), tmp_path)
    procs = [store]
    try:
        ready_line(store, lines, tmp_path)
        worker, wlines = spawn("wk-s", worker_cmd("wk-s", tiny_model_dir, store.address, tmp_path / "wcache"), tmp_path)
        procs.append(worker)
        ready_line(worker, wlines, tmp_path)
        config = router_config(workers=(worker.address,), store_address=store.address)
        with running_router(loop, config) as router, router_stub(router) as stub:
            warm = stub.Generate(gen_request("sql-lora", max_tokens=2), timeout=60)
            assert warm.usage.completion_tokens == 2

            store.stop(signal.SIGKILL)
            assert stub.Generate(gen_request("sql-lora", max_tokens=3), timeout=60).usage.completion_tokens == 3
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                stub.Generate(gen_request("chat-lora", max_tokens=2), timeout=60)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() - t0 < 10
            assert "store" in info.value.details().lower()

            shutil.rmtree(root / "sql-lora")  # only the store's cache holds it now
            port = store.address.rsplit(":", 1)[1]
            again, lines = spawn("store2", store_cmd(root, tmp_path / "cache", port), tmp_path)
            procs.append(again)
            ready_line(again, lines, tmp_path)
            # the cold one now loads; the cached one is served from the cache (its source is gone)
            assert wait_until(lambda: _ok(stub, "chat-lora"), 30)
            from loraserve.v1 import adapter_store_pb2_grpc
            from tests.store.conftest import resolve  # noqa: PLC0415 (the store's own RPC)

            with grpc.insecure_channel(again.address) as ch:
                manifest = resolve(adapter_store_pb2_grpc.AdapterStoreServiceStub(ch), "sql-lora")
            assert manifest.ref.content_hash == warm.served_by.adapter.content_hash
    finally:
        for p in reversed(procs):
            p.stop(signal.SIGKILL)


def _ok(stub, model: str) -> bool:
    try:
        return stub.Generate(gen_request(model, max_tokens=2), timeout=30).usage.completion_tokens == 2
    except grpc.RpcError:
        return False


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of this test's own, on a free port, that the test may stop and start again."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
           "--dir", str(tmp_path)]

    class Server:
        url = f"redis://127.0.0.1:{port}/0"
        proc: subprocess.Popen | None = None

        def start(self):
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            import redis

            assert wait_until(lambda: _pings(redis, self.url), 10)

        def stop(self):
            if self.proc is not None:
                self.proc.kill()
                self.proc.wait()

    server = Server()
    server.start()
    yield server
    server.stop()


def _pings(redis, url) -> bool:
    try:
        return redis.Redis.from_url(url, socket_connect_timeout=0.5).ping()
    except redis.RedisError:
        return False


def test_redis_stopped_and_restarted(loop, tiny_model_dir, tmp_path, own_redis):
    """Routers keep routing on their last view while Redis is down; the worker re-registers when it returns
    (its data was lost: a restart without persistence), and the router's view converges again."""
    worker, lines = spawn("wk-r", [
        sys.executable, "-m", "gpu_worker", "--model-dir", str(tiny_model_dir), "--host", "127.0.0.1", "--port", "0",
        "--worker-id", "wk-r", "--num-kv-blocks", "64", "--redis-url", own_redis.url, "--registry-ttl-s", "1.5",
        "--log-level", "warning"], tmp_path)
    try:
        ready_line(worker, lines, tmp_path)
        config = router_config(workers=(), redis_url=own_redis.url, registry_poll_s=0.2)
        with running_router(loop, config) as router, router_stub(router) as stub:
            assert wait_until(lambda: [w.worker_id for w in router.registry.published] == ["wk-r"], 15)
            own_redis.stop()
            time.sleep(2.0)  # past the record's TTL and several polls: the router keeps its last view
            assert [w.worker_id for w in router.registry.published] == ["wk-r"]
            assert stub.Generate(gen_request(max_tokens=2), timeout=30).usage.completion_tokens == 2
            own_redis.start()  # empty: the worker's record is gone until its next heartbeat
            import redis

            client = redis.Redis.from_url(own_redis.url)
            assert wait_until(lambda: client.get("loraserve:worker:wk-r") is not None, 10)
            assert wait_until(lambda: [w.worker_id for w in router.registry.published] == ["wk-r"], 10)
            assert stub.Generate(gen_request(max_tokens=2), timeout=30).usage.completion_tokens == 2
    finally:
        worker.stop(signal.SIGKILL)
