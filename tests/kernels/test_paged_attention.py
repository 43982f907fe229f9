"""Paged decode attention against a float64 reference: fresh random inputs, NaN-poisoned outputs,
relative error per dtype; shuffled block tables, GQA groups, lengths that end mid-block and mid-tile."""

from __future__ import annotations

import pytest
import torch

from kernels.paged_attention import paged_decode_attention, paged_decode_attention_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 1e-2}


def rel_err(out, ref):
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (8, 8), (4, 1)])
def test_decode_matches_reference(dtype, heads, kv_heads):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    D, bs, num_blocks = 16, 16, 24
    lens = [1, 15, 16, 17, 70, 130]
    B = len(lens)
    max_blocks = max(-(-n // bs) for n in lens) + 1
    k = torch.randn(num_blocks, bs, kv_heads, D, generator=g).to(DEVICE, dtype)
    v = torch.randn(num_blocks, bs, kv_heads, D, generator=g).to(DEVICE, dtype)
    q = torch.randn(B, heads, D, generator=g).to(DEVICE, dtype)
    # Each sequence gets distinct blocks in a shuffled order, as a block manager hands them out.
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.full((B, max_blocks), 10**6, dtype=torch.int32)  # unread entries: out of range on purpose
    at = 0
    for b, n in enumerate(lens):
        nb = -(-n // bs)
        tables[b, :nb] = perm[at % num_blocks : at % num_blocks + nb] if at % num_blocks + nb <= num_blocks \
            else perm[:nb]
        at += nb
    ctx = torch.tensor(lens, dtype=torch.int32)
    out = torch.full_like(q, float("nan"))
    paged_decode_attention(q, k, v, tables.to(DEVICE), ctx.to(DEVICE), 0.25, out=out)
    ref = paged_decode_attention_ref(q, k, v, tables, ctx, 0.25)
    assert not torch.isnan(out).any()
    assert rel_err(out, ref) <= TOLERANCE[dtype]


def test_refuses_bad_shapes():
    q = torch.randn(2, 4, 16)
    k = torch.randn(4, 8, 2, 16)
    with pytest.raises(ValueError, match="block_size"):
        paged_decode_attention(q, k, k, torch.zeros(2, 2, dtype=torch.int32), torch.ones(2, dtype=torch.int32), 1.0)
