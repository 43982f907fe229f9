"""Triton multi-LoRA kernels: shrink (x @ A) and expand (out += y @ B) over tokens grouped by adapter.

    meta = LoRAKernelMeta(max_tokens, max_slots, device)            # once
    meta.prepare(token_slots, distinct)                             # once per engine step
    y = lora_shrink(x, a, ranks, meta)                              # per layer and projection
    lora_expand(y, b, out, ranks, meta, slice_offsets)

See README.md for the design; reference.py holds the plain-torch semantics.
"""

from ._common import FILL, KernelConfig
from .engine_backend import TritonLoRA
from .lora_expand import expand_config, lora_expand
from .lora_shrink import lora_shrink, shrink_config, shrink_workspace
from .metadata import LoRAKernelMeta, prepare_reference
from .reference import lora_expand_ref, lora_gather_bmm, lora_loop, lora_ref, lora_shrink_ref

__all__ = [
    "FILL",
    "KernelConfig",
    "LoRAKernelMeta",
    "TritonLoRA",
    "expand_config",
    "lora_expand",
    "lora_expand_ref",
    "lora_gather_bmm",
    "lora_loop",
    "lora_ref",
    "lora_shrink",
    "lora_shrink_ref",
    "prepare_reference",
    "shrink_config",
    "shrink_workspace",
]
