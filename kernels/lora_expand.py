"""lora_expand: each token's shrunk vector times its adapter's B, added into the base layer's output."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ._common import (
    DOT_EMULATED,
    DOT_FP32,
    KernelConfig,
    cdiv,
    dot_mode,
    locate,
    m_tiles_bound,
    next_pow2,
    pick,
    segment_table,
    slots_pad,
    sm_count,
    to_low,
)
from .metadata import LoRAKernelMeta

MAX_SLICES = 4  # qkv has 3; the kernel takes one pointer argument per slice


@triton.jit
def _rank_block(acc, y_rows, b_cols, k0, rank, row_ok, col_ok, stride_br, BLOCK_K: tl.constexpr,
                DOT: tl.constexpr):
    rk = k0 + tl.arange(0, BLOCK_K)
    k_ok = rk < rank
    yt = tl.load(y_rows + rk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    bt = tl.load(b_cols + rk[:, None] * stride_br, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
    if DOT == DOT_FP32:
        return tl.dot(yt, bt, acc, input_precision="ieee")
    # y is fp32; bf16/fp16 operands run on the tensor cores at full rate, accumulating in fp32.
    # Rounding y costs ~2**-9 relative, as much as the bf16 output's own rounding.
    yt = to_low(yt, bt.dtype, DOT == DOT_EMULATED)
    if DOT == DOT_EMULATED:
        return tl.dot(yt.to(tl.float32), bt.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(yt, bt, acc)


@triton.jit
def _expand_kernel(
    y_ptr, out_ptr, ranks_ptr, scale_ptr,
    sorted_ptr, active_ptr, start_ptr, len_ptr,
    b0_ptr, b1_ptr, b2_ptr, b3_ptr,
    stride_b0, stride_b1, stride_b2, stride_b3, stride_bo, stride_br,
    w0, w1, w2, w3, col0, col1, col2, col3, end0, end1, end2, n_tiles,
    R, stride_yt, stride_ys, stride_ot, stride_oc,
    MAX_SLOTS: tl.constexpr, SLOTS_PAD: tl.constexpr, NUM_SLICES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ONE_K: tl.constexpr,
    HAS_SCALE: tl.constexpr, DOT: tl.constexpr,
):
    # Grid: axis 1 walks row tiles (persistent), axis 0 splits each row tile's output columns. The
    # segment lookup (reductions over the segment table) is paid once per row tile, not per output tile,
    # and the column loop has no dependence between iterations, so its loads pipeline.
    i, slots, starts, lens, ranks, firsts, ends, m_tiles = segment_table(
        active_ptr, start_ptr, len_ptr, ranks_ptr, R, MAX_SLOTS, SLOTS_PAD, BLOCK_M)
    if HAS_SCALE:
        scales = tl.load(scale_ptr + slots, mask=slots >= 0, other=0.0)
    for m in range(tl.program_id(1), m_tiles, tl.num_programs(1)):
        seg = locate(m, i, ends)
        slot = pick(slots, i, seg).to(tl.int64)
        rank = pick(ranks, i, seg)
        rows = (m - pick(firsts, i, seg)) * BLOCK_M + tl.arange(0, BLOCK_M)
        # A rank-0 slot adds nothing: its rows are not even read (so -0.0 in out stays -0.0).
        row_ok = rows < tl.where(rank > 0, pick(lens, i, seg), 0)
        tok = tl.load(sorted_ptr + pick(starts, i, seg) + rows, mask=row_ok, other=0).to(tl.int64)
        o_rows = out_ptr + tok[:, None] * stride_ot
        y_base = y_ptr + tok[:, None] * stride_yt
        if HAS_SCALE:
            factor = pick(scales, i, seg)

        for tn in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
            # Output tiles never straddle two slices: tiles [end_{s-1}, end_s) are slice s's columns.
            s = 0
            b_ptr = b0_ptr
            stride_bs = stride_b0
            width = w0
            col = col0
            first_tile = 0
            if NUM_SLICES > 1:  # noqa: SIM102 (static: compiled out for fewer slices)
                if tn >= end0:
                    s = 1
                    b_ptr = b1_ptr
                    stride_bs = stride_b1
                    width = w1
                    col = col1
                    first_tile = end0
            if NUM_SLICES > 2:  # noqa: SIM102 (static: compiled out for fewer slices)
                if tn >= end1:
                    s = 2
                    b_ptr = b2_ptr
                    stride_bs = stride_b2
                    width = w2
                    col = col2
                    first_tile = end1
            if NUM_SLICES > 3:  # noqa: SIM102 (static: compiled out for fewer slices)
                if tn >= end2:
                    s = 3
                    b_ptr = b3_ptr
                    stride_bs = stride_b3
                    width = w3
                    col = col3
                    first_tile = end2
            cols = (tn - first_tile) * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = cols < width

            # The base output tile is loaded first, so its HBM latency overlaps the y and B loads (L2).
            o_ptrs = o_rows + (col + cols)[None, :].to(tl.int64) * stride_oc
            o_mask = row_ok[:, None] & col_ok[None, :]
            base = tl.load(o_ptrs, mask=o_mask, other=0.0)

            y_rows = y_base + s * stride_ys
            b_cols = b_ptr + slot * stride_bs + cols[None, :].to(tl.int64) * stride_bo
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            # K is the rank: one block covers it when R <= 128 (no loop), else a loop that stops at the rank.
            if ONE_K:
                acc = _rank_block(acc, y_rows, b_cols, 0, rank, row_ok, col_ok, stride_br, BLOCK_K, DOT)
            else:
                for k0 in range(0, rank, BLOCK_K):
                    acc = _rank_block(acc, y_rows, b_cols, k0, rank, row_ok, col_ok, stride_br, BLOCK_K, DOT)
            if HAS_SCALE:
                acc = acc * factor
            res = base.to(tl.float32) + acc
            if out_ptr.dtype.element_ty != tl.float32:
                res = to_low(res, out_ptr.dtype.element_ty, DOT == DOT_EMULATED)
            tl.store(o_ptrs, res, mask=o_mask)


def expand_config(num_tokens: int, rows_per_slot: int, max_rank: int, sms: int) -> KernelConfig:
    """Launch parameters from host ints: T, tokens per adapter (`LoRAKernelMeta.rows_per_slot`), the rank.
    Expand is bound by reading B (decode, many adapters) or by reading and writing `out` (prefill: T x
    out_features x 2 bytes x 2). Row tiles follow the tokens per adapter: 128-row tiles over 16-token
    segments would be 7/8 masked. Tiles from sweeps on an H200 (`kernels.bench --sweep`): with 16-row
    tiles, 256 columns beat 64 by 1.2-1.6x (gate_up r16, 256 tokens of 128 adapters: 123 vs 204 us); in
    prefill at rank <= 32, 64 x 256 tiles, 4 column programs per row tile, each looping over its column
    tiles three loads deep (gate_up r16, 2,048 tokens: 120 us against 179 with 128 x 128, 8 programs, two
    deep); at rank 64, 128 x 256 tiles with no pipelining (three stages of out, B and y would not fit in
    shared memory; qkv r64, 2,048 tokens: 34 us against 46 at 64 x 128 pipelined)."""
    bk = max(16, next_pow2(max_rank))
    bm = max(16, min(next_pow2(rows_per_slot), 128 if bk <= 64 else 32))
    if num_tokens <= 64 or bm <= 32:
        return KernelConfig(bm if num_tokens > 64 else 16, 256 if bk <= 64 else 128, min(bk, 128),
                            num_warps=4, num_stages=2)
    if bk <= 32:
        return KernelConfig(64, 256, bk, num_warps=4, num_stages=3, programs_per_sm=2, col_programs=4)
    if bm == 64 or num_tokens >= 4096:  # 8,192 tokens of gate_up r64: 504 us here, 632 at 128 x 256
        return KernelConfig(64, 128, bk, num_warps=4, num_stages=3, programs_per_sm=2, col_programs=4)
    return KernelConfig(128, 256, bk, num_warps=8, num_stages=1, programs_per_sm=2)


def lora_expand(
    y: torch.Tensor,
    b: Sequence[torch.Tensor],
    out: torch.Tensor,
    ranks: torch.Tensor,
    meta: LoRAKernelMeta,
    slice_offsets: Sequence[int] | None = None,
    scale: torch.Tensor | None = None,
    config: KernelConfig | None = None,
) -> None:
    """Semantics:
        out[t, off_s + c] += scale[slot(t)] * sum_{j < ranks[slot(t)]} y[t, s, j] * b[s][slot(t), c, j]
    for every token t with slot(t) = token_slots[t] >= 0 (as given to `meta.prepare`), every slice s and
    column c < out_s; in place, fp32 accumulation, one rounding to out's dtype. Rows of tokens without an
    adapter (and of rank-0 slots) are not touched. One launch for all slices; each adapter's B is read
    once per token tile.

    Args:
        y: [T, S, R] float32, contiguous: `lora_shrink`'s output.
        b: S tensors [num_slots, out_s, R] (PEFT lora_B layout, zero-padded past each slot's rank), all
           of out's dtype, with equal strides in their last two dims. S <= 4.
        out: [T, sum(out_s)] (or wider), bf16 / fp16 / fp32: the base layer's output, modified in place.
        ranks: [num_slots] int32, each slot's real rank (<= R).
        meta: prepared for these T tokens.
        slice_offsets: column of out where each slice starts (default: the slices side by side from 0).
        scale: optional [num_slots] float32 per-slot factor (None: 1; the engine folds it into B).
        config: launch parameters (default: `expand_config`).
    """
    if y.dim() != 3 or y.dtype != torch.float32 or not y.is_contiguous():
        raise ValueError(f"y must be contiguous float32 [T, S, R], got {y.dtype} {tuple(y.shape)}")
    t, s, r = y.shape
    if len(b) != s or not 1 <= s <= MAX_SLICES:
        raise ValueError(f"y has {s} slices, b has {len(b)} (1 to {MAX_SLICES} supported)")
    if out.dim() != 2 or out.shape[0] != t:
        raise ValueError(f"out must be [{t}, N], got {tuple(out.shape)}")
    num_slots = b[0].shape[0]
    for bs in b:
        if bs.dim() != 3 or bs.shape[0] != num_slots or bs.shape[2] != r:
            raise ValueError(f"each b[s] must be [{num_slots}, out_s, {r}], got {tuple(bs.shape)}")
        if bs.dtype != out.dtype or bs.stride()[1:] != b[0].stride()[1:]:
            raise ValueError("every b[s] must have out's dtype and the same strides in its last two dims")
    if out.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"out must be bf16, fp16 or fp32, got {out.dtype}")
    widths = [bs.shape[1] for bs in b]
    if slice_offsets is None:
        slice_offsets = [sum(widths[:k]) for k in range(s)]
    if len(slice_offsets) != s or any(o < 0 or o + w > out.shape[1] for o, w in zip(slice_offsets, widths)):
        raise ValueError(f"slices of widths {widths} at columns {list(slice_offsets)} do not fit out's "
                         f"{out.shape[1]} columns")
    if ranks.dtype != torch.int32 or ranks.shape != (num_slots,):
        raise ValueError(f"ranks must be int32 [{num_slots}], got {ranks.dtype} {tuple(ranks.shape)}")
    if scale is not None and (scale.dtype != torch.float32 or scale.shape != (num_slots,)):
        raise ValueError(f"scale must be float32 [{num_slots}], got {scale.dtype} {tuple(scale.shape)}")
    if num_slots < meta.max_slots:
        raise ValueError(f"b has {num_slots} slots, fewer than the metadata's max_slots={meta.max_slots}")
    if meta.num_tokens != t:
        raise ValueError(f"metadata was prepared for {meta.num_tokens} tokens, y has {t}")
    if t == 0:
        return
    cfg = config or expand_config(t, meta.rows_per_slot(), r, sm_count(out.device))
    ends = list(itertools.accumulate(cdiv(w, cfg.block_n) for w in widths))
    pad = MAX_SLICES - s
    bp = list(b) + [b[0]] * pad
    n_tiles = ends[-1]
    # Column programs per row tile: enough for the whole grid to reach programs_per_sm x SMs when the
    # row tiles are few (decode), one or a few when they are many (prefill: the column loop pipelines).
    m_bound = m_tiles_bound(t, meta.slots_bound(), cfg.block_m)
    programs = cfg.programs_per_sm * sm_count(out.device)
    grid_n = min(n_tiles, cfg.col_programs) if cfg.col_programs else n_tiles
    grid_m = max(1, min(m_bound, programs // grid_n))
    _expand_kernel[(grid_n, grid_m)](
        y, out, ranks, scale if scale is not None else ranks,
        meta.sorted_tokens, meta.active_slots, meta.seg_start, meta.seg_len,
        *bp, *[x.stride(0) for x in bp], b[0].stride(1), b[0].stride(2),
        *(widths + [0] * pad), *(list(slice_offsets) + [0] * pad), *(ends[:-1] + [ends[-1]] * (pad + 1))[:3],
        n_tiles, r, y.stride(0), y.stride(1), out.stride(0), out.stride(1),
        MAX_SLOTS=meta.max_slots, SLOTS_PAD=slots_pad(meta.max_slots), NUM_SLICES=s,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, ONE_K=cfg.block_k >= r,
        HAS_SCALE=scale is not None, DOT=dot_mode(out),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
