"""The L2 prefetch (kernels/l2_prefetch.py): which addresses a share of the work asks for (the arithmetic, run
under the interpreter too, with the asking swapped for a store), and, on a GPU, that a norm asking on the way
computes what it computes without."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from kernels.elementwise import add_rms_norm
from kernels.l2_prefetch import LINE, Blocks, share_addresses

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@triton.jit
def _addresses_kernel(out, base, stride, nbytes, per_block, total, per_program, BLOCK: tl.constexpr):
    p = tl.program_id(0)
    for j in range(0, per_program, BLOCK):
        addr = share_addresses(base, stride, nbytes, per_block, total, p * per_program + j, BLOCK)
        tl.store(out + p * per_program + j + tl.arange(0, BLOCK), addr)


@pytest.mark.parametrize("blocks,nbytes,programs", [(1, 128, 1), (3, 1000, 2), (8, 70_000, 5), (5, 4096, 64)])
def test_the_shares_ask_for_every_line_of_every_block_and_nothing_else(blocks, nbytes, programs):
    base, stride = 1 << 40, 3 << 20  # byte addresses: nothing is read
    where = Blocks(base, blocks, stride, nbytes)
    args = where.args(programs)
    per_program, block = args[5], 16
    out = torch.full((programs * triton.cdiv(per_program, block) * block + block,), -1, dtype=torch.int64,
                     device=DEVICE)
    _addresses_kernel[(programs,)](out, *args, BLOCK=block)
    got = set(out[out >= 0].tolist())
    want = {base + b * stride + off for b in range(blocks) for off in range(0, nbytes, LINE)}
    assert got == want


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the prefetch instruction needs a CUDA GPU")
def test_a_norm_asking_for_bytes_on_the_way_computes_the_same():
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    t, n = 48, 2048
    h, r = (torch.randn(t, n, generator=g).to(DEVICE, torch.bfloat16) for _ in range(2))
    w = torch.rand(n, generator=g).to(DEVICE, torch.bfloat16) + 0.5
    far = torch.randn(8, 1 << 20, generator=g).to(DEVICE, torch.bfloat16)
    where = Blocks(far.data_ptr(), 6, far.stride(0) * 2, 700_000)
    want = add_rms_norm(h, r, w, 1e-5)
    got = add_rms_norm(h, r, w, 1e-5, prefetch=where)
    torch.cuda.synchronize()
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
