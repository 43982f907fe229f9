"""Sizing and allocating the KV cache: two tensors per layer, [num_blocks, block_size, kv_heads, head_dim]."""

from __future__ import annotations

import torch

from .model.config import ModelConfig

# Room left on the GPU for activations, the sampler and the allocator's slack.
_GPU_HEADROOM_BYTES = 2 * 1024**3


def block_bytes(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    return 2 * cfg.num_layers * block_size * cfg.kv_size * (torch.finfo(dtype).bits // 8)


def num_blocks_for(cfg, block_size, dtype, device, gpu_memory_utilization, cpu_bytes) -> int:
    per_block = block_bytes(cfg, block_size, dtype)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = free - (1 - gpu_memory_utilization) * total - _GPU_HEADROOM_BYTES
    else:
        budget = cpu_bytes
    blocks = int(budget // per_block)
    if blocks < 1:
        raise RuntimeError(f"no memory left for the KV cache (one block takes {per_block} bytes): lower "
                           "max_loras or max_lora_rank, or raise gpu_memory_utilization")
    return blocks


def allocate(cfg: ModelConfig, num_blocks: int, block_size: int, device, dtype) -> list[tuple[torch.Tensor, ...]]:
    shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    return [(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
            for _ in range(cfg.num_layers)]
