"""The router's half of the Redis worker registry: read the live workers, and keep the router's view of
them fresh. The keys and the worker's half (heartbeat, leave on drain) are service_kit/worker_registry.py,
so a worker registers itself without importing the router. Readers drop ids whose key has expired from the
set. Every router replica reads the same keys, so all of them see the same workers (and, since the policy
hashes on worker ids, place cold adapters alike).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from service_kit.worker_registry import raise_if_cancelled, set_key, worker_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerRecord:
    worker_id: str
    address: str
    base_model: str = ""
    updated: float = 0.0  # unix seconds of the heartbeat that wrote it


async def read_workers(redis: aioredis.Redis, prefix: str) -> dict[str, WorkerRecord]:
    """Live workers by id; ids whose record expired are removed from the set on the way."""
    ids = sorted(await redis.smembers(set_key(prefix)))
    if not ids:
        return {}
    values = await redis.mget([worker_key(prefix, i) for i in ids])
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
        await redis.srem(set_key(prefix), *gone)
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
            raise_if_cancelled()
            await asyncio.sleep(self.poll_s)

    async def close(self) -> None:
        await self._redis.aclose()
