"""lora_shrink: every token's input times its adapter's A, for all slices of a fused projection at once."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    DOT_NATIVE,
    KernelConfig,
    dot_mode,
    grid_size,
    locate,
    m_tiles_bound,
    pick,
    segment_table,
    slots_pad,
    sm_count,
)
from .metadata import LoRAKernelMeta


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, y_ptr, ranks_ptr,
    sorted_ptr, active_ptr, start_ptr, len_ptr,
    N, K, R, K_PER_SPLIT,
    stride_xt, stride_xk, stride_as, stride_ar, stride_ak, stride_yt,
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

        y_ptrs = y_ptr + tok[:, None] * stride_yt + rn[None, :]
        if SPLIT_K == 1:
            # Columns past the rank get the accumulator's zeros: y is fully written for every token
            # that has an adapter.
            tl.store(y_ptrs, acc, mask=row_ok[:, None] & (rn[None, :] < N))
        else:
            # Partial sums over K meet in y (zeroed by the launcher). Relaxed: only the sum matters.
            tl.atomic_add(y_ptrs, acc, mask=row_ok[:, None] & n_ok[None, :], sem="relaxed")


def shrink_config(num_tokens: int, in_features: int, n_total: int, max_rank: int, sms: int) -> KernelConfig:
    """Launch parameters by batch size; the numbers are for H100 (132 SMs, ~3 TB/s HBM, ~50 MB L2)."""
    p2 = triton.next_power_of_2
    if num_tokens <= 256:
        # Decode: a GEMV per adapter, bound by reading A. 16 rows is tl.dot's smallest M. One slice's
        # rank per N tile, so the three qkv slices are three programs; x is tiny and re-read from L2.
        bn = max(16, min(p2(max_rank), 64))
        cfg = KernelConfig(16, bn, 256 if bn <= 32 else 128, num_warps=4, num_stages=3)
        min_iters = 1
    elif num_tokens <= 1024:
        cfg = KernelConfig(32, max(16, min(p2(n_total), 128)), 128, num_warps=4, num_stages=3)
        min_iters = 2
    else:
        # Prefill: L2->SM traffic is x * n_tiles + A * (T / BLOCK_M). With N = 192 (qkv at rank 64)
        # BLOCK 128 x 256 moves 2.5 x |x|, against 5 x |x| for 64 x 128: one N tile, and tall M tiles.
        cfg = KernelConfig(128, max(16, min(p2(n_total), 256)), 64, num_warps=8, num_stages=3, programs_per_sm=2)
        min_iters = 4
    # Split K until the programs of a one-adapter batch (the fewest possible) fill the GPU twice over:
    # decode down_proj (in 14336, one token) is otherwise one program reading 1.8 MB at rank 64.
    # Capped so each split keeps min_iters K blocks and the fp32 atomics stay under T * N * 32.
    # From T rounded up to a power of two: split_k is a compile-time constant, and this keeps the variants
    # few and known, so an engine can compile them all at start (a compile inside a step stalled it 90 ms).
    programs = triton.cdiv(p2(num_tokens), cfg.block_m) * triton.cdiv(n_total, cfg.block_n)
    split = 1
    while (programs * split * 2 <= 2 * sms and in_features // (split * 2) >= cfg.block_k * min_iters
           and p2(num_tokens) * split * 2 <= 32768):
        split *= 2
    return cfg.with_(split_k=split)


def lora_shrink(
    x: torch.Tensor,
    a: torch.Tensor,
    ranks: torch.Tensor,
    meta: LoRAKernelMeta,
    y: torch.Tensor | None = None,
    config: KernelConfig | None = None,
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
    Returns:
        y [T, S, R] float32.
    """
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
    if num_slots < meta.max_slots:
        raise ValueError(f"a has {num_slots} slots, fewer than the metadata's max_slots={meta.max_slots}")
    if meta.num_tokens != t:
        raise ValueError(f"metadata was prepared for {meta.num_tokens} tokens, x has {t}")
    n = s * r
    cfg = config or shrink_config(t, k, n, r, sm_count(x.device))
    if y is None:
        y = (torch.zeros if cfg.split_k > 1 else torch.empty)((t, s, r), dtype=torch.float32, device=x.device)
    else:
        if y.shape != (t, s, r) or y.dtype != torch.float32 or not y.is_contiguous():
            raise ValueError(f"y must be contiguous float32 [{t}, {s}, {r}], got {y.dtype} {tuple(y.shape)}")
        if cfg.split_k > 1:
            y.zero_()
    if t == 0:
        return y
    # Every split gets whole K blocks; trailing splits that would be empty are not launched.
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    split = triton.cdiv(k, k_per_split)
    tiles = m_tiles_bound(t, meta.slots_bound(), cfg.block_m) * triton.cdiv(n, cfg.block_n) * split
    _shrink_kernel[(grid_size(tiles, cfg, x.device),)](
        x, a, y, ranks,
        meta.sorted_tokens, meta.active_slots, meta.seg_start, meta.seg_len,
        n, k, r, k_per_split,
        x.stride(0), x.stride(1), a.stride(0), a.stride(2), a.stride(3), y.stride(0),
        MAX_SLOTS=meta.max_slots, SLOTS_PAD=slots_pad(meta.max_slots),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=split,
        EVEN_K=k % cfg.block_k == 0, DOT=dot_mode(x),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y
