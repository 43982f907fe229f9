"""EngineArgs: the engine's one typed configuration object, validated once."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineArgs:
    """Everything the engine needs, with vLLM's names where vLLM has one.

    `device="auto"` picks CUDA when there is one; `dtype="auto"` is bfloat16 on CUDA (float16 where the
    card lacks bf16) and float32 on the CPU, where half precision is slow and inexact.
    """

    model: str
    tokenizer: str | None = None
    served_model_name: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    block_size: int = 16
    # KV capacity: an explicit block count, else a share of free GPU memory, else (CPU) a byte budget.
    num_kv_blocks: int | None = None
    gpu_memory_utilization: float = 0.85
    cpu_kv_cache_bytes: int = 256 * 1024 * 1024
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    # The longest a request may wait in the queue before it is refused with RESOURCE_EXHAUSTED upstream.
    max_waiting_requests: int = 4096
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    # "auto": the Triton kernels on CUDA, plain torch on the CPU; or "torch" / "triton".
    lora_backend: str = "auto"
    # Decode steps run eagerly instead of from CUDA graphs (as vLLM's enforce_eager): for debugging.
    enforce_eager: bool = False
    # Steps with prompt tokens (up to 2,048 of them) replay CUDA graphs cut at attention, attention eager between
    # them (gpu_worker/engine/mixed_graphs.py: vLLM's piecewise graphs); False (or enforce_eager): eager.
    piecewise_graphs: bool = True
    # The layers' elementwise work (RMSNorm + residual add, RoPE + KV-cache write, SiLU-and-multiply) as three
    # fused Triton kernels instead of ~30 torch ops a layer (kernels/elementwise.py). None: on with CUDA
    # (1.6x faster decode steps on an H200), torch elsewhere; True on the CPU runs Triton's interpreter (tests).
    fused_elementwise: bool | None = None
    # Prompt chunks with a cached prefix (a later chunk of a long prompt, prefix-cache hits) attend through the
    # paged prefill kernel (kernels/paged_prefill.py), one launch a layer for all of them, keys read in place,
    # instead of a padded, masked attention per chunk. None: on with CUDA; True on the CPU runs the interpreter.
    fused_prefill_attention: bool | None = None
    # Launch each step before handing out the previous one's tokens, so the host's work per step (scheduling,
    # detokenizing, stop checks) runs while the device computes (vLLM's async_scheduling). None: on with CUDA.
    # A step's outputs then come one step() later; a request that stops costs one wasted row.
    async_scheduling: bool | None = None
    # In decode graphs, run each projection's LoRA shrink and expand on a side stream beside the base GEMM, the
    # adapters' part added by the next elementwise op (kernels/engine_backend.py); False: in place after the GEMM.
    overlap_lora: bool = True
    # Reuse the K/V of full blocks whose tokens (and adapter, by content hash) a finished or running request
    # computed already (vLLM's enable_prefix_caching): a shared system prompt is computed once.
    enable_prefix_caching: bool = False
    # Largest adapter file accepted (bytes): an adapter is data from outside.
    max_adapter_bytes: int = 2 * 1024**3

    def __post_init__(self):
        checks = [
            (self.block_size in (8, 16, 32, 64, 128),
             f"block_size must be one of 8..128 (powers of 2), not {self.block_size}"),
            (0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization must be in (0, 1]"),
            (self.max_num_seqs >= 1, "max_num_seqs must be >= 1"),
            (self.max_num_batched_tokens >= self.block_size, "max_num_batched_tokens must be >= block_size"),
            (self.max_loras >= 1, "max_loras must be >= 1"),
            (1 <= self.max_lora_rank <= 512, "max_lora_rank must be in [1, 512]"),
            (self.num_kv_blocks is None or self.num_kv_blocks >= 1, "num_kv_blocks must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.max_cpu_loras is None:
            self.max_cpu_loras = self.max_loras
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")
