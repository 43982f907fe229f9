"""The Redis worker registry, both halves: the heartbeat any worker process calls, and the router's reader.

Keys, under a prefix (default "loraserve:"):
    {prefix}workers            a SET of worker ids (discovery)
    {prefix}worker:{id}        a STRING, JSON {"worker_id", "address", "base_model", "updated"}, with a TTL
A worker is live while its key exists. Redis expires the key `ttl` after the last heartbeat, on Redis's own
clock, so clocks that disagree between hosts do not matter. Readers drop ids whose key has expired from the
set. Every router replica reads the same keys, so all of them see the same workers (and, since the policy
hashes on worker ids, place cold adapters alike).

A worker registers by calling `heartbeat(redis, prefix, current, ttl_s)` as a task once it is SERVING
(`current()` returns its status, or None while it is not serving), and `deregister_worker` when it drains.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "loraserve:"
DEFAULT_TTL_S = 10.0


class Registrable(Protocol):
    """What a heartbeat needs of a worker: a loraserve.v1.WorkerStatus, or router.domain.WorkerStatus."""

    worker_id: str
    address: str
    base_model: str


@dataclass(frozen=True)
class WorkerRecord:
    worker_id: str
    address: str
    base_model: str = ""
    updated: float = 0.0  # unix seconds of the heartbeat that wrote it


def _set_key(prefix: str) -> str:
    return f"{prefix}workers"


def _worker_key(prefix: str, worker_id: str) -> str:
    return f"{prefix}worker:{worker_id}"


async def register_worker(redis: aioredis.Redis, prefix: str, worker: Registrable,
                          ttl_s: float = DEFAULT_TTL_S) -> None:
    """One heartbeat: (re)write the worker's record with a fresh TTL. Call it every ttl_s / 3 or so."""
    if not worker.worker_id or not worker.address:
        raise ValueError("a worker needs a worker_id and an address to register")
    record = {"worker_id": worker.worker_id, "address": worker.address, "base_model": worker.base_model,
              "updated": time.time()}
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(_worker_key(prefix, worker.worker_id), json.dumps(record), px=max(1, int(ttl_s * 1000)))
        pipe.sadd(_set_key(prefix), worker.worker_id)
        await pipe.execute()


async def deregister_worker(redis: aioredis.Redis, prefix: str, worker_id: str) -> None:
    """Leave at once (a draining worker), rather than when the TTL runs out."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(_worker_key(prefix, worker_id))
        pipe.srem(_set_key(prefix), worker_id)
        await pipe.execute()


async def heartbeat(redis: aioredis.Redis, prefix: str, current: Callable[[], Registrable | None],
                    ttl_s: float = DEFAULT_TTL_S, interval_s: float | None = None) -> None:
    """Register `current()` every interval (default ttl / 3) until cancelled; when it returns None (not
    serving), deregister. A Redis error is logged and retried at the next beat: the record lives `ttl_s`."""
    interval = interval_s if interval_s is not None else ttl_s / 3
    registered: str | None = None
    while True:
        worker = current()
        try:
            if worker is not None:
                await register_worker(redis, prefix, worker, ttl_s)
                registered = worker.worker_id
            elif registered is not None:
                await deregister_worker(redis, prefix, registered)
                registered = None
        except RedisError as e:
            log.warning("worker registry heartbeat failed (%s); retrying in %.1fs", e, interval)
        await asyncio.sleep(interval)


async def read_workers(redis: aioredis.Redis, prefix: str) -> dict[str, WorkerRecord]:
    """Live workers by id; ids whose record expired are removed from the set on the way."""
    ids = sorted(await redis.smembers(_set_key(prefix)))
    if not ids:
        return {}
    values = await redis.mget([_worker_key(prefix, i) for i in ids])
    live, gone = {}, []
    for worker_id, raw in zip(ids, values):
        if raw is None:
            gone.append(worker_id)
            continue
        try:
            data = json.loads(raw)
            live[worker_id] = WorkerRecord(worker_id, str(data["address"]), str(data.get("base_model", "")),
                                           float(data.get("updated", 0.0)))
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring the malformed registry record of %s: %r", worker_id, raw[:200])
    if gone:
        await redis.srem(_set_key(prefix), *gone)
    return live


class RedisMembership:
    """The router's half: read the registry every poll_s and hand the live addresses to `publish`. While
    Redis cannot be read, the last view stays (workers do not vanish because Redis blinked)."""

    def __init__(self, url: str, prefix: str, poll_s: float, publish: Callable[[set[str]], None]):
        self._redis = aioredis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=2,
                                              socket_timeout=5)
        self.prefix = prefix
        self.poll_s = poll_s
        self._publish = publish
        self.records: dict[str, WorkerRecord] = {}
        self._failing = False

    async def poll_once(self) -> dict[str, WorkerRecord]:
        self.records = await read_workers(self._redis, self.prefix)
        self._publish({r.address for r in self.records.values()})
        return self.records

    async def run(self) -> None:
        while True:
            try:
                await self.poll_once()
                if self._failing:
                    log.info("worker registry readable again")
                self._failing = False
            except (RedisError, OSError) as e:
                if not self._failing:
                    log.warning("cannot read the worker registry in Redis (%s); keeping the last view", e)
                self._failing = True
            await asyncio.sleep(self.poll_s)

    async def close(self) -> None:
        await self._redis.aclose()
