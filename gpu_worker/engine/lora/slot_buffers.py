"""The device copy of the adapters in slots.

Per layer and fused group, A is stacked as [slots, slices, r, in] and each slice's B as [slots, out, r], where r
is the slots' rank stride: the least of the rank classes (`rank_classes`: 16, 64 and max_lora_rank) that holds
every adapter in a slot. Ranks below r are zero-padded, so a padded row or column adds exactly nothing; a module
an adapter does not target is all zeros in its slot. The storage holds max_lora_rank; a smaller stride uses its
head: rank-16 adapters served with max_lora_rank 64 are read and multiplied at 16 (H200, Llama-3.2-1B, batch 64,
8 rank-16 adapters: graph replay 2.06 ms a step at stride 64, 1.43 at 16). `relayout` moves the slots to
another stride when an adapter of a larger rank comes in, or the last one leaves (LoRAManager decides); the
decode graphs are captured for every class (`layout`), and a step replays those of the current one.

Each adapter is packed once, in host memory, into one slot's layout at its own rank class (its "image": every
A, then every B; a rank-16 adapter's at 16, whatever max_lora_rank: pinned host memory and the copy to the device
a quarter of what they are at 64). All of one slot's B are views into one row of a single [slots, b_size] buffer,
and so are its A until `attach_base` moves every projection's A of all slots under that projection's base weight
([N + slots*S*R, K] in one tensor, kernels/consumer_expand.py says why). Loading an adapter into a slot is then one
copy of the image to the device and one launch that scatters it into the slot's pieces at the current stride, zeros
past the image's (kernels/slot_copy.py; on a side stream, overlapping the running steps), not ~500 small copies and
fills.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from ..model.config import ModelConfig
from .layout import MODULE_GROUP, group_shapes
from .peft_adapter import AdapterWeights

if TYPE_CHECKING:
    from kernels.slot_copy import Piece, SlotCopy

# The rank strides slots may be laid out at (each capped at max_lora_rank, which is one too): PEFT's common ranks
# (8, 16) at 16, the larger ones at 64. Each class past the first captures its own decode graphs.
RANK_CLASSES = (16, 64)


def rank_classes(max_rank: int) -> tuple[int, ...]:
    """The rank strides for max_lora_rank `max_rank`, ascending."""
    return tuple(sorted({min(c, max_rank) for c in RANK_CLASSES} | {max_rank}))


class SlotBuffers:
    def __init__(self, cfg: ModelConfig, num_slots: int, max_rank: int, device: torch.device, dtype: torch.dtype,
                 copy_kernel: bool | None = None):
        """copy_kernel: loads scatter a slot's pieces with kernels/slot_copy.py (default: on CUDA)."""
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.num_layers = cfg.num_layers
        self.dtype = dtype
        self.shapes = group_shapes(cfg)
        self.classes = rank_classes(max_rank)
        # Per rank class c, an adapter's image at stride c: (layer, group) -> offset of A, (layer, group, slice) ->
        # offset of B (every A, then every B), and its size. An adapter is packed at its own class.
        self._images = {c: self._image_layout(c) for c in self.classes}
        _, b_at, self.per_slot = self._images[max_rank]
        self.a_size = min(b_at.values())
        self.device = device
        self.a_flat: torch.Tensor | None = torch.zeros(num_slots, self.a_size, device=device, dtype=dtype)
        self.b_flat = torch.zeros(num_slots, self.per_slot - self.a_size, device=device, dtype=dtype)
        # stacked[layer][group]: the base weight with every slot's A under it, once attach_base ran (else None).
        self.stacked: list[dict[str, torch.Tensor]] | None = None
        self._base_rows: dict[tuple[int, str], int] = {}
        # Each slot's largest rank (0: empty): kernels skip the padded tail.
        self.ranks = torch.zeros(num_slots, dtype=torch.int32, device=device)
        # Each slot's targeted groups (host side): a step runs LoRA only on the groups its adapters target.
        self.groups: list[frozenset[str]] = [frozenset()] * num_slots
        self._copy_kernel = device.type == "cuda" if copy_kernel is None else copy_kernel
        # The device image a load or a relayout goes through: on CUDA taken now, before the KV cache takes what is
        # left (a slot's worth at max_lora_rank; elsewhere on first use).
        self._staging: torch.Tensor | None = None
        if device.type == "cuda":
            self._image()
        self.rank_class = self.classes[0]
        self._lay_out()

    def _image_layout(self, r: int) -> tuple[dict[tuple[int, str], int], dict[tuple[int, str, int], int], int]:
        a_at, b_at, at = {}, {}, 0
        for layer in range(self.num_layers):
            for g, s in self.shapes.items():
                a_at[layer, g] = at
                at += len(s.slice_widths) * r * s.in_features
        for layer in range(self.num_layers):
            for g, s in self.shapes.items():
                for i, w in enumerate(s.slice_widths):
                    b_at[layer, g, i] = at
                    at += w * r
        return a_at, b_at, at

    def _lay_out(self) -> None:
        """Every class's views (a[layer][group]: [slots, S, r, in]; b[layer][group][slice]: [slots, out, r]), B's
        offsets in a slot's row, and the pieces (and copy plans) loads scatter an image into."""
        self._views: dict[int, tuple[list, list]] = {}
        self._b_off: dict[int, dict[tuple[int, str, int], int]] = {}
        self._pieces: dict[tuple[int, int], list[list[Piece]]] = {}
        self._copies: dict[tuple[int, int], SlotCopy] = {}
        for r in self.classes:
            a, b, offsets, at = [], [], {}, 0
            for layer in range(self.num_layers):
                row = {}
                for g, s in self.shapes.items():
                    shape = (len(s.slice_widths), r, s.in_features)
                    if self.stacked is None:
                        row[g] = self._view(self.a_flat, at, shape)
                        at += shape[0] * r * shape[2]
                    else:
                        n = self._base_rows[layer, g]
                        row[g] = self.stacked[layer][g][n : n + self.num_slots * shape[0] * r].view(
                            self.num_slots, *shape)
                a.append(row)
            at = 0
            for layer in range(self.num_layers):
                row = {}
                for g, s in self.shapes.items():
                    row[g] = []
                    for i, w in enumerate(s.slice_widths):
                        offsets[layer, g, i] = at
                        row[g].append(self._view(self.b_flat, at, (w, r)))
                        at += w * r
                b.append(row)
            self._views[r], self._b_off[r] = (a, b), offsets
        for r in self.classes:  # the slots at stride r, an image at stride c (a load: c <= r; a relayout: either)
            a, b = self._views[r]
            for c in self.classes:
                # A slot's pieces in the image's order: each projection's A ([S, r, in] as S rows of r * in values,
                # from the image's S rows of c * in), then each slice's B ([out, r] from [out, c]); the image's
                # first min(r, c) of each, the rest zeros.
                a_at, b_at, _ = self._images[c]
                m = min(r, c)
                self._pieces[r, c] = [
                    [(a[layer][g][slot].reshape(a[layer][g].shape[1], -1), at, c * a[layer][g].shape[3],
                      m * a[layer][g].shape[3]) for (layer, g), at in a_at.items()]
                    + [(b[layer][g][i][slot], at, c, m) for (layer, g, i), at in b_at.items()]
                    for slot in range(self.num_slots)]
                if self._copy_kernel:
                    from kernels.slot_copy import SlotCopy

                    self._copies[r, c] = SlotCopy(self._pieces[r, c], self.device)
        self.a, self.b = self._views[self.rank_class]
        if self._copies and self.device.type == "cuda":
            # Compile the copy kernel's two variants now, not at the first load or move inside a step (1-4 s on an
            # H200 host): slot 0 out to the staging image and back, unchanged.
            plan = self._copies[self.rank_class, self.rank_class]
            plan.gather(0, self._image())
            plan.copy(0, self._image(), self.ranks, -1)

    def class_for(self, rank: int) -> int:
        """The least rank class that holds `rank` (<= max_lora_rank)."""
        return next(c for c in self.classes if c >= rank)

    @contextmanager
    def layout(self, rank_class: int) -> Iterator[None]:
        """a, b and rank_class as they would be at stride `rank_class`, for capturing its graphs (the slots'
        contents are not moved: what runs inside reads them as if they were)."""
        saved = self.a, self.b, self.rank_class
        self.a, self.b = self._views[rank_class]
        self.rank_class = rank_class
        try:
            yield
        finally:
            self.a, self.b, self.rank_class = saved

    def relayout(self, rank_class: int, keep: Iterable[int]) -> None:
        """Move the slots to stride `rank_class` (queued on the current stream, after whatever reads them): the
        adapters of slots `keep` (each of rank at most rank_class) keep their weights, the other slots are
        emptied. Each kept slot goes out to an image at the larger stride and back in at the new one, one slot after
        another in the order that never overwrites a slot not yet moved (a slot's block at a larger stride starts
        past its old one: highest slot first; at a smaller one lowest first)."""
        old = self.rank_class
        if rank_class == old:
            return
        if rank_class not in self.classes:
            raise ValueError(f"rank class {rank_class} is not one of {self.classes}")
        keep = sorted(set(keep), reverse=rank_class > old)
        wide = max(old, rank_class)
        image = self._image()[: self._images[wide][2]]
        for slot in keep:
            image.zero_()
            self._move((old, wide), slot, image, gather=True)
            self._move((rank_class, wide), slot, image, gather=False)
        for slot in set(range(self.num_slots)) - set(keep):
            self.ranks[slot : slot + 1].fill_(0)
            self.groups[slot] = frozenset()
        self.rank_class = rank_class
        self.a, self.b = self._views[rank_class]

    def _image(self) -> torch.Tensor:
        if self._staging is None:
            self._staging = torch.empty(self.per_slot, device=self.device, dtype=self.dtype)
        return self._staging

    def _move(self, strides: tuple[int, int], slot: int, image: torch.Tensor, gather: bool, rank: int = -1) -> None:
        """Slot <- image (gather: image <- slot), strides = (the slots', the image's); rank >= 0: also
        ranks[slot] <- rank."""
        plan = self._copies.get(strides)
        if plan is not None:
            if gather:
                plan.gather(slot, image)
            else:
                plan.copy(slot, image, self.ranks, rank)
            return
        from kernels.slot_copy import slot_copy_ref

        slot_copy_ref(self._pieces[strides][slot], image, gather)
        if rank >= 0:
            # A fill kernel, not `ranks[slot] = rank`: that copies a pageable host scalar, which waits for the
            # stream, and the copy stream waits for the step in flight (0.4-0.8 ms of host time a load on an H200).
            self.ranks[slot : slot + 1].fill_(rank)

    def attach_base(self, layers: list, copy_kernel: bool | None = None) -> None:
        """Store every projection's A (all slots) under the layer's base weight, `layers[i].<group>` [N, K]: one
        [N + slots*S*R, K] tensor whose first N rows become the layer's weight (the same values, a view) and the
        rest this projection's `a` (R = max_lora_rank; a stride r uses the first slots*S*r rows), so one GEMM over
        a prefix of it computes the base output and the shrink of every slot in the prefix
        (kernels/consumer_expand.py). Adapters already loaded keep their A. copy_kernel: as the constructor's."""
        if self.stacked is not None:
            return
        if copy_kernel is not None:
            self._copy_kernel = copy_kernel
        stacked_all = []
        for layer, weights in enumerate(layers):
            row = {}
            for g, s in self.shapes.items():
                base, a = getattr(weights, g), self.a[layer][g]
                n, k = base.shape
                if k != a.shape[3] or base.dtype != a.dtype:
                    raise ValueError(f"layer {layer} {g}: base weight {tuple(base.shape)} {base.dtype} does not "
                                     f"take A {tuple(a.shape)} {a.dtype} under it")
                stacked = torch.zeros(n + self.num_slots * len(s.slice_widths) * self.max_rank, k,
                                      device=base.device, dtype=base.dtype)
                stacked[:n].copy_(base)
                stacked[n : n + a[:, :, :, 0].numel()].copy_(a.reshape(-1, k))  # at the current stride
                setattr(weights, g, stacked[:n])
                self._base_rows[layer, g] = n
                row[g] = stacked
            stacked_all.append(row)
        self.stacked = stacked_all
        self.a_flat = None
        self._lay_out()

    def b_runs(self, layer: int, groups: frozenset[str] | None = None) -> list[tuple[int, int]]:
        """Where layer's B (of `groups`, None: all) lies in each slot's row of b_flat at the current stride:
        (offset, values) runs, the adjacent groups' merged (every group's, in one run: a layer's B is contiguous
        within a slot)."""
        runs: list[tuple[int, int]] = []
        offsets = self._b_off[self.rank_class]
        for g, s in self.shapes.items():
            if groups is not None and g not in groups:
                continue
            at = offsets[layer, g, 0]
            size = sum(w * self.rank_class for w in s.slice_widths)
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
        """The adapter in one slot's layout at its own rank class (a rank-16 adapter's image at 16, whatever
        max_lora_rank), in host memory (pinned for asynchronous copies)."""
        c = self.class_for(adapter.max_rank)
        a_at, b_at, size = self._images[c]
        image = torch.zeros(size, dtype=self.dtype, pin_memory=pin)
        for (layer, module), (a, b) in adapter.modules.items():
            group, index = MODULE_GROUP[module]
            s = self.shapes[group]
            r = a.shape[0]
            self._view(image, a_at[layer, group], (len(s.slice_widths), c, s.in_features))[index, :r].copy_(a)
            self._view(image, b_at[layer, group, index], (s.slice_widths[index], c))[:, :r].copy_(b)
        return image

    @staticmethod
    def groups_of(adapter: AdapterWeights) -> frozenset[str]:
        """The fused groups an adapter targets (a PEFT default q_proj + v_proj adapter: qkv alone)."""
        return frozenset(MODULE_GROUP[module][0] for _, module in adapter.modules)

    def groups_used(self, slots) -> frozenset[str]:
        """The groups any of these slots' adapters target (slot -1: none)."""
        return frozenset().union(*(self.groups[s] for s in set(slots) if s >= 0))

    def load(self, slot: int, image: torch.Tensor, max_rank: int, groups: frozenset[str],
             before_scatter: Callable[[], None] | None = None) -> None:
        """Copy a packed adapter into `slot` (on the current stream), replacing whatever was there. Its rank must fit
        the current stride (`relayout` first). before_scatter: called once the image's copy to the device is
        queued, before what writes the slot is (a wait for the steps that may still read the slot)."""
        if max_rank > self.rank_class:
            raise ValueError(f"an adapter of rank {max_rank} does not fit the slots' rank stride {self.rank_class}")
        strides = (self.rank_class, self.class_for(max_rank))  # (the image was packed at its adapter's class)
        if image.numel() != self._images[strides[1]][2]:
            raise ValueError(f"an image of {image.numel()} values is not a rank-{max_rank} adapter's")
        self.groups[slot] = groups
        if self._copies:  # one copy to the device, one launch into the pieces (and the rank)
            staging = self._image()[: image.numel()]
            staging.copy_(image, non_blocking=True)
            image = staging
        if before_scatter is not None:
            before_scatter()
        self._move(strides, slot, image, gather=False, rank=max_rank)

    def nbytes(self) -> int:
        """Device bytes the slots hold (A and B, wherever A is stored)."""
        return self.num_slots * self.per_slot * self.b_flat.element_size()
