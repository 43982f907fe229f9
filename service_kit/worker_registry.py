"""The worker's half of the Redis worker registry: a heartbeat that keeps the worker's record alive while
it serves, and the leave on drain. The router's reader is router/registry_redis.py; both use these keys.

Keys, under a prefix (default "loraserve:"):
    {prefix}workers            a SET of worker ids (discovery)
    {prefix}worker:{id}        a STRING, JSON {"worker_id", "address", "base_model", "updated"}, with a TTL
A worker is live while its key exists. Redis expires the key `ttl` after the last heartbeat, on Redis's own
clock, so clocks that disagree between hosts do not matter.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "loraserve:"
DEFAULT_TTL_S = 10.0


class Registrable(Protocol):
    """What a heartbeat needs of a worker (a loraserve.v1.WorkerStatus has these fields too)."""

    worker_id: str
    address: str
    base_model: str


def set_key(prefix: str) -> str:
    return f"{prefix}workers"


def worker_key(prefix: str, worker_id: str) -> str:
    return f"{prefix}worker:{worker_id}"


async def register_worker(redis: aioredis.Redis, prefix: str, worker: Registrable,
                          ttl_s: float = DEFAULT_TTL_S) -> None:
    """One heartbeat: (re)write the worker's record with a fresh TTL. Call it every ttl_s / 3 or so."""
    if not worker.worker_id or not worker.address:
        raise ValueError("a worker needs a worker_id and an address to register")
    record = {"worker_id": worker.worker_id, "address": worker.address, "base_model": worker.base_model,
              "updated": time.time()}
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(worker_key(prefix, worker.worker_id), json.dumps(record), px=max(1, int(ttl_s * 1000)))
        pipe.sadd(set_key(prefix), worker.worker_id)
        await pipe.execute()


async def deregister_worker(redis: aioredis.Redis, prefix: str, worker_id: str) -> None:
    """Leave at once (a draining worker), rather than when the TTL runs out."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(worker_key(prefix, worker_id))
        pipe.srem(set_key(prefix), worker_id)
        await pipe.execute()


def raise_if_cancelled() -> None:
    """Re-raise a cancellation that a Redis call swallowed. redis-py's asyncio client can eat the
    CancelledError when the cancel lands inside a command (redis/redis-py#2028, #2551); a loop that only ever
    awaits Redis and sleeps would then run on, and the shutdown that cancelled it would wait forever (seen: a
    router's shutdown hung on its registry reader under load). The task still counts the request
    (Task.cancelling()), so each loop checks after its Redis calls."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def heartbeat(redis: aioredis.Redis, prefix: str, current: Callable[[], Registrable | None],
                    ttl_s: float = DEFAULT_TTL_S, interval_s: float | None = None) -> None:
    """Register `current()` every interval (default ttl / 3) until cancelled; when it returns None (not
    serving), deregister. A Redis error is logged and retried at the next beat: the record lives `ttl_s`."""
    interval = interval_s if interval_s is not None else ttl_s / 3
    registered: str | None = None
    failing = False
    while True:
        worker = current()
        try:
            if worker is not None:
                await register_worker(redis, prefix, worker, ttl_s)
                registered = worker.worker_id
            elif registered is not None:
                await deregister_worker(redis, prefix, registered)
                registered = None
            if failing:
                log.info("worker registry reachable again")
            failing = False
        except (RedisError, OSError) as e:
            if not failing:
                log.warning("worker registry heartbeat failed (%s); retrying every %.1fs", e, interval)
            failing = True
        raise_if_cancelled()
        await asyncio.sleep(interval)


class RegistryMembership:
    """A serving process's registration: `start(current)` begins the heartbeat, `leave()` stops it and
    removes the record at once (a drain), `close()` releases the connection."""

    def __init__(self, url: str, prefix: str = DEFAULT_PREFIX, ttl_s: float = DEFAULT_TTL_S):
        if ttl_s <= 0:
            raise ValueError(f"the registry TTL must be positive, not {ttl_s}")
        self._redis = aioredis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=2,
                                              socket_timeout=5)
        self.prefix, self.ttl_s = prefix, ttl_s
        self._task: asyncio.Task | None = None
        self._worker_id = ""

    def start(self, current: Callable[[], Registrable | None]) -> None:
        def tracked() -> Registrable | None:
            worker = current()
            if worker is not None:
                self._worker_id = worker.worker_id
            return worker

        self._task = asyncio.get_running_loop().create_task(
            heartbeat(self._redis, self.prefix, tracked, self.ttl_s), name="worker-registry-heartbeat")

    async def leave(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._worker_id:
            try:
                await deregister_worker(self._redis, self.prefix, self._worker_id)
                log.info("worker %s left the registry", self._worker_id)
            except (RedisError, OSError) as e:  # the record then expires on its own, within the TTL
                log.warning("could not leave the worker registry (%s); the record expires in %.0fs", e, self.ttl_s)

    async def close(self) -> None:
        await self.leave()
        await self._redis.aclose()
