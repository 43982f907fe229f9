"""The device copy of the adapters in slots.

Per layer and fused group, A is stacked as [slots, slices, R, in] and each slice's B as [slots, out, R],
R = max_lora_rank. Ranks below R are zero-padded, so a padded row or column adds exactly nothing; a module
an adapter does not target is all zeros in its slot.

Each adapter is packed once, in host memory, into one slot's layout (its "image": every A, then every B).
All of one slot's B are views into one row of a single [slots, b_size] buffer, and so are its A until
`attach_base` moves every projection's A of all slots under that projection's base weight ([N + slots*S*R, K]
in one tensor, kernels/consumer_expand.py says why). Loading an adapter into a slot is then two
host-to-device copies, or, once A is under the base weights, one copy to the device and one launch that
scatters it into the slot's 65 pieces (on a side stream, overlapping the running steps), not ~500 small copies
and fills.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..model.config import ModelConfig
from .layout import MODULE_GROUP, group_shapes
from .peft_adapter import AdapterWeights

if TYPE_CHECKING:
    from kernels.slot_copy import SlotCopy


class SlotBuffers:
    def __init__(self, cfg: ModelConfig, num_slots: int, max_rank: int, device: torch.device, dtype: torch.dtype):
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.num_layers = cfg.num_layers
        self.dtype = dtype
        self.shapes = group_shapes(cfg)
        # (layer, group) -> offset of A; (layer, group, slice) -> offset of B, within one slot's image (A part,
        # then B part).
        self._a_at: dict[tuple[int, str], int] = {}
        self._b_at: dict[tuple[int, str, int], int] = {}
        at = 0
        for layer in range(cfg.num_layers):
            for g, s in self.shapes.items():
                self._a_at[layer, g] = at
                at += len(s.slice_widths) * max_rank * s.in_features
        self.a_size = at
        for layer in range(cfg.num_layers):
            for g, s in self.shapes.items():
                for i, w in enumerate(s.slice_widths):
                    self._b_at[layer, g, i] = at
                    at += w * max_rank
        self.per_slot = at
        self.device = device
        self.a_flat: torch.Tensor | None = torch.zeros(num_slots, self.a_size, device=device, dtype=dtype)
        self.b_flat = torch.zeros(num_slots, at - self.a_size, device=device, dtype=dtype)
        # a[layer][group]: [slots, S, R, in]; b[layer][group][slice]: [slots, out, R]
        self.a = [{g: self._view(self.a_flat, self._a_at[layer, g], self._a_shape(g)) for g in self.shapes}
                  for layer in range(cfg.num_layers)]
        self.b = [{g: [self._view(self.b_flat, self._b_at[layer, g, i] - self.a_size, (w, max_rank))
                       for i, w in enumerate(s.slice_widths)] for g, s in self.shapes.items()}
                  for layer in range(cfg.num_layers)]
        # stacked[layer][group]: the base weight with every slot's A under it, once attach_base ran (else None).
        self.stacked: list[dict[str, torch.Tensor]] | None = None
        # Once stacked, a slot's weights are 65 pieces (each projection's A rows, then its B row). On CUDA a load
        # copies the image to the device in one piece (`_staging`) and scatters it with one launch
        # (kernels/slot_copy.py: the pieces copied one by one, or by `torch._foreach_copy_`, cost the engine's
        # thread 250 us of host time a load); elsewhere the pieces are copied by its torch reference.
        self._slot_pieces: list[list[torch.Tensor]] = []  # [slot]: the pieces, in the image's order
        self._staging: torch.Tensor | None = None
        self._slot_copy: SlotCopy | None = None
        # Each slot's largest rank (0: empty): kernels skip the padded tail.
        self.ranks = torch.zeros(num_slots, dtype=torch.int32, device=device)
        # Each slot's targeted groups (host side): a step runs LoRA only on the groups its adapters target.
        self.groups: list[frozenset[str]] = [frozenset()] * num_slots

    def _a_shape(self, group: str) -> tuple[int, int, int]:
        s = self.shapes[group]
        return len(s.slice_widths), self.max_rank, s.in_features

    def attach_base(self, layers: list, copy_kernel: bool | None = None) -> None:
        """Store every projection's A (all slots) under the layer's base weight, `layers[i].<group>` [N, K]: one
        [N + slots*S*R, K] tensor whose first N rows become the layer's weight (the same values, a view) and the
        rest this projection's `a`, so one GEMM over a prefix of it computes the base output and the shrink of
        every slot in the prefix (kernels/consumer_expand.py). Adapters already loaded keep their A.
        copy_kernel: loads scatter a slot's pieces with kernels/slot_copy.py (default: on CUDA)."""
        if self.stacked is not None:
            return
        self.stacked = []
        for layer, weights in enumerate(layers):
            row = {}
            for g in self.shapes:
                base, a = getattr(weights, g), self.a[layer][g]
                n, k = base.shape
                if k != a.shape[3] or base.dtype != a.dtype:
                    raise ValueError(f"layer {layer} {g}: base weight {tuple(base.shape)} {base.dtype} does not "
                                     f"take A {tuple(a.shape)} {a.dtype} under it")
                stacked = torch.empty(n + a[:, :, :, 0].numel(), k, device=base.device, dtype=base.dtype)
                stacked[:n].copy_(base)
                stacked[n:].copy_(a.reshape(-1, k))
                setattr(weights, g, stacked[:n])
                self.a[layer][g] = stacked[n:].view(a.shape)
                row[g] = stacked
            self.stacked.append(row)
        from kernels.slot_copy import SlotCopy

        self.a_flat = None
        # (_a_at is in image order: layer by layer, group by group, as pack() lays A out; B follows in one piece.)
        self._slot_pieces = [[self.a[layer][g][slot] for layer, g in self._a_at] + [self.b_flat[slot]]
                             for slot in range(self.num_slots)]
        if self.device.type == "cuda" if copy_kernel is None else copy_kernel:
            self._staging = torch.empty(self.per_slot, device=self.device, dtype=self.dtype)
            self._slot_copy = SlotCopy(self._slot_pieces, self.device)

    def b_runs(self, layer: int, groups: frozenset[str] | None = None) -> list[tuple[int, int]]:
        """Where layer's B (of `groups`, None: all) lies in each slot's row of b_flat: (offset, values) runs, the
        adjacent groups' merged (every group's, in one run: a layer's B is contiguous within a slot)."""
        runs: list[tuple[int, int]] = []
        for g, s in self.shapes.items():
            if groups is not None and g not in groups:
                continue
            at = self._b_at[layer, g, 0] - self.a_size
            size = sum(w * self.max_rank for w in s.slice_widths)
            if runs and runs[-1][0] + runs[-1][1] == at:
                runs[-1] = (runs[-1][0], runs[-1][1] + size)
            else:
                runs.append((at, size))
        return runs

    @staticmethod
    def _view(flat: torch.Tensor, offset: int, shape: tuple[int, ...]) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= d
        return flat[..., offset : offset + n].unflatten(-1, shape)

    def pack(self, adapter: AdapterWeights, pin: bool) -> torch.Tensor:
        """The adapter in one slot's layout, in host memory (pinned for asynchronous copies)."""
        image = torch.zeros(self.per_slot, dtype=self.dtype, pin_memory=pin)
        for (layer, module), (a, b) in adapter.modules.items():
            group, index = MODULE_GROUP[module]
            s = self.shapes[group]
            r = a.shape[0]
            self._view(image, self._a_at[layer, group], self._a_shape(group))[index, :r].copy_(a)
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
        self.groups[slot] = groups
        if self._slot_copy is not None:  # one copy to the device, one launch into the pieces (and the rank)
            self._staging.copy_(image, non_blocking=True)
            self._slot_copy.copy(slot, self._staging, self.ranks, max_rank)
            return
        if self.a_flat is not None:
            self.a_flat[slot].copy_(image[:self.a_size], non_blocking=True)
            self.b_flat[slot].copy_(image[self.a_size:], non_blocking=True)
        else:
            from kernels.slot_copy import slot_copy_ref

            slot_copy_ref(self._slot_pieces[slot], image)
        # A fill kernel, not `ranks[slot] = max_rank`: that copies a pageable host scalar, which waits for the
        # stream, and the copy stream waits for the step in flight (0.4-0.8 ms of host time a load on an H200).
        self.ranks[slot : slot + 1].fill_(max_rank)

    def nbytes(self) -> int:
        """Device bytes the slots hold (A and B, wherever A is stored)."""
        return self.num_slots * self.per_slot * self.b_flat.element_size()
