"""paged_prefill_attention against a float64 reference: chunks with and without a cached prefix, of one to
many queries, several in one launch, grouped-query and plain heads, keys in shuffled blocks; output rows
outside every chunk (before, between and after them) are poisoned with NaN and must stay NaN (never written),
the others finite and close."""

from __future__ import annotations

import pytest
import torch

from kernels.paged_prefill import paged_prefill_attention, paged_prefill_attention_ref, prefill_launch, prefill_tiles

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def case(chunks, heads=8, kv_heads=2, d=16, bs=16, dtype=torch.float32):
    """chunks: (cached prefix length, new queries) per sequence. q has 3 rows before the chunks' and 3 after."""
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    need = [-(-(p + n) // bs) for p, n in chunks]
    num_blocks = sum(need) + 4
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.zeros(len(chunks), max(need) + 1, dtype=torch.int32)
    at = 0
    for s, k in enumerate(need):
        tables[s, :k] = perm[at:at + k].int()
        at += k
    q = torch.randn(sum(n for _, n in chunks) + 6, heads, d, generator=g)
    k = torch.randn(num_blocks, bs, kv_heads, d, generator=g)
    v = torch.randn(num_blocks, bs, kv_heads, d, generator=g)
    return (q.to(DEVICE, dtype), k.to(DEVICE, dtype), v.to(DEVICE, dtype), tables.to(DEVICE),
            [p for p, _ in chunks])


def check(chunks, **kw):
    q, k, v, tables, ctx = case(chunks, **kw)
    # The chunks' rows from row 3 on, in reverse order and one row apart (rows of no chunk between them).
    lens = [n for _, n in chunks]
    rows, at = [0] * len(chunks), 3
    for s in reversed(range(len(chunks))):
        rows[s], at = at, at + lens[s] + 1
    q = torch.cat([q, q[: at - q.shape[0]]]) if at > q.shape[0] else q
    out = torch.full_like(q, float("nan"))
    got = paged_prefill_attention(q, k, v, tables, rows, lens, ctx, 0.25, out=out)
    assert got is out
    ref = paged_prefill_attention_ref(q, k, v, tables, rows, lens, ctx, 0.25)
    inside = torch.zeros(q.shape[0], dtype=torch.bool)
    for r, n in zip(rows, lens):
        inside[r:r + n] = True
    assert out[~inside.to(DEVICE)].isnan().all(), "rows outside the chunks must not be written"
    o, r = out[inside.to(DEVICE)].double().cpu(), ref[inside]
    assert not o.isnan().any()
    assert float((o - r).norm() / r.norm()) <= TOLERANCE[q.dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_chunks_with_and_without_prefix(dtype):
    # A first chunk, a later chunk of a long prompt (prefix in the cache), one-query chunks (a decode row, a
    # chunk of one), a chunk that ends mid-block and one longer than a tile.
    check([(0, 20), (37, 9), (5, 1), (0, 1), (64, 33)], dtype=dtype)


def test_plain_heads_and_wide_groups():
    check([(0, 19), (17, 6)], heads=4, kv_heads=4)  # no GQA: 64 queries a tile
    check([(3, 12), (0, 40)], heads=8, kv_heads=1, d=32)  # a group of 8 heads: 8 queries a tile
    check([(9, 7)], heads=6, kv_heads=2)  # groups of 3 (padded to 4 rows)


def test_small_tiles_walk_many_key_blocks():
    q, k, v, tables, ctx = case([(50, 30), (0, 5)])
    out = paged_prefill_attention(q, k, v, tables, [0, 30], [30, 5], ctx, 0.3, block_m=4, block_n=16)
    ref = paged_prefill_attention_ref(q, k, v, tables, [0, 30], [30, 5], ctx, 0.3)
    o = out[:35].double().cpu()
    assert float((o - ref[:35]).norm() / ref[:35].norm()) <= 1e-4


def test_tiles_and_checks():
    assert prefill_tiles([5, 0, 35], 16) == [0, 0, 2, 0, 2, 16, 2, 32]
    q, k, v, tables, ctx = case([(0, 4)])
    with pytest.raises(ValueError, match="q_rows"):
        paged_prefill_attention(q, k, v, tables, [8], [4], ctx, 0.25)
    with pytest.raises(ValueError, match="int32"):
        paged_prefill_attention(q, k, v, tables.long(), [0], [4], ctx, 0.25)


def test_one_plan_serves_every_layer():
    """prefill_launch lays the tiles out once; its launch, called with each layer's own q and caches, gives what a
    one-shot call gives for that layer, and refuses tensors of other shapes."""
    layers = [case([(0, 20), (37, 9), (5, 1)]) for _ in range(3)]
    _, k0, _, tables, ctx = layers[0]
    rows, lens = [0, 20, 29], [20, 9, 1]
    launch = prefill_launch(tables, rows, lens, ctx, layers[0][0].shape[1], tuple(k0.shape), k0.device)
    for q, k, v, _, _ in layers:  # each layer's own q and caches, the step's block tables
        got = launch(q, k, v, 0.25)
        want = paged_prefill_attention(q, k, v, tables, rows, lens, ctx, 0.25)
        assert torch.equal(got[:30], want[:30])
    q, k, v, _, _ = layers[0]
    with pytest.raises(ValueError, match="shapes disagree"):
        launch(q[:, :1], k, v, 0.25)
    with pytest.raises(ValueError, match="q_rows"):
        launch(q[:10], k, v, 0.25)
