"""The fused elementwise kernels against the torch code they replace in the model (its references): fresh
random inputs, outputs that start as NaN, fp32 and bf16. RoPE and the cache write round exactly as torch;
RMSNorm and SiLU (a reduction's order, an exp) within a unit of bf16's last place, a few of fp32's."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from gpu_worker.engine.model.attention import write_kv
from gpu_worker.engine.model.config import ModelConfig
from gpu_worker.engine.model.layer_ops import rms_norm
from gpu_worker.engine.model.rope import RotaryEmbedding
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
    cfg = ModelConfig(architecture="LlamaForCausalLM", hidden_size=heads * d, num_layers=1, num_heads=heads,
                      num_kv_heads=kv_heads, head_dim=d, intermediate_size=32, vocab_size=32, rms_norm_eps=1e-5,
                      max_position_embeddings=64, tie_word_embeddings=False, qkv_bias=False, rope_theta=10000.0)
    rope = RotaryEmbedding(cfg, 64, DEVICE, dtype)
    # q, k, v as the model has them: views into one qkv row per token.
    qkv = rand(t, (heads + 2 * kv_heads) * d, dtype=dtype, g=g)
    q, k, v = (x.view(t, -1, d) for x in qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1))
    positions = torch.randint(0, 64, (t,), generator=g).to(DEVICE)
    slots = torch.randperm(blocks * bs, generator=g)[:t].to(DEVICE)
    want_q, want_k = rope.apply(q, k, positions)
    want_kc = torch.full((blocks, bs, kv_heads, d), float("nan"), dtype=dtype, device=DEVICE)
    want_vc = want_kc.clone()
    write_kv(want_kc, want_vc, want_k, v, SimpleNamespace(slot_mapping=slots))
    kc, vc = torch.full_like(want_kc, float("nan")), torch.full_like(want_vc, float("nan"))
    rope_and_cache(q, k, v, positions, rope.cos, rope.sin, kc, vc, slots)
    assert torch.equal(q, want_q) and torch.equal(k, want_k)  # in place, as torch rounds
    written = torch.zeros(blocks * bs, dtype=torch.bool, device=DEVICE)
    written[slots] = True
    for got, want in ((kc, want_kc), (vc, want_vc)):
        got, want = got.view(blocks * bs, -1), want.view(blocks * bs, -1)
        assert torch.equal(got[written], want[written])
        assert got[~written].isnan().all()  # no other slot touched


def test_bad_shapes_are_refused():
    x = torch.randn(3, 8, device=DEVICE)
    with pytest.raises(ValueError):
        add_rms_norm(x, None, torch.ones(7, device=DEVICE), 1e-5)
    with pytest.raises(ValueError):
        silu_mul(torch.randn(3, 7, device=DEVICE))
