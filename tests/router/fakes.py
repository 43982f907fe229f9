"""TEST AND BENCHMARK DOUBLE: a fake WorkerService ("echo worker") that streams a fixed reply, with no model.

It speaks worker.proto as the real worker does (StreamGenerate's first message carries the adapter and the
worker id, the last the finish reason and usage; WatchStatus pushes changes; Prefetch / Evict keep a
residency table), and lets a test inject what real workers do rarely: fail before the first token, fail
midway, hang until released, refuse unknown adapters. The router tests use it in-process; `make
bench-router` runs it as its own process:

    python -m tests.router.fakes --workers 2 [--tokens 4]     # prints "echo worker <id> serving on <addr>"
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import sys
from collections import Counter
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from loraserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from service_kit import keepalive

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name


def fake_hash(name: str, version: int = 1) -> str:
    return hashlib.sha256(f"{name}@{version}".encode()).hexdigest()


@dataclass
class Seen:
    request_id: str
    adapter: tuple[str, str] | None
    time_remaining: float | None
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class Faults:
    """What the next requests do wrong; each counter is consumed by one request."""

    unavailable_before_first: int = 0  # UNAVAILABLE before any message (as a draining worker)
    exhausted_before_first: int = 0  # RESOURCE_EXHAUSTED (queue full)
    fail_after_first: int = 0  # one message, then UNAVAILABLE
    hold: asyncio.Event | None = None  # wait for it before the first message


@dataclass
class FakeWorker(worker_pb2_grpc.WorkerServiceServicer):
    worker_id: str
    base_model: str = "tiny-base"
    # adapter name -> current version (its content hash is fake_hash(name, version)); None: any name is known
    adapters: dict[str, int] | None = None
    max_loras: int = 4
    tokens: int = 4
    token_delay_s: float = 0.0
    # Keep a residency table and push status changes (off for the benchmark: a plain echo).
    track: bool = True
    address: str = ""
    faults: Faults = field(default_factory=Faults)
    seen: list[Seen] = field(default_factory=list)
    cancelled: int = 0
    evictions: list[tuple[str, str]] = field(default_factory=list)
    prefetches: list[tuple[str, str]] = field(default_factory=list)
    resident: dict[tuple[str, str], int] = field(default_factory=dict)  # (name, hash) -> residency
    active: Counter = field(default_factory=Counter)
    state: int = common_pb2.WORKER_STATE_SERVING
    _version: int = 0
    _changed: asyncio.Condition | None = None

    def __post_init__(self):
        self._reply = [worker_pb2.StreamGenerateResponse(text_delta=f"t{i} ", token_ids=[100 + i])
                       for i in range(self.tokens)]

    # -- WorkerService --------------------------------------------------------------------------------

    async def StreamGenerate(self, request, context):
        key = self._adapter_key(request)
        if self.track:
            self.seen.append(Seen(request.request_id, key, context.time_remaining(),
                                  dict(context.invocation_metadata() or ())))
        f = self.faults
        if f.unavailable_before_first:
            f.unavailable_before_first -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"worker {self.worker_id} is draining")
        if f.exhausted_before_first:
            f.exhausted_before_first -= 1
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"worker {self.worker_id}: queue full")
        if key is not None and self.adapters is not None and key[0] not in self.adapters:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"adapter {key[0]!r} is unknown to this worker")
        if key is not None and self.adapters is not None and key[1] != self._current_hash(key[0]):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"version mismatch: requested {key[1][:12]}, have {self._current_hash(key[0])[:12]}")
        fail_midway = f.fail_after_first > 0
        f.fail_after_first -= fail_midway
        if self.track and key is not None:
            self.active[key] += 1
            self.resident[key] = common_pb2.RESIDENCY_GPU_SLOT
            self._bump()
        try:
            if f.hold is not None:
                await f.hold.wait()
            for i, msg in enumerate(self._reply):
                out = worker_pb2.StreamGenerateResponse()
                out.CopyFrom(msg)
                out.request_id = request.request_id
                if i == 0:
                    out.worker_id = self.worker_id
                    if key is not None:
                        out.adapter.name, out.adapter.content_hash = key
                    if fail_midway:
                        yield out
                        await context.abort(grpc.StatusCode.UNAVAILABLE, f"worker {self.worker_id} stopped")
                if i == len(self._reply) - 1:
                    out.finish_reason = common_pb2.FINISH_REASON_LENGTH
                    out.usage.prompt_tokens, out.usage.completion_tokens = 3, len(self._reply)
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
                yield out
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            if self.track and key is not None:
                self.active[key] -= 1
                self._bump()

    async def PrefetchAdapter(self, request, context):
        name = request.adapter.name
        if self.adapters is not None and name not in self.adapters:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"adapter {name!r} is unknown to this worker")
        key = (name, request.adapter.content_hash or self._current_hash(name))
        self.prefetches.append(key)
        self.resident.setdefault(key, common_pb2.RESIDENCY_HOST_MEMORY)
        self._bump()
        return worker_pb2.PrefetchAdapterResponse(adapter=common_pb2.ResidentAdapter(
            ref=common_pb2.AdapterRef(name=key[0], content_hash=key[1]), residency=self.resident[key]))

    async def EvictAdapter(self, request, context):
        self.evictions.append((request.name, request.content_hash))
        gone = [k for k in self.resident if k[0] == request.name
                and (not request.content_hash or k[1] == request.content_hash) and not self.active[k]]
        for k in gone:
            del self.resident[k]
        self._bump()
        return worker_pb2.EvictAdapterResponse(evicted=len(gone))

    async def GetStatus(self, request, context):
        return worker_pb2.GetStatusResponse(status=self.status())

    async def WatchStatus(self, request, context):
        if self._changed is None:
            self._changed = asyncio.Condition()
        while True:
            version = self._version
            yield worker_pb2.WatchStatusResponse(status=self.status())
            async with self._changed:
                await self._changed.wait_for(lambda v=version: self._version != v)
            await asyncio.sleep(max(request.interval_ms, 1) / 1000)

    # -- helpers --------------------------------------------------------------------------------------

    def status(self) -> common_pb2.WorkerStatus:
        running = sum(self.active.values())
        st = common_pb2.WorkerStatus(worker_id=self.worker_id, address=self.address, state=self.state,
                                     base_model=self.base_model, device="cpu", running_requests=running,
                                     kv_blocks_total=128, kv_blocks_free=128 - running, kv_block_size=16,
                                     max_loras=self.max_loras, max_cpu_loras=2 * self.max_loras, max_lora_rank=16,
                                     max_model_len=512)
        for (name, content_hash), residency in sorted(self.resident.items()):
            st.adapters.add(ref=common_pb2.AdapterRef(name=name, content_hash=content_hash), residency=residency,
                            active_requests=self.active[(name, content_hash)], rank=8)
        return st

    def set_state(self, state: int) -> None:
        self.state = state
        self._bump()

    def reload(self, name: str) -> str:
        """A new version of `name` (as a store re-registration would make); returns its hash."""
        self.adapters[name] = self.adapters.get(name, 0) + 1
        return fake_hash(name, self.adapters[name])

    def _current_hash(self, name: str) -> str:
        return fake_hash(name, self.adapters.get(name, 1)) if self.adapters is not None else fake_hash(name)

    def _adapter_key(self, request) -> tuple[str, str] | None:
        if not request.HasField("adapter"):
            return None
        return request.adapter.name, request.adapter.content_hash or self._current_hash(request.adapter.name)

    def _bump(self) -> None:
        if not self.track:
            return
        self._version += 1
        if self._changed is not None:
            cond = self._changed

            async def notify():
                async with cond:
                    cond.notify_all()

            asyncio.get_running_loop().create_task(notify())


@contextlib.asynccontextmanager
async def serving(worker: FakeWorker, host: str = "127.0.0.1", port: int = 0):
    """Serve `worker` on `port` (0: a free one; sets worker.address); yields the grpc server."""
    server = grpc.aio.server(options=keepalive.server_options())  # as the real worker
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(worker, server)
    hs = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    port = server.add_insecure_port(f"{host}:{port}")
    worker.address = f"{host}:{port}"
    await server.start()
    await hs.set("", health_pb2.HealthCheckResponse.SERVING)
    try:
        yield server
    finally:
        await server.stop(0)


async def _main(args) -> None:
    async with contextlib.AsyncExitStack() as stack:
        for i in range(args.workers):
            w = FakeWorker(f"echo-{i}", tokens=args.tokens, track=False)
            await stack.enter_async_context(serving(w, args.host))
            print(f"echo worker {w.worker_id} serving on {w.address}", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m tests.router.fakes", description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--tokens", type=int, default=4)
    p.add_argument("--host", default="127.0.0.1")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(p.parse_args(sys.argv[1:])))
