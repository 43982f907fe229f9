"""The decode step's inputs spread into the graph's static buffers in one launch (kernels/step_inputs.py) against its
torch reference: fresh random staged arrays, every buffer poisoned first; with and without LoRA slots and patched
ids, tables narrower and wider than a loop block, one row; rows past b untouched."""

from __future__ import annotations

import pytest
import torch

from kernels.step_inputs import BLOCK, decode_inputs, decode_inputs_ref, staged_size

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
N, MAX_BLOCKS = 8, 2 * BLOCK + 8
POISON = -777


def buffers():
    def full(*shape, dtype=torch.int64):
        return torch.full(shape, POISON, dtype=dtype, device=DEVICE)

    return [full(N), full(N), full(N), full(N, dtype=torch.int32), full(N, dtype=torch.int32),
            full(N, MAX_BLOCKS, dtype=torch.int32)]


@pytest.mark.parametrize("has_lora", [False, True], ids=["base", "lora"])
@pytest.mark.parametrize("patched", [False, True], ids=["known", "patched"])
@pytest.mark.parametrize("b,width", [(1, 1), (3, 5), (8, BLOCK + 3), (5, MAX_BLOCKS)])
def test_matches_the_reference(b, width, has_lora, patched):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    cols = torch.randint(0, 10_000, (6, b), generator=g)
    cols[4] = torch.randint(-1, 4, (b,), generator=g)
    pending = torch.randint(0, 50_000, (b + 2,), generator=g).to(DEVICE) if patched else None
    cols[5] = torch.where(torch.rand(b, generator=g) < 0.5, torch.randint(0, b + 2, (b,), generator=g), -1)
    if patched:
        cols[5, 0] = b + 1  # at least one row takes the step in flight's id
    tables = torch.randint(0, 5_000, (b, width), generator=g)
    staged = torch.cat([cols.reshape(-1), torch.tensor([width]), tables.reshape(-1)]).to(DEVICE)
    assert staged.numel() == staged_size(b, width)
    got, want = buffers(), buffers()
    decode_inputs(staged, pending, *got, b, has_lora)
    decode_inputs_ref(staged, pending, *want, b, has_lora)
    for x, y in zip(got, want, strict=True):
        assert torch.equal(x, y)
    ids, positions, kv_slots, ctx, lora, table = got
    expect_ids = cols[0].clone()
    if patched:
        rows = cols[5] >= 0
        expect_ids[rows] = pending.cpu()[cols[5][rows]]
    assert ids[:b].tolist() == expect_ids.tolist() and positions[:b].tolist() == cols[1].tolist()
    assert kv_slots[:b].tolist() == cols[2].tolist() and ctx[:b].tolist() == cols[3].tolist()
    assert lora[:b].tolist() == (cols[4].tolist() if has_lora else [POISON] * b)
    assert table[:b, :width].tolist() == tables.tolist()
    assert (table[:b, width:] == POISON).all() and (table[b:] == POISON).all()  # past the width, past b: untouched
    assert all((t[b:] == POISON).all() for t in got[:5])
