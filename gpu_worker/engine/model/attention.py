"""Attention over the paged KV cache, in plain torch (the CPU path and the reference for fused kernels).

The cache of each layer is two tensors [num_blocks, block_size, num_kv_heads, head_dim]. A step's new
K/V are written at `slot_mapping`; then every sequence's keys are gathered through its block table into a
padded batch and attended with one SDPA call (grouped-query attention without expanding K/V per head).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# cuDNN's SDPA builds a new plan for every new shape (tens of ms each on an H100): with one shape per
# decode step it cost 76 ms a step against 17 ms once warm. The other backends need no per-shape planning.
_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class AttentionMetadata:
    """Built once per step, shared by every layer."""

    slot_mapping: torch.Tensor  # [T] int64: flat cache position of each new token
    kv_index: torch.Tensor  # [B, K] int64: flat cache position of each key of each sequence (padded)
    mask: torch.Tensor  # [B, 1, Q, K] bool: True where a query may attend a key
    q_seq: torch.Tensor  # [T] int64: each token's sequence in the batch
    q_pos: torch.Tensor  # [T] int64: each token's row within its sequence's chunk
    num_seqs: int
    max_q: int

    @classmethod
    def build(
        cls,
        starts: list[int],
        lengths: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device,
        sliding_window: int | None = None,
    ) -> AttentionMetadata:
        """Chunks of sequences: tokens [starts[b], starts[b] + lengths[b]) of sequence b run this step."""
        B = len(starts)
        start = torch.tensor(starts, dtype=torch.int64)
        n = torch.tensor(lengths, dtype=torch.int64)
        ctx = start + n
        # Keys padded to whole blocks: attention sees a new shape every block_size steps, not every step.
        max_q, max_k = int(n.max()), -(-int(ctx.max()) // block_size) * block_size
        max_blocks = max(len(bt) for bt in block_tables)
        bt = torch.zeros(B, max_blocks, dtype=torch.int64)
        for b, table in enumerate(block_tables):
            bt[b, : len(table)] = torch.tensor(table, dtype=torch.int64)

        q_seq = torch.repeat_interleave(torch.arange(B), n)
        q_pos = torch.arange(int(n.sum())) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
        abs_pos = start[q_seq] + q_pos
        slot_mapping = bt[q_seq, abs_pos // block_size] * block_size + abs_pos % block_size

        j = torch.arange(max_k)
        kv_index = torch.gather(bt, 1, (j // block_size).clamp(max=max_blocks - 1).expand(B, -1)) * block_size
        kv_index += j % block_size
        qi = torch.arange(max_q)
        q_abs = start[:, None] + qi[None, :]  # [B, Q]
        mask = (j[None, None, :] <= q_abs[:, :, None]) & (j[None, None, :] < ctx[:, None, None])
        if sliding_window is not None:
            mask &= q_abs[:, :, None] - j[None, None, :] < sliding_window
        # Padding rows attend one key, so softmax stays finite; their outputs are never read.
        mask[:, :, 0] |= (qi[None, :] >= n[:, None])
        return cls(
            slot_mapping=slot_mapping.to(device),
            kv_index=kv_index.to(device),
            mask=mask.unsqueeze(1).to(device),
            q_seq=q_seq.to(device),
            q_pos=q_pos.to(device),
            num_seqs=B,
            max_q=max_q,
        )


def write_block_tables(dst: np.ndarray, tables: list[list[int]], lens: np.ndarray | None = None) -> None:
    """Row b of dst [>= len(tables), width] starts with tables[b] (entries past it are left as they are): one
    vectorized write, not a Python loop over rows. lens: the tables' lengths, when the caller has them."""
    if lens is None:
        lens = np.fromiter(map(len, tables), np.int64, len(tables))
    dst[: len(tables)][np.arange(dst.shape[1]) < lens[:, None]] = np.fromiter(
        itertools.chain.from_iterable(tables), dst.dtype, int(lens.sum()))


def token_slots(starts: list[int], lengths: list[int], tables: list[list[int]], block_size: int) -> np.ndarray:
    """The flat cache slot of every new token of a step, in row order: tokens starts[b] .. starts[b] + lengths[b]
    of sequence b, at tables[b][pos // block_size] * block_size + pos % block_size ([T] int64, numpy)."""
    lens = np.asarray(lengths, np.int64)
    table = np.zeros((len(tables), max(map(len, tables))), np.int64)
    write_block_tables(table, tables)
    row_starts = np.repeat(np.cumsum(lens) - lens, lens)
    pos = np.arange(int(lens.sum())) - row_starts + np.repeat(np.asarray(starts, np.int64), lens)
    return table[np.repeat(np.arange(len(tables)), lens), pos // block_size] * block_size + pos % block_size


def padded_block_tables(tables: list[list[int]], device: torch.device) -> torch.Tensor:
    """Block tables as one int32 [B, longest] tensor on `device` (short rows padded with block 0, never read:
    the kernels stop at each sequence's length); through pinned memory on CUDA."""
    padded = np.zeros((len(tables), max(map(len, tables))), np.int32)
    write_block_tables(padded, tables)
    t = torch.from_numpy(padded)
    return (t.pin_memory() if device.type == "cuda" else t).to(device, non_blocking=True)


@dataclass
class DecodeMetadata:
    """One new token per sequence, attended by the fused paged-attention kernel. Every tensor's shape is
    fixed by the batch size and max_model_len, never by the context lengths: capturable in a CUDA graph."""

    slot_mapping: torch.Tensor  # [B] int64
    block_tables: torch.Tensor  # [B, max_blocks] int32
    context_lens: torch.Tensor  # [B] int32

    @classmethod
    def build(cls, positions: list[int], block_tables: list[list[int]], block_size: int,
              device: torch.device) -> DecodeMetadata:
        """One new token per sequence, at positions[b] of sequence b (block tables padded to the longest)."""
        slots = [t[p // block_size] * block_size + p % block_size for t, p in zip(block_tables, positions)]
        return cls(
            slot_mapping=torch.tensor(slots, dtype=torch.int64).to(device, non_blocking=True),
            block_tables=padded_block_tables(block_tables, device),
            context_lens=torch.tensor([p + 1 for p in positions], dtype=torch.int32).to(device, non_blocking=True),
        )


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata):
    """k, v [T, KVH, D] into the flat cache positions of meta.slot_mapping."""
    k_cache.view(-1, *k_cache.shape[2:])[meta.slot_mapping] = k
    v_cache.view(-1, *v_cache.shape[2:])[meta.slot_mapping] = v


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta, scale: float
) -> torch.Tensor:
    """q [T, H, D] -> [T, H, D], attending each sequence's cached keys (the new ones included)."""
    if isinstance(meta, DecodeMetadata):
        from kernels.paged_attention import paged_decode_attention

        return paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale)
    if isinstance(meta, AttentionMetadata):
        return dense_attention(q, k_cache, v_cache, meta, scale)
    from .mixed_attention import mixed_attention

    return mixed_attention(q, k_cache, v_cache, meta, scale)


def dense_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float) -> torch.Tensor:
    """The padded, masked path: every sequence's keys gathered into one batch, one SDPA call."""
    T, H, D = q.shape
    flat_k = k_cache.view(-1, *k_cache.shape[2:])
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    keys = flat_k[meta.kv_index].transpose(1, 2)  # [B, KVH, K, D]
    values = flat_v[meta.kv_index].transpose(1, 2)
    qp = q.new_zeros(meta.num_seqs, meta.max_q, H, D)
    qp[meta.q_seq, meta.q_pos] = q
    with sdpa_kernel(_BACKENDS):
        out = F.scaled_dot_product_attention(
            qp.transpose(1, 2), keys, values, attn_mask=meta.mask, scale=scale, enable_gqa=True
        )  # [B, H, Q, D]
    return out.transpose(1, 2)[meta.q_seq, meta.q_pos]
