"""The LoRA expand computed by the elementwise op that reads the projection, for decode-sized steps.

At decode sizes each LoRA launch is latency, not bandwidth: a graphed Llama-3.2-1B step on an H200 spent
~370 us on 64 shrink + expand pairs at batch 64, 8 adapters, beside 1,273 us of base work. Two moves take
both launches out of the step:

- The shrink rides on the base GEMM. Each projection's weight W [N, K] is stored with every slot's A below
  it, [N + P*S*R, K] (gpu_worker/engine/lora/slot_buffers.py `attach_base`), so one cuBLAS call over the
  first P slots gives the base output and every token's y for every one of those slots; the base-only
  path multiplies by the first N rows alone, as before.
- The expand runs inside the op that reads the projection (kernels/elementwise.py): each output value gets
  y[t, slot(t), s, :rank] . B_s[slot(t), n, :rank] before anything else, rounded to the model's dtype as the
  delta buffer it replaces would round it. The norms do it per row, RoPE + cache per part of a row (q's heads in
  parts, k, v: a program each; `row_slot` once, then the part's B loaded whole first, `row_b`, and
  `expand_loaded` once y is there; past EARLY_B_PER_THREAD values a thread, `expand_cols`: B in [columns,
  ranks] blocks with y); silu_mul, whose 2 x 8,192-wide rows made that 4x slower in a trial, runs tiles of rows
  against the slots' B with tensor-core dots (`tile_b`, `tile_dot`; `expand_tile` loops them), from the lowest
  slot of a tile's rows to its highest (`tile_span`; decode tiles over P * R <= 128 take their one block from
  slot 0, past it a program per block of slots). What a kernel reads first, before its grid-dependency wait
  (kernels/launch.py's PDL), is what no kernel of the step writes: the slots and B. Eager steps hand it
  gate_up's y from the segmented shrink instead (float32 [T, S, R] with a zero stride over P): there a tile of
  64 rows is mostly one prompt's, so it reads one slot's B.

H200, batch 64, 8 adapters, P = 8, each op alone (python3 -m benchmarks.consumer_kernels): RMSNorm 1.5 -> 3.9 us,
RoPE + cache 2.2 -> 4.8, SiLU-and-multiply 1.8 -> 5.0 (more at P = 32: the tile reads every one of the P slots' B).
In a step they are bound by instruction issue and load latency, not bandwidth (ncu: ~11% of the SMs' issue peak,
L2 at 5-10% of its throughput, 64 one-row programs for the norms and RoPE): the expand's cost is the instructions
that widen and multiply a row's B (128 values a thread at 8 warps), and the round trips slot -> y, B.

The engine stacks qkv, o and down (kernels/engine_backend.STACKED_GROUPS), and gate_up while P <= 32 (graph replay,
batch 64, 8 adapters: 1,591 us against 1,626 with gate_up's LoRA kernels beside its GEMM; batch 32: 1,500 against
1,520; 32 adapters at P = 32: 1,680 against 1,740).

    pending = PendingExpand(y, b, ranks, slots)   # y: [T, P, S, R], the GEMM output's columns past N
    add_rms_norm(h, residual, w, eps, pending)    # or rope_and_cache(..., pending), silu_mul(gate_up, pending)

`expand_values` is the torch reference (and the torch ops' way of applying it).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import DOT_NATIVE, to_low


class PendingExpand(NamedTuple):
    """A projection's adapters' part, not yet expanded: y [T, P, S, R] (the shrink of every token for the first
    P slots, rank R = the slots' max rank, last two dims contiguous; zero past each slot's rank, as the stacked
    GEMM gives it), b (S tensors [slots, out_s, R], the rank dim contiguous and the same strides for every
    slice), ranks [slots] int32 (each slot's real rank), slots [T] int32 (each token's slot; -1, or a slot at or
    past P, adds nothing: the caller picks P past every token's slot)."""

    y: torch.Tensor
    b: tuple[torch.Tensor, ...]
    ranks: torch.Tensor
    slots: torch.Tensor

    def check(self, like: torch.Tensor) -> None:
        """Against the projection's output `like` [T, sum(out_s)] (or [T, ...] for q / k / v): shapes,
        dtypes, the strides the kernels assume."""
        y, b = self.y, self.b
        t = like.shape[0]
        if y.dim() != 4 or y.shape[0] != t or y.stride(3) != 1 or y.stride(2) != y.shape[3]:
            raise ValueError(f"y must be [{t}, P, S, R] with its last two dims contiguous, got {tuple(y.shape)} "
                             f"{y.stride()}")
        if len(b) != y.shape[2] or any(bs.dim() != 3 or bs.shape[0] < y.shape[1] or bs.shape[2] != y.shape[3]
                                       or bs.stride() != b[0].stride() or bs.dtype != like.dtype for bs in b):
            raise ValueError(f"b must be {y.shape[2]} tensors [slots >= {y.shape[1]}, out, {y.shape[3]}] of "
                             f"{like.dtype} with equal strides")
        if b[0].stride(2) != 1 or b[0].stride(1) != y.shape[3]:
            raise ValueError("b's rows must be R contiguous values (the kernels step through B by R)")
        if self.ranks.dtype != torch.int32 or self.ranks.shape != (b[0].shape[0],):
            raise ValueError(f"ranks must be int32 [{b[0].shape[0]}]")
        if self.slots.dtype != torch.int32 or self.slots.shape != (t,):
            raise ValueError(f"slots must be int32 [{t}]")

    def args(self) -> tuple:
        """(y, s_yt, s_yp, s_bp, ranks, slots, P) for the kernels (R, the rank dim, goes as a constexpr)."""
        y, b = self.y, self.b
        return y, y.stride(0), y.stride(1), b[0].stride(0), self.ranks, self.slots, y.shape[1]


# The ranks a per-row expand reads at a time, at most (rank_block). 8: a thread's vector of B holds a column's 8
# ranks and the sum over them stays in the thread; at 16 two threads share a column and exchange partial sums
# (H200, batch 64, 8 adapters, P = 8, the decode step's graph replay: 1,594 -> 1,537 us, batch 32 1,511 -> 1,455;
# alone, RMSNorm 4.06 -> 3.83 us, RoPE + cache 6.60 -> 5.57: python3 -m benchmarks.consumer_kernels).
RANK_BLOCK = 8


def rank_block(r: int) -> int:
    """The ranks a per-row expand reads at a time: a power of two up to RANK_BLOCK that divides R, so a block
    never crosses into the next row of B (whose loads then need no mask along the ranks and vectorize)."""
    return min(RANK_BLOCK, r & -r)


def expand_values(pending: PendingExpand, dtype: torch.dtype) -> torch.Tensor:
    """The adapters' part [T, sum(out_s)] in `dtype` (each value computed in float32 over the slot's rank,
    then rounded, as the kernels do); rows without an adapter (or with a slot at or past P) are zero."""
    y, b = pending.y, pending.b
    t, p = y.shape[0], y.shape[1]
    widths = [bs.shape[1] for bs in b]
    out = torch.zeros(t, sum(widths), dtype=torch.float32, device=y.device)
    slots = pending.slots.long()
    for slot in torch.unique(slots[(slots >= 0) & (slots < p)]).tolist():
        idx = torch.nonzero(slots == slot).flatten()
        k = int(pending.ranks[slot])
        at = 0
        for s, bs in enumerate(b):
            out[idx, at:at + widths[s]] = y[idx, slot, s, :k].float() @ bs[slot, :, :k].float().T
            at += widths[s]
    return out.to(dtype)


@triton.jit
def row_slot(row, ranks_ptr, slots_ptr, P):
    """(slot as int64, 0 where none; whether the row has an adapter; the slot's rank, 0 where none) for one row:
    looked up once per row, before any store of the kernel (a load after a store cannot be hoisted above it)."""
    slot = tl.load(slots_ptr + row)
    has = (slot >= 0) & (slot < P)
    sl = tl.where(has, slot, 0).to(tl.int64)
    return sl, has, tl.where(has, tl.load(ranks_ptr + sl), 0)


@triton.jit
def expand_cols(n, ok, y_row, b_slot, has, rank, R: tl.constexpr, RB: tl.constexpr, UNMASKED: tl.constexpr):
    """sum over r < rank of y_row[r] * b_slot[n, r] as float32 (zero where not ok), for a 1-D block n of column
    indices within the slice (masked by ok); y_row is the row's y of the slice for its slot, b_slot the slot's B
    of the slice (rows of R); has, rank from row_slot. RB (`rank_block`) divides R. B is read up to R, against y
    masked to zero past the slot's rank (the slots hold zeros there).

    UNMASKED: B is loaded without a mask: columns past the slice read its column 0 (zeroed after), rows without
    an adapter slot 0's B, against y that is zero there (rank is 0 without an adapter). Each masked load holds a
    predicate register, of which a thread has 7, and the compiler issues RoPE's 3 slices' masked loads a few at a
    time. H200, batch 64, 8 adapters, alone: RoPE + cache 5.25 -> 4.76 us; RMSNorm 3.85 -> 4.01, so it keeps
    the mask (python3 -m benchmarks.consumer_kernels)."""
    acc = tl.zeros(n.shape, tl.float32)
    if UNMASKED:
        cols = tl.where(ok, n, 0)
    else:
        # Whether the row has an adapter, as a block (a scalar in a mask trips the interpreter).
        b_ok = ok & ((n * 0 + tl.where(has, 1, 0)) > 0)
    # A static loop whose loads wait for the slot alone (not the rank, which masks y after its load): the row's
    # round trips are the slot's, then y's and B's together.
    for k0 in tl.static_range(0, R, RB):
        k = k0 + tl.arange(0, RB)
        yk = tl.where(k < rank, tl.load(y_row + k).to(tl.float32), 0.0)
        if UNMASKED:
            bt = tl.load(b_slot + cols[:, None] * R + k[None, :])
        else:
            bt = tl.load(b_slot + n[:, None] * R + k[None, :], mask=b_ok[:, None], other=0.0)
        acc += tl.sum(bt.to(tl.float32) * yk[None, :], 1)
    if UNMASKED:
        acc = tl.where(ok, acc, 0.0)
    return acc


# A row's B is loaded whole, ahead of the row's values (`row_b`, then `expand_loaded`), where it takes at most this
# many values a thread: under programmatic dependent launch (kernels/launch.py) its loads then overlap the end of
# the kernel before. Past it (wider rows, higher ranks) the expand reads B in blocks of ranks with y (expand_cols).
EARLY_B_PER_THREAD = 192


def early_b(block: int, r: int, warps: int) -> bool:
    """Whether a per-row expand over `block` columns at rank R loads its B whole, first (EARLY_B_PER_THREAD)."""
    return block * r <= EARLY_B_PER_THREAD * 32 * warps


@triton.jit
def row_b(b_slot, n, ok, has, R: tl.constexpr):
    """The row's slot's B [columns n, R] (b_slot from row_slot's slot), zero where not ok or the row has no
    adapter: loaded before anything the kernel waits for."""
    k = tl.arange(0, R)
    b_ok = ok & ((n * 0 + tl.where(has, 1, 0)) > 0)  # a scalar in a mask trips the interpreter
    return tl.load(b_slot + n[:, None] * R + k[None, :], mask=b_ok[:, None], other=0.0)


@triton.jit
def expand_loaded(bt, y_row, rank, R: tl.constexpr):
    """expand_cols over a B already loaded (row_b): sum over r < rank of y_row[r] * bt[:, r], float32."""
    k = tl.arange(0, R)
    yk = tl.where(k < rank, tl.load(y_row + k).to(tl.float32), 0.0)
    return tl.sum(bt.to(tl.float32) * yk[None, :], 1)


@triton.jit
def tile_b(b_ptr, s_bp, cols, col_ok, k0, k_end, R: tl.constexpr, BK: tl.constexpr, MASK_K: tl.constexpr):
    """B [BK, BN] of the flattened (slot, r) axis from k0 for columns cols: B[k // R, cols, k % R], zero past
    k_end where MASK_K (else every k0 + BK must lie within the slots b holds) and where not col_ok."""
    k = k0 + tl.arange(0, BK)
    b_at = b_ptr + (k // R)[:, None].to(tl.int64) * s_bp + cols[None, :].to(tl.int64) * R + (k % R)[:, None]
    if MASK_K:
        return tl.load(b_at, mask=(k < k_end)[:, None] & col_ok[None, :], other=0.0)
    return tl.load(b_at, mask=col_ok[None, :], other=0.0)


@triton.jit
def tile_y(rows, row_slots, y_ptr, y_off, s_yt, s_yp, k0, P, R: tl.constexpr, BK: tl.constexpr,
           b_dtype: tl.constexpr, EMULATED: tl.constexpr):
    """y [BM, BK] for the block of the flattened (slot, r) axis from k0: each row's y of its own slot (masked to zero
    elsewhere, and past the P slots). Only the row's own slot's y is loaded (a mask that holds over each slot's R
    values, so the loads stay vectors; H200, batch 64, P = 8: silu_mul 5.9 -> 5.0 us against loading all P slots'
    y and masking after), every rank: past a slot's rank both y (x times the slot's zero rows of A) and B are zero.
    A float32 y (the segmented shrink's, in eager steps) is rounded to B's dtype first, as lora_expand rounds it
    (a float32 B keeps it)."""
    k = k0 + tl.arange(0, BK)
    ks = k // R
    yt = tl.load(y_ptr + y_off + rows[:, None].to(tl.int64) * s_yt + ks[None, :].to(tl.int64) * s_yp
                 + (k % R)[None, :], mask=(row_slots[:, None] == ks[None, :]) & (k < P * R)[None, :], other=0.0)
    if yt.dtype != b_dtype and b_dtype != tl.float32:
        yt = to_low(yt, b_dtype, EMULATED)
    return yt


@triton.jit
def dot_y(acc, yt, bt, DOT: tl.constexpr):
    """acc + yt @ bt (tile_y's y, tile_b's B)."""
    if DOT == DOT_NATIVE:  # noqa: SIM108 (a static branch: only one dot is compiled)
        acc = tl.dot(yt, bt, acc)
    else:  # fp32 models, and the interpreter (which multiplies bf16 as raw bits): widened exactly
        acc = tl.dot(yt.to(tl.float32), bt.to(tl.float32), acc, input_precision="ieee")
    return acc


@triton.jit
def tile_dot(acc, rows, row_slots, y_ptr, y_off, s_yt, s_yp, bt, k0, P, R: tl.constexpr, BK: tl.constexpr,
             DOT: tl.constexpr, EMULATED: tl.constexpr):
    """acc + y @ bt for the block of the flattened (slot, r) axis from k0, bt its B (tile_b), y its rows' (tile_y)."""
    yt = tile_y(rows, row_slots, y_ptr, y_off, s_yt, s_yp, k0, P, R, BK, bt.dtype, EMULATED)
    return dot_y(acc, yt, bt, DOT)


@triton.jit
def expand_tile(acc, rows, row_slots, cols, col_ok, y_ptr, y_off, s_yt, s_yp, b_ptr, s_bp, P, k_lo, k_hi,
                R: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr, DOT: tl.constexpr,
                EMULATED: tl.constexpr):
    """acc [BM, BN] (float32) plus each row's y[row, slot(row), :rank] @ B[slot(row), cols, :rank].T for a tile
    of rows (row_slots: their slots, -1 for none or padding) and columns: a dot over the flattened (slot, r)
    axis of the first P slots, y masked to each row's own slot (tile_dot). Unlike the per-row expands it reads
    every rank R: y past a slot's rank must be zero (the stacked GEMM's is: the slots' A rows there are), as B is
    there. No branch on the data: the loads of every block pipeline. EVEN_K: BK divides P * R (no block runs past
    the P slots, and B's loads need no mask along k). [k_lo, k_hi): the span of the flattened axis the loop
    covers, a multiple of BK to past the last (slot, r) of the tile's rows (`tile_span`)."""
    for k0 in range(k_lo, k_hi, BK):
        bt = tile_b(b_ptr, s_bp, cols, col_ok, k0, P * R, R, BK, not EVEN_K)
        acc = tile_dot(acc, rows, row_slots, y_ptr, y_off, s_yt, s_yp, bt, k0, P, R, BK, DOT, EMULATED)
    return acc


@triton.jit
def tile_span(row_slots, P, R: tl.constexpr, BK: tl.constexpr):
    """[k_lo, k_hi) of expand_tile's flattened (slot, r) axis that a tile of rows needs: from its lowest slot's
    first rank (down to a multiple of BK) to past its highest slot's last; empty where no row has a slot
    (row_slots: -1 there). Rows of one adapter sit together in eager steps (a prompt's tokens), so a tile there
    reads one slot's B, not all P slots'."""
    lo = tl.min(tl.where(row_slots >= 0, row_slots, P), 0)
    hi = tl.max(row_slots, 0) + 1
    return lo * R // BK * BK, hi * R
