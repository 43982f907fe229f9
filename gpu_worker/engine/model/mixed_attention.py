"""Attention for a step that is not pure decode: prompts (or prompt chunks) joining running decodes, as every
arrival makes in serving.

Padding every sequence to the longest prompt chunk and masking (AttentionMetadata) cost a 1B model ~25-45 ms
a step on an H200 for one 128-token prompt among 32 decodes: the mask built on the host (B x Q x K), and a
mask that rules out the fast SDPA backends, so the math backend ran in float32. Here the step's rows are
split instead:
- with the paged prefill kernel (kernels/paged_prefill.py; CUDA, no sliding window), decode rows (a one-query
  chunk each), chunks with a cached prefix (a later chunk of a long prompt, or blocks from the prefix cache) and
  first chunks up to FIRST_CHUNK_KERNEL_MAX tokens all go to one launch of it a layer, keys read in place; a
  longer first chunk is plain causal attention over its own keys, which SDPA runs with its flash backend;
- without it, decode rows go to the fused paged-decode kernel on CUDA (the torch gather path over those rows
  alone elsewhere), first chunks to SDPA, and each chunk with a cached prefix (or any, with a sliding window)
  through the masked path for its one sequence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from .attention import (
    _BACKENDS,
    AttentionMetadata,
    DecodeMetadata,
    dense_attention,
    padded_block_tables,
    token_slots,
)

# First chunks (no cached prefix) up to this many tokens join the paged prefill launch: SDPA per chunk is ~8 launches
# a layer (gather, repeat, attention, scatter), so 64 prompts of 128 tokens arriving together cost a 1B model's
# step ~130 ms of host time on an H200; a long chunk is GPU-bound, and flash attention runs it best.
FIRST_CHUNK_KERNEL_MAX = 512


@dataclass
class PromptPart:
    """One sequence's prompt chunk: rows [lo, hi) of the step's tokens, queries at positions start..."""

    lo: int
    hi: int
    start: int
    # The masked single-sequence path, when the chunk has a cached prefix or the model a sliding window.
    dense: AttentionMetadata | None = None


@dataclass
class PagedChunks:
    """Prompt chunks for one paged-prefill launch (those with a cached prefix, and short first chunks): their rows
    in the step, lengths, first positions and block tables."""

    rows: list[int]
    lens: list[int]
    starts: list[int]
    block_tables: torch.Tensor  # [P, max_blocks] int32
    # The step's launch (kernels.paged_prefill.prefill_launch), planned at the first layer, called by every one.
    launch: Callable[..., torch.Tensor] | None = None


@dataclass
class MixedMetadata:
    slot_mapping: torch.Tensor  # [T] int64: where each new token's K/V go (write_kv)
    decode_rows: torch.Tensor | None  # [Bd] int64: the rows of one-token chunks
    decode: DecodeMetadata | AttentionMetadata | None  # the fused kernel's (CUDA), else the gather path's
    prompts: list[PromptPart]
    paged_chunks: PagedChunks | None = None

    @classmethod
    def build(cls, starts: list[int], lengths: list[int], block_tables: list[list[int]], block_size: int,
              device: torch.device, sliding_window: int | None, fused_decode: bool,
              fused_prefill: bool = False) -> MixedMetadata:
        """Chunks in row order: tokens [starts[b], starts[b] + lengths[b]) of sequence b. fused_prefill: chunks
        with a cached prefix, and short first chunks, go to the paged prefill kernel (no sliding window)."""
        decode_rows: list[int] = []
        decode_seqs: list[int] = []
        prompts: list[PromptPart] = []
        paged: list[int] = []  # chunks for the paged prefill kernel, by index b
        paged_rows: list[int] = []
        row = 0
        paged_ok = fused_prefill and sliding_window is None
        for b, (start, n, table) in enumerate(zip(starts, lengths, block_tables)):
            # A decode row is a one-query chunk of the paged launch: no gather, launch and scatter of its own.
            if paged_ok and (n == 1 or start > 0 or n <= FIRST_CHUNK_KERNEL_MAX):
                paged.append(b)
                paged_rows.append(row)
            elif n == 1:
                decode_rows.append(row)
                decode_seqs.append(b)
            else:
                dense = None
                if start > 0 or sliding_window is not None:
                    dense = AttentionMetadata.build([start], [n], [table], block_size, device, sliding_window)
                prompts.append(PromptPart(row, row + n, start, dense))
            row += n
        decode = None
        if decode_seqs:
            tables = [block_tables[b] for b in decode_seqs]
            if fused_decode:
                decode = DecodeMetadata.build([starts[b] for b in decode_seqs], tables, block_size, device)
            else:
                decode = AttentionMetadata.build([starts[b] for b in decode_seqs], [1] * len(decode_seqs), tables,
                                                 block_size, device, sliding_window)
        paged_chunks = None
        if paged:
            paged_chunks = PagedChunks(paged_rows, [lengths[b] for b in paged], [starts[b] for b in paged],
                                       padded_block_tables([block_tables[b] for b in paged], device))
        return cls(
            slot_mapping=torch.from_numpy(token_slots(starts, lengths, block_tables, block_size)).to(device),
            decode_rows=torch.tensor(decode_rows, dtype=torch.int64).to(device) if decode_rows else None,
            decode=decode,
            prompts=prompts,
            paged_chunks=paged_chunks,
        )


def mixed_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: MixedMetadata,
                    scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, H, D] -> [T, H, D] (into `out`, contiguous, when given); the step's K/V are already in the cache
    (write_kv)."""
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or not out.is_contiguous():
        raise ValueError(f"out must be contiguous {tuple(q.shape)}, got {tuple(out.shape)}")
    if meta.decode is not None:
        qd = q[meta.decode_rows]
        if isinstance(meta.decode, DecodeMetadata):
            from kernels.paged_attention import paged_decode_attention

            out[meta.decode_rows] = paged_decode_attention(qd, k_cache, v_cache, meta.decode.block_tables,
                                                           meta.decode.context_lens, scale)
        else:
            out[meta.decode_rows] = dense_attention(qd, k_cache, v_cache, meta.decode, scale)
    if meta.paged_chunks is not None:
        p = meta.paged_chunks
        if p.launch is None:
            from kernels.paged_prefill import prefill_launch

            p.launch = prefill_launch(p.block_tables, p.rows, p.lens, p.starts, q.shape[1], tuple(k_cache.shape),
                                      q.device)
        p.launch(q, k_cache, v_cache, scale, out)
    for part in meta.prompts:
        qp = q[part.lo:part.hi]
        if part.dense is not None:
            out[part.lo:part.hi] = dense_attention(qp, k_cache, v_cache, part.dense, scale)
            continue
        # A first chunk: its keys are its own, just written at its rows' slots.
        rows = meta.slot_mapping[part.lo:part.hi]
        k = k_cache.view(-1, *k_cache.shape[2:])[rows]  # [n, KVH, D]
        v = v_cache.view(-1, *v_cache.shape[2:])[rows]
        group = q.shape[1] // k.shape[1]
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        with sdpa_kernel(_BACKENDS):
            o = F.scaled_dot_product_attention(qp.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                               v.transpose(0, 1)[None], is_causal=True, scale=scale)
        out[part.lo:part.hi] = o[0].transpose(0, 1)
    return out
