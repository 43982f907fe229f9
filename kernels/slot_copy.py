"""An adapter's copy into its slot in one launch: a device image scattered into every place the slot's weights live.

Once A sits under the base weights (gpu_worker/engine/lora/slot_buffers.py `attach_base`), one slot's weights
are 65 pieces in 65 tensors (each projection's A rows, then every B). Copying them one by one, or with
`torch._foreach_copy_`, cost the engine's thread 250 us of host time a load on an H200 host (foreach alone:
100 us), and the step loop has ~0.3 ms to spare at batch 32 before the GPU waits for it. Here the pieces are
cut once into chunks of at most CHUNK values, with every slot's destination address of each chunk in a table
[slots, chunks]; a load is one host-to-device copy of the image and this launch.

    plan = SlotCopy(pieces_by_slot)            # pieces_by_slot[slot]: contiguous tensors, image order
    plan.copy(slot, image_on_device, ranks, rank)   # also ranks[slot] = rank, after the weights
    slot_copy_ref(pieces_by_slot[slot], image)      # the torch reference
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import Launches

CHUNK = 16384  # values a program copies (32 KB of bf16)
_BLOCK = 2048


# slot and rank change from load to load: unspecialised, one compiled kernel serves every slot (specialised, slot 1,
# slots 16 and 32, and the others each compiled on their first load, 1-4 s inside a step on an H200 host).
@triton.jit(do_not_specialize=["slot", "rank"])
def _slot_copy_kernel(src_ptr, table_ptr, offsets_ptr, sizes_ptr, ranks_ptr, slot, rank, chunks,
                      CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    p = tl.program_id(0)
    dst = tl.load(table_ptr + slot * chunks + p).to(tl.pointer_type(src_ptr.dtype.element_ty))
    at = tl.load(offsets_ptr + p)
    n = tl.load(sizes_ptr + p)
    for i in tl.static_range(0, CHUNK, BLOCK):
        k = i + tl.arange(0, BLOCK)
        ok = k < n
        tl.store(dst + k, tl.load(src_ptr + at + k, mask=ok), mask=ok)
    if p == 0:
        tl.store(ranks_ptr + slot, rank)


_slot_copy = Launches(_slot_copy_kernel)


def slot_copy_ref(pieces: list[torch.Tensor], image: torch.Tensor) -> None:
    """The reference: each piece <- the image's next piece.numel() values."""
    torch._foreach_copy_(pieces, [v.view(p.shape) for v, p in zip(image.split([p.numel() for p in pieces]),
                                                                  pieces, strict=True)])


class SlotCopy:
    """The chunk table for a set of slots whose weights are laid out alike: pieces_by_slot[slot] lists the
    slot's destination tensors (contiguous, one dtype) in the order the image holds them; every slot's list has
    the same sizes. The table holds addresses: the pieces must outlive the plan (it keeps references)."""

    def __init__(self, pieces_by_slot: list[list[torch.Tensor]], device: torch.device):
        first = pieces_by_slot[0]
        sizes = [p.numel() for p in first]
        for pieces in pieces_by_slot:
            if [p.numel() for p in pieces] != sizes or any(not p.is_contiguous() or p.dtype != first[0].dtype
                                                           for p in pieces):
                raise ValueError("every slot's pieces must be contiguous, of one dtype, and sized alike")
        starts, lengths, at = [], [], 0
        table: list[list[int]] = [[] for _ in pieces_by_slot]
        for i, n in enumerate(sizes):
            for c in range(0, n, CHUNK):
                starts.append(at + c)
                lengths.append(min(CHUNK, n - c))
                for slot, pieces in enumerate(pieces_by_slot):
                    table[slot].append(pieces[i].data_ptr() + c * pieces[i].element_size())
            at += n
        self.numel = at
        self.dtype = first[0].dtype
        self._pieces = pieces_by_slot
        self._table = torch.tensor(table, dtype=torch.int64, device=device)
        self._offsets = torch.tensor(starts, dtype=torch.int64, device=device)
        self._sizes = torch.tensor(lengths, dtype=torch.int32, device=device)

    def copy(self, slot: int, image: torch.Tensor, ranks: torch.Tensor, rank: int) -> None:
        """The slot's pieces <- image (on the device, contiguous, numel values), and ranks[slot] <- rank."""
        if image.numel() != self.numel or image.dtype != self.dtype or not image.is_contiguous() \
                or image.device != self._table.device:
            raise ValueError(f"the image must be {self.numel} contiguous {self.dtype} values on "
                             f"{self._table.device}, got {image.numel()} {image.dtype} on {image.device}")
        if not 0 <= slot < len(self._pieces):
            raise ValueError(f"slot {slot} out of range (0..{len(self._pieces) - 1})")
        chunks = self._offsets.shape[0]
        _slot_copy((chunks,), image, self._table, self._offsets, self._sizes, ranks, slot, rank, chunks,
                   CHUNK=CHUNK, BLOCK=_BLOCK)
