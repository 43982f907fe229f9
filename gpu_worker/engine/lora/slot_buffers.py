"""The device copy of the adapters in slots.

Per layer and fused group, A is stacked as [slots, slices, R, in] and each slice's B as [slots, out, R],
R = max_lora_rank. Ranks below R are zero-padded, so a padded row or column adds exactly nothing; a module
an adapter does not target is all zeros in its slot.

All of one slot's tensors are views into one row of a single [slots, per_slot] buffer, and each adapter
is packed once, in host memory, into that row's layout (its "image"). Loading an adapter into a slot is
then one host-to-device copy (on a side stream, overlapping the running steps), not ~500 small copies
and fills.
"""

from __future__ import annotations

import torch

from ..model.config import ModelConfig
from .layout import MODULE_GROUP, group_shapes
from .peft_adapter import AdapterWeights


class SlotBuffers:
    def __init__(self, cfg: ModelConfig, num_slots: int, max_rank: int, device: torch.device, dtype: torch.dtype):
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.num_layers = cfg.num_layers
        self.dtype = dtype
        self.shapes = group_shapes(cfg)
        # (layer, group) -> offset of A; (layer, group, slice) -> offset of B, within one slot's row.
        self._a_at: dict[tuple[int, str], int] = {}
        self._b_at: dict[tuple[int, str, int], int] = {}
        at = 0
        for layer in range(cfg.num_layers):
            for g, s in self.shapes.items():
                self._a_at[layer, g] = at
                at += len(s.slice_widths) * max_rank * s.in_features
                for i, w in enumerate(s.slice_widths):
                    self._b_at[layer, g, i] = at
                    at += w * max_rank
        self.per_slot = at
        self.flat = torch.zeros(num_slots, at, device=device, dtype=dtype)
        # a[layer][group]: [slots, S, R, in]; b[layer][group][slice]: [slots, out, R] (views into flat)
        self.a = [{g: self._view(self.flat, self._a_at[layer, g], (len(s.slice_widths), max_rank, s.in_features))
                   for g, s in self.shapes.items()} for layer in range(cfg.num_layers)]
        self.b = [{g: [self._view(self.flat, self._b_at[layer, g, i], (w, max_rank))
                       for i, w in enumerate(s.slice_widths)] for g, s in self.shapes.items()}
                  for layer in range(cfg.num_layers)]
        # Each slot's largest rank (0: empty): kernels skip the padded tail.
        self.ranks = torch.zeros(num_slots, dtype=torch.int32, device=device)
        # Each slot's targeted groups (host side): a step runs LoRA only on the groups its adapters target.
        self.groups: list[frozenset[str]] = [frozenset()] * num_slots

    @staticmethod
    def _view(flat: torch.Tensor, offset: int, shape: tuple[int, ...]) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= d
        return flat[..., offset : offset + n].unflatten(-1, shape)

    def pack(self, adapter: AdapterWeights, pin: bool) -> torch.Tensor:
        """The adapter in one slot row's layout, in host memory (pinned for asynchronous copies)."""
        image = torch.zeros(self.per_slot, dtype=self.dtype, pin_memory=pin)
        for (layer, module), (a, b) in adapter.modules.items():
            group, index = MODULE_GROUP[module]
            s = self.shapes[group]
            r = a.shape[0]
            self._view(image, self._a_at[layer, group], (len(s.slice_widths), self.max_rank, s.in_features)
                       )[index, :r].copy_(a)
            self._view(image, self._b_at[layer, group, index], (s.slice_widths[index], self.max_rank))[:, :r].copy_(b)
        return image

    @staticmethod
    def groups_of(adapter: AdapterWeights) -> frozenset[str]:
        """The fused groups an adapter targets (a PEFT default q_proj + v_proj adapter: qkv alone)."""
        return frozenset(MODULE_GROUP[module][0] for _, module in adapter.modules)

    def groups_used(self, slots) -> frozenset[str]:
        """The groups any of these slots' adapters target (slot -1: none)."""
        return frozenset().union(*(self.groups[s] for s in set(slots) if s >= 0))

    def load(self, slot: int, image: torch.Tensor, max_rank: int, groups: frozenset[str]) -> None:
        """Copy a packed adapter into `slot` (on the current stream), replacing whatever was there."""
        self.flat[slot].copy_(image, non_blocking=True)
        # A fill kernel, not `ranks[slot] = max_rank`: that copies a pageable host scalar, which waits for the
        # stream, and the copy stream waits for the step in flight (0.4-0.8 ms of host time a load on an H200).
        self.ranks[slot : slot + 1].fill_(max_rank)
        self.groups[slot] = groups

    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()
