"""An adapter's copy into its slot in one launch: a device image scattered into every place the slot's weights live.

Once A sits under the base weights (gpu_worker/engine/lora/slot_buffers.py `attach_base`), one slot's weights
are 65 pieces in 65 tensors (each projection's A rows, then every B). Copying them one by one, or with
`torch._foreach_copy_`, cost the engine's thread 250 us of host time a load on an H200 host (foreach alone:
100 us), and the step loop has ~0.3 ms to spare at batch 32 before the GPU waits for it. Here the pieces are
cut once into chunks of at most CHUNK values, with every slot's destination address of each chunk in a table
[slots, chunks]; a load is one host-to-device copy of the image and this launch.

A piece is a 2-D block: `rows` rows of `width` values in the slot, each row's first `copy` from a row of the
image (at a row stride of the image's own), the rest zeros. Slots and images are laid out at rank strides that may
differ (SlotBuffers' rank classes: an image at its adapter's, the slots at the least that holds them all): a B
piece is [out, r] in the slot and [out, c] in the image, its rows' first min(r, c) copied. The same chunks copy
the other way (`gather`, each row's first `copy` values): a slot into an image, for moving the slots to another
stride.

    plan = SlotCopy(pieces_by_slot)   # pieces_by_slot[slot]: (dst [rows, width], image offset, image stride, copy)
    plan.copy(slot, image_on_device, ranks, rank)   # also ranks[slot] = rank, after the weights (rank < 0: not)
    plan.gather(slot, image_on_device)              # the image's blocks <- the slot (the rest untouched)
    slot_copy_ref(pieces_by_slot[slot], image)      # the torch reference (gather=True: the other way)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import Launches

CHUNK = 16384  # values a program copies (32 KB of bf16)
_BLOCK = 2048

# (the slot's block [rows, width], its offset in the image, the image's row stride, values of a row copied)
Piece = tuple[torch.Tensor, int, int, int]


# slot and rank change from load to load: unspecialised, one compiled kernel serves every slot (specialised, slot 1,
# slots 16 and 32, and the others each compiled on their first load, 1-4 s inside a step on an H200 host).
@triton.jit(do_not_specialize=["slot", "rank"])
def _slot_copy_kernel(img_ptr, table_ptr, at_ptr, width_ptr, copy_ptr, rows_ptr, img_stride_ptr, dst_stride_ptr,
                      ranks_ptr, slot, rank, chunks, GATHER: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    p = tl.program_id(0)
    dst = tl.load(table_ptr + slot * chunks + p).to(tl.pointer_type(img_ptr.dtype.element_ty))
    at = tl.load(at_ptr + p)
    width = tl.load(width_ptr + p)
    copy = tl.load(copy_ptr + p)
    n = width * tl.load(rows_ptr + p)
    img_stride = tl.load(img_stride_ptr + p)
    dst_stride = tl.load(dst_stride_ptr + p)
    for i in tl.static_range(0, CHUNK, BLOCK):
        k = i + tl.arange(0, BLOCK)
        row = k // width
        col = k - row * width
        ok = k < n
        copied = ok & (col < copy)
        img = img_ptr + at + row * img_stride + col
        out = dst + row * dst_stride + col
        if GATHER:
            tl.store(img, tl.load(out, mask=copied), mask=copied)
        else:  # past `copy`: zeros
            tl.store(out, tl.load(img, mask=copied, other=0.0), mask=ok)
    if not GATHER and (p == 0) & (rank >= 0):  # a static test first: gathers compile no store
        tl.store(ranks_ptr + slot, rank)


_slot_copy = Launches(_slot_copy_kernel)


def slot_copy_ref(pieces: list[Piece], image: torch.Tensor, gather: bool = False) -> None:
    """The reference: each piece's rows <- their first `copy` values from the image, zeros past them (gather: the
    image's rows <- the pieces' first `copy` values)."""
    for dst, at, stride, copy in pieces:
        block = image.as_strided((dst.shape[0], copy), (stride, 1), image.storage_offset() + at)
        if gather:
            block.copy_(dst[:, :copy])
        else:
            dst[:, :copy].copy_(block)
            dst[:, copy:].zero_()


class SlotCopy:
    """The chunk table for a set of slots whose weights are laid out alike: pieces_by_slot[slot] lists the
    slot's blocks (2-D, rows contiguous, one dtype) with where each lies in the image; every slot's list has the
    same shapes, strides and image places. The table holds addresses: the blocks must outlive the plan (it keeps
    references)."""

    def __init__(self, pieces_by_slot: list[list[Piece]], device: torch.device):
        first = pieces_by_slot[0]
        shapes = [(p.shape, p.stride(), at, stride, copy) for p, at, stride, copy in first]
        for pieces in pieces_by_slot:
            if [(p.shape, p.stride(), at, stride, copy) for p, at, stride, copy in pieces] != shapes or any(
                    p.dim() != 2 or p.stride(1) != 1 or p.dtype != first[0][0].dtype or not 0 <= copy <= p.shape[1]
                    for p, _, _, copy in pieces):
                raise ValueError("every slot's pieces must be 2-D blocks of contiguous rows, of one dtype, shaped "
                                 "and placed alike, copying at most a row each")
        # Per chunk: (image offset, offset in the block, width, copy, rows, image row stride, block row stride).
        chunks: list[tuple[int, int, int, int, int, int, int]] = []
        owner: list[int] = []
        self.numel = 0
        for i, (block, at, stride, copy) in enumerate(first):
            rows, width = block.shape
            self.numel = max(self.numel, at + (rows - 1) * stride + copy if rows else 0)
            dst_stride = block.stride(0)
            if rows == 1 or (stride == width == copy and dst_stride == width):  # one run on both sides
                rows, width, copy, stride, dst_stride = 1, rows * width, rows * copy, 0, 0
            if rows == 1 or width >= CHUNK:  # long rows: cut along each
                parts = [(at + r * stride + c, r * dst_stride + c, min(CHUNK, width - c),
                          max(0, min(CHUNK, copy - c)), 1, 0, 0)
                         for r in range(rows) for c in range(0, width, CHUNK)]
            else:  # narrow rows: as many as a chunk holds
                per = CHUNK // width
                parts = [(at + r * stride, r * dst_stride, width, copy, min(per, rows - r), stride, dst_stride)
                         for r in range(0, rows, per)]
            chunks += parts
            owner += [i] * len(parts)
        self.dtype = first[0][0].dtype
        self._pieces = pieces_by_slot
        size = first[0][0].element_size()
        # Each slot's piece addresses (slots x pieces), then each chunk's: its piece's plus its offset in it.
        bases = torch.tensor([[p.data_ptr() for p, *_ in pieces] for pieces in pieces_by_slot], dtype=torch.int64)
        cols = list(zip(*chunks, strict=True)) if chunks else [()] * 7
        table = bases[:, torch.tensor(owner, dtype=torch.int64)] + torch.tensor(cols[1], dtype=torch.int64) * size
        self._table = table.to(device)
        self._at = torch.tensor(cols[0], dtype=torch.int64, device=device)
        self._width = torch.tensor(cols[2], dtype=torch.int32, device=device)
        self._copy = torch.tensor(cols[3], dtype=torch.int32, device=device)
        self._rows = torch.tensor(cols[4], dtype=torch.int32, device=device)
        self._img_stride = torch.tensor(cols[5], dtype=torch.int64, device=device)
        self._dst_stride = torch.tensor(cols[6], dtype=torch.int64, device=device)

    def _check(self, slot: int, image: torch.Tensor) -> None:
        if image.numel() < self.numel or image.dtype != self.dtype or not image.is_contiguous() \
                or image.device != self._table.device:
            raise ValueError(f"the image must be at least {self.numel} contiguous {self.dtype} values on "
                             f"{self._table.device}, got {image.numel()} {image.dtype} on {image.device}")
        if not 0 <= slot < len(self._pieces):
            raise ValueError(f"slot {slot} out of range (0..{len(self._pieces) - 1})")

    def _launch(self, slot: int, image: torch.Tensor, ranks: torch.Tensor, rank: int, gather: bool) -> None:
        self._check(slot, image)
        chunks = self._at.shape[0]
        _slot_copy((chunks,), image, self._table, self._at, self._width, self._copy, self._rows, self._img_stride,
                   self._dst_stride, ranks, slot, rank, chunks, GATHER=gather, CHUNK=CHUNK, BLOCK=_BLOCK)

    def copy(self, slot: int, image: torch.Tensor, ranks: torch.Tensor, rank: int) -> None:
        """The slot's pieces <- their blocks of the image (on the device, contiguous; zeros past each row's copy),
        and ranks[slot] <- rank (rank < 0: ranks untouched)."""
        self._launch(slot, image, ranks, rank, False)

    def gather(self, slot: int, image: torch.Tensor) -> None:
        """The image's blocks <- the slot's pieces, each row's first `copy` values (nothing else is written)."""
        self._launch(slot, image, image, -1, True)
