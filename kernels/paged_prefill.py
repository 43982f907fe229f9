"""Prefill attention over the paged KV cache: every prompt chunk of a step in one launch, causal, each chunk
attending its sequence's cached prefix (a later chunk of a long prompt, or blocks from the prefix cache) and
its own new keys, read in place through the block table.

Semantics, for chunk s with queries at rows [q_rows[s], q_rows[s] + q_lens[s]) of q, the first at position
ctx_start[s] of its sequence:
    out[row, h, :] = softmax(scale * q[row, h] @ K_s[:p + 1].T) @ V_s[:p + 1]
where p = ctx_start[s] + (row - q_rows[s]) is the query's position and K_s / V_s are the sequence's keys and
values, read from the cache of kv head h // (H / KVH) through block_tables[s] (the chunk's own keys are
written there before, as every layer does). Rows of q outside every chunk are neither read nor written.

    q            [T, H, D]                          bf16 / fp16 / fp32 (any row stride)
    k_cache      [num_blocks, block_size, KVH, D]   q's dtype
    v_cache      [num_blocks, block_size, KVH, D]
    block_tables [S, max_blocks] int32
    q_rows, q_lens, ctx_start: [S] host ints         each chunk's first row in q, its length, its first position
(chunks need not be adjacent in q: a mixed step's decode rows sit between them)

A program owns BLOCK_M queries of one chunk and one kv head, for all H / KVH query heads of its group (rows
of its tile are (query, head) pairs: each key block is read once for the group), and walks the keys BLOCK_N
at a time up to its last query's position with an online softmax. The host lists the tiles (chunk, first
query): one launch however the chunks' lengths differ.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from ._common import next_pow2
from .launch import Launches
from .paged_attention import attend_tile


# The block table's row stride (its widest chunk's block count) changes from step to step: specialized on it (== 1,
# a multiple of 16), Triton compiled new variants while serving (~1 s each, inside a step, H200).
@triton.jit(do_not_specialize=["s_btb"])
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, chunk_ptr, tiles_ptr, out_ptr, scale,
    s_qt, s_qh, s_kb, s_kt, s_kh, s_btb, s_ot, s_oh,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    seq = tl.load(tiles_ptr + 2 * tile)
    q0 = tl.load(tiles_ptr + 2 * tile + 1)
    row0 = tl.load(chunk_ptr + 3 * seq)
    n_q = tl.load(chunk_ptr + 3 * seq + 1)
    pos0 = tl.load(chunk_ptr + 3 * seq + 2)

    r = tl.arange(0, BLOCK_M * G_PAD)  # (query, head) pairs of the tile, head fastest
    m = q0 + r // G_PAD
    g = r % G_PAD
    ok = (m < n_q) & (g < G)
    qpos = pos0 + m
    d = tl.arange(0, D)
    heads = kvh * G + g
    rows = (row0 + m).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * s_qt + heads[:, None] * s_qh + d[None, :], mask=ok[:, None], other=0.0)
    q = q.to(tl.float32) * scale

    mx = tl.full([BLOCK_M * G_PAD], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_M * G_PAD], tl.float32)
    acc = tl.zeros([BLOCK_M * G_PAD, D], tl.float32)
    # Keys up to the tile's last query's position (causal): the tiles of a long chunk stop early.
    end = pos0 + tl.minimum(q0 + BLOCK_M, n_q)
    t = tl.arange(0, BLOCK_N)
    for start in range(0, end, BLOCK_N):
        kpos = start + t
        valid = kpos < end
        mx, l_sum, acc = attend_tile(q, k_ptr, v_ptr, bt_ptr + seq * s_btb, kpos, valid,
                                     valid[None, :] & (kpos[None, :] <= qpos[:, None]), kvh, s_kb, s_kt, s_kh, d,
                                     mx, l_sum, acc, BLOCK, PRECISION)
    out = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
    tl.store(out_ptr + rows[:, None] * s_ot + heads[:, None] * s_oh + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=ok[:, None])


_prefill = Launches(_prefill_kernel)


def prefill_tiles(q_lens: list[int], block_m: int) -> list[int]:
    """(chunk, first query) of every BLOCK_M-query tile, flattened: the launch's work list."""
    tiles: list[int] = []
    for s, n in enumerate(q_lens):
        for q0 in range(0, n, block_m):
            tiles += [s, q0]
    return tiles


def prefill_launch(
    block_tables: torch.Tensor,
    q_rows: list[int],
    q_lens: list[int],
    ctx_start: list[int],
    num_heads: int,
    cache_shape: tuple[int, ...],
    device: torch.device,
    block_m: int | None = None,
    block_n: int = 64,
    num_warps: int = 4,
) -> Callable[..., torch.Tensor]:
    """Check a step's chunk layout and work out its launch once: the tile list, built on the host and copied to the
    device a single time; returns launch(q, k_cache, v_cache, scale, out=None) -> out, which every layer of the step
    calls with its own tensors (a step's 16-32 layers listed the tiles and copied them again each: for 64 prompts of
    128 tokens, 512 tiles a layer). See the module doc for the arguments."""
    _, block_size, KVH, D = cache_shape
    S = len(ctx_start)
    if num_heads % KVH:
        raise ValueError(f"{num_heads} query heads do not group over {KVH} kv heads")
    if block_size & (block_size - 1) or D & (D - 1) or D < 16:
        raise ValueError(f"block_size ({block_size}) and head_dim ({D}) must be powers of 2, head_dim >= 16")
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2 or block_tables.shape[0] != S:
        raise ValueError(f"block_tables must be int32 [{S}, max_blocks], got {block_tables.dtype} "
                         f"{tuple(block_tables.shape)}")
    if len(q_rows) != S or len(q_lens) != S or any(r < 0 or n < 0 for r, n in zip(q_rows, q_lens)):
        raise ValueError(f"q_rows / q_lens must give {S} chunks of non-negative rows")
    rows_end = max((r + n for r, n in zip(q_rows, q_lens)), default=0)
    G = num_heads // KVH
    # 64 (query, head) rows a tile: 16 queries of a 4-head group (Llama 3), 64 without GQA.
    block_m = block_m or max(16 // next_pow2(G), 64 // next_pow2(G), 1)
    tiles = prefill_tiles(q_lens, block_m)
    # The tile list starts 16 bytes aligned whatever the chunk count (an unaligned pointer is another variant).
    chunks = [x for c in zip(q_rows, q_lens, ctx_start) for x in c]
    chunks += [0] * (-len(chunks) % 4)
    meta = torch.tensor(chunks + tiles, dtype=torch.int32)
    meta = meta.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else meta.to(device)
    chunk_meta, tile_meta = meta[:3 * S], meta[len(chunks):]
    grid = (len(tiles) // 2, KVH)
    consts = dict(G=G, G_PAD=next_pow2(G), D=D, BLOCK=block_size, BLOCK_M=block_m, BLOCK_N=block_n,
                  num_warps=num_warps)

    def launch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float,
               out: torch.Tensor | None = None) -> torch.Tensor:
        if q.dim() != 3 or q.shape[1:] != (num_heads, D) or tuple(k_cache.shape) != tuple(cache_shape) \
                or v_cache.shape != k_cache.shape:
            raise ValueError(f"shapes disagree: q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, planned for "
                             f"{num_heads} heads over a cache {tuple(cache_shape)}")
        if rows_end > q.shape[0]:
            raise ValueError(f"q_rows / q_lens reach row {rows_end}, q has {q.shape[0]}")
        if k_cache.stride(3) != 1 or q.stride(2) != 1:
            raise ValueError("the head dimension must be contiguous")
        out = torch.empty_like(q) if out is None else out
        if grid[0]:
            _prefill(
                grid, q, k_cache, v_cache, block_tables, chunk_meta, tile_meta, out, scale,
                q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                block_tables.stride(0), out.stride(0), out.stride(1),
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32", **consts,
            )
        return out

    return launch


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    q_rows: list[int],
    q_lens: list[int],
    ctx_start: list[int],
    scale: float,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int = 64,
    num_warps: int = 4,
) -> torch.Tensor:
    """See the module doc. q_rows / q_lens / ctx_start are host lists (the tiles are laid out from them); returns out
    ([T, H, D], q's dtype; rows outside the chunks untouched, or unset when out is None). One call: `prefill_launch`
    plans once for many layers."""
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(f"q must be [T, H, D] and k_cache [blocks, block_size, KVH, D]: {tuple(q.shape)}, "
                         f"{tuple(k_cache.shape)}")
    return prefill_launch(block_tables, q_rows, q_lens, ctx_start, q.shape[1], tuple(k_cache.shape), q.device,
                          block_m, block_n, num_warps)(q, k_cache, v_cache, scale, out)


def paged_prefill_attention_ref(q, k_cache, v_cache, block_tables, q_rows, q_lens, ctx_start, scale):
    """Float64 reference, one chunk at a time; rows outside every chunk are NaN."""
    T, H, D = q.shape
    _, bs, KVH, _ = k_cache.shape
    out = torch.full((T, H, D), float("nan"), dtype=torch.float64)
    for s, pos0 in enumerate(ctx_start):
        lo, hi = q_rows[s], q_rows[s] + q_lens[s]
        n = pos0 + hi - lo
        blocks = block_tables[s, : -(-n // bs)].long().cpu()
        k = k_cache.cpu()[blocks].reshape(-1, KVH, D)[:n].double().repeat_interleave(H // KVH, dim=1)
        v = v_cache.cpu()[blocks].reshape(-1, KVH, D)[:n].double().repeat_interleave(H // KVH, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[lo:hi].double().cpu(), k) * scale
        causal = torch.arange(n)[None, :] <= (pos0 + torch.arange(hi - lo))[:, None]
        scores = scores.masked_fill(~causal[None], float("-inf"))
        out[lo:hi] = torch.einsum("hqk,khd->qhd", torch.softmax(scores, -1), v)
    return out
