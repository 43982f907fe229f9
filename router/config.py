"""RouterConfig: the router's one typed configuration, built once in __main__ from flags and environment.

Every field `foo_bar` is the flag `--foo-bar` and, when the flag is absent, the variable
`LORASERVE_ROUTER_FOO_BAR` (docker-compose.yml sets PORT, REDIS_URL, STORE_ADDRESS and
ENABLE_RUNTIME_LORA_UPDATING). Flags win over the environment; the environment wins over the defaults here.
Two exceptions, as in the adapter store: the admin token comes only from LORASERVE_ADMIN_TOKEN (a flag would
show it in `ps`), and enable_runtime_lora_updating falls back to the stack-wide
LORASERVE_ENABLE_RUNTIME_LORA_UPDATING.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields

from router.policy import ROUTINGS, PolicyParams

ENV_PREFIX = "LORASERVE_ROUTER_"
ADMIN_TOKEN_ENV = "LORASERVE_ADMIN_TOKEN"
SHARED_ADMIN_ENV = "LORASERVE_ENABLE_RUNTIME_LORA_UPDATING"
_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):\d{1,5}$")
# a proxyless-mesh target, resolved through the xDS control plane (service_kit/channels.py)
_XDS_TARGET = re.compile(r"^xds:///[A-Za-z0-9_.-]+(:\d{1,5})?$")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class RouterConfig:
    host: str = "0.0.0.0"
    # 0: let the OS pick a free port; the router prints the one it got.
    port: int = 50051
    # Workers: a static list of host:port, or a Redis registry the workers heartbeat into (or both).
    workers: tuple[str, ...] = ()
    redis_url: str = ""
    redis_prefix: str = "loraserve:"
    # ... or DNS names (host:port) whose every address is a worker (a headless Service), re-resolved every
    # dns_refresh_s; through dns_nameserver (host:port) when set, else the system resolver.
    workers_dns: tuple[str, ...] = ()
    dns_refresh_s: float = 5.0
    dns_nameserver: str = ""
    # How often the Redis registry is read (a worker's record lives worker_ttl_s after its last heartbeat).
    registry_poll_s: float = 1.0
    # The adapter store (host:port, or xds:///name[:port] in a proxyless mesh): the adapter catalogue,
    # LoadAdapter / UnloadAdapter. Optional.
    store_address: str = ""
    # Re-read the store's adapter list this often (reloads made through another router replica show up).
    catalog_refresh_s: float = 5.0
    # Admin RPCs (LoadAdapter, UnloadAdapter): off unless enabled; then `authorization: Bearer <token>`.
    enable_runtime_lora_updating: bool = False
    admin_token: str = field(default="", repr=False)
    # Prometheus /metrics on this port; 0: off.
    metrics_port: int = 9091
    # The OpenAI-compatible HTTP front (router/http_front.py) on this port, on `host`; 0: off.
    http_port: int = 0
    # WatchStatus interval asked of each worker.
    status_interval_ms: int = 50
    # HTTP/2 keepalive pings on each worker's channel: a worker that stops answering (a vanished host, a
    # frozen process) is marked down after about twice this. 0: off.
    worker_keepalive_s: float = 10.0
    # Routing policy (router/policy.py): "affinity" (ours), or a baseline: "round-robin", "least-loaded".
    routing: str = "affinity"
    load_factor: float = 1.25
    spill_load: int = 32
    max_load: int = 256
    prefetch_fraction: float = 0.5
    # Workers tried for one request before its first token (a failed one is not tried again).
    max_attempts: int = 3
    drain_timeout_s: float = 30.0
    log_level: str = "info"

    def __post_init__(self):
        checks = [
            (0 <= self.port <= 65535, f"port must be in [0, 65535], not {self.port}"),
            (0 <= self.metrics_port <= 65535, f"metrics_port must be in [0, 65535], not {self.metrics_port}"),
            (0 <= self.http_port <= 65535, f"http_port must be in [0, 65535], not {self.http_port}"),
            (bool(self.workers or self.redis_url or self.workers_dns),
             "no workers: give --workers host:port,... (LORASERVE_ROUTER_WORKERS), --workers-dns name:port "
             "(a headless Service) or --redis-url (LORASERVE_ROUTER_REDIS_URL) for the worker registry"),
            (self.dns_refresh_s > 0, f"dns_refresh_s must be > 0, not {self.dns_refresh_s}"),
            (not self.redis_url or self.redis_url.startswith(("redis://", "rediss://", "unix://")),
             f"redis_url must start with redis://, rediss:// or unix://, not {self.redis_url!r}"),
            (self.registry_poll_s > 0, f"registry_poll_s must be > 0, not {self.registry_poll_s}"),
            (self.catalog_refresh_s > 0, f"catalog_refresh_s must be > 0, not {self.catalog_refresh_s}"),
            (self.status_interval_ms >= 10, f"status_interval_ms must be >= 10, not {self.status_interval_ms}"),
            (self.worker_keepalive_s == 0 or self.worker_keepalive_s >= 0.5,
             f"worker_keepalive_s must be 0 (off) or >= 0.5, not {self.worker_keepalive_s}"),
            (self.routing in ROUTINGS, f"routing must be one of {', '.join(ROUTINGS)}, not {self.routing!r}"),
            (self.max_attempts >= 1, f"max_attempts must be >= 1, not {self.max_attempts}"),
            (self.drain_timeout_s >= 0, f"drain_timeout_s must be >= 0, not {self.drain_timeout_s}"),
            (not self.enable_runtime_lora_updating or self.admin_token,
             f"runtime LoRA updating is enabled but {ADMIN_TOKEN_ENV} is empty: set a token (or leave it off)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        for address in (*self.workers, *self.workers_dns, *((self.dns_nameserver,) if self.dns_nameserver else ())):
            if not _ADDRESS.match(address):
                raise ValueError(f"{address!r} is not host:port")
        if self.store_address and not (_ADDRESS.match(self.store_address) or _XDS_TARGET.match(self.store_address)):
            raise ValueError(f"store_address {self.store_address!r} is neither host:port nor xds:///name[:port]")
        if len(set(self.workers)) != len(self.workers):
            raise ValueError(f"workers has duplicates: {list(self.workers)}")
        self.policy()  # PolicyParams checks its own fields

    def policy(self) -> PolicyParams:
        return PolicyParams(load_factor=self.load_factor, spill_load=self.spill_load, max_load=self.max_load,
                            prefetch_fraction=self.prefetch_fraction)

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> RouterConfig:
        """Parse flags, fill the rest from LORASERVE_ROUTER_* variables; exit 2 with a message if invalid."""
        environ = os.environ if environ is None else environ
        parser = _parser()
        ns = vars(parser.parse_args(argv))
        values = {}
        for f in fields(cls):
            if f.name == "admin_token":
                continue
            raw = ns.get(f.name)
            if raw is None:
                var = next((v for v in _env_names(f.name) if environ.get(v, "") != ""), None)
                if var is None:
                    continue
                try:
                    values[f.name] = _convert(f.name, environ[var])
                except ValueError as e:
                    parser.error(f"{var}={environ[var]!r}: {e}")
            else:
                values[f.name] = _convert(f.name, raw) if isinstance(raw, str) and f.name in _LISTS else raw
        values["admin_token"] = environ.get(ADMIN_TOKEN_ENV, "")
        try:
            return cls(**values)
        except ValueError as e:
            parser.error(str(e))


def _env_names(name: str) -> tuple[str, ...]:
    own = ENV_PREFIX + name.upper()
    return (own, SHARED_ADMIN_ENV) if name == "enable_runtime_lora_updating" else (own,)


_INTS = {"port", "metrics_port", "http_port", "status_interval_ms", "spill_load", "max_load", "max_attempts"}
_FLOATS = {"dns_refresh_s", "registry_poll_s", "catalog_refresh_s", "load_factor", "prefetch_fraction",
           "drain_timeout_s", "worker_keepalive_s"}
_LISTS = {"workers", "workers_dns"}


def _convert(name: str, raw: str):
    if name in _INTS:
        try:
            return int(raw)
        except ValueError:
            raise ValueError("not an integer") from None
    if name in _FLOATS:
        try:
            return float(raw)
        except ValueError:
            raise ValueError("not a number") from None
    if name == "enable_runtime_lora_updating":
        low = raw.strip().lower()
        if low not in _TRUE + _FALSE:
            raise ValueError("not a boolean (true/false)")
        return low in _TRUE
    if name in _LISTS:
        return tuple(w.strip() for w in raw.split(",") if w.strip())
    return raw


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m router",
        description="LoRA serving router: the public loraserve.v1.InferenceService in front of the GPU workers. "
        f"Every flag --foo-bar may instead come from ${ENV_PREFIX}FOO_BAR; the admin token only from "
        f"${ADMIN_TOKEN_ENV}.",
    )
    add = p.add_argument
    add("--host", help="address to listen on (default 0.0.0.0)")
    add("--port", type=int, help="port to listen on; 0 picks a free one (default 50051)")
    add("--workers", help="static workers: host:port,host:port,...")
    add("--redis-url", help="worker registry: redis://host:port/db (workers heartbeat there)")
    add("--workers-dns", help="DNS names name:port,... whose every address is a worker (a Kubernetes headless "
        "Service), re-resolved every --dns-refresh-s")
    add("--dns-refresh-s", type=float, help="how often --workers-dns names are resolved again (default 5)")
    add("--dns-nameserver", help="ask this DNS server (host:port) for --workers-dns instead of the system resolver")
    add("--redis-prefix", help="key prefix in Redis (default loraserve:)")
    add("--registry-poll-s", type=float, help="how often the Redis registry is read (default 1)")
    add("--store-address", "--adapter-store", dest="store_address",
        help="adapter store host:port: the adapter catalogue and admin RPCs go through it (optional)")
    add("--catalog-refresh-s", type=float, help="how often the store's adapter list is re-read (default 5)")
    add("--enable-runtime-lora-updating", action=argparse.BooleanOptionalAction, default=None,
        help=f"allow LoadAdapter / UnloadAdapter, with the bearer token from ${ADMIN_TOKEN_ENV} (default off)")
    add("--metrics-port", type=int, help="Prometheus /metrics port; 0: off (default 9091)")
    add("--http-port", type=int, help="OpenAI-compatible HTTP API (/v1/completions, /v1/models, ...) on this "
        "port; 0: off (default 0; `make run` serves it on 8000)")
    add("--status-interval-ms", type=int, help="least interval of each worker's status stream (default 50)")
    add("--worker-keepalive-s", type=float, help="keepalive pings to each worker: one unanswered this long marks "
        "it down (default 10; 0: off)")
    add("--routing", help="affinity (default: adapter affinity with bounded loads), or a baseline for "
        "comparison: round-robin, least-loaded")
    add("--load-factor", type=float, help="bounded-load slack over the average load (default 1.25)")
    add("--spill-load", type=int, help="load below which a worker keeps its adapters' requests (default 32)")
    add("--max-load", type=int, help="hard cap of requests per worker (default 256)")
    add("--prefetch-fraction", type=float, help="prefetch the spill target at this fraction of the bound (0.5)")
    add("--max-attempts", type=int, help="workers tried per request before its first token (default 3)")
    add("--drain-timeout-s", type=float, help="on SIGTERM, how long in-flight requests may finish (default 30)")
    add("--log-level", choices=["debug", "info", "warning", "error"], help="default info")
    return p
