"""lora_expand_rows: `lora_expand` for small launches (decode sizes), a sorted row a program on CUDA cores (BGMV style).

The segmented expand (lora_expand.py) runs each row tile of a segment through a tensor-core dot. At decode sizes a
16-row tile holds one or two tokens of an adapter (256 tokens of 128 adapters), and the cost is not bytes but
instructions: B moved into the MMA's layout (a 16-bit load and byte permutes an element) and the tile's segment
found (reductions over the segment table) for every tile (H200: gate_up r16 at 256 tokens of 128 adapters read B
at 0.26 TB/s). Here program (j, p) takes the p-th row of the tokens sorted by slot (`LoRAKernelMeta.sorted_tokens`,
its slot from `sorted_slots`) and column tile j across the slices: B's tile in 16-byte vectors along the rank, the
row's y, its output tile, all loaded at once; the row's part is B's tile times y in fp32 registers, added and
rounded once. An adapter's B still comes from memory once a launch: the programs of one column tile for all rows
are launched side by side (column tiles vary fastest in the grid, and the launches it is picked for fit in one or
two waves), so its other rows read that tile from L2.

    launch = expand_rows_launch(y, b, out, ranks, meta)    # checks once
    launch(y, b, out)                                      # per layer
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl

from ._common import (
    DOT_EMULATED,
    KernelConfig,
    cdiv,
    check_expand_args,
    dot_mode,
    next_pow2,
    padded_slices,
    slice_scalars,
    to_low,
)
from .launch import Launch
from .metadata import LoRAKernelMeta


@triton.jit
def _expand_rows_kernel(
    y_ptr, out_ptr, ranks_ptr, scale_ptr, sorted_ptr, sorted_slots_ptr,
    b0_ptr, b1_ptr, b2_ptr, b3_ptr,
    stride_b0, stride_b1, stride_b2, stride_b3, stride_bo, stride_br,
    w0, w1, w2, w3, col0, col1, col2, col3,
    T, R, stride_yt, stride_ys, stride_ot, stride_oc,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_SCALE: tl.constexpr, ACCUMULATE: tl.constexpr, DOT: tl.constexpr,
):
    # Program (j, p): column tile j, numbered across the slices, of the token at sorted position p.
    j = tl.program_id(0)
    pos = tl.program_id(1)
    c1 = (w0 + BLOCK_N - 1) // BLOCK_N
    c2 = c1 + (w1 + BLOCK_N - 1) // BLOCK_N
    c3 = c2 + (w2 + BLOCK_N - 1) // BLOCK_N
    in1 = j >= c1
    in2 = j >= c2
    in3 = j >= c3
    b_ptr = tl.where(in3, b3_ptr, tl.where(in2, b2_ptr, tl.where(in1, b1_ptr, b0_ptr)))
    stride_bs = tl.where(in3, stride_b3, tl.where(in2, stride_b2, tl.where(in1, stride_b1, stride_b0)))
    width = tl.where(in3, w3, tl.where(in2, w2, tl.where(in1, w1, w0)))
    col = tl.where(in3, col3, tl.where(in2, col2, tl.where(in1, col1, col0)))
    s = in1.to(tl.int32) + in2.to(tl.int32) + in3.to(tl.int32)
    cols = (j - tl.where(in3, c3, tl.where(in2, c2, tl.where(in1, c1, 0)))) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_R)

    tok = tl.load(sorted_ptr + pos).to(tl.int64)
    slot = tl.load(sorted_slots_ptr + pos)  # -1: no adapter (those tokens sort last)
    rank = tl.where(slot >= 0, tl.minimum(tl.load(ranks_ptr + tl.maximum(slot, 0)), R), 0)
    # A rank-0 slot adds nothing: its row is not even read; assigned, it gets zeros. Rows without an adapter (last in
    # the sorted order) leave at once: masked, a row costs about what its work does, the kernel being bound by its
    # instructions (H200, gate_up r16: 256 rows masked 33 us, skipped 7-10).
    if (slot >= 0) & ((rank > 0) | (not ACCUMULATE)):
        _add_row(y_ptr, out_ptr, scale_ptr, b_ptr, stride_bs, stride_bo, stride_br, tok, slot, rank, s, col, cols, rk,
                 width, R, stride_yt, stride_ys, stride_ot, stride_oc, HAS_SCALE, ACCUMULATE, DOT)


@triton.jit
def _add_row(y_ptr, out_ptr, scale_ptr, b_ptr, stride_bs, stride_bo, stride_br, tok, slot, rank, s, col, cols, rk,
             width, R, stride_yt, stride_ys, stride_ot, stride_oc,
             HAS_SCALE: tl.constexpr, ACCUMULATE: tl.constexpr, DOT: tl.constexpr):
    """The row's part of one column tile, added into out (or assigned)."""
    LOW: tl.constexpr = out_ptr.dtype.element_ty
    # Everything the row reads at once: B's tile in 16-byte vectors along the rank (up to the rank rounded up to 8;
    # the ranks past the slot's are zeroed in registers below), its y, its output tile.
    bound = tl.minimum((rank + 7) // 8 * 8, R)
    b = tl.load(b_ptr + slot.to(tl.int64) * stride_bs + cols[:, None].to(tl.int64) * stride_bo
                + rk[None, :] * stride_br, mask=(cols < width)[:, None] & (rk < bound)[None, :], other=0.0)
    yr = tl.load(y_ptr + tok * stride_yt + s * stride_ys + rk, mask=rk < rank, other=0.0)
    o_row = out_ptr + tok * stride_ot + (col + cols).to(tl.int64) * stride_oc
    o_mask = cols < width
    base = tl.load(o_row, mask=o_mask, other=0.0).to(tl.float32) if ACCUMULATE else 0.0
    b = tl.where((rk < rank)[None, :], b, tl.zeros_like(b))
    part = tl.sum(b.to(tl.float32) * yr[None, :], axis=1)
    if HAS_SCALE:
        part = part * tl.load(scale_ptr + slot)
    part = base + part
    if o_row.dtype.element_ty != tl.float32:
        part = to_low(part, LOW, DOT == DOT_EMULATED)
    tl.store(o_row, part, mask=o_mask)


# The rows kernel runs where its work is small: T x the output columns x R (its CUDA-core multiply-adds) at most
# this. H200, Llama-3-8B shapes, ranks 16 and 64, 1 to 128 adapters (python3 -m kernels.bench, README's results
# log): below it the rows kernel was never slower (qkv r16 at 64 tokens of 32 adapters 4.4 us against 8.8; one
# token 1.8-3.9 against 3.2-6.6; gate_up r16 at 16 tokens of 8 adapters 5.8 against 10.9); past it, as soon as an
# adapter holds many of the tokens, the tensor-core tiles win (gate_up r16, 64 tokens of one adapter: 11.8 against
# 7.9; r64, 256 tokens: 145 against 24), and a graph replayed for any batch cannot know.
MAX_WORK = 1 << 23


# Where the step says (`LoRAKernelMeta.spread`) that no adapter holds more than SPREAD_ROWS of its tokens, the rows
# kernel runs decode launches past MAX_WORK too, up to SPREAD_TOKENS tokens. H200, Llama-3-8B shapes, two tokens an
# adapter, against the segmented kernel (rotated copies, README's results log, fifteenth session): gate_up r16 256
# tokens of 128 adapters 48-50 us against 112; r64 167-171 against 257-260; gate_up r16 64 of 32 15.2-15.5 against
# 31.2-31.9; qkv r16 256 of 128 10.9-12.1 against 24.8-25.8; down r64 256 of 128 31.5-32.6 against 45.8-46.6. At
# eight tokens an adapter the two are even or the segmented one wins (qkv r64 256 of 32: 33 against 19).
SPREAD_ROWS = 2
SPREAD_TOKENS = 256


def fits(num_tokens: int, n_out: int, max_rank: int) -> bool:
    """Whether `lora_expand` runs this launch on the rows kernel (MAX_WORK), on a GPU. Not in Triton's interpreter,
    which runs every program in Python: a program a row made the engine's CPU tests with the Triton backend 3.3x
    slower (test_mixed_graphs 128 -> 419 s); the kernel's own tests call it directly."""
    return num_tokens * n_out * max_rank <= MAX_WORK


def spread(num_tokens: int, meta: LoRAKernelMeta) -> bool:
    """Whether the step's tokens are spread thin enough over adapters that `lora_expand` runs the rows kernel past
    MAX_WORK (SPREAD_ROWS above), on a GPU."""
    return num_tokens <= SPREAD_TOKENS and meta.spread is not None and meta.spread <= SPREAD_ROWS


def expand_rows_config(max_rank: int) -> KernelConfig:
    """One row a program (block_m), all BLOCK_R = R ranks (block_k), and 8,192 elements of B's tile (512 columns at
    rank 16, 128 at 64: the fastest or within 5% in the sweep above), 4 warps. (Programs of 2 and 4 rows, loading B
    where the slot changed and reusing it, were slower in every case measured: the rows are bound by their
    multiply-adds, not by B.)"""
    r = max(8, next_pow2(max_rank))
    return KernelConfig(1, max(32, 8192 // r), r, num_warps=4, num_stages=1)


def expand_rows_launch(
    y: torch.Tensor,
    b: Sequence[torch.Tensor],
    out: torch.Tensor,
    ranks: torch.Tensor,
    meta: LoRAKernelMeta,
    slice_offsets: Sequence[int] | None = None,
    scale: torch.Tensor | None = None,
    config: KernelConfig | None = None,
    accumulate: bool = True,
) -> Callable[[torch.Tensor, Sequence[torch.Tensor], torch.Tensor], None]:
    """Check the arguments and work out the launch once; returns launch(y, b, out). Semantics and arguments as
    `lora_expand`'s."""
    t, _, r, widths, slice_offsets = check_expand_args(y, b, out, ranks, meta, slice_offsets, scale)
    if t == 0:
        return lambda y, b, out: None
    cfg = config or expand_rows_config(r)
    if cfg.block_k < r:
        raise ValueError(f"block_k {cfg.block_k} < R = {r}: a program holds all of B's ranks")
    if cfg.block_m != 1:
        raise ValueError(f"block_m (rows a program) must be 1, got {cfg.block_m}")
    n_tiles = sum(cdiv(w, cfg.block_n) for w in widths)
    scalars = (*slice_scalars(b, widths, slice_offsets),
               t, r, y.stride(0), y.stride(1), out.stride(0), out.stride(1))
    kernel = Launch(_expand_rows_kernel, (n_tiles, t), out.device, BLOCK_N=cfg.block_n,
                    BLOCK_R=cfg.block_k, HAS_SCALE=scale is not None, ACCUMULATE=accumulate,
                    DOT=dot_mode(out), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    tables = (ranks, scale if scale is not None else ranks, meta.sorted_tokens, meta.sorted_slots)

    def launch(y: torch.Tensor, b: Sequence[torch.Tensor], out: torch.Tensor) -> None:
        kernel(y, out, *tables, *padded_slices(b), *scalars)

    return launch


def lora_expand_rows(y: torch.Tensor, b: Sequence[torch.Tensor], out: torch.Tensor, ranks: torch.Tensor,
                     meta: LoRAKernelMeta, slice_offsets: Sequence[int] | None = None,
                     scale: torch.Tensor | None = None, config: KernelConfig | None = None,
                     accumulate: bool = True) -> None:
    """`lora_expand`'s result on the rows kernel, whatever the size (`lora_expand` picks it where it `fits`)."""
    expand_rows_launch(y, b, out, ranks, meta, slice_offsets, scale, config, accumulate)(y, b, out)
