"""The step metadata attention reads: decode rows (one new token each) for the fused paged-decode kernel, and a
mixed step's split into decode rows and prompt chunks, with the same decode metadata for its decode rows."""

from __future__ import annotations

import random

import numpy as np
import torch

from gpu_worker.engine.model.attention import DecodeMetadata, token_slots, write_block_tables
from gpu_worker.engine.model.mixed_attention import MixedMetadata

DEVICE = torch.device("cpu")


def test_decode_metadata_slots_padded_tables_and_lengths():
    meta = DecodeMetadata.build([0, 17, 5], [[7], [3, 9], [4]], block_size=16, device=DEVICE)
    assert meta.slot_mapping.tolist() == [7 * 16, 9 * 16 + 1, 4 * 16 + 5]
    assert meta.block_tables.tolist() == [[7, 0], [3, 9], [4, 0]] and meta.block_tables.dtype == torch.int32
    assert meta.context_lens.tolist() == [1, 18, 6]


def test_mixed_step_decode_rows_use_the_same_metadata():
    # A decode (seq 0, position 17), a first prompt chunk (seq 1, 3 tokens), a decode (seq 2, position 5).
    starts, lengths, tables = [17, 0, 5], [1, 3, 1], [[3, 9], [2], [4]]
    mixed = MixedMetadata.build(starts, lengths, tables, 16, DEVICE, None, fused_decode=True)
    want = DecodeMetadata.build([17, 5], [[3, 9], [4]], 16, DEVICE)
    assert mixed.decode_rows.tolist() == [0, 4]
    for name in ("slot_mapping", "block_tables", "context_lens"):
        assert torch.equal(getattr(mixed.decode, name), getattr(want, name)), name
    assert mixed.slot_mapping.tolist() == [9 * 16 + 1, 32, 33, 34, 4 * 16 + 5]  # every row, in row order
    assert [(p.lo, p.hi, p.start, p.dense) for p in mixed.prompts] == [(1, 4, 0, None)]


def test_token_slots_match_the_per_token_formula():
    """token_slots (vectorized over the step) against table[pos // bs] * bs + pos % bs token by token: prompt chunks
    from position 0 and later, decode rows, tables of different lengths."""
    rng = random.Random(torch.seed())
    bs = 8
    starts, lengths, tables = [], [], []
    for _ in range(12):
        start, n = rng.choice([(0, rng.randint(2, 40)), (rng.randint(1, 60), 1),
                               (rng.randint(1, 30), rng.randint(2, 9))])
        tables.append(rng.sample(range(500), -(-(start + n) // bs) + rng.randint(0, 2)))
        starts.append(start)
        lengths.append(n)
    want = [t[p // bs] * bs + p % bs for s, n, t in zip(starts, lengths, tables) for p in range(s, s + n)]
    assert token_slots(starts, lengths, tables, bs).tolist() == want
    dst = np.full((14, 9), -7, np.int64)
    write_block_tables(dst, [[1, 2], [], [3, 4, 5]])
    assert dst[:3, :3].tolist() == [[1, 2, -7], [-7, -7, -7], [3, 4, 5]] and (dst[3:] == -7).all()
