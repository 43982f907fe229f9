"""WorkerConfig: the worker's one typed configuration, built once in __main__ from flags and environment.

Every field `foo_bar` is the flag `--foo-bar` and, when the flag is absent, the variable
`LORASERVE_WORKER_FOO_BAR` (docker-compose.yml sets those). Flags win over the environment; the
environment wins over the defaults here.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from gpu_worker.adapters import LoRAModule
from gpu_worker.engine.config import EngineArgs
from gpu_worker.engine.llm_engine import resolve_device

ENV_PREFIX = "LORASERVE_WORKER_"
# Variables whose name is not simply the field's name upper-cased (docker-compose.yml fixed these first).
ENV_NAMES = {"adapter_store": "STORE_ADDRESS"}


@dataclass(frozen=True)
class WorkerConfig:
    model_dir: str
    host: str = "0.0.0.0"
    # 0: let the OS pick a free port; the worker reports the one it got.
    port: int = 50053
    # Default: "<hostname>-<port>", unique per worker on one host.
    worker_id: str = ""
    # host:port the router should dial; default: this host's name and the bound port.
    advertise_address: str = ""
    served_model_name: str = ""
    # Engine knobs, mapped one to one onto EngineArgs (vLLM's names).
    device: str = "auto"
    dtype: str = "auto"
    enable_lora: bool = True
    max_loras: int = 4
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    num_kv_blocks: int | None = None
    max_model_len: int | None = None
    block_size: int = 16
    # The layers' elementwise work as fused Triton kernels (EngineArgs.fused_elementwise; None: on with CUDA).
    fused_elementwise: bool | None = None
    # Launch each step before handing out the last one's tokens (EngineArgs.async_scheduling; None: on with CUDA).
    async_scheduling: bool | None = None
    # Decode graphs run each projection's LoRA beside its base GEMM (EngineArgs.overlap_lora).
    overlap_lora: bool = True
    # Steps with prompt tokens replay CUDA graphs cut at attention (EngineArgs.piecewise_graphs).
    piecewise_graphs: bool = True
    # Reuse cached K/V of shared prompt prefixes (per adapter version) (EngineArgs.enable_prefix_caching).
    enable_prefix_caching: bool = False
    # Requests waiting for the batch beyond this are refused (RESOURCE_EXHAUSTED) so the router tries elsewhere.
    max_queue: int = 1024
    # Adapters: pre-loaded modules, then <lora_root>/<name> on first request.
    lora_modules: tuple[LoRAModule, ...] = ()
    lora_root: str = ""
    # The adapter store (host:port): names that are not local resolve there; their files are fetched into
    # adapter_cache_dir (default: <tmp>/loraserve-worker-adapters; workers on one host may share it).
    adapter_store: str = ""
    adapter_cache_dir: str = ""
    # The worker registry: with a Redis URL the worker registers itself (record `<prefix>worker:<id>` with
    # a TTL, refreshed every ttl / 3) once it serves, and leaves it the moment it starts draining.
    redis_url: str = ""
    registry_prefix: str = "loraserve:"
    registry_ttl_s: float = 10.0
    drain_timeout_s: float = 30.0
    status_interval_ms: int = 500
    # A stream's messages after its first carry at least this many tokens (its last may carry fewer): vLLM's and
    # SGLang's --stream-interval. 1: a message a token, unless the event loop falls behind (readers then take the
    # outputs already queued as one).
    stream_interval: int = 1
    # The GIL switch interval (sys.setswitchinterval) of the server's process and the engine's, set when the server
    # starts. On a thread, the step loop shares the GIL with the event loop streaming a message per token; Python's
    # default, 5 ms, lets a busy event loop hold it past several decode steps (benchmarks.served_host, batch 64,
    # dev CPU: 0.5 ms moved ~25% more tokens a second, in half the messages). In its own process it shares it
    # with the thread that reads and packs cold adapters.
    gil_switch_interval_ms: float = 0.5
    # The engine's step loop in a process of its own, apart from the gRPC server (vLLM V1's EngineCore): the step
    # loop then has a GIL of its own. "auto": on when the engine runs on CUDA; "on", "off".
    engine_process: str = "auto"
    log_level: str = "info"

    def __post_init__(self):
        checks = [
            (0 <= self.port <= 65535, f"port must be in [0, 65535], not {self.port}"),
            (self.max_queue >= 1, f"max_queue must be >= 1, not {self.max_queue}"),
            (self.drain_timeout_s >= 0, f"drain_timeout_s must be >= 0, not {self.drain_timeout_s}"),
            (self.registry_ttl_s > 0, f"registry_ttl_s must be > 0, not {self.registry_ttl_s}"),
            (not self.redis_url or self.redis_url.startswith(("redis://", "rediss://", "unix://")),
             f"redis_url must be redis://, rediss:// or unix://, not {self.redis_url!r}"),
            (self.status_interval_ms >= 1, f"status_interval_ms must be >= 1, not {self.status_interval_ms}"),
            (1 <= self.stream_interval <= 1024, f"stream_interval must be in [1, 1024], not {self.stream_interval}"),
            (0 < self.gil_switch_interval_ms <= 1000,
             f"gil_switch_interval_ms must be in (0, 1000], not {self.gil_switch_interval_ms}"),
            (self.engine_process in ("auto", "on", "off"),
             f"engine_process must be auto, on or off, not {self.engine_process!r}"),
            (self.enable_lora or not self.lora_modules, "lora_modules were given but enable_lora is off"),
            (Path(self.model_dir).is_dir(), f"model_dir {self.model_dir!r} is not a directory"),
            (not self.lora_root or Path(self.lora_root).is_dir(), f"lora_root {self.lora_root!r} is not a directory"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        names = [m.name for m in self.lora_modules]
        if len(set(names)) != len(names):
            raise ValueError(f"lora_modules names must be unique: {names}")
        for m in self.lora_modules:
            if not Path(m.path).is_dir():
                raise ValueError(f"lora module {m.name!r}: {m.path} is not a directory")
        self.engine_args()  # EngineArgs checks its own fields; fail here, before anything starts

    def use_engine_process(self) -> bool:
        if self.engine_process != "auto":
            return self.engine_process == "on"
        return resolve_device(self.device).type == "cuda"

    def engine_args(self) -> EngineArgs:
        return EngineArgs(
            model=self.model_dir,
            served_model_name=self.served_model_name or None,
            device=self.device,
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            block_size=self.block_size,
            num_kv_blocks=self.num_kv_blocks,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_waiting_requests=self.max_queue,
            enable_lora=self.enable_lora,
            max_loras=self.max_loras,
            max_lora_rank=self.max_lora_rank,
            max_cpu_loras=self.max_cpu_loras,
            fused_elementwise=self.fused_elementwise,
            async_scheduling=self.async_scheduling,
            overlap_lora=self.overlap_lora,
            piecewise_graphs=self.piecewise_graphs,
            enable_prefix_caching=self.enable_prefix_caching,
        )

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> WorkerConfig:
        """Parse flags, fill the rest from LORASERVE_WORKER_* variables; exit 2 with a message if invalid."""
        environ = os.environ if environ is None else environ
        parser = _parser()
        ns = vars(parser.parse_args(argv))
        values = {}
        for f in fields(cls):
            if ns.get(f.name) is not None:
                values[f.name] = ns[f.name]
                continue
            var = ENV_PREFIX + ENV_NAMES.get(f.name, f.name.upper())
            if environ.get(var, "") != "":
                try:
                    values[f.name] = _from_env(f.name, environ[var])
                except ValueError as e:
                    parser.error(f"{var}={environ[var]!r}: {e}")
        if "model_dir" not in values:
            parser.error(f"--model-dir (or {ENV_PREFIX}MODEL_DIR) is required")
        if "lora_modules" in values:
            try:
                values["lora_modules"] = tuple(LoRAModule.parse(s) for s in values["lora_modules"])
            except ValueError as e:
                parser.error(str(e))
        try:
            return cls(**values)
        except ValueError as e:
            parser.error(str(e))


# -- flags ----------------------------------------------------------------------------------------

_INT_FIELDS = {"port", "max_loras", "max_lora_rank", "max_cpu_loras", "max_num_seqs", "max_num_batched_tokens",
               "num_kv_blocks", "max_model_len", "block_size", "max_queue", "status_interval_ms", "stream_interval"}


_BOOL_FIELDS = {"enable_lora", "fused_elementwise", "async_scheduling", "overlap_lora", "piecewise_graphs",
                "enable_prefix_caching"}


def _from_env(name: str, raw: str):
    if name in _INT_FIELDS:
        try:
            return int(raw)
        except ValueError:
            raise ValueError("not an integer") from None
    if name in ("drain_timeout_s", "registry_ttl_s", "gil_switch_interval_ms"):
        return float(raw)
    if name in _BOOL_FIELDS:
        low = raw.strip().lower()
        if low not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise ValueError("not a boolean (true/false)")
        return low in ("1", "true", "yes", "on")
    if name == "lora_modules":  # a JSON list (of strings or objects), else shell-style words
        if raw.lstrip().startswith("["):
            items = json.loads(raw)
            if not isinstance(items, list):
                raise ValueError("expected a JSON list")
            return items
        return shlex.split(raw)
    return raw


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gpu_worker",
        description="LoRA serving GPU worker: the engine behind the loraserve.v1.WorkerService gRPC API. "
        f"Every flag --foo-bar may instead come from ${ENV_PREFIX}FOO_BAR.",
    )
    add = p.add_argument
    add("--model-dir", "--model", dest="model_dir", help="base model directory (config.json, safetensors, tokenizer)")
    add("--host", help="address to listen on (default 0.0.0.0)")
    add("--port", type=int, help="port to listen on; 0 picks a free one (default 50053)")
    add("--worker-id", help="this worker's id (default <hostname>-<port>)")
    add("--advertise-address", help="host:port the router dials (default <hostname>:<port>)")
    add("--served-model-name", help="the base model's name as requests give it (default: the model dir's name)")
    add("--device", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:N")
    add("--dtype", help="auto (bf16 on CUDA, fp32 on CPU), float32, float16, bfloat16")
    add("--enable-lora", action=argparse.BooleanOptionalAction, default=None, help="serve adapters (default on)")
    add("--max-loras", type=int, help="adapters in device slots at once (default 4)")
    add("--max-lora-rank", type=int, help="largest adapter rank accepted (default 16)")
    add("--max-cpu-loras", type=int, help="adapters kept in host memory (default max_loras)")
    add("--max-num-seqs", type=int, help="most requests in one batch (default 256)")
    add("--max-num-batched-tokens", type=int, help="most tokens in one step (default 8192)")
    add("--num-kv-blocks", type=int, help="KV cache blocks (default: sized from memory)")
    add("--max-model-len", type=int, help="longest prompt + output (default: the model's)")
    add("--block-size", type=int, help="tokens per KV block (default 16)")
    add("--fused-elementwise", action=argparse.BooleanOptionalAction, default=None,
        help="RMSNorm + residual, RoPE + KV write and SiLU-and-multiply as fused Triton kernels "
        "(default: on with CUDA)")
    add("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
        help="launch each step before handing out the last one's tokens, hiding host work (default: on with CUDA)")
    add("--overlap-lora", action=argparse.BooleanOptionalAction, default=None,
        help="in decode graphs, run each projection's LoRA on a side stream beside the base GEMM (default on)")
    add("--piecewise-graphs", action=argparse.BooleanOptionalAction, default=None,
        help="steps with prompt tokens replay CUDA graphs cut at attention, attention eager (default on)")
    add("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
        help="reuse the K/V of prompt prefixes computed before, per adapter version (default off)")
    add("--max-queue", type=int, help="waiting requests before RESOURCE_EXHAUSTED (default 1024)")
    add("--lora-modules", nargs="+", metavar="SPEC",
        help='pre-loaded adapters: name=path or {"name": ..., "path": ..., "base_model_name": ...}')
    add("--lora-root", help="directory where an unknown adapter <name> is looked up as <root>/<name>")
    add("--adapter-store", "--store-address", dest="adapter_store",
        help=f"adapter store host:port (env {ENV_PREFIX}STORE_ADDRESS): names not found locally resolve there")
    add("--adapter-cache-dir", help="where adapters fetched from the store are kept "
        "(default <tmp>/loraserve-worker-adapters)")
    add("--redis-url", help="worker registry: the worker registers itself there while it serves (routers that "
        "share the URL and prefix find it)")
    add("--registry-prefix", help="key prefix in Redis, the same as the routers' (default loraserve:)")
    add("--registry-ttl-s", type=float, help="a record lives this long after the last heartbeat (default 10)")
    add("--drain-timeout-s", type=float, help="on SIGTERM, how long in-flight requests may finish (default 30)")
    add("--status-interval-ms", type=int, help="WatchStatus's default least interval (default 500)")
    add("--stream-interval", type=int, help="tokens a stream message carries at least, after the first (default 1: "
        "every token as it comes)")
    add("--gil-switch-interval-ms", type=float, help="the process's GIL switch interval: the step loop and the "
        "event loop streaming tokens share the GIL (default 0.5; Python's own is 5)")
    add("--engine-process", choices=["auto", "on", "off"], help="run the engine's step loop in a process of its "
        "own, apart from the gRPC server, so streaming does not slow the steps (default auto: on with CUDA)")
    add("--log-level", choices=["debug", "info", "warning", "error"], help="default info")
    return p
