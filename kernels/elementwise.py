"""The decoder layer's elementwise work, fused: one launch where the torch path runs 2-12.

A Llama layer in plain torch is ~40 kernels, ~30 of them elementwise on a [tokens, hidden] or smaller
tensor: RMSNorm alone is eight (float, pow, mean, add, rsqrt, mul, cast, weight mul), rotary embeddings
twelve, SiLU-and-multiply two, the residual adds one each. At decode batch sizes each is a few microseconds of
GPU time and one node of the step's CUDA graph, which the host pays for at every launch. Three kernels take
their place:

    x, h = add_rms_norm(h, residual, weight, eps)   # h + residual, then RMSNorm(h) * weight
    rope_and_cache(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping)   # q, k rotated in place,
                                                    # k and v written to their cache slots
    act = silu_mul(gate_up)                         # silu(gate) * up

Each takes, optionally, the adapters' part of the projection it reads (`delta`: values [T, N] and the
tokens' slots [T], -1 for none), which the LoRA backend computed beside the base projection instead of adding
it in place (kernels/engine_backend.py): it is added, rounded to the model's dtype, to the rows with an adapter
before anything else, and rows without one never read it.

Each rounds where the torch path rounds (a bf16 model's products and sums are rounded to bf16 after every
op, as torch does), so results match it to the last bit except where a reduction's order or an exp differs
(RMSNorm's mean, SiLU's sigmoid): there by at most one unit in the last place. The torch functions they
replace (gpu_worker.engine.model: rms_norm, RotaryEmbedding.apply, write_kv, F.silu(g) * u) are their
references.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import dot_mode, emulated, next_pow2, round_low, sm_count, to_low
from .consumer_expand import (
    PendingExpand,
    dot_y,
    early_b,
    expand_cols,
    expand_loaded,
    expand_tile,
    rank_block,
    row_b,
    row_slot,
    tile_b,
    tile_dot,
    tile_span,
    tile_y,
)
from .l2_prefetch import Blocks, prefetch_share
from .launch import Launches, gdc_wait, pdl

# The adapters' part an op is handed: none, values to add (LoRADelta), or to expand first (PendingExpand); the
# kernels' LORA argument (host ints, and the same as constexprs for the kernels: Triton reads no other globals).
NO_LORA, DELTA, EXPAND = 0, 1, 2
# Warps of a norm's program (one row) or RoPE's (a part of a row) when it expands the adapters' part (H200, graph
# replay, 8 rank-16 adapters, one program a row: 4 and 16 warps ran 1,569 / 1,571 us a step at batch 64 against
# 1,558 with 8; 1,485 / 1,489 against 1,469 at batch 32).
EXPAND_WARPS = 8
_NO_LORA: tl.constexpr = tl.constexpr(NO_LORA)
_DELTA: tl.constexpr = tl.constexpr(DELTA)
_EXPAND: tl.constexpr = tl.constexpr(EXPAND)


@triton.jit
def _plus_delta(v, d_ptr, ds_ptr, row, offs, ok, HAS_DELTA: tl.constexpr, dt: tl.constexpr,
                EMULATED: tl.constexpr):
    """v (fp32, loaded from the projection's output at offs) plus the adapters' part, rounded to dt as an
    in-place add would round it; rows without an adapter (slot < 0) unchanged."""
    if HAS_DELTA:
        slot = tl.load(ds_ptr + row)
        # The row's "has an adapter" broadcast to the block's shape (a scalar in a mask trips the interpreter).
        d = tl.load(d_ptr + offs, mask=ok & ((offs * 0 + slot) >= 0), other=0.0).to(tl.float32)
        v = tl.where(slot >= 0, round_low(v + d, dt, EMULATED), v)
    return v


@triton.jit
def _plus_expand(r, row, cols, ok, bt, y_ptr, s_yt, s_yp, b_slot, sl, has, rank, R: tl.constexpr,
                 RB: tl.constexpr, EARLY_B: tl.constexpr, dt: tl.constexpr, EMULATED: tl.constexpr):
    """r (fp32, a row's columns) plus the row's adapter part expanded from its slot's y and B (bt: B loaded
    already, by row_b, where EARLY_B; b_slot: the slot's B), rounded to dt as an in-place add would round it."""
    y_row = y_ptr + row * s_yt + sl * s_yp
    d = expand_loaded(bt, y_row, rank, R) if EARLY_B else expand_cols(cols, ok, y_row, b_slot, has, rank, R, RB,
                                                                      False)
    return tl.where(has, round_low(r + round_low(d, dt, EMULATED), dt, EMULATED), r)


def _expand_args(pending: PendingExpand | None, like: torch.Tensor, slices: int) -> tuple[tuple, dict]:
    """((y, s_yt, s_yp, s_bp, ranks, slots, P, b_0 .. b_{slices-1}) kernel arguments, {R, RB} constexprs); `like`
    stands in for the tensors when there is nothing to expand."""
    if pending is None:
        return (like, 0, 0, 0, like, like, 0) + (like,) * slices, {"R": 1, "RB": 1}
    if len(pending.b) != slices:
        raise ValueError(f"the projection has {slices} slices, the pending expand {len(pending.b)}")
    pending.check(like)
    r = pending.y.shape[3]
    return pending.args() + tuple(pending.b), {"R": r, "RB": rank_block(r)}


def _pdl_launch(pending: PendingExpand | None, like: torch.Tensor) -> dict:
    """{PDL constexpr, launch_pdl}: on for ops that expand the adapters' part on Hopper on (kernels/launch.py)."""
    on = pending is not None and pdl(like)
    return {"PDL": on, "launch_pdl": on}


def _delta_args(delta, like: torch.Tensor) -> tuple:
    """(values, slots, HAS_DELTA) kernel arguments; the values must be laid out as `like` (same strides)."""
    if delta is None or isinstance(delta, PendingExpand):
        return like, like, False
    values, slots = delta
    if values.shape != like.shape or values.stride() != like.stride() or slots.shape != (like.shape[0],) \
            or slots.dtype != torch.int32:
        raise ValueError(f"delta must be laid out as its projection's output {tuple(like.shape)} "
                         f"{like.stride()}, with int32 slots [{like.shape[0]}]; got {tuple(values.shape)} "
                         f"{values.stride()}, {slots.dtype} {tuple(slots.shape)}")
    return values, slots, True


@triton.jit
def _add_rms_norm_kernel(h_ptr, r_ptr, w_ptr, x_ptr, hout_ptr, d_ptr, ds_ptr, N, eps,
                         s_h, s_r, s_x, s_ho,
                         y_ptr, s_yt, s_yp, s_bp, ranks_ptr, es_ptr, P, b_ptr,
                         pf_base, pf_stride, pf_nbytes, pf_per_block, pf_total, pf_per_program,
                         HAS_RESIDUAL: tl.constexpr, LORA: tl.constexpr, BLOCK: tl.constexpr,
                         EMULATED: tl.constexpr, R: tl.constexpr, RB: tl.constexpr, PREFETCH: tl.constexpr,
                         EARLY_B: tl.constexpr, PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    if PREFETCH:  # bytes a later kernel reads, asked into L2 (kernels/l2_prefetch.py)
        prefetch_share(pf_base, pf_stride, pf_nbytes, pf_per_block, pf_total, pf_per_program, row, 256)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    dt: tl.constexpr = x_ptr.dtype.element_ty
    # What no kernel of the step writes first (the weight, the row's slot and its B): under PDL it overlaps the
    # kernel before, up to the wait.
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    if LORA == _EXPAND:
        sl, has, rank = row_slot(row, ranks_ptr, es_ptr, P)
        bt = row_b(b_ptr + sl * s_bp, cols, ok, has, R) if EARLY_B else b_ptr
    if PDL:
        gdc_wait()
    h = tl.load(h_ptr + row * s_h + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * s_r + cols, mask=ok, other=0.0).to(tl.float32)
        if LORA == _EXPAND:
            r = _plus_expand(r, row, cols, ok, bt, y_ptr, s_yt, s_yp, b_ptr + sl * s_bp, sl, has, rank, R, RB,
                             EARLY_B, dt, EMULATED)
        else:
            r = _plus_delta(r, d_ptr, ds_ptr, row, row * s_r + cols, ok, LORA == _DELTA, dt, EMULATED)
        h = round_low(h + r, dt, EMULATED)  # the sum in the model's dtype, as torch rounds it
        tl.store(hout_ptr + row * s_ho + cols, h.to(dt), mask=ok)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, 0) / N + eps)
    y = round_low(h * rstd, dt, EMULATED)  # normalized in fp32, then cast (Hugging Face's order)
    tl.store(x_ptr + row * s_x + cols, to_low(w * y, dt, EMULATED), mask=ok)


_add_rms_norm = Launches(_add_rms_norm_kernel)

def add_rms_norm(h: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float, delta=None, prefetch: Blocks | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(h + residual) * weight, h + residual) for h, residual [T, N] (rows contiguous), weight [N];
    residual None: (RMSNorm(h) * weight, h). delta: the adapters' part of residual, as values or pending (see
    the module doc). prefetch: bytes to ask into L2 on the way (CUDA only; the programs share the asking)."""
    t, n = h.shape
    if h.stride(1) != 1 or weight.shape != (n,) or (residual is not None and (residual.shape != h.shape
                                                                              or residual.stride(1) != 1)):
        raise ValueError(f"h {tuple(h.shape)}, residual, weight {tuple(weight.shape)}: rows must be contiguous "
                         "and the shapes agree")
    if delta is not None and residual is None:
        raise ValueError("a delta is the adapters' part of the residual: it needs one")
    x = torch.empty_like(h)
    h_out = torch.empty_like(h) if residual is not None else h
    if t:
        r = residual if residual is not None else h
        d, ds, has_delta = _delta_args(delta, r)
        pending = delta if isinstance(delta, PendingExpand) else None
        # Expanding, a row's B tile is [N, RB] values: 8 warps keep it in registers at N = 4,096.
        warps = EXPAND_WARPS if pending is not None else 8 if n > 4096 else 4
        args, consts = _expand_args(pending, r, 1)
        asks = prefetch is not None and h.is_cuda
        block = next_pow2(n)
        pf = prefetch.args(t) if asks else (0, 0, 1, 1, 1, 0)
        _add_rms_norm((t,), h, r, weight, x, h_out, d, ds, n, eps, h.stride(0), r.stride(0), x.stride(0),
                      h_out.stride(0), *args, *pf, HAS_RESIDUAL=residual is not None,
                      LORA=EXPAND if pending is not None else DELTA if has_delta else NO_LORA, BLOCK=block,
                      EMULATED=emulated(h), **consts, PREFETCH=asks,
                      EARLY_B=pending is not None and early_b(block, consts["R"], warps),
                      **_pdl_launch(pending, h), num_warps=warps)
    return x, h_out


@triton.jit
def _row_cols(n_heads, HEADS: tl.constexpr, HALF: tl.constexpr):
    """(the columns of a row of n_heads heads of 2 HALF values as one 1-D block, which are real)."""
    n = tl.arange(0, HEADS * 2 * HALF)
    return n, n < n_heads * 2 * HALF


@triton.jit
def _expanded_halves(x_ptr, row, s_t, s_h, n_heads, y_row, b_slot, bt, has, rank, HEADS: tl.constexpr,
                     HALF: tl.constexpr, dt: tl.constexpr, EMULATED: tl.constexpr, R: tl.constexpr,
                     RB: tl.constexpr, EARLY_B: tl.constexpr):
    """x[row] (n_heads x 2 HALF values, HEADS >= n_heads a power of two) plus the adapters' part (y_row, b_slot,
    has, rank: consumer_expand.row_slot's; bt the row's B loaded already where EARLY_B), rounded as an in-place add
    rounds it, as its two halves [HEADS, HALF] (float32). The row is one 1-D block, whose expand is a 2-D
    [columns, ranks] tile (a 3-D one over heads ran 7x slower); its halves are split in registers, not stored and
    read back."""
    n, ok = _row_cols(n_heads, HEADS, HALF)
    v = tl.load(x_ptr + row * s_t + (n // (2 * HALF)) * s_h + n % (2 * HALF), mask=ok, other=0.0).to(tl.float32)
    if EARLY_B:  # noqa: SIM108 (a static branch: only one is compiled)
        d = expand_loaded(bt, y_row, rank, R)
    else:
        d = expand_cols(n, ok, y_row, b_slot, has, rank, R, RB, True)
    v = tl.where(has, round_low(v + round_low(d, dt, EMULATED), dt, EMULATED), v)
    return tl.split(tl.permute(tl.reshape(v, [HEADS, 2, HALF]), (0, 2, 1)))


@triton.jit
def _row_b(b_slot, n_heads, has, HEADS: tl.constexpr, HALF: tl.constexpr, R: tl.constexpr,
           EARLY_B: tl.constexpr):
    """The row's B of a slice of n_heads heads where EARLY_B (consumer_expand.row_b); else zeros, unused."""
    n, ok = _row_cols(n_heads, HEADS, HALF)
    if EARLY_B:
        return row_b(b_slot, n, ok, has, R)
    return tl.zeros([HEADS * 2 * HALF, R], b_slot.dtype.element_ty)


@triton.jit
def _rotated(x1, x2, cos1, sin1, cos2, sin2, dt: tl.constexpr, EMULATED: tl.constexpr):
    """The halves of x * cos + rotate_half(x) * sin in dt, with torch's roundings."""
    o1 = to_low(round_low(x1 * cos1, dt, EMULATED) + round_low(-x2 * sin1, dt, EMULATED), dt, EMULATED)
    o2 = to_low(round_low(x2 * cos2, dt, EMULATED) + round_low(x1 * sin2, dt, EMULATED), dt, EMULATED)
    return o1, o2


@triton.jit
def _rotate(x_ptr, d_ptr, ds_ptr, row, heads, s_t, s_h, d1, cos1, sin1, cos2, sin2, n_heads, dt: tl.constexpr,
            HALF: tl.constexpr, HAS_DELTA: tl.constexpr, EMULATED: tl.constexpr):
    """x[row, heads, :] (plus the adapters' part) <- x * cos + rotate_half(x) * sin, in place, with torch's
    roundings; returns the rotated halves (for the cache)."""
    ok = (heads < n_heads)[:, None]
    offs = row * s_t + heads[:, None] * s_h + d1[None, :]
    base = x_ptr + offs
    x1 = tl.load(base, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=ok, other=0.0).to(tl.float32)
    x1 = _plus_delta(x1, d_ptr, ds_ptr, row, offs, ok, HAS_DELTA, dt, EMULATED)
    x2 = _plus_delta(x2, d_ptr, ds_ptr, row, offs + HALF, ok, HAS_DELTA, dt, EMULATED)
    o1, o2 = _rotated(x1, x2, cos1, sin1, cos2, sin2, dt, EMULATED)
    tl.store(base, o1, mask=ok)
    tl.store(base + HALF, o2, mask=ok)
    return o1, o2


@triton.jit
def _rope_part(x_ptr, cache_ptr, row, s_t, s_h, n_heads, dst, y_row, b_slot, has, rank, cos1, sin1, cos2, sin2,
               HEADS: tl.constexpr, HALF: tl.constexpr, dt: tl.constexpr, EMULATED: tl.constexpr, R: tl.constexpr,
               RB: tl.constexpr, EARLY_B: tl.constexpr, PDL: tl.constexpr, ROTATE: tl.constexpr,
               CACHE: tl.constexpr):
    """Heads [0, n_heads) of a row's q, k or v (x_ptr at the part's first head) plus the adapters' part (y_row,
    b_slot: the part's), rotated where ROTATE, back in place and, where CACHE, to the row's cache slot (dst): the
    part's B first, then the wait, the values, the stores."""
    heads = tl.arange(0, HEADS)
    ok = (heads < n_heads)[:, None]
    d1 = tl.arange(0, HALF)
    bt = _row_b(b_slot, n_heads, has, HEADS, HALF, R, EARLY_B)
    if PDL:
        gdc_wait()
    x1, x2 = _expanded_halves(x_ptr, row, s_t, s_h, n_heads, y_row, b_slot, bt, has, rank, HEADS, HALF, dt, EMULATED,
                              R, RB, EARLY_B)
    if ROTATE:
        x1, x2 = _rotated(x1, x2, cos1, sin1, cos2, sin2, dt, EMULATED)
    at = x_ptr + row * s_t + heads[:, None] * s_h + d1[None, :]
    tl.store(at, x1.to(dt), mask=ok)
    tl.store(at + HALF, x2.to(dt), mask=ok)
    if CACHE:
        tl.store(cache_ptr + dst, x1.to(dt), mask=ok)
        tl.store(cache_ptr + dst + HALF, x2.to(dt), mask=ok)


@triton.jit
def _rope_cache_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, slot_ptr,
                       dq_ptr, dk_ptr, dv_ptr, ds_ptr,
                       H, KVH, s_qt, s_qh, s_kt, s_kh, s_vt, s_vh, s_cos, s_cs, s_ch,
                       y_ptr, s_yt, s_yp, s_bp, ranks_ptr, es_ptr, P, bq_ptr, bk_ptr, bv_ptr,
                       H_PAD: tl.constexpr, KVH_PAD: tl.constexpr, HALF: tl.constexpr,
                       LORA: tl.constexpr, EMULATED: tl.constexpr, R: tl.constexpr, RB: tl.constexpr,
                       EARLY_B: tl.constexpr, PDL: tl.constexpr, Q_PARTS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    dt: tl.constexpr = q_ptr.dtype.element_ty
    d1 = tl.arange(0, HALF)
    p = tl.load(pos_ptr + row)
    cos1 = tl.load(cos_ptr + p * s_cos + d1).to(tl.float32)[None, :]
    cos2 = tl.load(cos_ptr + p * s_cos + HALF + d1).to(tl.float32)[None, :]
    sin1 = tl.load(sin_ptr + p * s_cos + d1).to(tl.float32)[None, :]
    sin2 = tl.load(sin_ptr + p * s_cos + HALF + d1).to(tl.float32)[None, :]
    # The new key and value go to their cache slot (the cache is [blocks * block_size, KVH, D] flat).
    slot = tl.load(slot_ptr + row).to(tl.int64)
    heads = tl.arange(0, H_PAD)
    kvh = tl.arange(0, KVH_PAD)
    ok = (kvh < KVH)[:, None]
    dst = slot * s_cs + kvh[:, None] * s_ch + d1[None, :]
    v_offs = row * s_vt + kvh[:, None] * s_vh + d1[None, :]
    if LORA == _EXPAND:
        # A program per part of the row (rope_parts): q's heads in Q_PARTS parts, then k, then v. Each loads what
        # no kernel of the step writes (cos / sin, the slot, its part's B) first: under PDL it overlaps the kernel
        # before; then all its loads before its first store (a load after a store waits for it).
        sl, has, rank = row_slot(row, ranks_ptr, es_ptr, P)
        y_row = y_ptr + row * s_yt + sl * s_yp
        part = tl.program_id(1)
        if part < Q_PARTS:  # q's heads [head0, head0 + QH), rotated
            QH: tl.constexpr = H_PAD // Q_PARTS
            head0 = part * QH
            _rope_part(q_ptr + head0 * s_qh, kc_ptr, row, s_qt, s_qh, H - head0, dst, y_row,
                       bq_ptr + sl * s_bp + head0 * (2 * HALF * R), has, rank, cos1, sin1, cos2, sin2, QH, HALF, dt,
                       EMULATED, R, RB, EARLY_B, PDL, True, False)
        elif part == Q_PARTS:  # k, rotated, to k and the cache
            _rope_part(k_ptr, kc_ptr, row, s_kt, s_kh, KVH, dst, y_row + R, bk_ptr + sl * s_bp, has, rank, cos1, sin1,
                       cos2, sin2, KVH_PAD, HALF, dt, EMULATED, R, RB, EARLY_B, PDL, True, True)
        else:  # v to the cache, and back into v for whoever reads it there
            _rope_part(v_ptr, vc_ptr, row, s_vt, s_vh, KVH, dst, y_row + 2 * R, bv_ptr + sl * s_bp, has, rank, cos1,
                       sin1, cos2, sin2, KVH_PAD, HALF, dt, EMULATED, R, RB, EARLY_B, PDL, False, True)
    else:
        has_delta: tl.constexpr = LORA == _DELTA
        _rotate(q_ptr, dq_ptr, ds_ptr, row, heads, s_qt, s_qh, d1, cos1, sin1, cos2, sin2, H, dt, HALF, has_delta,
                EMULATED)
        k1, k2 = _rotate(k_ptr, dk_ptr, ds_ptr, row, kvh, s_kt, s_kh, d1, cos1, sin1, cos2, sin2, KVH, dt, HALF,
                         has_delta, EMULATED)
        tl.store(kc_ptr + dst, k1, mask=ok)
        tl.store(kc_ptr + dst + HALF, k2, mask=ok)
        if has_delta:  # v plus the adapters' part goes to the cache, and back into v for whoever reads it there
            for half in tl.static_range(2):
                o = v_offs + half * HALF
                v = _plus_delta(tl.load(v_ptr + o, mask=ok, other=0.0).to(tl.float32), dv_ptr, ds_ptr, row, o, ok,
                                has_delta, dt, EMULATED).to(dt)
                tl.store(v_ptr + o, v, mask=ok)
                tl.store(vc_ptr + dst + half * HALF, v, mask=ok)
        else:
            v = v_ptr + v_offs
            tl.store(vc_ptr + dst, tl.load(v, mask=ok, other=0.0), mask=ok)
            tl.store(vc_ptr + dst + HALF, tl.load(v + HALF, mask=ok, other=0.0), mask=ok)


_rope_cache = Launches(_rope_cache_kernel)

# RoPE + cache expanding the adapters' part runs a program per part of a row: q's heads in up to ROPE_Q_PARTS parts
# about as wide as k's, then k, then v (each with its cache write), so a row's expand (its B loaded whole, then
# multiplied) is spread over 6 SMs (Llama-3.2-1B) instead of one. H200, 8 adapters in P = 8 slots, alone
# (python3 -m benchmarks.consumer_kernels): batch 64 3.54 -> 2.42 us against 2.13 base (q in 2 parts beside k and v
# together: 2.89), batch 32 3.43 -> 2.02 against 2.07; graph replay of the step (benchmarks.step_breakdown) batch
# 64 1,432 -> 1,417-1,425 us, batch 32 1,352 -> 1,336-1,340. With q in 2 parts, parts of 4 warps ran 2.79 us alone
# against 2.90 at 8 (EXPAND_WARPS), and 1,425 against 1,421 in the step.
ROPE_Q_PARTS = 4


def rope_parts(h_pad: int, kvh_pad: int) -> int:
    """How many programs RoPE + cache splits q's h_pad heads into when it expands: a power of two, up to
    ROPE_Q_PARTS, each part at least kvh_pad heads wide where there are that many."""
    return min(ROPE_Q_PARTS, max(1, h_pad // kvh_pad))


def rope_and_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                   cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, delta=None) -> None:
    """Rotary embedding (Hugging Face's rotate-half layout) applied to q [T, H, D] and k [T, KVH, D] in
    place, from cos / sin tables [max_positions, D] at positions [T]; then k and v [T, KVH, D] written to
    k_cache / v_cache [num_blocks, block_size, KVH, D] at the flat slots slot_mapping [T] (int64).
    delta: the adapters' part of (q, k, v), three tensors laid out as they are, and the slots; or pending
    (consumer_expand.PendingExpand, slices q, k, v): added to q, k and v (in place) first."""
    t, h, d = q.shape
    kvh = k.shape[1]
    if (k.shape != (t, kvh, d) or v.shape != k.shape or d % 2 or d & (d - 1) or cos.shape != sin.shape
            or cos.shape[1] != d or k_cache.shape[2:] != (kvh, d) or v_cache.shape != k_cache.shape):
        raise ValueError(f"shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"cos {tuple(cos.shape)}, cache {tuple(k_cache.shape)} (head_dim a power of two)")
    if q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1 or not k_cache.is_contiguous() \
            or not v_cache.is_contiguous() or not cos.is_contiguous() or not sin.is_contiguous():
        raise ValueError("head dimensions, caches and cos / sin tables must be contiguous")
    if t == 0:
        return
    kc = k_cache.view(-1, kvh, d)
    pending = delta if isinstance(delta, PendingExpand) else None
    if delta is None or pending is not None:
        dq = dk = dv = ds = None
    else:
        (dq, dk, dv), slots = delta
        dq, ds, _ = _delta_args((dq, slots), q)
        dk, _, _ = _delta_args((dk, slots), k)
        dv, _, _ = _delta_args((dv, slots), v)
    args, consts = _expand_args(pending, q, 3)
    # expanding, a program per part of a row: q's parts, k, v (rope_parts); else one a row
    q_parts = rope_parts(next_pow2(h), next_pow2(kvh)) if pending is not None else 0
    _rope_cache(
        (t, q_parts + 2 if q_parts else 1), q, k, v, positions, cos, sin, kc, v_cache.view(-1, kvh, d), slot_mapping,
        *((q, q, q, q) if dq is None else (dq, dk, dv, ds)),
        h, kvh, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        kc.stride(0), kc.stride(1), *args,
        H_PAD=next_pow2(h), KVH_PAD=next_pow2(kvh), HALF=d // 2,
        LORA=EXPAND if pending is not None else NO_LORA if delta is None else DELTA,
        EMULATED=emulated(q), **consts,
        EARLY_B=pending is not None and early_b(next_pow2(h) // max(q_parts, 1) * d, consts["R"], EXPAND_WARPS),
        Q_PARTS=q_parts, **_pdl_launch(pending, q), num_warps=EXPAND_WARPS if pending is not None else 4,
    )


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, d_ptr, ds_ptr, N, s_gu, s_o, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr,
                     EMULATED: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    dt: tl.constexpr = out_ptr.dtype.element_ty
    g = tl.load(gu_ptr + row * s_gu + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * s_gu + N + cols, mask=ok, other=0.0).to(tl.float32)
    g = _plus_delta(g, d_ptr, ds_ptr, row, row * s_gu + cols, ok, HAS_DELTA, dt, EMULATED)
    u = _plus_delta(u, d_ptr, ds_ptr, row, row * s_gu + N + cols, ok, HAS_DELTA, dt, EMULATED)
    act = round_low(g / (1.0 + tl.exp(-g)), dt, EMULATED)  # F.silu, rounded as torch does
    tl.store(out_ptr + row * s_o + cols, to_low(act * u, dt, EMULATED), mask=ok)


_silu_mul = Launches(_silu_mul_kernel)


@triton.jit
def _silu_out(g, u, dg, du, has, out_at, ok, dt: tl.constexpr, EMULATED: tl.constexpr):
    """silu(g + dg) * (u + du) stored at out_at (rows without an adapter: has False, their values as they are), the
    adapters' parts rounded as the in-place adds they replace would be."""
    g = tl.where(has, round_low(g + round_low(dg, dt, EMULATED), dt, EMULATED), g)
    u = tl.where(has, round_low(u + round_low(du, dt, EMULATED), dt, EMULATED), u)
    act = round_low(g / (1.0 + tl.exp(-g)), dt, EMULATED)
    tl.store(out_at, to_low(act * u, dt, EMULATED), mask=ok)


# silu_mul expands a pending adapters' part for all rows of a column tile at once up to this many rows (decode
# steps: the stacked GEMMs' P slots mixed in any order); past it, in tiles of EXPAND_TILE_ROWS rows.
EXPAND_MAX_ROWS = 128
EXPAND_TILE_ROWS = 64
# Tiles of at least this many rows (up to EXPAND_MAX_ROWS) past BK = 128 (P > 8 slots at rank 16): a program per
# column tile and block of 128 / R slots, each taking the rows of its slots, one block each with its B loaded
# before the wait, in place of one looping over the blocks. H200, graph replay (scratch A/B, two engines): batch
# 64, 32 adapters at P = 32 1,659 us against 1,718, 16 at P = 16 1,528 against 1,567 (alone, 10.9 us against
# 11.9); batch 32 (tiles of 32 rows) 1,588 against 1,550 (alone 12.1 against 9.0), so not there.
EXPAND_GROUPED_MIN_ROWS = 64
# Where P * R <= BK (P <= 8 at rank 16): the program's one block from slot 0, not from its rows' lowest slot, so
# B's loads need not wait for the slots and a reduction over them (SASS: 1,832 -> 1,464 instructions, 17 -> 9
# barriers; H200, graph replay, 8 adapters: batch 64 1,436 -> 1,428 us, batch 32 1,356 -> 1,349,
# python3 -m benchmarks.step_breakdown --adapters 1,8 --compare-set kernels.elementwise.EXPAND_ONE_BLOCK=False).
EXPAND_ONE_BLOCK = True
# Decode tiles (up to EXPAND_MAX_ROWS rows): columns a program (in slot groups, EXPAND_GROUPED_BN), the most of the
# (slot, rank) axis a block covers, warps. H200, alone (python3 -m benchmarks.consumer_kernels --set ...), B in L2:
# P = 8, BN 64 against 32: batch 64 4.16 us against 4.43, batch 32 3.65 against 4.37; P = 32, batch 32 (one
# program looping over the blocks) 8.05 against 9.06; in slot groups (batch 64) 11.57 against 10.95. BN 16, 2 or 8
# warps, BK 32 or 64: none better. In the step BN 64 is within the noise (graph replay, two engines: batch 32, 8
# adapters 1,363 us against 1,375, 32 adapters 1,527 against 1,530; batch 64, 8 adapters 1,448 against 1,444, base
# 1,283 against 1,275).
EXPAND_DECODE_BN, EXPAND_GROUPED_BN, EXPAND_DECODE_BK, EXPAND_DECODE_WARPS = 64, 32, 128, 4
# The one-block tiles' warps. H200, P = 8, alone: batch 64 4.22 us at 4 warps, 3.75 at 8, 3.92 at 16; batch 32 3.54,
# 3.41, 4.40; graph replay, 8 adapters, batch 64 1,418 -> 1,406 us, batch 32 1,337 -> 1,330. At P = 32 (slot groups,
# or a loop) 8 warps were slower (alone 10.95 -> 11.55 us at batch 64; replay 1,638 -> 1,646). Tiles of fewer rows
# (BM 32 or 16 at batch 64: 4.87, 6.35 us; more programs, each reading all of B) and a block of 64 of the (slot,
# rank) axis in slot groups at P = 8 (4.38 us; 32: 5.41) were slower too.
EXPAND_ONE_BLOCK_WARPS = 8


# T (rows) unspecialised: it only bounds masks, and the warm-up's row counts then cover every prompt step's
# (specialised, a count past EXPAND_MAX_ROWS that is not a multiple of 16 compiled a kernel inside a served step,
# 1-4 s on an H200 host).
@triton.jit(do_not_specialize=["T"])
def _silu_mul_expand_kernel(gu_ptr, out_ptr, T, N, s_gu, s_o, y_ptr, s_yt, s_yp, s_bp, ranks_ptr, es_ptr, P,
                            bg_ptr, bu_ptr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                            EVEN_K: tl.constexpr, DOT: tl.constexpr, EMULATED: tl.constexpr, R: tl.constexpr,
                            RB: tl.constexpr, PDL: tl.constexpr, GROUPS: tl.constexpr):
    # One program per BM rows and BN columns: each present slot's B tile is read once per tile, not once per row
    # (consumer_expand.expand_tile). GROUPS 0: over the slots from the tile's lowest to its highest, in blocks of
    # BK. GROUPS 1: P * R <= BK, one block from slot 0, so B's loads wait for nothing. GROUPS > 1: a program per
    # block of BK // R slots too (program_id 2), which takes only the rows of those slots (the first block also
    # the rows without an adapter): no row's expand is split, and no program loops over blocks.
    rows = tl.program_id(1) * BM + tl.arange(0, BM)
    row_ok = rows < T
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    col_ok = cols < N
    dt: tl.constexpr = out_ptr.dtype.element_ty
    # What no kernel of the step writes first (the rows' slots, the B of the span's first block): under PDL it
    # overlaps the kernel before, up to the wait. In decode steps that block is the whole span (GROUPS > 0), and
    # in prompts' tiles (one slot) most often.
    slots = tl.load(es_ptr + rows, mask=row_ok, other=-1)
    slots = tl.where((slots >= 0) & (slots < P), slots, -1)
    if GROUPS == 0:
        k_lo, k_hi = tile_span(slots, P, R, BK)
    elif GROUPS == 1:
        k_lo, k_hi = 0, P * R
    else:
        group = tl.program_id(2)
        k_lo = group * BK
        k_hi = k_lo + BK
        row_ok &= tl.where(slots >= 0, slots // (BK // R), 0) == group
        if tl.max(row_ok.to(tl.int32), 0) == 0:
            return
    ok = row_ok[:, None] & col_ok[None, :]
    bg = tile_b(bg_ptr, s_bp, cols, col_ok, k_lo, k_hi, R, BK, True)
    bu = tile_b(bu_ptr, s_bp, cols, col_ok, k_lo, k_hi, R, BK, True)
    if PDL:
        gdc_wait()
    at = rows[:, None].to(tl.int64) * s_gu + cols[None, :]
    g = tl.load(gu_ptr + at, mask=ok, other=0.0).to(tl.float32)  # first: their latency beside the expand's
    u = tl.load(gu_ptr + at + N, mask=ok, other=0.0).to(tl.float32)
    dg = tile_dot(tl.zeros([BM, BN], tl.float32), rows, slots, y_ptr, 0, s_yt, s_yp, bg, k_lo, P, R, BK, DOT,
                  EMULATED)
    du = tile_dot(tl.zeros([BM, BN], tl.float32), rows, slots, y_ptr, R, s_yt, s_yp, bu, k_lo, P, R, BK, DOT,
                  EMULATED)
    if GROUPS == 0:
        dg = expand_tile(dg, rows, slots, cols, col_ok, y_ptr, 0, s_yt, s_yp, bg_ptr, s_bp, P, k_lo + BK, k_hi, R,
                         BK, EVEN_K, DOT, EMULATED)
        du = expand_tile(du, rows, slots, cols, col_ok, y_ptr, R, s_yt, s_yp, bu_ptr, s_bp, P, k_lo + BK, k_hi, R,
                         BK, EVEN_K, DOT, EMULATED)
    _silu_out(g, u, dg, du, (slots >= 0)[:, None], out_ptr + rows[:, None].to(tl.int64) * s_o + cols[None, :], ok,
              dt, EMULATED)


_silu_mul_expand = Launches(_silu_mul_expand_kernel)

# Prompt steps (past EXPAND_MAX_ROWS rows): a program per row tile and share of the column tiles, which it walks in a
# software-pipelined loop (SILU_PROMPT_STAGES loads deep, SILU_PROMPT_SHALLOW_STAGES where it walks few) with the
# rows' slots and y loaded once; about SILU_PROMPT_PROGRAMS_PER_SM programs an SM in all. A program per 64 x 64 tile
# (SILU_PROMPT_LOOP False) took 214 us at 8,192 rows against 97 for silu_mul with nothing to expand: two round
# trips a tile (slots, then B and the values) at a few programs an SM. H200, rank 16, prompts of 128 tokens over
# 8 adapters, alone (`python3 -m benchmarks.consumer_kernels --batches 8192,...,256 --prompt-rows 128 --set ...`):
# 8,192 rows 214.8 -> 130.0 us, 4,096 110.3 -> 70.1, 2,048 57.2 -> 39.6, 1,024 30.3 -> 22.0, 512 11.8 -> 10.3,
# 256 7.6 -> 7.0. Swept: BN 16-128 (32 best from 2,048 rows up), 2-32 programs an SM (8), 1-4 stages (1: 298 us
# at 8,192; 2 best where a program walks 1-2 tiles, 3 where it walks 29). In the engine, 8 prompts of 2,048
# tokens with 8 adapters (`python3 -m benchmarks.profile_prefill --set ...`, rounds interleaved): 84.1 -> 82.1 ms
# (base 74.0); 64 prompts of 128: 36.4 -> 35.5 (base 31.4).
SILU_PROMPT_LOOP = True
SILU_PROMPT_STAGES = 3
SILU_PROMPT_SHALLOW_STAGES = 2  # where a program walks fewer than SILU_PROMPT_DEEP_MIN_TILES tiles
SILU_PROMPT_DEEP_MIN_TILES = 8
SILU_PROMPT_PROGRAMS_PER_SM = 8
SILU_PROMPT_BN = 32


@triton.jit(do_not_specialize=["T"])
def _silu_mul_prompt_expand_kernel(gu_ptr, out_ptr, T, N, s_gu, s_o, y_ptr, s_yt, s_yp, s_bp, ranks_ptr, es_ptr, P,
                                   bg_ptr, bu_ptr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                                   EVEN_K: tl.constexpr, DOT: tl.constexpr, EMULATED: tl.constexpr,
                                   R: tl.constexpr, RB: tl.constexpr, PDL: tl.constexpr, STAGES: tl.constexpr):
    # A program per BM rows (program_id 1) walks every num_programs(0)-th column tile. The rows' slots, and where
    # their span is one block of BK (a prompt's rows: one slot) their y, are loaded once; the loop over the
    # column tiles then has no dependence between iterations and its loads are pipelined STAGES deep. A tile
    # whose rows span more (rows of prompts of far-apart slots) walks the blocks in a plain loop.
    rows = tl.program_id(1) * BM + tl.arange(0, BM)
    row_ok = rows < T
    dt: tl.constexpr = out_ptr.dtype.element_ty
    slots = tl.load(es_ptr + rows, mask=row_ok, other=-1)
    slots = tl.where((slots >= 0) & (slots < P), slots, -1)
    k_lo, k_hi = tile_span(slots, P, R, BK)
    if PDL:
        gdc_wait()
    has = (slots >= 0)[:, None]
    g_rows = gu_ptr + rows[:, None].to(tl.int64) * s_gu
    o_rows = out_ptr + rows[:, None].to(tl.int64) * s_o
    tiles = tl.cdiv(N, BN)
    if k_hi - k_lo <= BK:
        yg = tile_y(rows, slots, y_ptr, 0, s_yt, s_yp, k_lo, P, R, BK, bg_ptr.dtype.element_ty, EMULATED)
        yu = tile_y(rows, slots, y_ptr, R, s_yt, s_yp, k_lo, P, R, BK, bg_ptr.dtype.element_ty, EMULATED)
        for j in tl.range(tl.program_id(0), tiles, tl.num_programs(0), num_stages=STAGES):
            cols = j * BN + tl.arange(0, BN)
            col_ok = cols < N
            ok = row_ok[:, None] & col_ok[None, :]
            g = tl.load(g_rows + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            u = tl.load(g_rows + N + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            bg = tile_b(bg_ptr, s_bp, cols, col_ok, k_lo, P * R, R, BK, not EVEN_K)
            bu = tile_b(bu_ptr, s_bp, cols, col_ok, k_lo, P * R, R, BK, not EVEN_K)
            dg = dot_y(tl.zeros([BM, BN], tl.float32), yg, bg, DOT)
            du = dot_y(tl.zeros([BM, BN], tl.float32), yu, bu, DOT)
            _silu_out(g, u, dg, du, has, o_rows + cols[None, :], ok, dt, EMULATED)
    else:
        for j in range(tl.program_id(0), tiles, tl.num_programs(0)):
            cols = j * BN + tl.arange(0, BN)
            col_ok = cols < N
            ok = row_ok[:, None] & col_ok[None, :]
            g = tl.load(g_rows + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            u = tl.load(g_rows + N + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            dg = expand_tile(tl.zeros([BM, BN], tl.float32), rows, slots, cols, col_ok, y_ptr, 0, s_yt, s_yp, bg_ptr,
                             s_bp, P, k_lo, k_hi, R, BK, EVEN_K, DOT, EMULATED)
            du = expand_tile(tl.zeros([BM, BN], tl.float32), rows, slots, cols, col_ok, y_ptr, R, s_yt, s_yp, bu_ptr,
                             s_bp, P, k_lo, k_hi, R, BK, EVEN_K, DOT, EMULATED)
            _silu_out(g, u, dg, du, has, o_rows + cols[None, :], ok, dt, EMULATED)


_silu_mul_prompt_expand = Launches(_silu_mul_prompt_expand_kernel)

# Decode steps over at least this many slots expand a row's part a program, per column tile, as the norms do
# (`_silu_mul_row_expand_kernel`), instead of tiles of rows against blocks of the slots' B. Past 8 slots the tiles'
# dots are mostly other slots' zeros: at P = 32, 64 rows, ncu read the tile kernel 13.5 us in the step (L1/TEX 78%
# busy, DRAM 4%, 26% occupancy: 86 registers and 33 KB of shared memory a program, 1.55 waves). H200, N = 8,192,
# rank 16, alone (benchmarks.consumer_kernels): P = 32, 64 rows 11.4 -> 6.2 us, 32 rows 8.1 -> 3.9; P = 8, 64 rows
# 3.8 -> 6.0, 32 rows 3.4 -> 3.6 (there a tile's rows share their slots' B). In the step (graph replay, 16 layers):
# batch 64 over 32 adapters 1.625 -> 1.536 ms, batch 32 1.492 -> 1.419; over 8 (at P = 8) 1.406 -> 1.428 and equal.
# BN 256 or 1,024, or 4 warps, were slower at P = 32 (6.7-7.8 us). A program per (column tile, slot) with its
# rows found in registers was slower than the tiles (alone, 18.3 us against 11.4).
SILU_ROW_EXPAND_MIN_SLOTS = 16
# Columns of a slice a row's program covers, and its warps (at rank 16 its two B tiles, [BN, 16] each, are then 64
# values a thread, loaded before the grid-dependency wait: consumer_expand.early_b).
SILU_ROW_EXPAND_BN, SILU_ROW_EXPAND_WARPS = 512, 8


@triton.jit
def _silu_mul_row_expand_kernel(gu_ptr, out_ptr, N, s_gu, s_o, y_ptr, s_yt, s_yp, s_bp, ranks_ptr, es_ptr, P,
                                bg_ptr, bu_ptr, BN: tl.constexpr, EMULATED: tl.constexpr, R: tl.constexpr,
                                RB: tl.constexpr, EARLY_B: tl.constexpr, PDL: tl.constexpr):
    # One program per row and BN columns of each slice: the row's slot's B tiles for those columns (consumer_expand's
    # per-row expand, as the norms run it), gate's then up's, y of the row's slot; rows without an adapter read none.
    row = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    ok = cols < N
    dt: tl.constexpr = out_ptr.dtype.element_ty
    sl, has, rank = row_slot(row, ranks_ptr, es_ptr, P)
    if EARLY_B:
        bg = row_b(bg_ptr + sl * s_bp, cols, ok, has, R)
        bu = row_b(bu_ptr + sl * s_bp, cols, ok, has, R)
    if PDL:
        gdc_wait()
    g = tl.load(gu_ptr + row * s_gu + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * s_gu + N + cols, mask=ok, other=0.0).to(tl.float32)
    y_row = y_ptr + row * s_yt + sl * s_yp
    if EARLY_B:
        dg = expand_loaded(bg, y_row, rank, R)
        du = expand_loaded(bu, y_row + R, rank, R)
    else:
        dg = expand_cols(cols, ok, y_row, bg_ptr + sl * s_bp, has, rank, R, RB, False)
        du = expand_cols(cols, ok, y_row + R, bu_ptr + sl * s_bp, has, rank, R, RB, False)
    _silu_out(g, u, dg, du, has, out_ptr + row * s_o + cols, ok, dt, EMULATED)


_silu_mul_row_expand = Launches(_silu_mul_row_expand_kernel)


def silu_prompt_grid(t: int, n: int, device: torch.device) -> tuple[int, int, int]:
    """(column programs, row tiles, pipeline stages) of silu_mul's expand in a prompt step of t rows (past
    EXPAND_MAX_ROWS) and n columns a slice: the stages are a compile-time constant, so an engine warms each."""
    row_tiles, col_tiles = -(-t // EXPAND_TILE_ROWS), -(-n // SILU_PROMPT_BN)
    cols = max(1, min(col_tiles, -(-SILU_PROMPT_PROGRAMS_PER_SM * sm_count(device) // row_tiles)))
    deep = -(-col_tiles // cols) >= SILU_PROMPT_DEEP_MIN_TILES
    return cols, row_tiles, SILU_PROMPT_STAGES if deep else SILU_PROMPT_SHALLOW_STAGES


def silu_mul(gate_up: torch.Tensor, delta=None) -> torch.Tensor:
    """gate_up [T, 2N] (gate then up, rows contiguous) -> silu(gate) * up [T, N]. delta: the adapters' part of
    gate_up, as values or pending (see the module doc)."""
    t, n2 = gate_up.shape
    if n2 % 2 or gate_up.stride(1) != 1:
        raise ValueError(f"gate_up must be [T, 2N] with contiguous rows, got {tuple(gate_up.shape)}")
    n = n2 // 2
    out = torch.empty((t, n), dtype=gate_up.dtype, device=gate_up.device)
    if t and isinstance(delta, PendingExpand):
        args, consts = _expand_args(delta, gate_up, 2)
        r = delta.y.shape[3]
        kp = delta.y.shape[1] * r  # P * R: the dot's k
        if t <= EXPAND_MAX_ROWS and delta.y.shape[1] >= SILU_ROW_EXPAND_MIN_SLOTS:
            bn = min(SILU_ROW_EXPAND_BN, next_pow2(n))
            _silu_mul_row_expand((-(-n // bn), t), gate_up, out, n, gate_up.stride(0), out.stride(0), *args, BN=bn,
                                 EMULATED=emulated(gate_up), **consts,
                                 EARLY_B=early_b(2 * bn, consts["R"], SILU_ROW_EXPAND_WARPS),
                                 **_pdl_launch(delta, gate_up), num_warps=SILU_ROW_EXPAND_WARPS)
            return out
        if t <= EXPAND_MAX_ROWS:
            # H200, 64 rows, P = 8, N = 8,192 (a sweep of BN 16-64, 2-8 warps, 1-2 stages, BK 32-128): 6.4 us,
            # against 8.5 for BN 64, 8 warps, 2 stages: one stage where the loop runs once. At P = 32 (4 blocks of
            # 128) three stages: 14.1 -> 10.1 us (B rotated past the L2; scratch sweep, 2-8 warps, BN 16-64).
            bm, bk = max(16, next_pow2(t)), max(16, min(EXPAND_DECODE_BK, kp & -kp))
            if kp <= bk and EXPAND_ONE_BLOCK:
                groups = 1
            elif kp > bk and bm >= EXPAND_GROUPED_MIN_ROWS and kp % bk == 0 and bk % r == 0:
                groups = kp // bk
            else:
                groups = 0
            bn = EXPAND_GROUPED_BN if groups > 1 else EXPAND_DECODE_BN
            stages = 1 if kp <= bk or groups else 3
            warps = EXPAND_ONE_BLOCK_WARPS if groups == 1 else EXPAND_DECODE_WARPS
        else:  # eager steps: a tile's rows are mostly one prompt's, one slot; BK one slot's ranks (at least 16)
            bm, bn, bk, stages, groups, warps = EXPAND_TILE_ROWS, 64, max(16, min(128, r & -r)), 1, 0, 4
            if SILU_PROMPT_LOOP:
                cols, row_tiles, stages = silu_prompt_grid(t, n, gate_up.device)
                _silu_mul_prompt_expand((cols, row_tiles), gate_up, out, t, n, gate_up.stride(0), out.stride(0),
                                        *args, BM=bm, BN=SILU_PROMPT_BN, BK=bk, EVEN_K=kp % bk == 0,
                                        DOT=dot_mode(gate_up), EMULATED=emulated(gate_up), **consts,
                                        **_pdl_launch(delta, gate_up), STAGES=stages, num_warps=warps)
                return out
        _silu_mul_expand((-(-n // bn), -(-t // bm), max(groups, 1)), gate_up, out, t, n, gate_up.stride(0),
                         out.stride(0), *args, BM=bm, BN=bn, BK=bk, EVEN_K=kp % bk == 0, DOT=dot_mode(gate_up),
                         EMULATED=emulated(gate_up), **consts, **_pdl_launch(delta, gate_up), GROUPS=groups,
                         num_warps=warps, num_stages=stages)
    elif t:
        block = min(1024, next_pow2(n))
        d, ds, has_delta = _delta_args(delta, gate_up)
        _silu_mul((t, -(-n // block)), gate_up, out, d, ds, n, gate_up.stride(0), out.stride(0),
                  HAS_DELTA=has_delta, BLOCK=block, EMULATED=emulated(gate_up), num_warps=4)
    return out
