"""Row-wise argmax of a step's logits for greedy sampling: one program per row.

torch.argmax over [batch, 128256] bf16 logits took ~28 us on an H200 whatever the batch (its reduction
spreads one row over few threads); one program per row walking the vocabulary in 2,048-wide blocks reads
the logits once. Ties go to the first index, as torch.argmax. NaN never wins (torch returns a NaN's index);
logits are finite here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _argmax_kernel(x_ptr, out_ptr, V, stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    where = tl.zeros([BLOCK], tl.int32)
    for start in range(0, V, BLOCK):
        idx = start + offs
        v = tl.load(x_ptr + row * stride + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
        take = v > best  # strict: each lane keeps its first maximum
        best = tl.where(take, v, best)
        where = tl.where(take, idx, where)
    top = tl.max(best, 0)
    tl.store(out_ptr + row, tl.min(tl.where(best == top, where, V), 0).to(tl.int64))


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x: [N, V] float (any float dtype, last dimension contiguous) -> [N] int64, the first maximum's index."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be 2-D with a contiguous last dimension, got {tuple(x.shape)}")
    out = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    if x.shape[0]:
        _argmax_kernel[(x.shape[0],)](x, out, x.shape[1], x.stride(0), BLOCK=2048, num_warps=4)
    return out
