"""WorkerServer: the gRPC server's lifecycle. Listen first (health NOT_SERVING, so probes get an answer while
the model loads), load and warm the engine, then SERVING; on shutdown drain, then stop."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from gpu_worker.adapters import LocalAdapterSource, StoreAdapterSource
from gpu_worker.async_engine import AsyncEngine
from gpu_worker.config import WorkerConfig
from gpu_worker.engine.llm_engine import LLMEngine
from gpu_worker.engine.sampling_params import SamplingParams
from gpu_worker.service import SERVICE_NAME, WorkerService, error_interceptor
from gpu_worker.store_client import StoreClient
from loraserve.v1 import worker_pb2_grpc
from service_kit import keepalive
from service_kit.health import SERVING, ServiceHealth
from service_kit.lifecycle import StartupError, listen
from service_kit.worker_registry import RegistryMembership

log = logging.getLogger(__name__)

MAX_RECEIVE_BYTES = 4 * 1024 * 1024
# After the drain, RPCs still open (WatchStatus, health Watch) get this long before they are cancelled.
STOP_GRACE_S = 1.0
_WILDCARD = {"0.0.0.0", "::", "[::]", ""}


@dataclass(frozen=True)
class _Record:
    """What the worker writes into the registry."""

    worker_id: str
    address: str
    base_model: str


class WorkerServer:
    def __init__(self, config: WorkerConfig, engine_factory: Callable[[], LLMEngine] | None = None):
        self.config = config
        # A factory given here must pickle when the engine runs in its own process (config.engine_process).
        self.engine = AsyncEngine(engine_factory or functools.partial(LLMEngine, config.engine_args()),
                                  process=config.use_engine_process())
        self.engine.on_death = self._engine_died
        # Set when the engine's process died or its step loop failed: the worker cannot serve any more (serve() exits
        # 1 on it).
        self.failed = asyncio.Event()
        self.adapters = local = LocalAdapterSource(config.lora_modules, config.lora_root or None)
        self.store_client: StoreClient | None = None
        if config.adapter_store:
            cache = config.adapter_cache_dir or str(Path(tempfile.gettempdir()) / "loraserve-worker-adapters")
            self.store_client = StoreClient(config.adapter_store)
            self.adapters = StoreAdapterSource(local, self.store_client, cache)
        self.health = ServiceHealth(SERVICE_NAME)
        self.registry: RegistryMembership | None = None
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.worker_id = ""
        self.address = ""  # what the router dials
        self.listen_address = ""

    async def start(self) -> None:
        """Listen, load and warm the engine, report SERVING. Raises StartupError."""
        cfg = self.config
        sys.setswitchinterval(cfg.gil_switch_interval_ms / 1000)  # the config's comment says why
        # so_reuseport off: a second worker on a taken port must fail, not silently share it.
        server = grpc.aio.server(
            interceptors=[error_interceptor()],
            options=[("grpc.max_receive_message_length", MAX_RECEIVE_BYTES), ("grpc.so_reuseport", 0),
                     *keepalive.server_options()],
        )
        host, self.port = listen(server, cfg.host, cfg.port)
        self.listen_address = f"{host}:{self.port}"
        name = socket.gethostname()
        self.worker_id = cfg.worker_id or f"{name}-{self.port}"
        self.address = cfg.advertise_address or f"{name if cfg.host in _WILDCARD else host}:{self.port}"

        service = WorkerService(self.engine, self.adapters, cfg.enable_lora, self.worker_id, self.address,
                                cfg.status_interval_ms, cfg.stream_interval)
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(service, server)
        await self.health.expose(server)
        self.server = server
        await server.start()
        log.info("worker %s listening on %s; loading %s", self.worker_id, self.listen_address, cfg.model_dir)

        t0 = time.perf_counter()
        preload = [self.adapters.lookup(m.name) for m in cfg.lora_modules]
        try:
            info = await self.engine.start(preload)
            await self._warm_up(preload[0] if preload else None)
        except BaseException as e:
            await self.engine.stop()
            await server.stop(0)
            if isinstance(e, Exception):  # any failure to load is fatal, with its message
                raise StartupError(f"the engine failed to start: {e}") from e
            raise
        self.engine.set_state("serving")
        await self.health.set(SERVING)
        if cfg.redis_url:
            # Registered only while serving: the heartbeat reads the state at every beat.
            record = _Record(self.worker_id, self.address, info.served_model_name)
            self.registry = RegistryMembership(cfg.redis_url, cfg.registry_prefix, cfg.registry_ttl_s)
            self.registry.start(lambda: record if self.engine.state == "serving" else None)
            log.info("worker %s registers as %s in %s (prefix %r)", self.worker_id, self.address, cfg.redis_url,
                     cfg.registry_prefix)
        where = "on a thread" if self.engine.engine_pid == os.getpid() else f"in process {self.engine.engine_pid}"
        log.info("worker %s ready in %.1fs: %s on %s (step loop %s), %d KV blocks, adapters pre-loaded: %s",
                 self.worker_id, time.perf_counter() - t0, info.served_model_name, info.device, where,
                 info.kv_blocks_total, [m.name for m in cfg.lora_modules] or "none")

    async def _warm_up(self, lora) -> None:
        """One tiny greedy request (and one with an adapter if there is one) through the whole path, so the
        first real request does not pay for lazy initialisation (allocator, kernel compilation on CUDA)."""
        for req in [None, lora] if lora is not None else [None]:
            stream = await self.engine.generate("Hello", SamplingParams(max_tokens=2, temperature=0.0), req,
                                                request_id="warmup")
            try:
                async for _ in stream:
                    pass
            finally:
                stream.close()

    def _engine_died(self, error: BaseException) -> None:
        """The engine is gone (its process died, or its step loop failed): stop answering as healthy at once; the
        process exits (serve())."""
        log.error("worker %s cannot serve any more: %s", self.worker_id, error)
        self.failed.set()
        asyncio.get_running_loop().create_task(self.health.enter_graceful_shutdown())

    async def shutdown(self, drain_timeout_s: float | None = None) -> None:
        """Refuse new requests (UNAVAILABLE, health NOT_SERVING), let running ones finish for up to
        `drain_timeout_s` (default: the config's), then stop the engine and the server."""
        timeout = self.config.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        if self.engine.state == "serving":
            self.engine.set_state("draining")
        await self.health.enter_graceful_shutdown()
        if self.registry is not None:
            # Routers stop sending new work at their next poll; streams already running keep their channel.
            await self.registry.close()
            self.registry = None
        log.info("worker %s draining (up to %.0fs)", self.worker_id, timeout)
        if not await self.engine.wait_idle(timeout):
            log.warning("worker %s: requests still running after %.0fs; aborting them", self.worker_id, timeout)
        await self.engine.stop()
        if self.server is not None:
            await self.server.stop(STOP_GRACE_S)
        if self.store_client is not None:
            self.store_client.close()
        log.info("worker %s stopped", self.worker_id)
