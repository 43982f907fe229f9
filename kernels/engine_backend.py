"""The engine's LoRA hook on the GPU: `TorchLoRA`'s contract (`apply(layer, group, x, out)`) over the same
SlotBuffers, with the Triton kernels.

    meta = LoRAKernelMeta(max_tokens, max_loras, device)    # once, at engine start
    meta.prepare(token_slots, distinct)                     # every step, before the forward
    model.forward(..., lora=TritonLoRA(buffers, meta))      # cheap: allocates its y once per step
"""

from __future__ import annotations

from typing import Protocol

import torch

from ._common import sm_count
from .lora_expand import expand_config, lora_expand
from .lora_shrink import default_config, lora_shrink, shrink_workspace
from .metadata import LoRAKernelMeta


class _GroupShape(Protocol):
    slice_offsets: tuple[int, ...]


class SlotBuffersLike(Protocol):
    """What TritonLoRA reads of gpu_worker.engine.lora.slot_buffers.SlotBuffers."""

    a: list[dict[str, torch.Tensor]]  # [layer][group]: [slots, S, R, in]
    b: list[dict[str, list[torch.Tensor]]]  # [layer][group][slice]: [slots, out_s, R]
    shapes: dict[str, _GroupShape]
    ranks: torch.Tensor  # [slots] int32


class TritonLoRA:
    """LoRAHook over SlotBuffers: shrink + expand per projection, metadata shared by the whole step."""

    def __init__(self, buffers: SlotBuffersLike, meta: LoRAKernelMeta):
        self.buffers = buffers
        self.meta = meta
        # One fp32 y and one split-K scratch for every projection (they run one after another on one
        # stream): they grow to the largest step seen, instead of an allocation per layer and projection.
        self._y: torch.Tensor | None = None
        self._scratch: torch.Tensor | None = None
        # group -> (tokens, shrink config, scratch size, expand config): every layer of a step has the same
        # shapes and metadata, so the launch configs are worked out once per group and step, not per layer.
        self._plans: dict[str, tuple] = {}

    def prepare(self, token_slots: torch.Tensor, distinct: int | None = None) -> None:
        """This step's tokens -> slots; call once per step before the forward. distinct: how many slots
        the step holds, when the caller knows it (not in a graph replayed for other batches)."""
        self.meta.prepare(token_slots, distinct)
        self._plans = {}

    def _plan(self, group: str, x: torch.Tensor, a: torch.Tensor) -> tuple:
        t = x.shape[0]
        plan = self._plans.get(group)
        if plan is None or plan[0] != t:
            cfg = default_config(x, a, self.meta)
            need = max(1, shrink_workspace(x, a, self.meta, cfg))
            expand = expand_config(t, self.meta.rows_per_slot(), a.shape[2], sm_count(x.device))
            plan = self._plans[group] = (t, cfg, need, expand)
        return plan

    def apply(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """Add the adapters' contribution for projection `group` of `layer` into `out` in place."""
        a = self.buffers.a[layer][group]
        t, s, r = x.shape[0], a.shape[1], a.shape[2]
        if self._y is None or self._y.numel() < t * s * r:
            self._y = torch.empty(t * s * r, dtype=torch.float32, device=x.device)
        _, cfg, need, expand = self._plan(group, x, a)
        if self._scratch is None or self._scratch.numel() < need:
            self._scratch = torch.empty(need, dtype=torch.float32, device=x.device)
        y = self._y[: t * s * r].view(t, s, r)
        lora_shrink(x, a, self.buffers.ranks, self.meta, y=y, config=cfg, workspace=self._scratch)
        lora_expand(y, self.buffers.b[layer][group], out, self.buffers.ranks, self.meta,
                    slice_offsets=self.buffers.shapes[group].slice_offsets, config=expand)
