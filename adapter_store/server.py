"""StoreServer: the gRPC server's lifecycle. Listen first (health NOT_SERVING, so probes get an answer),
warm up (scan the disk cache, load plugins, build the resolvers), then SERVING; on shutdown drain, then stop.

grpc.aio, with the blocking work on two thread pools (downloads and file reads): a Fetch stream waiting
on a slow client or a Resolve waiting on a single-flight download holds no thread, so a few threads serve
many streams, and a slow source never starves the reads of cached adapters.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from adapter_store.auth import AdminGuard
from adapter_store.cache import DiskCache
from adapter_store.config import StoreConfig
from adapter_store.registry import REGISTERED, Registry, SourceFactory
from adapter_store.service import SERVICE_NAME, AdapterStoreService, Runtime, add_to_server, error_interceptor
from adapter_store.sources.base import Resolver
from adapter_store.sources.filesystem import FilesystemResolver
from adapter_store.sources.hub import HubResolver
from adapter_store.sources.plugins import load_plugins
from adapter_store.sources.s3 import S3Clients, S3Resolver
from adapter_store.store import AdapterStore
from service_kit.health import SERVING, ServiceHealth
from service_kit.lifecycle import StartupError, listen

log = logging.getLogger(__name__)

# Fetch messages are ~1 MiB of data plus a few fields.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


class StoreServer:
    def __init__(self, config: StoreConfig):
        self.config = config
        self.health = ServiceHealth(SERVICE_NAME)
        self.runtime = Runtime(
            guard=AdminGuard(config.enable_admin, config.admin_token),
            downloads=ThreadPoolExecutor(config.download_threads, thread_name_prefix="store-download"),
            io=ThreadPoolExecutor(config.io_threads, thread_name_prefix="store-io"),
        )
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.listen_address = ""

    @property
    def store(self) -> AdapterStore | None:
        return self.runtime.store

    async def start(self) -> None:
        """Listen, warm up, report SERVING. Raises StartupError."""
        cfg = self.config
        server = grpc.aio.server(
            interceptors=[error_interceptor()],
            options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                     ("grpc.max_send_message_length", MAX_MESSAGE_BYTES), ("grpc.so_reuseport", 0)],
        )
        host, self.port = listen(server, cfg.host, cfg.port)
        self.listen_address = f"{host}:{self.port}"
        add_to_server(AdapterStoreService(self.runtime), server)
        await self.health.expose(server)
        self.server = server
        await server.start()
        log.info("adapter store listening on %s; opening cache %s", self.listen_address, cfg.cache_dir)

        t0 = time.perf_counter()
        try:
            store = await asyncio.get_running_loop().run_in_executor(self.runtime.io, build_store, cfg)
        except Exception as e:
            await server.stop(0)
            self._close_pools()
            raise StartupError(f"the adapter store failed to start: {e}") from e
        self.runtime.store = store
        await self.health.set(SERVING)
        log.info("adapter store ready in %.2fs: resolvers %s, %d registered names, admin %s",
                 time.perf_counter() - t0, [k for k in cfg.resolvers if k == REGISTERED or k in store.registry.resolvers
                                            or k == "plugins"], len(store.registry.all()),
                 "on" if cfg.enable_admin else "off")

    async def shutdown(self, grace_s: float | None = None) -> None:
        """Health NOT_SERVING, let running RPCs finish for up to `grace_s` (default: the config's drain
        timeout) while new ones are refused, then stop and save the cache index."""
        grace = self.config.drain_timeout_s if grace_s is None else grace_s
        await self.health.enter_graceful_shutdown()
        log.info("adapter store draining (up to %.0fs)", grace)
        if self.server is not None:
            await self.server.stop(grace)
        if self.runtime.store is not None:
            self.runtime.store.cache.flush()
        self._close_pools()
        log.info("adapter store stopped")

    def _close_pools(self) -> None:
        self.runtime.downloads.shutdown(wait=False, cancel_futures=True)
        self.runtime.io.shutdown(wait=False, cancel_futures=True)


def build_store(cfg: StoreConfig) -> AdapterStore:
    """Open the cache (scan, rebuild the LRU), load plugins, check the registrations: blocking."""
    cache = DiskCache(Path(cfg.cache_dir), cfg.cache_max_bytes)
    cache.open()
    plugins = load_plugins(cfg.plugins, cfg.plugin_options)
    sources = SourceFactory(S3Clients(cfg.s3_settings()), cfg.hub_settings(), plugins)
    resolvers: dict[str, Resolver] = {}
    if cfg.lora_root:
        resolvers["filesystem"] = FilesystemResolver(Path(cfg.lora_root))
    if cfg.hf_repo_allowlist:
        log.warning("names may resolve to these Hub repos: %s (their content is validated, never executed)",
                    list(cfg.hf_repo_allowlist))
        resolvers["hub"] = HubResolver(cfg.hub_settings(), cfg.hf_repo_allowlist)
    if cfg.s3_bucket:
        resolvers["s3"] = S3Resolver(sources.s3, cfg.s3_bucket, cfg.s3_prefix)
    order: list[str] = []
    for kind in cfg.resolvers:  # "plugins" stands for every loaded plugin, in PLUGINS order
        order.extend(plugins if kind == "plugins" else [kind.removeprefix("plugin:")])
    for kind in order:
        if kind in plugins:
            resolvers[kind] = plugins[kind]
        elif kind not in (REGISTERED, "filesystem", "hub", "s3"):
            raise ValueError(f"resolver plugin:{kind} is in resolvers but not loaded (add it to plugins)")
    registry = Registry(sources, tuple(order), resolvers, cfg.lora_modules, cache.state_root / "registry.json")
    for reg in cfg.lora_modules:
        if not reg.uri.startswith("plugin:"):
            sources.from_uri(reg.uri)  # a malformed URI stops the start, with its reason
    return AdapterStore(cache, registry, cfg.limits(), cfg.base_model())
