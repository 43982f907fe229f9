"""decode_gemm: out = x @ W.T for the few rows of a decode step (M <= 128), a candidate for the base projections.

At decode sizes a projection is a read of W and nothing else; cuBLAS's kernels for them reached 27-59% of the
copy bandwidth in a graphed H200 decode step (qkv 7.1 us for 12.6 MB: 96 tiles of 64 x 32 on 132 SMs). Here
every program owns a block of W's rows (output columns) and a slice of K, all of x's rows at once, so the
grid is (N / BLOCK_N) x SPLIT_K programs sized to fill the GPU, each streaming its W tile once; the splits of a
tile meet as in the split-K shrink (kernels/lora_shrink.py): each stores its partial sum, counts itself in on
the tile's semaphore, and the last one adds the parts and writes out. Whether it beats cuBLAS is measured by
`python3 -m benchmarks.decode_gemms --ways linear,triton`; the engine does not use it yet.

    out = decode_gemm(x, w)            # x [M, K], w [N, K] (K contiguous), same dtype -> out [M, N]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import DOT_NATIVE, cdiv, dot_mode, next_pow2, sm_count, to_low
from .launch import Launch

MAX_ROWS = 128


@triton.jit
def _decode_gemm_kernel(
    x_ptr, w_ptr, out_ptr, part_ptr, sem_ptr,
    M, N, K, K_PER_SPLIT, stride_xm, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    DOT: tl.constexpr,
):
    LOW: tl.constexpr = out_ptr.dtype.element_ty
    tn = tl.program_id(0) // SPLIT_K
    ks = tl.program_id(0) % SPLIT_K
    rm = tl.arange(0, BLOCK_M)
    rn = tn * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    k_lo = ks * K_PER_SPLIT
    k_hi = tl.minimum(K, k_lo + K_PER_SPLIT)
    x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm
    w_rows = w_ptr + rn[:, None].to(tl.int64) * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = (rk < k_hi)[None, :]
        xt = tl.load(x_rows + rk[None, :], mask=m_ok[:, None] & k_ok, other=0.0)
        wt = tl.load(w_rows + rk[None, :], mask=n_ok[:, None] & k_ok, other=0.0)
        if DOT == DOT_NATIVE:
            acc = tl.dot(xt, tl.trans(wt), acc)
        else:
            acc = tl.dot(xt.to(tl.float32), tl.trans(wt).to(tl.float32), acc, input_precision="ieee")
    mask = m_ok[:, None] & n_ok[None, :]
    o_ptrs = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    if SPLIT_K == 1:
        tl.store(o_ptrs, to_low(acc, LOW, DOT != DOT_NATIVE), mask=mask)
    else:
        p_ptrs = part_ptr + rm[:, None].to(tl.int64) * N + rn[None, :]
        tl.store(p_ptrs + ks * M * N, acc, mask=mask)
        tl.debug_barrier()  # every thread's part is stored before the count (release below)
        arrived = tl.atomic_add(sem_ptr + tn, 1, sem="acq_rel", scope="gpu")
        tl.debug_barrier()  # the acquire is seen by every thread before they read the parts
        if arrived == SPLIT_K - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for p in tl.static_range(SPLIT_K):
                total += tl.load(p_ptrs + p * M * N, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(o_ptrs, to_low(total, LOW, DOT != DOT_NATIVE), mask=mask)
            tl.atomic_xchg(sem_ptr + tn, 0, sem="relaxed", scope="gpu")


@dataclass(frozen=True)
class GemmConfig:
    block_n: int = 64
    block_k: int = 128
    split_k: int = 0  # 0: enough splits for `waves` programs per SM
    num_warps: int = 4
    num_stages: int = 3
    waves: int = 2


class DecodeGemm:
    """Launches for one (M, N, K, dtype), with the split-K scratch (partial sums and per-tile semaphores,
    which the kernel re-arms to zero) allocated once: graph-capturable."""

    def __init__(self, m: int, n: int, k: int, device: torch.device, config: GemmConfig = GemmConfig()):
        if not 0 < m <= MAX_ROWS:
            raise ValueError(f"decode_gemm takes 1 to {MAX_ROWS} rows, got {m}")
        self.m, self.n, self.k, self.config = m, n, k, config
        tiles = cdiv(n, config.block_n)
        split = config.split_k or max(1, min(32, config.waves * sm_count(device) // tiles,
                                             k // (2 * config.block_k)))
        per_split = cdiv(cdiv(k, split), config.block_k) * config.block_k
        self.splits = cdiv(k, per_split)
        self.per_split = per_split
        self.tiles = tiles
        self.part = torch.empty(max(1, self.splits * m * n if self.splits > 1 else 1), dtype=torch.float32,
                                device=device)
        self.sem = torch.zeros(tiles, dtype=torch.int32, device=device)
        self._launches: dict = {}

    def __call__(self, x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape != (self.m, self.k) or w.shape != (self.n, self.k) or x.dtype != w.dtype:
            raise ValueError(f"planned for x [{self.m}, {self.k}] and w [{self.n}, {self.k}] of one dtype, got "
                             f"{tuple(x.shape)} {x.dtype} and {tuple(w.shape)} {w.dtype}")
        if x.stride(1) != 1 or w.stride(1) != 1:
            raise ValueError("x and w must have K contiguous")
        out = torch.empty((self.m, self.n), dtype=x.dtype, device=x.device) if out is None else out
        if out.shape != (self.m, self.n) or out.stride(1) != 1 or out.dtype != x.dtype:
            raise ValueError(f"out must be [{self.m}, {self.n}] of x's dtype with contiguous rows")
        key = (x.dtype, x.stride(0), w.stride(0), out.stride(0))
        launch = self._launches.get(key)
        if launch is None:
            cfg = self.config
            launch = self._launches[key] = Launch(
                _decode_gemm_kernel, (self.tiles * self.splits,), x.device, BLOCK_M=max(16, next_pow2(self.m)),
                BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=self.splits, DOT=dot_mode(x),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        launch(x, w, out, self.part, self.sem, self.m, self.n, self.k, self.per_split, x.stride(0), w.stride(0),
               out.stride(0))
        return out


def decode_gemm(x: torch.Tensor, w: torch.Tensor, config: GemmConfig = GemmConfig()) -> torch.Tensor:
    """x [M, K] @ w [N, K].T -> [M, N] in x's dtype, fp32 accumulation (a one-off plan; the engine would keep
    a DecodeGemm per shape)."""
    return DecodeGemm(x.shape[0], w.shape[0], x.shape[1], x.device, config)(x, w)
