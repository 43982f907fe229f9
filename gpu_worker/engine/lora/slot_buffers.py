"""The device copy of the adapters in slots: per layer and fused group, A stacked as [slots, slices, R, in]
and each slice's B as [slots, out, R], R = max_lora_rank. Ranks below R are zero-padded, so a padded
row or column adds exactly nothing; a module an adapter does not target is all zeros in its slot.
"""

from __future__ import annotations

import contextlib

import torch

from ..model.config import ModelConfig
from .layout import MODULE_GROUP, group_shapes
from .peft_adapter import AdapterWeights


class SlotBuffers:
    def __init__(self, cfg: ModelConfig, num_slots: int, max_rank: int, device: torch.device, dtype: torch.dtype):
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.shapes = group_shapes(cfg)
        # a[layer][group]: [slots, slices, R, in]; b[layer][group][slice]: [slots, out, R]
        self.a: list[dict[str, torch.Tensor]] = []
        self.b: list[dict[str, list[torch.Tensor]]] = []
        for _ in range(cfg.num_layers):
            self.a.append({
                g: torch.zeros(num_slots, len(s.slice_widths), max_rank, s.in_features, device=device, dtype=dtype)
                for g, s in self.shapes.items()
            })
            self.b.append({
                g: [torch.zeros(num_slots, w, max_rank, device=device, dtype=dtype) for w in s.slice_widths]
                for g, s in self.shapes.items()
            })
        # Each slot's largest rank (0: empty): kernels skip the padded tail.
        self.ranks = torch.zeros(num_slots, dtype=torch.int32, device=device)

    def load(self, slot: int, adapter: AdapterWeights, stream: torch.cuda.Stream | None = None) -> None:
        """Copy an adapter's weights into `slot`, replacing whatever was there."""
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with ctx:
            for layer_a, layer_b in zip(self.a, self.b):
                for g in layer_a:
                    layer_a[g][slot].zero_()
                    for b in layer_b[g]:
                        b[slot].zero_()
            for (layer, module), (a, b) in adapter.modules.items():
                group, index = MODULE_GROUP[module]
                r = a.shape[0]
                self.a[layer][group][slot, index, :r].copy_(a, non_blocking=True)
                self.b[layer][group][index][slot, :, :r].copy_(b, non_blocking=True)
            self.ranks[slot] = adapter.max_rank

    def nbytes(self) -> int:
        total = sum(t.numel() * t.element_size() for layer in self.a for t in layer.values())
        total += sum(t.numel() * t.element_size() for layer in self.b for ts in layer.values() for t in ts)
        return total

