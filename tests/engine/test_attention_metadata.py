"""The step metadata attention reads: decode rows (one new token each) for the fused paged-decode kernel, and a
mixed step's split into decode rows and prompt chunks, with the same decode metadata for its decode rows."""

from __future__ import annotations

import torch

from gpu_worker.engine.model.attention import DecodeMetadata
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
