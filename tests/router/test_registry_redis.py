"""The Redis worker registry against the real Redis: heartbeats with a TTL, the reader, and two router
replicas sharing one view of fake workers (real workers: test_cluster.py)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import pytest
import redis.asyncio as aioredis

from loraserve.v1 import inference_pb2
from router.domain import WorkerStatus
from router.policy import preference
from router.registry_redis import read_workers
from service_kit.worker_registry import deregister_worker, heartbeat, register_worker
from tests.router.conftest import fake_workers, gen_request, router_config, router_stub, running_router
from tests.router.fakes import FakeWorker
from tests.services import wait_until


@pytest.fixture
def aredis(loop, redis_url, redis_client):  # redis_client: deletes the test's keys afterwards
    client = loop.run(_connect(redis_url))
    yield client
    loop.run(client.aclose())


async def _connect(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(url, decode_responses=True)


def test_a_record_lives_until_its_ttl(loop, aredis, redis_prefix):
    w = WorkerStatus("w1", address="10.0.0.1:50053", base_model="llama")
    loop.run(register_worker(aredis, redis_prefix, w, ttl_s=0.3))
    records = loop.run(read_workers(aredis, redis_prefix))
    assert list(records) == ["w1"] and records["w1"].address == "10.0.0.1:50053"
    assert records["w1"].base_model == "llama" and records["w1"].updated > time.time() - 5
    time.sleep(0.5)
    assert loop.run(read_workers(aredis, redis_prefix)) == {}
    assert loop.run(aredis.smembers(f"{redis_prefix}workers")) == set()  # the reader cleaned the set


def test_heartbeat_registers_and_deregisters(loop, aredis, redis_prefix):
    current = {"status": WorkerStatus("w2", address="h:1")}
    task = loop.submit(heartbeat(aredis, redis_prefix, lambda: current["status"], ttl_s=5, interval_s=0.05))
    try:
        assert wait_until(lambda: "w2" in loop.run(read_workers(aredis, redis_prefix)), 5)
        current["status"] = None  # draining: leave now, not in 5 s
        assert wait_until(lambda: not loop.run(read_workers(aredis, redis_prefix)), 5)
    finally:
        task.cancel()
    loop.run(register_worker(aredis, redis_prefix, WorkerStatus("w3", address="h:2")))
    loop.run(deregister_worker(aredis, redis_prefix, "w3"))
    assert loop.run(read_workers(aredis, redis_prefix)) == {}
    with pytest.raises(ValueError):
        loop.run(register_worker(aredis, redis_prefix, WorkerStatus("", address="h:3")))


def test_two_routers_share_one_view_of_the_workers(loop, aredis, redis_url, redis_prefix):
    workers = [FakeWorker(f"fw-{i}", adapters={"sql-lora": 1, "chat-lora": 1}) for i in range(3)]
    with fake_workers(loop, *workers):
        beats = {w.worker_id: loop.submit(heartbeat(aredis, redis_prefix, (lambda w=w: w.status()), ttl_s=0.6,
                                                    interval_s=0.1)) for w in workers}
        config = router_config(redis_url=redis_url, redis_prefix=redis_prefix)
        try:
            with running_router(loop, config) as r1, running_router(loop, config) as r2, \
                    router_stub(r1) as s1, router_stub(r2) as s2:
                ids = lambda stub: sorted(w.worker_id for w in stub.GetClusterStatus(  # noqa: E731
                    inference_pb2.GetClusterStatusRequest(), timeout=5).workers)
                everyone = ["fw-0", "fw-1", "fw-2"]
                assert wait_until(lambda: ids(s1) == everyone and ids(s2) == everyone, 10)
                # both replicas place a cold adapter on the same worker
                want = preference("chat-lora", tuple(everyone))[0]
                assert s1.Generate(gen_request("chat-lora"), timeout=5).served_by.worker_id == want
                assert s2.Generate(gen_request("chat-lora"), timeout=5).served_by.worker_id == want
                # a worker whose heartbeats stop leaves both views once its record expires
                beats.pop("fw-1").cancel()
                assert wait_until(lambda: ids(s1) == ["fw-0", "fw-2"] and ids(s2) == ["fw-0", "fw-2"], 10)
                assert not any(e.address == workers[1].address for e in r1.registry.entries())
        finally:
            for task in beats.values():
                task.cancel()


def test_redis_down_keeps_the_last_view(loop):
    config = router_config(redis_url="redis://127.0.0.1:1/0")  # nothing listens there
    with running_router(loop, config, wait=False) as router, router_stub(router) as stub:
        loop.run(asyncio.sleep(0.3))
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(gen_request("sql-lora"), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


class SwallowingRedis:
    """Stands in for redis-py when a cancel lands inside a command and the client eats the CancelledError
    (redis/redis-py#2028): every call waits a moment and, if cancelled meanwhile, returns as if nothing happened."""

    def __init__(self):
        self.calls = 0

    async def _swallow(self):
        self.calls += 1
        with contextlib.suppress(asyncio.CancelledError):  # the bug being simulated
            await asyncio.sleep(0.05)

    async def smembers(self, key):
        await self._swallow()
        return set()

    def pipeline(self, transaction=True):
        outer = self

        class Pipe:
            async def __aenter__(self):
                return self

            async def __aexit__(self, *exc):
                return False

            def __getattr__(self, name):
                return lambda *a, **k: None

            async def execute(self):
                await outer._swallow()

        return Pipe()


async def _cancel_soon(coro) -> str:
    task = asyncio.create_task(coro)
    await asyncio.sleep(0.02)  # inside the first Redis call
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=2)  # (wait_for would cancel it again, and wait for that)
    if not done:
        return "still running"
    return "cancelled" if task.cancelled() else "returned"


def test_loops_end_when_redis_swallows_their_cancellation(loop):
    """The registry reader and the heartbeat stop on cancel even if the Redis call under way ate it: a
    router's or a worker's shutdown never waits on them forever."""
    from router.registry_redis import RedisMembership

    membership = RedisMembership("redis://127.0.0.1:1/0", "p:", 0.01, lambda addresses: None)
    membership._redis = SwallowingRedis()
    assert loop.run(_cancel_soon(membership.run())) == "cancelled"
    w = WorkerStatus("w1", address="10.0.0.1:50053")
    fake = SwallowingRedis()
    assert loop.run(_cancel_soon(heartbeat(fake, "p:", lambda: w, ttl_s=0.03))) == "cancelled"
    assert fake.calls == 1
