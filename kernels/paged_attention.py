"""Decode attention over the paged KV cache: one new query token per sequence against its cached keys.

Semantics:
    out[b, h, :] = softmax(scale * q[b, h] @ K_b.T) @ V_b, where K_b / V_b are the first context_lens[b]
    keys / values of sequence b, read through its block table from the cache of kv head h // (H / KVH).

    q            [B, H, D]                          bf16 / fp16 / fp32
    k_cache      [num_blocks, block_size, KVH, D]   same dtype
    v_cache      [num_blocks, block_size, KVH, D]
    block_tables [B, max_blocks] int32              block ids; entries past a sequence's blocks are unread
    context_lens [B] int32                          >= 1
    returns      [B, H, D] in q's dtype; accumulation in fp32.

One program per (sequence, kv head) serves all H / KVH query heads of the group, so each key and value
is read from memory once (grouped-query attention without expanding K/V). Keys are walked TILE tokens at
a time (several blocks per step, gathered through the block table) with an online softmax. Shapes are
fixed by B and max_blocks, never by the context lengths: the launch can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import next_pow2
from .launch import Launches


@triton.jit
def attend_tile(q, k_ptr, v_ptr, table_ptr, kpos, valid, allowed, kvh, s_kb, s_kt, s_kh, d, m, l_sum, acc,
                BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    """One step of the online softmax over the keys at positions kpos (a tile) of one sequence, read through
    its block-table row `table_ptr` from kv head kvh: q [R, D] fp32 (scaled), `allowed` [R or 1, TILE] which
    keys each row may see; returns the updated (running max, sum, unnormalized output)."""
    blk = tl.load(table_ptr + kpos // BLOCK, mask=valid, other=0).to(tl.int64)
    at = blk * s_kb + (kpos % BLOCK) * s_kt + kvh * s_kh
    k = tl.load(k_ptr + at[:, None] + d[None, :], mask=valid[:, None], other=0.0)
    v = tl.load(v_ptr + at[:, None] + d[None, :], mask=valid[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision=PRECISION)  # [R, TILE]
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    # A row with no key allowed yet keeps m = -inf: exp(-inf - -inf) would be NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m - m_safe)
    l_sum = l_sum * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision=PRECISION)
    return m_new, l_sum, acc


# The block table's row stride varies between eager steps (their longest context's block count); specialized on it,
# Triton would compile new variants inside serving steps. Graphs and eager steps share one variant.
@triton.jit(do_not_specialize=["s_btb"])
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr, out_ptr, scale,
    s_qb, s_qh, s_kb, s_kt, s_kh, s_btb, s_ob, s_oh,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, TILE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    ctx = tl.load(ctx_ptr + b)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    heads = kvh * G + g
    q = tl.load(q_ptr + b * s_qb + heads[:, None] * s_qh + d[None, :], mask=(g < G)[:, None], other=0.0)
    # fp32 math on 16-bit loads: decode attention is memory-bound, the tile products are free.
    q = q.to(tl.float32) * scale

    m = tl.full([G_PAD], float("-inf"), tl.float32)
    l_sum = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    t = tl.arange(0, TILE)
    for start in range(0, ctx, TILE):
        pos = start + t
        valid = pos < ctx
        m, l_sum, acc = attend_tile(q, k_ptr, v_ptr, bt_ptr + b * s_btb, pos, valid, valid[None, :], kvh,
                                    s_kb, s_kt, s_kh, d, m, l_sum, acc, BLOCK, PRECISION)
    out = acc / l_sum[:, None]
    tl.store(out_ptr + b * s_ob + heads[:, None] * s_oh + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=(g < G)[:, None])


_decode = Launches(_decode_kernel)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    B, H, D = q.shape
    _, block_size, KVH, Dk = k_cache.shape
    if Dk != D or H % KVH or v_cache.shape != k_cache.shape:
        raise ValueError(f"shapes disagree: q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}")
    if block_size < 16 or block_size & (block_size - 1) or D & (D - 1) or D < 16:
        raise ValueError(f"block_size ({block_size}) and head_dim ({D}) must be powers of 2, >= 16")
    if block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32:
        raise ValueError("block_tables and context_lens must be int32")
    if k_cache.stride(3) != 1 or q.stride(2) != 1:
        raise ValueError("the head dimension must be contiguous")
    G = H // KVH
    out = torch.empty_like(q) if out is None else out
    # 64 keys a step: four 16-token blocks, a 64x64 bf16 tile of K and of V (8 KB each) in flight; two warps
    # (H200, batch 64, 32 / 8 heads of 64: 8.9 us at ~192 keys and 42.4 at ~1,024, against 9.7 and 46.0 with
    # four; tiles of 32 / 128, 8 warps and 1-3 stages were no better at both lengths).
    tile = max(64, block_size)
    _decode(
        (B, KVH), q, k_cache, v_cache, block_tables, context_lens, out, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        G=G, G_PAD=max(16, next_pow2(G)), D=D, BLOCK=block_size, TILE=tile,
        # A float32 cache keeps float32 products (tf32 would cost ~1e-3); 16-bit caches lose nothing to tf32.
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=2,
    )
    return out


def paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale) -> torch.Tensor:
    """Float64 reference, one sequence at a time."""
    B, H, D = q.shape
    _, bs, KVH, _ = k_cache.shape
    out = torch.empty(B, H, D, dtype=torch.float64)
    for b in range(B):
        n = int(context_lens[b])
        blocks = block_tables[b, : -(-n // bs)].long()
        k = k_cache[blocks].reshape(-1, KVH, D)[:n].double().cpu()
        v = v_cache[blocks].reshape(-1, KVH, D)[:n].double().cpu()
        k = k.repeat_interleave(H // KVH, dim=1)
        v = v.repeat_interleave(H // KVH, dim=1)
        s = torch.einsum("hd,thd->ht", q[b].double().cpu(), k) * scale
        out[b] = torch.einsum("ht,thd->hd", torch.softmax(s, -1), v)
    return out
