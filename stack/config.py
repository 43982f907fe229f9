"""StackConfig: the launcher's one typed configuration, from flags (and LORASERVE_STACK_* variables)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

ENV_PREFIX = "LORASERVE_STACK_"


@dataclass(frozen=True)
class StackConfig:
    # Where the demo model, adapters, Hub cache, store cache and logs go (built once, reused).
    demo_dir: str = ".demo"
    # A real base model directory (Hugging Face layout, safetensors); default: the demo model.
    model_dir: str = ""
    # A directory of adapters <root>/<name>/ the store resolves on first request; default: the demo's.
    adapters_dir: str = ""
    host: str = "127.0.0.1"
    # The router (the public endpoint), the adapter store, the worker; 0: any free port.
    port: int = 50051
    store_port: int = 50052
    worker_port: int = 50053
    # Prometheus /metrics of the router; 0: off.
    metrics_port: int = 0
    # The router's OpenAI-compatible HTTP API (vLLM's curl workflows); 0: off.
    http_port: int = 8000
    device: str = "auto"
    max_loras: int = 2
    max_cpu_loras: int = 4
    max_lora_rank: int = 16
    # Admin RPCs (load / unload / reload): on for the local demo, with $LORASERVE_ADMIN_TOKEN or a random
    # token printed at start.
    enable_admin: bool = True
    # A Redis shared with other routers and workers (default: none, the router's view is its own).
    redis_url: str = ""
    # S3 resolver: names looked up under s3://<bucket>/<prefix><name>/ (endpoint: MinIO, moto).
    s3_endpoint_url: str = ""
    s3_bucket: str = ""
    s3_prefix: str = ""
    # Seconds each service may take to report SERVING.
    start_timeout_s: float = 300.0
    log_level: str = "info"

    def __post_init__(self):
        for name in ("port", "store_port", "worker_port", "metrics_port", "http_port"):
            value = getattr(self, name)
            if not 0 <= value <= 65535:
                raise ValueError(f"{name} must be in [0, 65535], not {value}")
        if self.model_dir and not Path(self.model_dir, "config.json").is_file():
            raise ValueError(f"model_dir {self.model_dir!r} has no config.json: give a Hugging Face model directory")
        if self.adapters_dir and not Path(self.adapters_dir).is_dir():
            raise ValueError(f"adapters_dir {self.adapters_dir!r} is not a directory")
        if self.s3_endpoint_url and not self.s3_bucket:
            raise ValueError("s3_endpoint_url needs s3_bucket (the S3 resolver's bucket)")
        if self.start_timeout_s <= 0:
            raise ValueError(f"start_timeout_s must be > 0, not {self.start_timeout_s}")

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> StackConfig:
        environ = os.environ if environ is None else environ
        parser = _parser()
        ns = vars(parser.parse_args(argv))
        values = {}
        for f in fields(cls):
            raw = ns.get(f.name)
            if raw is None and environ.get(ENV_PREFIX + f.name.upper(), "") != "":
                raw = environ[ENV_PREFIX + f.name.upper()]
                if f.type == "bool":
                    raw = raw.strip().lower() in ("1", "true", "yes", "on")
            if raw is not None:
                values[f.name] = {"int": int, "float": float}.get(f.type, lambda v: v)(raw)
        try:
            return cls(**values)
        except ValueError as e:
            parser.error(str(e))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stack", description="The adapter store, a worker and the router on "
                                "this machine, as local processes. Ctrl-C stops all three. Every flag --foo-bar may "
                                f"instead come from ${ENV_PREFIX}FOO_BAR.")
    add = p.add_argument
    add("--demo-dir", help="where the demo model and adapters are built once (default .demo)")
    add("--model-dir", help="a real base model directory instead of the demo model")
    add("--adapters-dir", help="adapters <dir>/<name>/ resolved on first request (default: the demo adapters)")
    add("--host", help="address every service listens on (default 127.0.0.1)")
    add("--port", help="the router's port, the public endpoint (default 50051; 0: any free port)")
    add("--store-port", help="the adapter store's port (default 50052)")
    add("--worker-port", help="the worker's port (default 50053)")
    add("--metrics-port", help="the router's Prometheus port (default 0: off)")
    add("--http-port", help="the router's OpenAI-compatible HTTP API (default 8000; 0: off)")
    add("--device", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:N")
    add("--max-loras", help="adapters in device slots at once (default 2)")
    add("--max-cpu-loras", help="adapters kept in host memory (default 4)")
    add("--max-lora-rank", help="largest adapter rank accepted (default 16)")
    add("--enable-admin", action=argparse.BooleanOptionalAction, default=None,
        help="load / unload / reload through the router, with $LORASERVE_ADMIN_TOKEN (default on)")
    add("--redis-url", help="a worker registry shared with other routers and workers")
    add("--s3-endpoint-url", help="S3 endpoint for the S3 resolver (MinIO, moto)")
    add("--s3-bucket", help="S3 resolver bucket")
    add("--s3-prefix", help="S3 resolver key prefix")
    add("--start-timeout-s", help="seconds each service may take to start (default 300)")
    add("--log-level", choices=["debug", "info", "warning", "error"], help="the services' log level (default info)")
    return p
