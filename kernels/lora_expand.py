"""lora_expand: each token's shrunk vector times its adapter's B, added into the base layer's output."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl

from . import lora_expand_rows as expand_rows
from ._common import (
    DOT_EMULATED,
    DOT_NATIVE,
    FILL,
    KernelConfig,
    cdiv,
    check_expand_args,
    dot_mode,
    locate,
    m_tiles_bound,
    next_pow2,
    padded_slices,
    pick,
    segment_table,
    slice_scalars,
    slots_pad,
    sm_count,
    to_low,
)
from .launch import Launch
from .metadata import LoRAKernelMeta


@triton.jit
def _rank_bound(rank, R):
    """The slot's rank rounded up to 8 (within R). Loads masked there, not at the rank, are 16-byte vectors along
    the rank (contiguous in y and B; Triton then copies B through shared memory asynchronously), and the ranks past
    the slot's are zeroed in registers. Used (VEC) where B's tile is held over a chunk of row tiles (SUB > 1): H200,
    rank 64, gate_up 64 tokens of 32 adapters 87.8 -> 72.1 us, 256 of 128 329 -> 260, qkv 256 of 32 23.0 ->
    19.4. In the plain walk, where each B tile feeds one dot, the same loads were slower (1.12x over the
    kernel benchmark's grid: the zeroing's selects and the copies' waits cost more than the narrow loads)."""
    return tl.minimum((rank + 7) // 8 * 8, R)


@triton.jit
def _y_block(y_rows, k0, rank, R, row_ok, BLOCK_K: tl.constexpr, LOW: tl.constexpr, DOT: tl.constexpr,
             VEC: tl.constexpr):
    """Rows of y (fp32) for ranks [k0, k0 + BLOCK_K), as the MMA's left operand (zero past the rank)."""
    rk = k0 + tl.arange(0, BLOCK_K)
    bound = _rank_bound(rank, R) if VEC else rank
    yt = tl.load(y_rows + rk[None, :], mask=row_ok[:, None] & (rk < bound)[None, :], other=0.0)
    if VEC:
        yt = tl.where((rk < rank)[None, :], yt, 0.0)
    # y is fp32; bf16/fp16 operands run on the tensor cores at full rate, accumulating in fp32.
    # Rounding y costs ~2**-9 relative, as much as the bf16 output's own rounding.
    if DOT == DOT_NATIVE:
        yt = yt.to(LOW)
    elif DOT == DOT_EMULATED:
        yt = to_low(yt, LOW, True).to(tl.float32)
    return yt


@triton.jit
def _b_block(b_cols, k0, rank, R, col_ok, stride_br, BLOCK_K: tl.constexpr, VEC: tl.constexpr):
    """B's ranks [k0, k0 + BLOCK_K) for a tile of columns, as the MMA's right operand (zero past the rank)."""
    rk = k0 + tl.arange(0, BLOCK_K)
    bound = _rank_bound(rank, R) if VEC else rank
    bt = tl.load(b_cols + rk[:, None] * stride_br, mask=(rk < bound)[:, None] & col_ok[None, :], other=0.0)
    if VEC:
        bt = tl.where((rk < rank)[:, None], bt, tl.zeros_like(bt))
    return bt


@triton.jit
def _dot(acc, yt, bt, DOT: tl.constexpr):
    if DOT == DOT_NATIVE:  # noqa: SIM108 (a static branch: only one dot is compiled)
        acc = tl.dot(yt, bt, acc)
    else:
        acc = tl.dot(yt, bt.to(tl.float32), acc, input_precision="ieee")
    return acc


@triton.jit
def _b_dot(acc, yt, b_cols, k0, rank, R, col_ok, stride_br, BLOCK_K: tl.constexpr, DOT: tl.constexpr):
    return _dot(acc, yt, _b_block(b_cols, k0, rank, R, col_ok, stride_br, BLOCK_K, False), DOT)


@triton.jit
def _store_tile(acc, base, o_ptrs, o_mask, factor, HAS_SCALE: tl.constexpr, ACCUMULATE: tl.constexpr,
                LOW: tl.constexpr, DOT: tl.constexpr):
    """The adapters' part of a tile (acc: fp32, unscaled) added to the output's values there (base, loaded by the
    caller before the dot's operands, so that its latency overlaps theirs) or assigned; rounded once."""
    if HAS_SCALE:
        acc = acc * factor
    res = base.to(tl.float32) + acc if ACCUMULATE else acc
    if o_ptrs.dtype.element_ty != tl.float32:
        res = to_low(res, LOW, DOT == DOT_EMULATED)
    tl.store(o_ptrs, res, mask=o_mask)


@triton.jit
def _expand_kernel(
    y_ptr, out_ptr, ranks_ptr, scale_ptr,
    sorted_ptr, active_ptr, start_ptr, len_ptr,
    b0_ptr, b1_ptr, b2_ptr, b3_ptr,
    stride_b0, stride_b1, stride_b2, stride_b3, stride_bo, stride_br,
    w0, w1, w2, w3, col0, col1, col2, col3,
    R, stride_yt, stride_ys, stride_ot, stride_oc,
    MAX_SLOTS: tl.constexpr, SLOTS_PAD: tl.constexpr, NUM_SLICES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ONE_K: tl.constexpr,
    HAS_SCALE: tl.constexpr, DOT: tl.constexpr, ACCUMULATE: tl.constexpr, SUB: tl.constexpr,
):
    # Grid: axis 1 walks row tiles (persistent), axis 0 splits each row tile's output columns. The
    # segment lookup (reductions over the segment table) is paid once per row tile, not per output tile;
    # y's rows are loaded (and rounded) once per row tile and slice, not per output tile; and the column
    # loop has no dependence between iterations, so its loads pipeline. Output tiles never straddle two
    # slices; numbered across slices, tile t goes to program t % num_programs(0), as if flat.
    # SUB > 1 (decode-sized row tiles, rank <= BLOCK_K): a grid row tile is a chunk of up to SUB row tiles of one
    # segment, walked one after another under each column tile's B, loaded once for them: a long segment's B is
    # read once per SUB row tiles, and a short one's chunk is its one row tile, as with SUB = 1.
    LOW: tl.constexpr = out_ptr.dtype.element_ty
    i, slots, starts, lens, ranks, firsts, ends, m_tiles = segment_table(
        active_ptr, start_ptr, len_ptr, ranks_ptr, R, MAX_SLOTS, SLOTS_PAD, BLOCK_M * SUB)
    if HAS_SCALE:
        scales = tl.load(scale_ptr + slots, mask=slots >= 0, other=0.0)
    pid_n = tl.program_id(0)
    n_progs = tl.num_programs(0)
    for m in range(tl.program_id(1), m_tiles, tl.num_programs(1)):
        seg = locate(m, i, ends)
        slot = pick(slots, i, seg).to(tl.int64)
        rank = pick(ranks, i, seg)
        # A rank-0 slot adds nothing: its rows are not even read (so -0.0 in out stays -0.0); assigned, they
        # get zeros.
        seg_len = tl.where((rank > 0) | (not ACCUMULATE), pick(lens, i, seg), 0)
        seg_start = pick(starts, i, seg)
        first_row = (m - pick(firsts, i, seg)) * (BLOCK_M * SUB)
        if SUB == 1:
            rows = first_row + tl.arange(0, BLOCK_M)
            row_ok = rows < seg_len
            tok = tl.load(sorted_ptr + seg_start + rows, mask=row_ok, other=0).to(tl.int64)
            o_rows = out_ptr + tok[:, None] * stride_ot
            y_base = y_ptr + tok[:, None] * stride_yt
        else:
            n_sub = tl.cdiv(tl.minimum(seg_len - first_row, BLOCK_M * SUB), BLOCK_M)
        factor = pick(scales, i, seg) if HAS_SCALE else 1.0
        first_tile = 0  # of this slice, numbered across slices
        for s in tl.static_range(NUM_SLICES):
            if s == 0:
                b_ptr, stride_bs, width, col = b0_ptr, stride_b0, w0, col0
            elif s == 1:
                b_ptr, stride_bs, width, col = b1_ptr, stride_b1, w1, col1
            elif s == 2:
                b_ptr, stride_bs, width, col = b2_ptr, stride_b2, w2, col2
            else:
                b_ptr, stride_bs, width, col = b3_ptr, stride_b3, w3, col3
            tiles = (width + BLOCK_N - 1) // BLOCK_N
            if SUB == 1:
                y_rows = y_base + s * stride_ys
                if ONE_K:  # rank <= BLOCK_K: y's rows for this slice, once
                    yt = _y_block(y_rows, 0, rank, R, row_ok, BLOCK_K, LOW, DOT, False)
            b_slot = b_ptr + slot * stride_bs
            for j in range((pid_n - first_tile % n_progs + n_progs) % n_progs, tiles, n_progs):
                cols = j * BLOCK_N + tl.arange(0, BLOCK_N)
                col_ok = cols < width
                b_cols = b_slot + cols[None, :].to(tl.int64) * stride_bo
                if SUB == 1:
                    # The base output tile is loaded first, so its HBM latency overlaps the B loads (L2).
                    o_ptrs = o_rows + (col + cols)[None, :].to(tl.int64) * stride_oc
                    o_mask = row_ok[:, None] & col_ok[None, :]
                    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                    base = tl.load(o_ptrs, mask=o_mask, other=0.0) if ACCUMULATE else acc
                    if ONE_K:
                        acc = _b_dot(acc, yt, b_cols, 0, rank, R, col_ok, stride_br, BLOCK_K, DOT)
                    else:
                        for k0 in range(0, rank, BLOCK_K):
                            yk = _y_block(y_rows, k0, rank, R, row_ok, BLOCK_K, LOW, DOT, False)
                            acc = _b_dot(acc, yk, b_cols, k0, rank, R, col_ok, stride_br, BLOCK_K, DOT)
                    _store_tile(acc, base, o_ptrs, o_mask, factor, HAS_SCALE, ACCUMULATE, LOW, DOT)
                else:
                    bt = _b_block(b_cols, 0, rank, R, col_ok, stride_br, BLOCK_K, True)
                    for u in range(0, n_sub):
                        rows = first_row + u * BLOCK_M + tl.arange(0, BLOCK_M)
                        row_ok = rows < seg_len
                        tok = tl.load(sorted_ptr + seg_start + rows, mask=row_ok, other=0).to(tl.int64)
                        o_ptrs = out_ptr + tok[:, None] * stride_ot + (col + cols)[None, :].to(tl.int64) * stride_oc
                        o_mask = row_ok[:, None] & col_ok[None, :]
                        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                        base = tl.load(o_ptrs, mask=o_mask, other=0.0) if ACCUMULATE else acc
                        yt = _y_block(y_ptr + tok[:, None] * stride_yt + s * stride_ys, 0, rank, R, row_ok, BLOCK_K,
                                      LOW, DOT, True)
                        acc = _dot(acc, yt, bt, DOT)
                        _store_tile(acc, base, o_ptrs, o_mask, factor, HAS_SCALE, ACCUMULATE, LOW, DOT)
            first_tile += tiles


def expand_config(num_tokens: int, rows_per_slot: int, max_rank: int, sms: int, n_out: int = 0,
                  segments_known: bool = False) -> KernelConfig:
    """Launch parameters from host ints: T, tokens per adapter (`LoRAKernelMeta.rows_per_slot`), the rank, the
    output columns (0: unknown), whether the adapters present are known (`LoRAKernelMeta.distinct` given).
    Expand is bound by reading B (decode, many adapters) or by reading and writing `out` (prefill: T x
    out_features x 2 bytes x 2). Row tiles follow the tokens per adapter: 128-row tiles over 16-token
    segments would be 7/8 masked. Tiles from sweeps on an H200 (`kernels.bench --sweep`, and wider ones over
    programs per SM and warps) and an ncu pass: with 16-row tiles, 256 columns beat 64 by 1.2-1.6x (gate_up
    r16, 256 tokens of 128 adapters).
    In prefill, the grid is about two programs per SM (the launcher splits columns so that row tiles x
    column programs fill it), each looping over its column tiles with y's rows held: at rank <= 32,
    32 x 256 tiles of 8 warps, three loads deep (gate_up r16, 2,048 tokens: 85 us against 110 with 64 x 256
    of 4 warps); at rank 64, 128 x 128 tiles of 4 warps (gate_up r64, 8,192 tokens: 304 us against 380
    with 64 x 128; down r64, 2,048 tokens: 21 against 25 with 128 x 256).
    Decode-sized row tiles over at most 32 column tiles (qkv, o, down) run 4 programs an SM, not 16: fewer
    programs find no tile (H200: qkv r16, 64 tokens of 32 adapters, 8.8 us against 10.6; down r16, 256 tokens of
    32, 5.8 against 7.7); over gate_up's 112 the rows need the programs. Past rank 32, where one adapter could
    hold many of the tokens (the adapters present unknown, as in a graph replayed for any batch, or more than a
    row tile each), a row tile of the grid is a chunk of `sub_tiles` row tiles under one B: B's reads fall by
    that factor, the programs too, so chunks grow (up to 8) while the grid would still give every SM a program
    were all tokens one adapter's (H200, rank 64, 256 tokens of one adapter: gate_up 43.7 -> 25.4 us with 8, qkv
    15.1 -> 11.4 with 2; 64 tokens, gate_up 14.9 -> 12.3 with 2; 8 adapters, qkv 16.0 -> 11.5). At rank 16 B's
    tile is small and the chunks lost more to fewer programs than they saved (qkv, 256 tokens of one adapter:
    7.9 -> 8.5 us); with short segments a chunk is one row tile, a few percent slower than the plain walk."""
    bk = max(16, next_pow2(max_rank))
    bm = max(16, min(next_pow2(rows_per_slot), 128 if bk <= 64 else 32))
    if num_tokens <= 64 or bm <= 32:
        bm = bm if num_tokens > 64 else 16
        chunked = n_out and 32 < bk <= 128 and (not segments_known or rows_per_slot > bm)
        # Chunks of row tiles under one B take 128 columns, 4 programs an SM, their chunk count as 256 columns
        # would give it (H200, Llama-3-8B shapes, rank 64, against 256 columns: gate_up, 64 tokens of one adapter,
        # 11.6 -> 9.5 us, of 8 24.4 -> 21.8; 256 of one 25.0 -> 22.5; qkv 256 tokens of one 10.6 -> 9.4, of 8
        # 11.8 -> 10.4; counted at 128 columns, the chunks grew to 4-8 and qkv's 256 tokens of one took 12.4).
        bn = 256 if bk <= 64 and not chunked else 128
        col_tiles, sub = cdiv(n_out, bn), 1
        if chunked:
            # T rounded up to a power of two, as the engine's warm-up compiles the variants (backends.warmup).
            while sub < 8 and cdiv(n_out, 256) * cdiv(next_pow2(num_tokens), bm * sub * 2) >= sms:
                sub *= 2
        return KernelConfig(bm, bn, min(bk, 128), num_warps=4, num_stages=2,
                            programs_per_sm=4 if 0 < col_tiles <= 32 or chunked else 16, sub_tiles=sub)
    if bk <= 32:
        if num_tokens > 4096:  # gate_up r16, 8,192 tokens: 286 us against 310 with 32 x 256 of 8 warps
            return KernelConfig(64, 256, bk, num_warps=4, num_stages=3, programs_per_sm=2, col_programs=4)
        return KernelConfig(32, 256, bk, num_warps=8, num_stages=3, programs_per_sm=2, col_programs=FILL)
    return KernelConfig(bm, 128, bk, num_warps=4, num_stages=2 if bm == 128 else 3, programs_per_sm=2,
                        col_programs=FILL)


def default_config(t: int, widths: Sequence[int], max_rank: int, meta: LoRAKernelMeta,
                   device: torch.device) -> KernelConfig:
    """`expand_config` for a launch of T tokens into slices of these widths, with this step's metadata."""
    return expand_config(t, meta.rows_per_slot(), max_rank, sm_count(device), n_out=sum(widths),
                         segments_known=meta.distinct is not None)


def lora_expand(
    y: torch.Tensor,
    b: Sequence[torch.Tensor],
    out: torch.Tensor,
    ranks: torch.Tensor,
    meta: LoRAKernelMeta,
    slice_offsets: Sequence[int] | None = None,
    scale: torch.Tensor | None = None,
    config: KernelConfig | None = None,
    accumulate: bool = True,
) -> None:
    """Semantics:
        out[t, off_s + c] += scale[slot(t)] * sum_{j < ranks[slot(t)]} y[t, s, j] * b[s][slot(t), c, j]
    for every token t with slot(t) = token_slots[t] >= 0 (as given to `meta.prepare`), every slice s and
    column c < out_s; in place, fp32 accumulation, one rounding to out's dtype. Rows of tokens without an
    adapter (and of rank-0 slots) are not touched. One launch for all slices; each adapter's B is read
    once per token tile. accumulate=False assigns instead of adding (out = ..., out is not read): the
    adapters' part alone, into a buffer of its own, whose rows of tokens without an adapter are left as
    they were.

    Args:
        y: [T, S, R] float32, contiguous: `lora_shrink`'s output.
        b: S tensors [num_slots, out_s, R] (PEFT lora_B layout, zero-padded past each slot's rank), all
           of out's dtype, with equal strides in their last two dims. S <= 4.
        out: [T, sum(out_s)] (or wider), bf16 / fp16 / fp32: the base layer's output, modified in place.
        ranks: [num_slots] int32, each slot's real rank (<= R).
        meta: prepared for these T tokens.
        slice_offsets: column of out where each slice starts (default: the slices side by side from 0).
        scale: optional [num_slots] float32 per-slot factor (None: 1; the engine folds it into B).
        config: launch parameters of the segmented kernel here (default: on a GPU the rows kernel of
           lora_expand_rows.py where the launch `fits` it or the step's tokens are `spread` over adapters, else
           `expand_config`).
    """
    expand_launch(y, b, out, ranks, meta, slice_offsets, scale, config, accumulate)(y, b, out)


def expand_launch(
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
    """Check `lora_expand`'s arguments and work out its launch once; returns launch(y, b, out) for tensors of
    these shapes, strides and dtypes (one plan per projection and step, reused by every layer)."""
    t, s, r, widths, slice_offsets = check_expand_args(y, b, out, ranks, meta, slice_offsets, scale)
    if t == 0:
        return lambda y, b, out: None
    if config is None and out.is_cuda and (expand_rows.fits(t, sum(widths), r) or expand_rows.spread(t, meta)):
        # small, or few tokens an adapter: a row a program
        return expand_rows.expand_rows_launch(y, b, out, ranks, meta, slice_offsets, scale, None, accumulate)
    cfg = config or default_config(t, widths, r, meta, out.device)
    if cfg.sub_tiles > 1 and cfg.block_k < r:
        raise ValueError(f"sub_tiles={cfg.sub_tiles} holds all of B's ranks in one block: block_k {cfg.block_k} < "
                         f"rank {r}")
    n_tiles = sum(cdiv(w, cfg.block_n) for w in widths)
    # Column programs per row tile (see KernelConfig.col_programs); the row tiles take the rest of the grid.
    m_bound = m_tiles_bound(t, meta.slots_bound(), cfg.block_m * cfg.sub_tiles)
    programs = cfg.programs_per_sm * sm_count(out.device)
    if cfg.col_programs == FILL:
        grid_n = max(1, min(n_tiles, programs // m_bound))
    else:
        grid_n = min(n_tiles, cfg.col_programs) if cfg.col_programs else n_tiles
    grid_m = max(1, min(m_bound, programs // grid_n))
    tables = (ranks, scale if scale is not None else ranks,
              meta.sorted_tokens, meta.active_slots, meta.seg_start, meta.seg_len)
    scalars = (*slice_scalars(b, widths, slice_offsets),
               r, y.stride(0), y.stride(1), out.stride(0), out.stride(1))
    kernel = Launch(_expand_kernel, (grid_n, grid_m), out.device, MAX_SLOTS=meta.max_slots,
                    SLOTS_PAD=slots_pad(meta.max_slots), NUM_SLICES=s, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                    BLOCK_K=cfg.block_k, ONE_K=cfg.block_k >= r, HAS_SCALE=scale is not None, DOT=dot_mode(out),
                    ACCUMULATE=accumulate, SUB=cfg.sub_tiles, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    def launch(y: torch.Tensor, b: Sequence[torch.Tensor], out: torch.Tensor) -> None:
        kernel(y, out, *tables, *padded_slices(b), *scalars)

    return launch
