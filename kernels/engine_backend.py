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
from .lora_expand import expand_config, expand_launch
from .lora_shrink import default_config, shrink_launch, shrink_workspace
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
        # group -> ((tokens, strides), y, shrink launch, expand launch): every layer of a step has the same shapes and
        # metadata, so the checks, configs and grids are worked out once per group and step, not per layer.
        self._plans: dict[str, tuple] = {}

    def prepare(self, token_slots: torch.Tensor, distinct: int | None = None) -> None:
        """This step's tokens -> slots; call once per step before the forward. distinct: how many slots
        the step holds, when the caller knows it (not in a graph replayed for other batches)."""
        self.meta.prepare(token_slots, distinct)
        self._plans = {}

    def _plan(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor) -> tuple:
        # The launches bake in the strides of x and out: a plan serves calls with the same ones.
        key = (x.shape[0], x.stride(), out.stride())
        t = key[0]
        plan = self._plans.get(group)
        if plan is None or plan[0] != key:
            a = self.buffers.a[layer][group]
            s, r = a.shape[1], a.shape[2]
            if self._y is None or self._y.numel() < t * s * r:
                self._y = torch.empty(t * s * r, dtype=torch.float32, device=x.device)
            y = self._y[: t * s * r].view(t, s, r)
            cfg = default_config(x, a, self.meta)
            need = max(1, shrink_workspace(x, a, self.meta, cfg))
            if self._scratch is None or self._scratch.numel() < need:
                # A new scratch: launches planned with the old one for other groups are planned again.
                self._scratch = torch.empty(need, dtype=torch.float32, device=x.device)
                self._plans = {}
            expand = expand_config(t, self.meta.rows_per_slot(), r, sm_count(x.device))
            plan = self._plans[group] = (
                key, y,
                shrink_launch(x, a, self.buffers.ranks, self.meta, y, cfg, self._scratch),
                expand_launch(y, self.buffers.b[layer][group], out, self.buffers.ranks, self.meta,
                              slice_offsets=self.buffers.shapes[group].slice_offsets, config=expand))
        return plan

    def apply(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """Add the adapters' contribution for projection `group` of `layer` into `out` in place."""
        _, y, shrink, expand = self._plan(layer, group, x, out)
        shrink(x, self.buffers.a[layer][group], y)
        expand(y, self.buffers.b[layer][group], out)
