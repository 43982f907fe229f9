"""lora_shrink_rows: `lora_shrink` for decode sizes, one token per program (BGMV style), no metadata.

The segmented shrink (lora_shrink.py) reads each adapter's A once per launch, which is what prefill needs;
but at decode sizes its cost is latency, not bytes: a program reads the segment table, then the slot's
ranks, then its tokens' indices, then x and A, then (split K) counts itself in and re-reads the parts,
one dependent round trip to memory after another. Here a program reads its token's slot and then, at
once, the token's x row and a block of rows of A[slot] over all of K, and reduces in registers: two round
trips. Tokens of one adapter read its A once each (from L2 after the first): up to 64 tokens that costs
less than the latency it saves (MAX_TOKENS below).

    launch = shrink_rows_launch(x, a, ranks, token_slots, y)    # checks once
    launch(x, a, y)                                            # per layer
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from ._common import KernelConfig, cdiv, next_pow2
from .launch import Launch
from .lora_shrink import check_shrink_args


@triton.jit
def _shrink_rows_kernel(
    x_ptr, a_ptr, y_ptr, slots_ptr, ranks_ptr,
    N, K, R, MAX_SLOTS,
    stride_xt, stride_xk, stride_as, stride_ar, stride_ak, stride_yt,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    # Program (t, j): y[t, rows j*BLOCK_N ... of the S*R axis] = A[slot(t)][those rows] @ x[t].
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t)
    # Slots past MAX_SLOTS count as no adapter (as in LoRAKernelMeta.prepare): the row is not written.
    if (slot >= 0) & (slot < MAX_SLOTS):
        rank = tl.minimum(tl.load(ranks_ptr + slot), R)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        # Rows of A past the slot's rank are zero padding: never loaded; their y is 0.
        n_ok = (rn < N) & ((rn % R) < rank)
        a_rows = a_ptr + slot.to(tl.int64) * stride_as + rn[:, None].to(tl.int64) * stride_ar
        x_row = x_ptr + t.to(tl.int64) * stride_xt
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            if EVEN_K:
                xk = tl.load(x_row + rk * stride_xk)
                ak = tl.load(a_rows + rk[None, :] * stride_ak, mask=n_ok[:, None], other=0.0)
            else:
                xk = tl.load(x_row + rk * stride_xk, mask=rk < K, other=0.0)
                ak = tl.load(a_rows + rk[None, :] * stride_ak, mask=n_ok[:, None] & (rk < K)[None, :], other=0.0)
            acc += tl.sum(ak.to(tl.float32) * xk.to(tl.float32)[None, :], axis=1)
        tl.store(y_ptr + t.to(tl.int64) * stride_yt + rn, acc, mask=rn < N)


# Up to this many tokens a step's shrinks run per token (TritonLoRA); past it, segmented. Graphed decode
# steps, H200, Llama-3.2-1B, rank 16, per token vs segmented: batch 64 with 1 / 8 / 32 adapters 1.00x /
# 0.985x / 0.926x the step time; batch 128 1.09x / 1.08x / 1.01x, batch 256 1.14x / 1.15x / 1.11x (each
# token re-reads its adapter's A: at 128 tokens that outweighs the latency saved).
MAX_TOKENS = 64


def shrink_rows_config(in_features: int, n_total: int) -> KernelConfig:
    """One token (block_m 1) and up to 32 rows of A (of N = S*R) a program, over K in blocks of 1,024, 16
    warps (a 32 x 1,024 tile of A is 64 elements a thread). From sweeps of the graphed decode step (H200,
    Llama-3.2-1B, batch 64, rank 16): 32 x 1,024 of 16 warps beat 16 x 2,048, 64 x 1,024 (32 warps),
    16 x 1,024 (8 warps) and 32 x 512 by 1-5% at 8 and 32 adapters; fewer warps or narrower tiles lost up to
    30% (more programs, each longer, beside the base GEMM)."""
    return KernelConfig(1, min(32, next_pow2(n_total)), min(next_pow2(in_features), 1024), num_warps=16,
                        num_stages=1)


def shrink_rows_launch(
    x: torch.Tensor,
    a: torch.Tensor,
    ranks: torch.Tensor,
    token_slots: torch.Tensor,
    y: torch.Tensor,
    config: KernelConfig | None = None,
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]:
    """Check the arguments and work out the launch once; returns launch(x, a, y). Semantics as
    `lora_shrink` (x [T, in], a [slots, S, R, in] with (S, R) contiguous, ranks [slots] int32, y [T, S, R]
    float32 contiguous; rows of tokens without an adapter are not written), with the tokens' slots given
    directly: token_slots [T] int32 on x's device."""
    t, k, num_slots, s, r = check_shrink_args(x, a, ranks, y)
    if token_slots.dtype != torch.int32 or token_slots.shape != (t,):
        raise ValueError(f"token_slots must be int32 [{t}], got {token_slots.dtype} {tuple(token_slots.shape)}")
    if t == 0:
        return lambda x, a, y: None
    n = s * r
    cfg = config or shrink_rows_config(k, n)
    kernel = Launch(_shrink_rows_kernel, (t, cdiv(n, cfg.block_n)), x.device, BLOCK_N=cfg.block_n,
                    BLOCK_K=cfg.block_k, EVEN_K=k % cfg.block_k == 0, num_warps=cfg.num_warps,
                    num_stages=cfg.num_stages)
    args = (ranks, n, k, r, num_slots,
            x.stride(0), x.stride(1), a.stride(0), a.stride(2), a.stride(3), y.stride(0))

    def launch(x: torch.Tensor, a: torch.Tensor, y: torch.Tensor) -> None:
        kernel(x, a, y, token_slots, *args)

    return launch


def lora_shrink_rows(x: torch.Tensor, a: torch.Tensor, ranks: torch.Tensor, token_slots: torch.Tensor,
                     y: torch.Tensor | None = None, config: KernelConfig | None = None) -> torch.Tensor:
    """`lora_shrink`'s result, one program per token (decode sizes); returns y [T, S, R] float32."""
    if y is None and a.dim() == 4 and x.dim() == 2:
        y = torch.empty((x.shape[0], a.shape[1], a.shape[2]), dtype=torch.float32, device=x.device)
    shrink_rows_launch(x, a, ranks, token_slots, y, config)(x, a, y)
    return y
