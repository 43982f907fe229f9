"""Row-wise argmax of a step's logits for greedy sampling, split over the vocabulary.

torch.argmax over [batch, 128256] bf16 logits took ~28 us on an H200 whatever the batch (its reduction
spreads one row over few threads); one program per row walking the whole vocabulary took 44 us at batch 64
(64 programs on 132 SMs, each a serial walk over 256 KB). Here each row is cut into chunks, one program per
(row, chunk): each finds its chunk's first maximum and packs (value, index) into one int64 whose order is
the value's, then the lower index's; a second launch takes each row's largest packed key. Ties go to the first
index, as torch.argmax; -0.0 and +0.0 tie. NaN never wins (torch returns a NaN's index); logits are finite here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, next_pow2, sm_count
from .launch import Launches

BLOCK = 2048
# Chunks a row is cut into, at most. The count itself is a runtime argument, not a constant: one compiled variant
# for every batch size (a variant per count compiled inside a serving step when a new batch size came, ~1 s).
MAX_SPLITS = 64


@triton.jit(do_not_specialize=["splits", "chunk"])
def _chunk_max_kernel(x_ptr, part_ptr, V, stride, chunk, splits, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    where = tl.zeros([BLOCK], tl.int32)
    lo = part * chunk
    for start in range(lo, tl.minimum(V, lo + chunk), BLOCK):
        idx = start + offs
        v = tl.load(x_ptr + row * stride + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
        take = v > best  # strict: each lane keeps its first maximum
        best = tl.where(take, v, best)
        where = tl.where(take, idx, where)
    top = tl.max(best, 0) + 0.0  # -0.0 + 0.0 is +0.0: the two zeros tie, as in torch
    first = tl.min(tl.where(best == top, where, V), 0)
    # A float's bits read as int32 order like the float once the negatives' lower 31 bits are flipped;
    # the low word, 2**31 - 1 - index, makes the lower index the larger key among equal values.
    bits = top.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    tl.store(part_ptr + row * splits + part, (key.to(tl.int64) << 32) | (0x7FFFFFFF - first).to(tl.int64))


@triton.jit(do_not_specialize=["splits"])
def _pick_kernel(part_ptr, out_ptr, splits, MAX_SPLITS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, MAX_SPLITS)
    keys = tl.load(part_ptr + row * splits + i, mask=i < splits, other=-(2**63))
    tl.store(out_ptr + row, 0x7FFFFFFF - (tl.max(keys, 0) & 0x7FFFFFFF))


_chunk_max = Launches(_chunk_max_kernel)
_pick = Launches(_pick_kernel)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x: [N, V] float (any float dtype, last dimension contiguous) -> [N] int64, the first maximum's index."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be 2-D with a contiguous last dimension, got {tuple(x.shape)}")
    n, v = x.shape
    out = torch.empty(n, dtype=torch.int64, device=x.device)
    if n == 0:
        return out
    if v >= 2**31 - 1:
        raise ValueError(f"a vocabulary of {v} does not fit the packed int32 index")
    # About four programs per SM over the whole batch, each at least one block of the row.
    splits = max(1, min(MAX_SPLITS, next_pow2(cdiv(4 * sm_count(x.device), n)), next_pow2(cdiv(v, BLOCK))))
    chunk = cdiv(cdiv(v, splits), BLOCK) * BLOCK
    parts = torch.empty((n, splits), dtype=torch.int64, device=x.device)
    # Straight to the compiled kernels (kernels/launch.py): a decode step's sampler launches these two.
    _chunk_max((n, splits), x, parts, v, x.stride(0), chunk, splits, BLOCK=BLOCK, num_warps=4)
    _pick((n,), parts, out, splits, MAX_SPLITS=MAX_SPLITS, num_warps=1)
    return out
