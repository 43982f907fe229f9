"""What the shrink and expand kernels share: launch configs as data, the SM count, and the device-side
walk from a flat tile index to (adapter segment, tile within it)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

if TYPE_CHECKING:
    from .metadata import LoRAKernelMeta

# How tl.dot runs: natively (bf16/fp16 on tensor cores, fp32 accumulation); in true fp32 ("ieee", not
# tf32's 10-bit mantissa, which would miss the 1e-3 fp32 tolerance); or, in the CPU interpreter, whose
# dot multiplies bf16's raw uint16 bits, on operands rounded to the low precision and widened to fp32.
DOT_NATIVE: tl.constexpr = tl.constexpr(0)
DOT_FP32: tl.constexpr = tl.constexpr(1)
DOT_EMULATED: tl.constexpr = tl.constexpr(2)


def emulated(t: torch.Tensor) -> bool:
    """Off CUDA the kernels run in Triton's interpreter, which multiplies bf16 as raw bits and truncates
    fp32 -> bf16: they then widen operands and round on the bits (`to_low`), as the GPU does."""
    return t.device.type != "cuda"


def dot_mode(t: torch.Tensor) -> int:
    if t.dtype == torch.float32:
        return 1
    return 2 if emulated(t) else 0


FILL = -1  # KernelConfig.col_programs: derived from the grid
MAX_SLICES = 4  # qkv has 3; the expand kernels take one pointer argument per slice


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    # Persistent grid: at most this many programs per SM, each looping over tiles. Sized so that programs
    # that find no tile (the grid is sized from a host-side bound, not from the slots present) cost at
    # most about one wave, ~1-2 us, instead of vLLM's grid over every slot (max_loras + 1 programs per
    # tile, almost all exiting at once: thousands of empty CTAs at 128 slots).
    programs_per_sm: int = 16
    # Expand only: at most this many programs share one row tile's output columns (0: one per column
    # tile; FILL: as many as reach programs_per_sm x SMs together with the row tiles, for prefill, where
    # the row-tile bound is tight). Fewer means each program loops over several column tiles, whose loads
    # then pipeline and reuse y's rows. In decode the bound counts every slot that could be present, so
    # FILL would leave the GPU idle when a few adapters hold all tokens.
    col_programs: int = 0
    # Expand only: a row tile of the grid covers up to this many row tiles of one segment, walked in turn under
    # each column tile's B (lora_expand's kernel says why); needs block_k >= the rank.
    sub_tiles: int = 1

    def with_(self, **kw) -> KernelConfig:
        return replace(self, **kw)


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host ints. triton.cdiv is a ConstexprFunction in Triton 3.x: ~6 us a call from Python,
    and a step's launch configs made ~20 such calls per LoRA projection (~130 us of host time each)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The least power of two >= n (0 for n <= 0), as triton.next_power_of_2, for host ints, without its
    per-call cost."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 2  # the interpreter: few programs, so each loops over several tiles and tests that path


def m_tiles_bound(num_tokens: int, slots_bound: int, block_m: int) -> int:
    """Upper bound on sum over present slots of cdiv(tokens of slot, block_m), from host ints only:
    with n slots holding T tokens it is n + (T - n) // block_m, largest at n = min(max_slots, T)."""
    n = max(1, min(slots_bound, num_tokens))
    return n + (num_tokens - n) // block_m


def slots_pad(max_slots: int) -> int:
    return max(2, next_pow2(max_slots))


def grid_size(tiles_bound: int, cfg: KernelConfig, device: torch.device) -> int:
    return max(1, min(tiles_bound, cfg.programs_per_sm * sm_count(device)))


def check_expand_args(y: torch.Tensor, b: Sequence[torch.Tensor], out: torch.Tensor, ranks: torch.Tensor,
                      meta: LoRAKernelMeta, slice_offsets: Sequence[int] | None, scale: torch.Tensor | None
                      ) -> tuple[int, int, int, list[int], list[int]]:
    """What every expand needs of its arguments (see `lora_expand`) -> (T, S, R, widths, slice offsets)."""
    if y.dim() != 3 or y.dtype != torch.float32 or not y.is_contiguous():
        raise ValueError(f"y must be contiguous float32 [T, S, R], got {y.dtype} {tuple(y.shape)}")
    t, s, r = y.shape
    if len(b) != s or not 1 <= s <= MAX_SLICES:
        raise ValueError(f"y has {s} slices, b has {len(b)} (1 to {MAX_SLICES} supported)")
    if out.dim() != 2 or out.shape[0] != t:
        raise ValueError(f"out must be [{t}, N], got {tuple(out.shape)}")
    num_slots = b[0].shape[0]
    for bs in b:
        if bs.dim() != 3 or bs.shape[0] != num_slots or bs.shape[2] != r:
            raise ValueError(f"each b[s] must be [{num_slots}, out_s, {r}], got {tuple(bs.shape)}")
        if bs.dtype != out.dtype or bs.stride()[1:] != b[0].stride()[1:]:
            raise ValueError("every b[s] must have out's dtype and the same strides in its last two dims")
    if out.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"out must be bf16, fp16 or fp32, got {out.dtype}")
    widths = [bs.shape[1] for bs in b]
    if slice_offsets is None:
        slice_offsets = [sum(widths[:k]) for k in range(s)]
    if len(slice_offsets) != s or any(o < 0 or o + w > out.shape[1] for o, w in zip(slice_offsets, widths)):
        raise ValueError(f"slices of widths {widths} at columns {list(slice_offsets)} do not fit out's "
                         f"{out.shape[1]} columns")
    if ranks.dtype != torch.int32 or ranks.shape != (num_slots,):
        raise ValueError(f"ranks must be int32 [{num_slots}], got {ranks.dtype} {tuple(ranks.shape)}")
    if scale is not None and (scale.dtype != torch.float32 or scale.shape != (num_slots,)):
        raise ValueError(f"scale must be float32 [{num_slots}], got {scale.dtype} {tuple(scale.shape)}")
    if num_slots < meta.max_slots:
        raise ValueError(f"b has {num_slots} slots, fewer than the metadata's max_slots={meta.max_slots}")
    if meta.num_tokens != t:
        raise ValueError(f"metadata was prepared for {meta.num_tokens} tokens, y has {t}")
    return t, s, r, widths, list(slice_offsets)


def padded_slices(b: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """B's slices as the expand kernels take them: MAX_SLICES pointers, the first repeated for absent slices."""
    return [*b, *[b[0]] * (MAX_SLICES - len(b))]


def slice_scalars(b: Sequence[torch.Tensor], widths: list[int], slice_offsets: list[int]) -> tuple[int, ...]:
    """The expand kernels' per-slice scalars, padded to MAX_SLICES: each slice's slot stride, B's column and rank
    strides, the widths (0 for padding), the columns of out where the slices start."""
    pad = MAX_SLICES - len(b)
    return (*[x.stride(0) for x in padded_slices(b)], b[0].stride(1), b[0].stride(2), *(widths + [0] * pad),
            *(slice_offsets + [0] * pad))


@triton.jit
def segment_table(active_ptr, start_ptr, len_ptr, ranks_ptr, R,
                  MAX_SLOTS: tl.constexpr, SLOTS_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """Each program reads the step's segment table once into registers (<= SLOTS_PAD entries, one or two
    per thread) and then maps every tile it owns without touching memory. Entries past num_active have
    length 0, hence 0 tiles, so num_active itself is never read."""
    i = tl.arange(0, SLOTS_PAD)
    ok = i < MAX_SLOTS
    slots = tl.load(active_ptr + i, mask=ok, other=-1)
    starts = tl.load(start_ptr + i, mask=ok, other=0)
    lens = tl.load(len_ptr + i, mask=ok, other=0)
    # The slot's real rank: the kernels skip the zero padding between it and R (a rank-8 adapter in an
    # R=64 buffer reads 1/8 of the bytes). min() guards against a rank written larger than R.
    ranks = tl.minimum(tl.load(ranks_ptr + slots, mask=slots >= 0, other=0), R)
    tiles = (lens + BLOCK_M - 1) // BLOCK_M
    ends = tl.cumsum(tiles, 0)
    return i, slots, starts, lens, ranks, ends - tiles, ends, tl.sum(tiles, 0)


@triton.jit
def pick(vec, i, k):
    """vec[k] for a register vector: a masked sum (Triton has no dynamic register indexing)."""
    return tl.sum(tl.where(i == k, vec, 0), 0)


@triton.jit
def locate(m, i, ends):
    """Index of the segment holding m-tile m: how many segments end at or before it."""
    return tl.sum((ends <= m).to(tl.int32), 0)


@triton.jit
def to_low(x, dtype: tl.constexpr, EMULATED: tl.constexpr):
    """fp32 -> bf16/fp16 rounding to nearest even, as the GPU converts. The interpreter truncates fp32 to
    bf16 (relative error up to 2**-8, twice the GPU's), so there the rounding is done on the bits."""
    if EMULATED and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def round_low(x, dtype: tl.constexpr, EMULATED: tl.constexpr):
    """x (fp32) rounded to dtype's precision and kept in fp32, as torch rounds an op's result before the next op
    reads it. bf16 is not rounded by a convert to bf16 and back, which the compiler could fold away and then fuse
    the product into the next sum (one FMA, not torch's two roundings): on the GPU by the hardware's convert in
    inline PTX, which no compiler pass looks into (two values per convert: 1.5 instructions a value, against 4 on
    the bits); in the interpreter on the bits."""
    if dtype == tl.bfloat16:
        if EMULATED:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True)
        return tl.inline_asm_elementwise(
            "{ .reg .b32 p; cvt.rn.bf16x2.f32 p, $3, $2; shl.b32 $0, p, 16; and.b32 $1, p, 0xffff0000; }",
            "=r,=r,r,r", [x], dtype=tl.float32, is_pure=True, pack=2)
    elif dtype == tl.float32:
        return x
    else:
        return to_low(x, dtype, EMULATED).to(tl.float32)
