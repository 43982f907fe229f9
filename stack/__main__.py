"""python -m stack [--model-dir DIR] [--port 50051] ...  (what `make run` runs)

Starts the adapter store, one worker (on the GPU if there is one, else the CPU) and the router as local
processes, waits until each reports SERVING, prints the endpoint and requests to copy and paste, and on
Ctrl-C (or SIGTERM) stops them in order: router, worker, store, each draining first. The last stdout line
before the banner is `loraserve stack serving on <router host:port>`, for scripts.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from service_kit.lifecycle import configure_logging
from stack.assets import HUB_REPO, PRELOADED, PRELOADED_JSON, DemoAssets, ensure_demo
from stack.config import StackConfig
from stack.processes import Service, ServiceFailed

log = logging.getLogger("stack")
ROOT = Path(__file__).resolve().parents[1]
SERVED_MODEL = "demo-llama"


@dataclass(frozen=True)
class Plan:
    """What the three services get: paths, the admin token, and the pieces of their command lines."""

    cfg: StackConfig
    token: str
    model_dir: Path
    adapters_dir: Path
    demo: DemoAssets | None
    logs: Path

    @classmethod
    def make(cls, cfg: StackConfig, token: str) -> Plan:
        demo_dir = Path(cfg.demo_dir).resolve()
        demo = ensure_demo(demo_dir) if not (cfg.model_dir and cfg.adapters_dir) else None
        model_dir = Path(cfg.model_dir).resolve() if cfg.model_dir else demo.model_dir
        adapters = Path(cfg.adapters_dir).resolve() if cfg.adapters_dir else demo.adapters_dir
        return cls(cfg, token, model_dir, adapters, demo, demo_dir / "logs")

    @property
    def demo_adapters(self) -> bool:
        return self.demo is not None and not self.cfg.adapters_dir

    def _common(self) -> list[str]:
        return ["--host", self.cfg.host, "--log-level", self.cfg.log_level]

    def _admin_env(self) -> dict[str, str]:
        return {"LORASERVE_ADMIN_TOKEN": self.token} if self.cfg.enable_admin else {}

    def store(self) -> Service:
        cfg = self.cfg
        args = ["adapter_store", *self._common(), "--port", str(cfg.store_port), "--drain-timeout-s", "5",
                "--cache-dir", str(Path(cfg.demo_dir).resolve() / "store-cache"), "--lora-root", str(self.adapters_dir)]
        resolvers, env = ["registered", "filesystem"], self._admin_env()
        if self.demo_adapters:
            # The Hub resolver, offline, over the demo's local Hub cache: `--model demo-org/chat-lora` works.
            args += ["--hf-repo-allowlist", HUB_REPO, "--hf-cache-dir", str(self.demo.hub_cache)]
            env["HF_HUB_OFFLINE"] = "1"
            resolvers.append("hub")
        if cfg.s3_bucket:
            args += ["--s3-bucket", cfg.s3_bucket, "--s3-prefix", cfg.s3_prefix]
            args += ["--s3-endpoint-url", cfg.s3_endpoint_url] if cfg.s3_endpoint_url else []
            resolvers.append("s3")
        args += ["--resolvers", ",".join(resolvers)] + (["--enable-admin"] if cfg.enable_admin else [])
        args += ["--lora-modules", *self.preloaded()] if self.preloaded() else []
        return Service("adapter-store", args, self.logs / "adapter-store.log", env)

    def preloaded(self) -> list[str]:
        """The worker's pre-loaded adapters in both of vLLM's --lora-modules forms; the store registers the
        same names, so the router lists them from the start (vLLM lists pre-loaded adapters as models)."""
        if self.demo is None or self.cfg.model_dir:
            return []
        return [f"{PRELOADED}={self.demo.adapters_dir / PRELOADED}",
                json.dumps({"name": PRELOADED_JSON, "path": str(self.demo.adapters_dir / PRELOADED_JSON),
                            "base_model_name": SERVED_MODEL})]

    def worker(self, store: str) -> Service:
        cfg = self.cfg
        args = ["gpu_worker", *self._common(), "--port", str(cfg.worker_port), "--model-dir", str(self.model_dir),
                "--device", cfg.device, "--max-loras", str(cfg.max_loras), "--max-cpu-loras", str(cfg.max_cpu_loras),
                "--max-lora-rank", str(cfg.max_lora_rank), "--worker-id", "worker-0", "--drain-timeout-s", "10",
                "--adapter-store", store, "--adapter-cache-dir", str(Path(cfg.demo_dir).resolve() / "worker-cache")]
        if self.demo is not None and not cfg.model_dir:
            args += ["--served-model-name", SERVED_MODEL, "--lora-modules", *self.preloaded()]
        args += ["--redis-url", cfg.redis_url] if cfg.redis_url else []
        return Service("worker", args, self.logs / "worker.log")

    def router(self, worker: str, store: str) -> Service:
        cfg = self.cfg
        args = ["router", *self._common(), "--port", str(cfg.port), "--metrics-port", str(cfg.metrics_port),
                "--drain-timeout-s", "10", "--workers", worker, "--store-address", store]
        args += ["--redis-url", cfg.redis_url] if cfg.redis_url else []
        args += ["--enable-runtime-lora-updating"] if cfg.enable_admin else []
        args += ["--http-port", str(cfg.http_port)] if cfg.http_port else []
        return Service("router", args, self.logs / "router.log", self._admin_env())


def banner(router: str, plan: Plan) -> str:
    cfg, demo = plan.cfg, plan.demo_adapters
    cli = f".venv/bin/loraserve --address {router}"
    lines = [
        "",
        f"loraserve is up: router {router} (gRPC, reflection on); base model {plan.model_dir}"
        + (" (random weights: the text is noise)" if plan.demo is not None and not cfg.model_dir else ""),
        f"  adapters resolved on first request from {plan.adapters_dir}"
        + (f"; from the Hub (its offline cache) for {HUB_REPO}" if demo else ""),
        f"  logs: {plan.logs}/",
        "",
        "Try, in another terminal (make setup installed the `loraserve` command into .venv/bin):",
        f"  {cli} models",
        f"  {cli} generate --model {PRELOADED if demo else '<adapter>'} \"Write a SQL query:\"",
        f"  {cli} generate --stream \"Once upon a time\"",
    ]
    if demo:
        lines.append(f"  {cli} generate --model code-lora \"def f(x):\"    # the filesystem resolver loads it now")
    if cfg.enable_admin:
        lines += [f"  export LORASERVE_ADMIN_TOKEN={plan.token}",
                  f"  {cli} load my-lora {plan.adapters_dir}/chat-lora"]
    if cfg.http_port:
        http = f"http://{cfg.host}:{cfg.http_port}"
        model = PRELOADED if demo else "<adapter>"
        lines += ["", f"  OpenAI-compatible HTTP API on {http}/v1 (vLLM's curl workflows work unchanged):",
                  f"  curl {http}/v1/models",
                  f"  curl {http}/v1/completions -H 'Content-Type: application/json' -d '{{\"model\": \"{model}\", "
                  f"\"prompt\": \"San Francisco is a\", \"max_tokens\": 7, \"temperature\": 0}}'"]
    lines += [f"  grpcurl -plaintext -d '{{\"model\": \"{PRELOADED}\", \"prompt\": {{\"text\": \"Hello\"}}, "
              f"\"sampling\": {{\"max_tokens\": 16}}}}' {router} loraserve.v1.InferenceService/Generate",
              "", "Ctrl-C stops the router, the worker and the store.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    cfg = StackConfig.from_args(argv)
    configure_logging(cfg.log_level)
    token = os.environ.get("LORASERVE_ADMIN_TOKEN") or secrets.token_urlsafe(24)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    started: list[Service] = []

    def run(svc: Service) -> str:
        log.info("starting %s (log: %s)", svc.name, svc.log_path)
        svc.start(ROOT)
        started.append(svc)
        address = svc.wait_ready(cfg.start_timeout_s)
        log.info("%s serving on %s", svc.name, address)
        return address

    try:
        plan = Plan.make(cfg, token)
        store = run(plan.store())
        worker = run(plan.worker(store)) if not stop.is_set() else ""
        router = run(plan.router(worker, store)) if not stop.is_set() else ""
        if stop.is_set():
            return 0
        print(f"loraserve stack serving on {router}", flush=True)
        print(banner(router, plan), flush=True)
        while not stop.wait(1.0):
            dead = [s.name for s in started if not s.running()]
            if dead:
                log.error("%s exited; stopping the rest (see its log)", ", ".join(dead))
                return 1
        return 0
    except ServiceFailed as e:
        log.error("%s", e)
        return 1
    finally:
        for svc in reversed(started):
            log.info("%s stopped (exit status %s)", svc.name, svc.stop())


if __name__ == "__main__":
    sys.exit(main())
