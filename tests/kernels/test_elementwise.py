"""The fused elementwise kernels against the torch code they replace in the model (its references): fresh
random inputs, outputs that start as NaN, fp32 and bf16. RoPE and the cache write round exactly as torch;
RMSNorm and SiLU (a reduction's order, an exp) within a unit of bf16's last place, a few of fp32's. On a GPU the
float32 RoPE is within a few units of the last place too (FMA); the tests run there as they are."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from gpu_worker.engine.model.attention import write_kv
from gpu_worker.engine.model.config import ModelConfig
from gpu_worker.engine.model.layer_ops import plus_delta, rms_norm
from gpu_worker.engine.model.rope import RotaryEmbedding
from kernels.consumer_expand import PendingExpand, expand_values
from kernels.elementwise import add_rms_norm, rope_and_cache, silu_mul

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.bfloat16]
# Largest relative difference allowed (RMSNorm, SiLU): one unit in the last place of bf16 (2**-7 at worst);
# a few of fp32's, whose rsqrt and mean are computed in another order.
REL = {torch.float32: 2.0**-20, torch.bfloat16: 2.0**-7}


def rand(*shape, dtype, g):
    return (torch.randn(*shape, generator=g) * 2).to(DEVICE, dtype)


def gen():
    return torch.Generator().manual_seed(torch.seed() % 2**31)


def assert_within_ulp(got, want, dtype):
    assert torch.isfinite(got).all()
    err = (got.double() - want.double()).abs()
    assert (err <= want.double().abs() * REL[dtype] + 1e-30).all(), float((err / want.double().abs()).max())


def assert_rounds_as_torch(got, want, dtype):
    """Bit for bit, except float32 on a GPU, where the compiler fuses a product and a sum into one FMA (one rounding
    where torch rounds twice): within a few units of float32's last place of the operands there."""
    if got.is_cuda and dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5, equal_nan=True)
    else:
        assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0))


def rope_case(qkv, heads: int, kv_heads: int, hd: int, dtype, g, values=None, slots=None, pending=None,
              blocks: int = 5, bs: int = 16) -> tuple[dict, torch.Tensor]:
    """rope_and_cache over q, k, v (views into qkv [T, (heads + 2 kv_heads) * hd], as the model has them) and the torch
    code over the same, with the adapters' part `values` [T, same] added first on the rows of `slots` >= 0: handed to
    the kernel as a delta, or as `pending` when given. ({name: (got, want)} for q, k, v and both caches, the cache
    slots the tokens wrote)."""
    t = qkv.shape[0]
    cfg = ModelConfig(architecture="LlamaForCausalLM", hidden_size=heads * hd, num_layers=1, num_heads=heads,
                      num_kv_heads=kv_heads, head_dim=hd, intermediate_size=32, vocab_size=32, rms_norm_eps=1e-5,
                      max_position_embeddings=64, tie_word_embeddings=False, qkv_bias=False, rope_theta=10000.0)
    rope = RotaryEmbedding(cfg, 64, DEVICE, dtype)
    sizes = [heads * hd, kv_heads * hd, kv_heads * hd]
    q, k, v = (x.view(t, -1, hd) for x in qkv.split(sizes, dim=-1))
    want_q, want_k, want_v = q, k, v
    delta = pending
    if values is not None:
        dq, dk, dv = (x.view(t, -1, hd) for x in values.split(sizes, dim=-1))
        want_q, want_k, want_v = (plus_delta(x, d, slots) for x, d in ((q, dq), (k, dk), (v, dv)))
        delta = delta if delta is not None else ((dq, dk, dv), slots)
    positions = torch.randint(0, 64, (t,), generator=g).to(DEVICE)
    cache_slots = torch.randperm(blocks * bs, generator=g)[:t].to(DEVICE)
    want_q, want_k = rope.apply(want_q, want_k, positions)
    want_v = want_v.clone()
    want_kc = torch.full((blocks, bs, kv_heads, hd), float("nan"), dtype=dtype, device=DEVICE)
    want_vc = want_kc.clone()
    write_kv(want_kc, want_vc, want_k, want_v, SimpleNamespace(slot_mapping=cache_slots))
    kc, vc = torch.full_like(want_kc, float("nan")), torch.full_like(want_vc, float("nan"))
    rope_and_cache(q, k, v, positions, rope.cos, rope.sin, kc, vc, cache_slots, delta)
    return {"q": (q, want_q), "k": (k, want_k), "v": (v, want_v), "kc": (kc, want_kc), "vc": (vc, want_vc)}, cache_slots


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [64, 96])
def test_add_rms_norm_matches_the_torch_layer_code(dtype, n):
    g = gen()
    h, r = rand(7, n, dtype=dtype, g=g), rand(7, n, dtype=dtype, g=g)
    w = (torch.rand(n, generator=g) + 0.5).to(DEVICE, dtype)
    x, h_new = add_rms_norm(h, r, w, 1e-5)
    want_h = h + r
    assert torch.equal(h_new, want_h)  # the residual sum rounds as torch's
    assert_within_ulp(x, rms_norm(want_h, w, 1e-5), dtype)
    x0, same = add_rms_norm(h, None, w, 1e-5)  # no residual: the first layer's norm
    assert same is h
    assert_within_ulp(x0, rms_norm(h, w, 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_mul_matches_torch(dtype):
    g = gen()
    gate_up = rand(5, 2 * 1100, dtype=dtype, g=g)  # two column blocks, the second partly masked
    gate, up = gate_up.chunk(2, dim=-1)
    assert_within_ulp(silu_mul(gate_up), F.silu(gate) * up, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (6, 6)])  # GQA; head counts that are not powers of two
def test_rope_and_cache_match_rotary_embedding_and_write_kv(dtype, heads, kv_heads):
    g = gen()
    d, t, bs, blocks = 16, 9, 16, 5
    out, slots = rope_case(rand(t, (heads + 2 * kv_heads) * d, dtype=dtype, g=g), heads, kv_heads, d, dtype, g)
    assert_rounds_as_torch(*out["q"], dtype)  # in place, as torch rounds
    assert_rounds_as_torch(*out["k"], dtype)
    written = torch.zeros(blocks * bs, dtype=torch.bool, device=DEVICE)
    written[slots] = True
    for got, want in (out["kc"], out["vc"]):
        got, want = got.view(blocks * bs, -1), want.view(blocks * bs, -1)
        assert_rounds_as_torch(got[written], want[written], dtype)
        assert got[~written].isnan().all()  # no other slot touched


def delta_for(like: torch.Tensor, dtype, g):
    """The adapters' part of a projection output shaped like `like`, as the LoRA backend hands it over: values
    for rows with an adapter, NaN (never to be read) for the rows without, whose slot is -1."""
    slots = torch.randint(-1, 3, (like.shape[0],), generator=g, dtype=torch.int32)
    slots[0], slots[-1] = -1, 2
    values = rand(*like.shape, dtype=dtype, g=g) * 0.1
    values[(slots < 0).to(DEVICE)] = float("nan")
    return values, slots.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deltas_are_added_first_on_rows_with_an_adapter(dtype):
    """add_rms_norm, silu_mul and rope_and_cache with the adapters' part of what they read: as if it had been added
    (rounded) to the projection's rows with an adapter first; rows without one never read it (NaN there)."""
    g = gen()
    n, t = 96, 7
    h, r = rand(t, n, dtype=dtype, g=g), rand(t, n, dtype=dtype, g=g)
    w = (torch.rand(n, generator=g) + 0.5).to(DEVICE, dtype)
    d, slots = delta_for(r, dtype, g)
    x, h_new = add_rms_norm(h, r, w, 1e-5, (d, slots))
    want_h = h + plus_delta(r, d, slots)
    assert torch.equal(h_new, want_h)
    assert_within_ulp(x, rms_norm(want_h, w, 1e-5), dtype)
    with pytest.raises(ValueError, match="residual"):
        add_rms_norm(h, None, w, 1e-5, (d, slots))
    with pytest.raises(ValueError, match="laid out"):
        add_rms_norm(h, r, w, 1e-5, (d[:, :64], slots))

    gate_up = rand(t, 2 * 1100, dtype=dtype, g=g)
    d, slots = delta_for(gate_up, dtype, g)
    gate, up = plus_delta(gate_up, d, slots).chunk(2, dim=-1)
    assert_within_ulp(silu_mul(gate_up, (d, slots)), F.silu(gate) * up, dtype)

    heads, kv_heads, hd = 4, 2, 16
    qkv = rand(t, (heads + 2 * kv_heads) * hd, dtype=dtype, g=g)
    d, slots = delta_for(qkv, dtype, g)
    out, _ = rope_case(qkv, heads, kv_heads, hd, dtype, g, values=d, slots=slots)
    for got, want in out.values():
        assert_rounds_as_torch(got, want, dtype)


def test_bad_shapes_are_refused():
    x = torch.randn(3, 8, device=DEVICE)
    with pytest.raises(ValueError):
        add_rms_norm(x, None, torch.ones(7, device=DEVICE), 1e-5)
    with pytest.raises(ValueError):
        silu_mul(torch.randn(3, 7, device=DEVICE))


def pending_for(like: torch.Tensor, widths: list[int], dtype, g, rank: int = 16, p: int = 3,
                past_rank: float = float("nan")):
    """The adapters' part of a projection output shaped like `like` [T, sum(widths)], not yet expanded, as the
    concatenated GEMM leaves it (consumer_expand.PendingExpand): y [T, P, S, R] in the columns past the output's,
    B per slice over P + 1 slots with ranks that differ. What the kernels must not read is NaN: y of the slots a
    row does not use, everything of rows without an adapter (slot -1) and of the row whose slot is past P (which
    gets no adapter part); y past its slot's rank is `past_rank` (NaN: the kernel must not read it; 0: what the
    stacked GEMM gives there, x times the slot's zero rows of A); B past each slot's rank is large (the slots hold
    zeros there, and the kernels may read it only against y masked or zero)."""
    t, s = like.shape[0], len(widths)
    slots = torch.randint(-1, p, (t,), generator=g, dtype=torch.int32)
    slots[0], slots[1], slots[-1] = -1, p, p - 1
    ranks = torch.tensor([rank, 3, rank - 5, 7][: p + 1], dtype=torch.int32)
    cat = rand(t, sum(widths) + p * s * rank, dtype=dtype, g=g)
    y = cat[:, sum(widths):].view(t, p, s, rank)
    b = (rand(p + 1, sum(widths), rank, dtype=dtype, g=g) * 0.1).split(widths, dim=1)  # equal strides, as the slots'
    for slot in range(p + 1):
        for bs in b:
            bs[slot, :, int(ranks[slot]):] = 1e4
    for row in range(t):
        keep = int(slots[row])
        for slot in range(p):
            if slot != keep:
                y[row, slot] = float("nan")
            else:
                y[row, slot, :, int(ranks[slot]):] = past_rank
    return PendingExpand(y, b, ranks.to(DEVICE), slots.to(DEVICE))


def assert_close_where_expanded(got, want, dtype):
    """Within a few units of the model's dtype's last place: the expand's float32 sum runs in another order than
    torch's matmul, so its rounding may land a unit off (a NaN the kernel should not have read fails it)."""
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want.double(), rtol=4 * REL[dtype], atol=4 * REL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pending_expands_are_added_first_on_rows_with_an_adapter(dtype):
    """add_rms_norm, silu_mul and rope_and_cache handed the adapters' part still to expand (decode graphs' concatenated
    GEMMs): as if its values (consumer_expand.expand_values, the reference) had been added to the rows with an
    adapter first, every NaN the kernels must not read unread. silu_mul reads each row's own slot's y at every rank
    (past the slot's rank, the GEMM's zero); the per-row expands stop at the rank."""
    g = gen()
    n, t = 96, 7
    h, r = rand(t, n, dtype=dtype, g=g), rand(t, n, dtype=dtype, g=g)
    w = (torch.rand(n, generator=g) + 0.5).to(DEVICE, dtype)
    pending = pending_for(r, [n], dtype, g)
    x, h_new = add_rms_norm(h, r, w, 1e-5, pending)
    want_h = h + plus_delta(r, expand_values(pending, dtype), pending.slots)
    assert_close_where_expanded(h_new, want_h, dtype)
    assert_close_where_expanded(x, rms_norm(want_h, w, 1e-5), dtype)
    with pytest.raises(ValueError, match="slices"):
        add_rms_norm(h, r, w, 1e-5, pending._replace(b=pending.b * 2))

    # One row tile of 16; of 64, most rows padding. P = 3 slots: over the tile's span of slots (16 rows), in a program
    # per slot (64 rows: slot groups); P = 2: one block from slot 0.
    for rows, p in ((t, 3), (40, 3), (t, 2), (40, 2)):
        gate_up = rand(rows, 2 * 80, dtype=dtype, g=g)
        pending = pending_for(gate_up, [80, 80], dtype, g, p=p, past_rank=0.0)
        gate, up = plus_delta(gate_up, expand_values(pending, dtype), pending.slots).chunk(2, dim=-1)
        out = silu_mul(gate_up, pending)
        assert_close_where_expanded(out, F.silu(gate) * up, dtype)

    # Head counts a power of two, and not (the kernel pads them); q in 2 parts, and in 4 (the third part partly past
    # the heads, the fourth wholly), then k and v (kernels.elementwise.rope_parts).
    for heads, kv_heads in ((4, 2), (6, 3), (10, 2)):
        hd = 16
        sizes = [heads * hd, kv_heads * hd, kv_heads * hd]
        cat = rand(t, sum(sizes) + 3 * 3 * 16, dtype=dtype, g=g)
        qkv = cat[:, :sum(sizes)]  # the projection's output is a view into the concatenated GEMM's
        pending = pending_for(qkv, sizes, dtype, g)
        pending = pending._replace(y=cat[:, sum(sizes):].view(t, 3, 3, 16).copy_(pending.y))
        out, cache_slots = rope_case(qkv, heads, kv_heads, hd, dtype, g, values=expand_values(pending, dtype),
                                     slots=pending.slots, pending=pending)
        for name in "qkv":
            assert_close_where_expanded(*out[name], dtype)
        for got, want in (out["kc"], out["vc"]):  # the cache rows the tokens wrote, in token order
            assert_close_where_expanded(got.view(-1, got[0, 0].numel())[cache_slots],
                                        want.view(-1, got[0, 0].numel())[cache_slots], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_mul_row_programs_expand_each_rows_part(monkeypatch, dtype):
    """Decode steps over many slots may expand a row's part a program per column tile
    (elementwise.SILU_ROW_EXPAND_MIN_SLOTS): at P = 3 and at P = 16 of which a few slots are used, 7 and 40 rows,
    column tiles cut short, B loaded whole first and in blocks of ranks. As the reference adds the expanded values
    first; rows without an adapter and the one past P get silu_mul's own values; what must stay unread is NaN, B
    past each slot's rank large."""
    import kernels.elementwise as elementwise

    g = gen()
    monkeypatch.setattr(elementwise, "SILU_ROW_EXPAND_MIN_SLOTS", 3)
    monkeypatch.setattr(elementwise, "SILU_ROW_EXPAND_BN", 64)
    for rows, p, early in ((7, 3, True), (40, 3, False), (40, 16, True)):
        monkeypatch.setattr(elementwise, "early_b", lambda *_, early=early: early)
        gate_up = rand(rows, 2 * 144, dtype=dtype, g=g)
        pending = pending_for(gate_up, [144, 144], dtype, g, p=3, past_rank=float("nan"))
        if p > 3:  # the same rows, their y and B among P slots: slots 0, 13 and 15 used, the rest idle
            y = torch.full((rows, p, 2, 16), float("nan"), dtype=dtype, device=DEVICE)
            b = tuple(torch.full((p + 1, 144, 16), 1e4, dtype=dtype, device=DEVICE) for _ in range(2))
            ranks = torch.full((p + 1,), 16, dtype=torch.int32, device=DEVICE)
            moved = pending.slots.clone()
            for old, new in ((0, 0), (1, 13), (2, 15)):
                moved[pending.slots == old] = new
                y[:, new] = pending.y[:, old]
                ranks[new] = pending.ranks[old]
                for bs, src in zip(b, pending.b):
                    bs[new] = src[old]
            moved[pending.slots == 3] = p  # past P
            pending = PendingExpand(y, b, ranks, moved)
        gate, up = plus_delta(gate_up, expand_values(pending, dtype), pending.slots).chunk(2, dim=-1)
        out = silu_mul(gate_up, pending)
        assert_close_where_expanded(out, F.silu(gate) * up, dtype)
        none = (pending.slots < 0) | (pending.slots >= p)
        assert none.any() and not none.all()
        assert torch.equal(out[none], silu_mul(gate_up)[none])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loop, n", [(True, 80), (True, 200), (False, 80)], ids=["loop", "loop-2-tiles", "tiles"])
def test_silu_mul_expands_the_segmented_shrinks_y_in_row_tiles(monkeypatch, dtype, loop, n):
    """Eager steps hand silu_mul gate_up's y from the segmented shrink (float32 [T, S, R], one y a token standing
    for every slot: a zero stride over P) for more rows than one tile: tiles of rows mostly of one prompt, some
    mixing slots, rows without an adapter and one past P. As the reference adds the expanded values first; what
    must stay unread is NaN (y of rows without an adapter), B past each slot's rank large. In the pipelined loop
    (elementwise.SILU_PROMPT_LOOP; 200 columns: 4 tiles over 2 programs a row tile, each walking 2) and in a
    program per tile."""
    import kernels.elementwise as elementwise

    monkeypatch.setattr(elementwise, "SILU_PROMPT_LOOP", loop)
    g = gen()
    t, p, rank = 150, 4, 16
    slots = torch.full((t,), 2, dtype=torch.int32)
    slots[70:80], slots[80:141], slots[141:] = -1, 0, 3
    slots[[5, 100]] = -1
    slots[110] = p  # past P: no adapter part
    ranks = torch.tensor([rank, 3, rank - 5, 7], dtype=torch.int32)
    y = torch.randn(t, 2, rank, generator=g)
    for row in range(t):
        slot = int(slots[row])
        if 0 <= slot < p:
            y[row, :, int(ranks[slot]):] = 0.0  # the shrink writes zeros past the slot's rank
        else:
            y[row] = float("nan")
    # Values of the model's dtype, held in float32: the kernel rounds y to B's dtype before its dot (as lora_expand
    # does), the reference does not, and where the delta cancels the projection's value that rounding alone moved
    # a bf16 result by 100% (H200).
    y = y.to(dtype).float().to(DEVICE)
    b = (rand(p, 2 * n, rank, dtype=dtype, g=g) * 0.1).split([n, n], dim=1)
    for slot in range(p):
        for bs in b:
            bs[slot, :, int(ranks[slot]):] = 1e4
    pending = PendingExpand(y[:, None].expand(t, p, 2, rank), b, ranks.to(DEVICE), slots.to(DEVICE))
    gate_up = rand(t, 2 * n, dtype=dtype, g=g)
    out = silu_mul(gate_up, pending)
    gate, up = plus_delta(gate_up, expand_values(pending, dtype), pending.slots).chunk(2, dim=-1)
    assert_close_where_expanded(out, F.silu(gate) * up, dtype)
    none = ((slots < 0) | (slots >= p)).to(DEVICE)
    plain = silu_mul(gate_up)  # rows without an adapter: silu_mul's own values
    assert torch.equal(out[none], plain[none])
    assert not torch.equal(out[~none], plain[~none])


def _stacked_gemm_case(t: int, g):
    """Inputs of a layer's three expanding ops as a decode graph has them, each projection's output (and y) written
    by a stacked GEMM: {name: (weight, output)} and a `step` that runs the GEMMs and the ops, returning what the ops
    wrote. P = 16 slots of rank 16 (past BK: silu_mul's slot groups at 64 rows, its loop at 32)."""
    dt, p, r, k, hd, heads, kvh, hidden, inter = torch.bfloat16, 16, 16, 1024, 64, 8, 2, 512, 1024
    slots = torch.randint(-1, p, (t,), generator=g, dtype=torch.int32).to(DEVICE)
    ranks = torch.full((p,), r, dtype=torch.int32, device=DEVICE)
    x = rand(t, k, dtype=dt, g=g)

    def stacked(widths):
        n, s = sum(widths), len(widths)
        w = rand(n + p * s * r, k, dtype=dt, g=g) * 0.05
        out = torch.empty(t, n + p * s * r, dtype=dt, device=DEVICE)
        b = (rand(p, n, r, dtype=dt, g=g) * 0.1).split(widths, dim=1)
        return (w, out), PendingExpand(out[:, n:].view(t, p, s, r), b, ranks, slots)

    sizes = [heads * hd, kvh * hd, kvh * hd]
    (w_o, o), o_pending = stacked([hidden])
    (w_qkv, qkv), qkv_pending = stacked(sizes)
    (w_gu, gu), gu_pending = stacked([inter, inter])
    h, norm_w = rand(t, hidden, dtype=dt, g=g), (torch.rand(hidden, generator=g) + 0.5).to(DEVICE, dt)
    cos, sin = rand(64, hd, dtype=dt, g=g), rand(64, hd, dtype=dt, g=g)
    positions = torch.randint(0, 64, (t,), generator=g).to(DEVICE)
    kc = torch.full((8, 16, kvh, hd), float("nan"), dtype=dt, device=DEVICE)
    vc = torch.full_like(kc, float("nan"))
    cache_slots = torch.randperm(8 * 16, generator=g)[:t].to(DEVICE)
    q, kk, v = (y.view(t, -1, hd) for y in qkv[:, :sum(sizes)].split(sizes, dim=-1))
    block, at = cache_slots // 16, cache_slots % 16

    def step():
        torch.mm(x, w_o.T, out=o)
        normed, h_new = add_rms_norm(h, o[:, :hidden], norm_w, 1e-5, o_pending)
        torch.mm(x, w_qkv.T, out=qkv)
        rope_and_cache(q, kk, v, positions, cos, sin, kc, vc, cache_slots, qkv_pending)
        torch.mm(x, w_gu.T, out=gu)
        act = silu_mul(gu[:, :2 * inter], gu_pending)
        return {"norm": normed, "residual": h_new, "q": q, "k": kk, "v": v, "silu": act,
                "k cache": kc[block, at], "v cache": vc[block, at]}

    return {"o": o, "qkv": qkv, "gate_up": gu}, step


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch needs a Hopper GPU")
@pytest.mark.parametrize("t", [32, 64])
def test_dependent_launches_wait_for_the_gemm_before_them(monkeypatch, t):
    """On Hopper the ops that expand launch dependent on the kernel before them (kernels/launch.py PDL) and load
    their B before the grid-dependency wait. Captured in a CUDA graph right after the stacked GEMMs whose outputs
    they read (NaN before each replay: a read before the GEMM ends would see it), they give what the same graph
    with plain launches gives, bit for bit, and nothing they read is NaN."""
    import kernels.launch

    outputs, step = _stacked_gemm_case(t, gen())
    got = {}
    for on in (False, True):
        monkeypatch.setattr(kernels.launch, "PDL", on)
        assert kernels.launch.pdl(outputs["o"]) == on
        step()  # compiled and planned outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            written = step()
        for buf in outputs.values():
            buf.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        got[on] = {name: x.clone() for name, x in written.items()}
    for name, plain in got[False].items():
        assert torch.isfinite(plain).all(), name
        assert torch.equal(plain, got[True][name]), name
