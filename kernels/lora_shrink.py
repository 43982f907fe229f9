"""lora_shrink: every token's input times its adapter's A, for all slices of a fused projection at once."""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from ._common import (
    DOT_NATIVE,
    KernelConfig,
    cdiv,
    dot_mode,
    grid_size,
    locate,
    m_tiles_bound,
    next_pow2,
    pick,
    segment_table,
    slots_pad,
    sm_count,
)
from .launch import Launch
from .metadata import LoRAKernelMeta


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, y_ptr, part_ptr, sem_ptr, ranks_ptr,
    sorted_ptr, active_ptr, start_ptr, len_ptr,
    N, K, R, K_PER_SPLIT,
    stride_xt, stride_xk, stride_as, stride_ar, stride_ak, stride_yt, stride_pp, stride_pt,
    MAX_SLOTS: tl.constexpr, SLOTS_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr, DOT: tl.constexpr,
):
    # A[slot] is [S, R, in] contiguous in (S, R), so all slices together are one [S*R, in] matrix and a
    # fused qkv shrink is a single GEMM with N = S*R: x is read once for the three slices.
    i, slots, starts, lens, ranks, firsts, ends, m_tiles = segment_table(
        active_ptr, start_ptr, len_ptr, ranks_ptr, R, MAX_SLOTS, SLOTS_PAD, BLOCK_M)
    n_tiles = tl.cdiv(N, BLOCK_N)
    # Neighbouring tile ids share rows (split and N innermost), so x stays in L2 across them.
    for t in range(tl.program_id(0), m_tiles * n_tiles * SPLIT_K, tl.num_programs(0)):
        ks = t % SPLIT_K
        tn = (t // SPLIT_K) % n_tiles
        m = t // (SPLIT_K * n_tiles)
        seg = locate(m, i, ends)
        slot = pick(slots, i, seg).to(tl.int64)
        rank = pick(ranks, i, seg)
        rows = (m - pick(firsts, i, seg)) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < pick(lens, i, seg)
        tok = tl.load(sorted_ptr + pick(starts, i, seg) + rows, mask=row_ok, other=0).to(tl.int64)

        rn = tn * BLOCK_N + tl.arange(0, BLOCK_N)
        # Rows of A past the slot's rank are zero padding: never loaded.
        n_ok = ((rn % R) < rank) & (rn < N)
        k_lo = ks * K_PER_SPLIT
        k_hi = tl.minimum(K, k_lo + K_PER_SPLIT)
        k_hi = tl.where(tl.max(n_ok.to(tl.int32), 0) > 0, k_hi, k_lo)  # a tile wholly in the padding
        x_rows = x_ptr + tok[:, None] * stride_xt
        a_rows = a_ptr + slot * stride_as + rn[:, None].to(tl.int64) * stride_ar
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            if EVEN_K:
                xm = row_ok[:, None]
                am = n_ok[:, None]
            else:
                xm = row_ok[:, None] & (rk[None, :] < K)
                am = n_ok[:, None] & (rk[None, :] < K)
            xt = tl.load(x_rows + rk[None, :] * stride_xk, mask=xm, other=0.0)
            at = tl.load(a_rows + rk[None, :] * stride_ak, mask=am, other=0.0)
            if DOT == DOT_NATIVE:
                acc = tl.dot(xt, tl.trans(at), acc)
            else:
                acc = tl.dot(xt.to(tl.float32), tl.trans(at).to(tl.float32), acc, input_precision="ieee")

        # Columns past the rank get the accumulator's zeros: y is fully written for every token that has
        # an adapter.
        mask = row_ok[:, None] & (rn[None, :] < N)
        y_ptrs = y_ptr + tok[:, None] * stride_yt + rn[None, :]
        if SPLIT_K == 1:
            tl.store(y_ptrs, acc, mask=mask)
        else:
            # Split K, finished in the kernel: each split stores its partial sum, then counts itself in on
            # the tile's semaphore; the split that arrives last adds every part (from L2), writes y and
            # re-arms the semaphore to 0 for the next launch. No zeroed y, no atomics on y, no second
            # launch, and expand reads a single y (the parts once re-read by every column tile of expand
            # cost more than they saved: qkv r64, 2,048 tokens, 68 us against 34).
            p_rows = part_ptr + tok[:, None] * stride_pt + rn[None, :]
            tl.store(p_rows + ks * stride_pp, acc, mask=mask)
            tl.debug_barrier()  # every thread's part is stored before the count (release below)
            sem = sem_ptr + m * n_tiles + tn
            arrived = tl.atomic_add(sem, 1, sem="acq_rel", scope="gpu")
            tl.debug_barrier()  # the acquire is seen by every thread before they read the parts
            if arrived == SPLIT_K - 1:
                total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for p in tl.static_range(SPLIT_K):
                    total += tl.load(p_rows + p * stride_pp, mask=mask, other=0.0, cache_modifier=".cg")
                tl.store(y_ptrs, total, mask=mask)
                tl.atomic_xchg(sem, 0, sem="relaxed", scope="gpu")


# Decode launches whose tokens are spread this thin over adapters (LoRAKernelMeta.spread) size their splits by
# the row tiles the tokens must fill (shrink_config).
SPREAD_MAX_ROWS = 2
MAX_SPLIT = 32  # 16 was slower on one-token shrinks (H200, down r64: 16.3 us vs 14.1 at 32, two runs)
# Semaphores per launch: one per (row tile, column tile); LoRAKernelMeta holds them, sized by this bound.
MAX_N_TILES = 64


def shrink_config(num_tokens: int, distinct: int | None, rows_per_slot: int, in_features: int, n_total: int,
                  max_rank: int, sms: int, spread: int | None = None) -> KernelConfig:
    """Launch parameters from host ints: T, the count of adapters present if known, tokens per adapter
    (`LoRAKernelMeta.distinct` / `rows_per_slot`), the shape, and the bound on any adapter's tokens if known
    (`LoRAKernelMeta.spread`). Shrink is bound by reading x (prefill) or A (decode, many adapters). Tiles from
    sweeps on an H200 (`kernels.bench --sweep`).

    Row tiles follow the tokens per adapter. One column tile holds up to 64 of N = S*R: all three qkv
    slices at rank 16 in one program (qkv r16, 2,048 tokens of 128 adapters: 25.6 us vs 30.2 with a tile
    per slice)."""
    p2 = next_pow2
    bm = max(16, min(p2(rows_per_slot), 128))
    bn = max(16, min(p2(n_total), 64))
    if bm == 16:
        # Decode: a GEMV per adapter, bound by reading A; 16 rows is tl.dot's smallest M. Past one row
        # tile of in <= 4096, two warps and at most 8 splits (qkv r64, 64 tokens of 32 adapters: 19.9 us
        # against 26.3 with 4 warps and 16 splits); down_proj (in 14336) splits further: below.
        many = num_tokens > 16 and in_features <= 4096
        thin = spread is not None and spread <= SPREAD_MAX_ROWS and cdiv(num_tokens, spread) > cdiv(num_tokens, 16)
        # (Past 128 tokens: four warps, K blocks of 128 and a persistent grid of two programs an SM won a sweep
        # at 256 tokens by 0.5-1.4 us a call, but lost in batch-256 decode steps of 64 adapters, H200 graph
        # replay 3.53 against 3.30 ms, twenty-fourth session: dropped.)
        cfg = KernelConfig(16, bn, 64 if bn >= 64 and not thin else 128, num_warps=2 if many or thin else 4,
                           num_stages=3)
        max_split, slots, min_blocks = (8 if many and not thin else MAX_SPLIT), 2 * sms, 1
        if thin:
            distinct = max(distinct or 1, cdiv(num_tokens, spread))
    else:
        # Prefill: bound by reading x. 64-row tiles, K blocks of 128, four loads deep, 8 warps (one program
        # per SM: 131 KB of shared memory); past 4,096 tokens at ranks over 16, 128-row tiles, K blocks of 64,
        # 4 warps (two per SM). Splits of K until the programs reach 1.5 x the resident ones: qkv r16 at 2,048
        # tokens 12.8 us with 4 splits (15.7 before, 19.7 with 8); qkv r64 18.6 us with 2 (27.4 before); gate_up
        # r64 at 8,192 tokens 35.0 us with 2 (44.1 before, 120 with 8). At rank 16 and 8,192 tokens the 64-row
        # tiles, unsplit, beat the 128-row ones split in 4 (rotated copies: qkv 28.4 against 32.7 us, gate_up
        # 27.0 against 30.4, down 65.8 against 66.1).
        if num_tokens > 4096 and bm == 128 and max_rank > 16:
            cfg, per_sm = KernelConfig(128, bn, 64, num_warps=4, num_stages=4, programs_per_sm=2), 2
        else:
            cfg, per_sm = KernelConfig(min(bm, 64), bn, 128, num_warps=8, num_stages=4, programs_per_sm=1), 1
        max_split, slots, min_blocks = MAX_SPLIT, 3 * per_sm * sms // 2, 4
    # Split K until the batch's programs fill the GPU: decode down_proj (in 14336, one token) is otherwise
    # one program reading 1.8 MB of A. The programs are counted as if the adapters present held as few
    # row tiles as they can (a one-adapter batch must not run 16 long programs), unless the step says its
    # tokens are spread thin: then as the T / spread tiles they fill at least, at two warps and K blocks of 128
    # (qkv r64, 64 tokens of 32 adapters, 2 splits: 23.0 us with K blocks of 64, 19.0 with 128). H200, Llama-3-8B
    # shapes, rotated copies (splits 1-32, README's results log, twenty-third session): down r16, 128 tokens of
    # 128 adapters, 21.6 us at 4 splits against ~50 at the 32 of the few-adapter count; 64 of 32, 11.2 at 8
    # against 17.9; qkv r64, 16 of 8, 9.2 at 8 against 14.0. From T and the adapter count rounded up to
    # powers of two: split_k is a compile-time constant, and this keeps the variants few and known, so an
    # engine can compile them all at start (a compile inside a step stalled it 90 ms).
    t2 = p2(num_tokens)
    m_tiles = max(cdiv(t2, cfg.block_m), p2(distinct) if distinct else 1)
    programs = m_tiles * cdiv(n_total, cfg.block_n)
    split = 1
    while (programs * split * 2 <= slots and in_features // (split * 2) >= cfg.block_k * min_blocks
           and split * 2 <= max_split):
        split *= 2
    return cfg.with_(split_k=split)


def _splits(k: int, cfg: KernelConfig) -> tuple[int, int]:
    """(splits launched, K per split): every split gets whole K blocks; trailing empty ones are dropped."""
    k_per_split = cdiv(cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    return cdiv(k, k_per_split), k_per_split


def shrink_workspace(x: torch.Tensor, a: torch.Tensor, meta: LoRAKernelMeta,
                     config: KernelConfig | None = None) -> int:
    """float32 elements of scratch `lora_shrink` needs for these shapes (split K's partial sums; 0 when
    K is not split)."""
    cfg = config or default_config(x, a, meta)
    splits, _ = _splits(x.shape[1], cfg)
    return 0 if splits == 1 else splits * x.shape[0] * a.shape[1] * a.shape[2]


def default_config(x: torch.Tensor, a: torch.Tensor, meta: LoRAKernelMeta) -> KernelConfig:
    """`shrink_config` for these tensors and this step's metadata."""
    _, s, r, k = a.shape
    return shrink_config(x.shape[0], meta.distinct, meta.rows_per_slot(), k, s * r, r, sm_count(x.device),
                         meta.spread)


def lora_shrink(
    x: torch.Tensor,
    a: torch.Tensor,
    ranks: torch.Tensor,
    meta: LoRAKernelMeta,
    y: torch.Tensor | None = None,
    config: KernelConfig | None = None,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """Semantics:
        y[t, s, j] = sum_i x[t, i] * a[slot(t), s, j, i]    for j < ranks[slot(t)]
        y[t, s, j] = 0                                      for ranks[slot(t)] <= j < R
    for every token t with slot(t) = token_slots[t] >= 0 (as given to `meta.prepare`), every slice s.
    Rows of tokens without an adapter are not written (unspecified; `lora_expand` never reads them).
    Accumulates in fp32. One launch for all slices; each adapter's A is read once however many tokens
    use it.

    Args:
        x: [T, in_features], bf16 / fp16 / fp32. Any strides.
        a: [num_slots, S, R, in_features], x's dtype; (S, R) contiguous (PEFT lora_A rows, zero-padded
           from each slot's rank to R = max_lora_rank). num_slots >= meta.max_slots.
        ranks: [num_slots] int32, each slot's real rank (<= R): rows past it are skipped.
        meta: prepared for these T tokens.
        y: optional output [T, S, R] float32, contiguous.
        config: launch parameters (default: `shrink_config`).
        workspace: optional contiguous float32 scratch of at least `shrink_workspace(...)` elements, for
           the partial sums of split K (default: allocated when needed).
    Returns:
        y [T, S, R] float32.
    """
    shaped = a.dim() == 4 and x.dim() == 2  # else shrink_launch says what is wrong
    if y is None and shaped:
        y = torch.empty((x.shape[0], a.shape[1], a.shape[2]), dtype=torch.float32, device=x.device)
    if workspace is None and shaped and x.shape[0]:
        workspace = torch.empty(max(1, shrink_workspace(x, a, meta, config)), dtype=torch.float32, device=x.device)
    shrink_launch(x, a, ranks, meta, y, config, workspace)(x, a, y)
    return y


def check_shrink_args(x: torch.Tensor, a: torch.Tensor, ranks: torch.Tensor, y: torch.Tensor
                      ) -> tuple[int, int, int, int, int]:
    """What every shrink needs of x, a, ranks and y (see `lora_shrink`) -> (T, in, num_slots, S, R)."""
    t, k = x.shape
    if a.dim() != 4 or a.shape[3] != k:
        raise ValueError(f"a must be [num_slots, S, R, {k}], got {tuple(a.shape)}")
    num_slots, s, r, _ = a.shape
    if a.dtype != x.dtype or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"x and a must share a float dtype (bf16, fp16, fp32): {x.dtype}, {a.dtype}")
    if a.stride(1) != r * a.stride(2):
        raise ValueError("a's (slice, rank) dimensions must be contiguous: they are walked as one S*R axis")
    if ranks.dtype != torch.int32 or ranks.shape != (num_slots,):
        raise ValueError(f"ranks must be int32 [{num_slots}], got {ranks.dtype} {tuple(ranks.shape)}")
    if y.shape != (t, s, r) or y.dtype != torch.float32 or not y.is_contiguous():
        raise ValueError(f"y must be contiguous float32 [{t}, {s}, {r}], got {y.dtype} {tuple(y.shape)}")
    return t, k, num_slots, s, r


def shrink_launch(
    x: torch.Tensor,
    a: torch.Tensor,
    ranks: torch.Tensor,
    meta: LoRAKernelMeta,
    y: torch.Tensor,
    config: KernelConfig | None = None,
    workspace: torch.Tensor | None = None,
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]:
    """Check `lora_shrink`'s arguments and work out its launch once; returns launch(x, a, y), which runs it
    for tensors of these shapes, strides and dtypes (the engine's layers: one plan per projection and step,
    not the checks and grid arithmetic again for every layer)."""
    t, k, num_slots, s, r = check_shrink_args(x, a, ranks, y)
    if num_slots < meta.max_slots:
        raise ValueError(f"a has {num_slots} slots, fewer than the metadata's max_slots={meta.max_slots}")
    if meta.num_tokens != t:
        raise ValueError(f"metadata was prepared for {meta.num_tokens} tokens, x has {t}")
    n = s * r
    cfg = config or default_config(x, a, meta)
    if t == 0:
        return lambda x, a, y: None
    splits, k_per_split = _splits(k, cfg)
    need = shrink_workspace(x, a, meta, cfg)
    if workspace is None or workspace.dtype != torch.float32 or not workspace.is_contiguous() \
            or workspace.numel() < need:
        raise ValueError(f"workspace must be contiguous float32 with >= {need} elements, got "
                         f"{None if workspace is None else (workspace.dtype, tuple(workspace.shape))}")
    n_tiles = cdiv(n, cfg.block_n)
    m_bound = m_tiles_bound(t, meta.slots_bound(), cfg.block_m)
    if splits > 1 and m_bound * n_tiles > meta.semaphores.numel():
        raise ValueError(f"{m_bound} x {n_tiles} tiles need more semaphores than the metadata holds "
                         f"({meta.semaphores.numel()}): a column tile of {cfg.block_n} over N = {n}?")
    grid = (grid_size(m_bound * n_tiles * splits, cfg, x.device),)
    args = (workspace, meta.semaphores, ranks, meta.sorted_tokens, meta.active_slots, meta.seg_start, meta.seg_len,
            n, k, r, k_per_split,
            x.stride(0), x.stride(1), a.stride(0), a.stride(2), a.stride(3), y.stride(0), t * n, n)
    kernel = Launch(_shrink_kernel, grid, x.device, MAX_SLOTS=meta.max_slots, SLOTS_PAD=slots_pad(meta.max_slots),
                    BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=splits,
                    EVEN_K=k % cfg.block_k == 0, DOT=dot_mode(x), num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    def launch(x: torch.Tensor, a: torch.Tensor, y: torch.Tensor) -> None:
        kernel(x, a, y, *args)

    return launch
