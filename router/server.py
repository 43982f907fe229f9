"""RouterServer: the router's lifecycle. Listen first with health NOT_SERVING, dial the workers (static list,
Redis registry) and the store; SERVING while at least one worker is routable, NOT_SERVING while none is; on
shutdown refuse new calls, let running ones finish (drain), then stop."""

from __future__ import annotations

import asyncio
import functools
import logging

import grpc

from loraserve.v1 import inference_pb2_grpc
from router.admin import AdapterAdmin, AdminGuard
from router.catalog import AdapterCatalog
from router.config import RouterConfig
from router.dispatcher import Dispatcher
from router.http_front import HttpFront
from router.interceptor import error_interceptor
from router.metrics import RouterMetrics
from router.registry import WorkerRegistry
from router.registry_dns import DnsMembership
from router.registry_redis import RedisMembership
from router.service import SERVICE_NAME, InferenceService
from router.store_client import StoreClient
from router.worker_client import WorkerClient
from service_kit.health import NOT_SERVING, SERVING, ServiceHealth
from service_kit.lifecycle import StartupError, listen

log = logging.getLogger(__name__)

MAX_RECEIVE_BYTES = 4 * 1024 * 1024


class RouterServer:
    def __init__(self, config: RouterConfig):
        self.config = config
        self.health = ServiceHealth(SERVICE_NAME)
        self.registry = WorkerRegistry(functools.partial(WorkerClient, keepalive_s=config.worker_keepalive_s),
                                       status_interval_ms=config.status_interval_ms, on_change=self._workers_changed)
        self.metrics = RouterMetrics(lambda: self.registry.published)
        self.store = StoreClient(config.store_address) if config.store_address else None
        self.catalog = AdapterCatalog(self.registry, self.store, config.catalog_refresh_s)
        self.dispatcher = Dispatcher(self.registry, self.catalog, config.policy(), self.metrics, config.max_attempts,
                                     config.routing)
        self.admin = AdapterAdmin(AdminGuard(config.enable_runtime_lora_updating, config.admin_token), self.catalog,
                                  self.registry)
        self.membership: RedisMembership | None = None
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.listen_address = ""
        self.serving = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._metrics_server = None
        self.http: HttpFront | None = None
        self._health_state = NOT_SERVING
        self._stopping = False

    async def start(self) -> None:
        """Listen, then dial the workers and the store. Raises StartupError."""
        cfg = self.config
        server = grpc.aio.server(interceptors=[error_interceptor(SERVICE_NAME)],
                                 options=[("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
                                          ("grpc.so_reuseport", 0)])
        host, self.port = listen(server, cfg.host, cfg.port)
        self.listen_address = f"{host}:{self.port}"
        service = InferenceService(self.dispatcher, self.catalog, self.admin, self.registry)
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(service, server)
        await self.health.expose(server)
        if cfg.metrics_port:
            try:
                self._metrics_server = self.metrics.serve(cfg.metrics_port, cfg.host)
            except OSError as e:
                raise StartupError(f"cannot serve metrics on port {cfg.metrics_port} ({e}); is it taken?") from None
        if cfg.http_port:
            self.http = HttpFront(service, self.dispatcher, self.catalog, self.admin, self.registry, self.metrics)
            try:
                port = await self.http.start(cfg.host, cfg.http_port, cfg.drain_timeout_s)
            except OSError as e:
                raise StartupError(f"cannot serve HTTP on port {cfg.http_port} ({e}); is it taken?") from None
            log.info("OpenAI-compatible HTTP API on http://%s:%d/v1", host, port)
        self.server = server
        await server.start()
        log.info("router listening on %s (NOT_SERVING until a worker is up); workers: %s%s%s%s", self.listen_address,
                 ", ".join(cfg.workers) or "none listed", f"; registry {cfg.redis_url}" if cfg.redis_url else "",
                 f"; DNS {', '.join(cfg.workers_dns)}" if cfg.workers_dns else "",
                 f"; adapter store {cfg.store_address}" if cfg.store_address else "; no adapter store")
        self.registry.set_members("static", set(cfg.workers))
        if cfg.redis_url:
            self.membership = RedisMembership(cfg.redis_url, cfg.redis_prefix, cfg.registry_poll_s,
                                              lambda addresses: self.registry.set_members("redis", addresses))
            self._tasks.append(asyncio.create_task(self.membership.run(), name="redis registry"))
        if cfg.workers_dns:
            dns = DnsMembership(cfg.workers_dns, cfg.dns_refresh_s,
                                lambda addresses: self.registry.set_members("dns", addresses), cfg.dns_nameserver)
            self._tasks.append(asyncio.create_task(dns.run(), name="dns discovery"))
        if self.store is not None:
            self._tasks.append(asyncio.create_task(self.catalog.run(), name="adapter catalogue"))

    def _workers_changed(self) -> None:
        state = SERVING if self.registry.routable() else NOT_SERVING
        if state == self._health_state or self._stopping:
            return
        self._health_state = state
        log.info("router %s: %d routable workers", "SERVING" if state == SERVING else "NOT_SERVING",
                 len(self.registry.routable()))
        if state == SERVING:
            self.serving.set()
        else:
            self.serving.clear()
        asyncio.get_running_loop().create_task(self.health.set(state))

    async def shutdown(self, drain_timeout_s: float | None = None) -> None:
        """NOT_SERVING, refuse new calls, give running ones up to `drain_timeout_s` (default: the config's),
        then close the workers' channels, the registry reader and the store client."""
        timeout = self.config.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        self._stopping = True
        await self.health.enter_graceful_shutdown()
        if self.server is not None:
            log.info("router draining (up to %.0fs)", timeout)
            await asyncio.gather(self.server.stop(timeout), *([self.http.stop()] if self.http else []))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.dispatcher.close()
        await self.admin.close()
        await self.registry.close()
        if self.membership is not None:
            await self.membership.close()
        if self.store is not None:
            await self.store.close()
        if self._metrics_server is not None:
            server, thread = self._metrics_server
            server.shutdown()
            thread.join(5)
        log.info("router stopped")
