"""Bytes asked into the L2 cache ahead of the kernel that reads them: `prefetch.global.L2::evict_last`, one
instruction a 128-byte line, fire and forget (no register waits for it).

The decode graphs' consumer kernels (kernels/consumer_expand.py) read each row's slot's B right after the GEMM
before them. A step streams ~2.5 GB of weights through the 60 MB L2 of an H200, so a layer's B (5.9 MB for 8
rank-16 slots of Llama-3.2-1B) comes from memory at every use, on the critical path: RMSNorm with its expand
took 6.2 us in a step against 4.3 alone with B in L2. Asked for when the layer starts, with the evict-last
hint so the weights streaming past do not push it out, it is in L2 by the time the norms, RoPE and SiLU read it.

The asking rides on the layer's norms (`prefetch_share`: each of a norm's programs asks for a share), since a
launch of its own sits on the step's critical path: the input norm asks for the layer's B of the stacked groups
(all four while gate_up is stacked, P <= 32; else qkv's and o's), the post-attention norm for down's
(kernels/engine_backend.py `layer_prefetch`, up to P = 16). H200, graph replay, 8 rank-16 adapters (`python3 -m
benchmarks.step_breakdown --compare-set "kernels.engine_backend.PREFETCH_B=False"`, P = 8): batch 64 1,560 us
against 1,593 without and 1,592 with a launch of its own (its 1.5 us a layer eat what it saves); batch 32 1,471 /
1,500 / 1,506; without the hint, in a launch of its own: 1,617 (a loss). At P = 16 (`python3 -m
benchmarks.worker`, batch 64): 1 adapter 1,588 -> 1,545 us, 8 adapters 1,625 -> 1,587. At P = 32 the 23.5 MB a
layer asked for cost 66-70 us a step, so none past 16. Prefetching the base weights the same way (gate_up's
first 16-48 MB, loaded on a side stream while attention runs) slowed the step 3-17%; Hopper's bulk L2 prefetch
(`cp.async.bulk.prefetch.L2`) slowed gate_up's GEMM after a 30 us stretch from 19.5 to 28.5 us.

    where = Blocks(base, blocks, stride, nbytes)   # blocks of nbytes at base + i * stride (byte addresses)
    prefetch_share(*where.args(programs), program, BLOCK)   # inside a kernel of `programs` programs
"""

from __future__ import annotations

from typing import NamedTuple

import triton
import triton.language as tl

LINE = 128  # bytes a prefetch instruction asks for
_LINE: tl.constexpr = tl.constexpr(LINE)


class Blocks(NamedTuple):
    """`blocks` runs of nbytes at byte addresses base, base + stride, ... (a layer's B in each of P slots)."""

    base: int
    blocks: int
    stride: int
    nbytes: int

    def args(self, programs: int) -> tuple[int, int, int, int, int, int]:
        """(base, stride, nbytes, lines a block, lines in all, lines a program) for `prefetch_share` over
        `programs` programs."""
        per_block = triton.cdiv(self.nbytes, LINE)
        total = per_block * self.blocks
        return self.base, self.stride, self.nbytes, per_block, total, triton.cdiv(total, programs)


@triton.jit
def share_addresses(base, stride, nbytes, per_block, total, first, BLOCK: tl.constexpr):
    """The byte addresses of lines first .. first + BLOCK - 1 of the Blocks (past the end: the last line)."""
    line = tl.minimum(first + tl.arange(0, BLOCK), total - 1).to(tl.int64)
    block = line // per_block
    return base + block * stride + tl.minimum((line - block * per_block) * _LINE, nbytes - 1)


@triton.jit
def prefetch_share(base, stride, nbytes, per_block, total, per_program, program, BLOCK: tl.constexpr):
    """Program `program`'s share (lines [program * per_program, + per_program)) of the Blocks' lines, BLOCK
    lines at a time, asked for with the evict-last hint: for a kernel that has this to do beside its own work."""
    for j in range(0, per_program, BLOCK):
        addr = share_addresses(base, stride, nbytes, per_block, total, program * per_program + j, BLOCK)
        tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0;", "=r,l", [addr],
                                  dtype=tl.int32, is_pure=False, pack=1)
