"""Shrink, expand and the step metadata against float64 references, in Triton's interpreter on the CPU
(tiny shapes: in <= 64, R <= 16, T <= 24) or on a GPU when there is one.

Every case draws fresh random inputs (never zeros), poisons outputs with NaN before the call, and fills
A and B past each slot's rank with NaN: a kernel that read the padding would return NaN."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

import kernels.engine_backend as engine_backend
import kernels.lora_expand_rows as expand_rows
from gpu_worker.engine.lora.layout import GroupShape
from gpu_worker.engine.lora.torch_backend import LoRABatch, TorchLoRA
from kernels import (
    FILL,
    KernelConfig,
    LoRAKernelMeta,
    expand_config,
    lora_expand,
    lora_expand_ref,
    lora_gather_bmm,
    lora_loop,
    lora_ref,
    lora_shrink,
    lora_shrink_ref,
    prepare_reference,
    shrink_config,
    shrink_workspace,
)
from kernels.engine_backend import TritonLoRA
from kernels.lora_expand import expand_launch as lora_expand_launch
from kernels.lora_expand_rows import lora_expand_rows

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Relative error (Frobenius norm of the error over that of the float64 reference) allowed per input dtype.
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 1e-2}
DTYPES = list(TOLERANCE)


@dataclass
class Case:
    x: torch.Tensor  # [T, in]
    a: torch.Tensor  # [slots, S, R, in], NaN past each slot's rank
    b: list[torch.Tensor]  # S x [slots, out_s, R], NaN past each slot's rank
    ranks: torch.Tensor  # [slots] int32
    token_slots: torch.Tensor  # [T] int32
    offsets: list[int]
    meta: LoRAKernelMeta


def make_case(token_slots: list[int], ranks: list[int], widths=(24, 8, 8), in_features=48, r=16,
              dtype=torch.float32, pad=float("nan"), gap=0, chunk=16) -> Case:
    """gap: unused columns of out before each slice, to check slice_offsets."""
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    slots = len(ranks)
    real = torch.arange(r)[None, :] < torch.tensor(ranks)[:, None]  # [slots, R]

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    a = torch.where(real[:, None, :, None], rnd(slots, len(widths), r, in_features, scale=in_features ** -0.5), pad)
    b = [torch.where(real[:, None, :], rnd(slots, w, r), pad) for w in widths]
    offsets, at = [], 0
    for w in widths:
        offsets.append(at + gap)
        at += gap + w
    ts = torch.tensor(token_slots, dtype=torch.int32, device=DEVICE)
    meta = LoRAKernelMeta(max_tokens=64, max_slots=slots, device=DEVICE, chunk=chunk)
    meta.prepare(ts)
    return Case(rnd(len(token_slots), in_features).to(DEVICE, dtype), a.to(DEVICE, dtype),
                [t.to(DEVICE, dtype) for t in b], torch.tensor(ranks, dtype=torch.int32, device=DEVICE), ts,
                offsets, meta)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def out_width(c: Case) -> int:
    return c.offsets[-1] + c.b[-1].shape[1]


def ref_inputs(c: Case):
    """The reference sees zero padding (what SlotBuffers holds); the kernels see NaN and must skip it."""
    return c.x, torch.nan_to_num(c.a, nan=0.0), [torch.nan_to_num(t, nan=0.0) for t in c.b]


def check_shrink(c: Case, config: KernelConfig | None = None):
    x, a, _ = ref_inputs(c)
    t, (s, r) = c.x.shape[0], c.a.shape[1:3]
    y = torch.full((t, s, r), float("nan"), dtype=torch.float32, device=DEVICE)
    # Split K's partial sums go through a poisoned scratch too: only what a split wrote may be read back.
    scratch = torch.full((shrink_workspace(c.x, c.a, c.meta, config) + 7,), float("nan"), device=DEVICE)
    lora_shrink(c.x, c.a, c.ranks, c.meta, y=y, config=config, workspace=scratch)
    ref = lora_shrink_ref(x, a, c.ranks, c.token_slots)
    has = c.token_slots >= 0
    if has.any():
        assert not y[has].isnan().any()
        assert rel_err(y[has], ref[has]) <= TOLERANCE[c.x.dtype]
    # The semaphores of split K are re-armed by the kernel for the next launch.
    assert not c.meta.semaphores.any()
    return ref


def check_expand(c: Case, y: torch.Tensor, config: KernelConfig | None = None, scale=None, expand=lora_expand):
    """expand: lora_expand, or lora_expand_rows."""
    _, _, b = ref_inputs(c)
    base = torch.randn(c.x.shape[0], out_width(c), device=DEVICE).to(c.x.dtype)
    out = base.clone()
    expand(y, c.b, out, c.ranks, c.meta, slice_offsets=c.offsets, scale=scale, config=config)
    ref = lora_expand_ref(y, b, base, c.ranks, c.token_slots, c.offsets, scale)
    has = c.token_slots >= 0
    assert torch.equal(out[~has], base[~has]), "rows without an adapter must be untouched, bit for bit"
    if has.any():
        assert rel_err(out[has], ref[has]) <= TOLERANCE[c.x.dtype]
    # Columns outside every slice (gaps) are untouched too.
    touched = torch.zeros(out.shape[1], dtype=torch.bool)
    for off, bs in zip(c.offsets, c.b):
        touched[off:off + bs.shape[1]] = True
    assert torch.equal(out[:, ~touched.to(DEVICE)], base[:, ~touched.to(DEVICE)])
    # accumulate=False: the adapters' part alone, assigned (out is never read: NaN there must not leak);
    # rows without an adapter keep their NaN.
    part = torch.full_like(base, float("nan"))
    expand(y, c.b, part, c.ranks, c.meta, slice_offsets=c.offsets, scale=scale, config=config, accumulate=False)
    ref = lora_expand_ref(y, b, torch.zeros_like(base), c.ranks, c.token_slots, c.offsets, scale)
    assert part[~has].isnan().all()
    if has.any():
        assert not part[has][:, touched.to(DEVICE)].isnan().any()
        assert rel_err(part[has][:, touched.to(DEVICE)], ref[has][:, touched.to(DEVICE)]) <= TOLERANCE[c.x.dtype]


def check_both(c: Case, shrink_cfg=None, expand_cfg=None):
    """Shrink and expand each against the reference, then the two chained against lora_ref."""
    y_ref = check_shrink(c, shrink_cfg)
    check_expand(c, y_ref.float(), expand_cfg)
    x, a, b = ref_inputs(c)
    base = torch.randn(c.x.shape[0], out_width(c), device=DEVICE).to(c.x.dtype)
    out = base.clone()
    lora_expand(lora_shrink(c.x, c.a, c.ranks, c.meta, config=shrink_cfg), c.b, out, c.ranks, c.meta,
                slice_offsets=c.offsets, config=expand_cfg)
    ref = lora_ref(x, a, b, base, c.ranks, c.token_slots, c.offsets)
    has = c.token_slots >= 0
    assert torch.equal(out[~has], base[~has])
    if has.any():
        assert rel_err(out[has], ref[has]) <= TOLERANCE[c.x.dtype]


def random_slots(t: int, slots: int, none_share: float = 0.0) -> list[int]:
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    s = torch.randint(0, slots, (t,), generator=g)
    s[torch.rand(t, generator=g) < none_share] = -1
    return s.tolist()


CASES = {
    "one_adapter": lambda: ([2] * 20, [16, 8, 12]),
    "many_adapters": lambda: (random_slots(24, 6), [16, 4, 9, 16, 1, 12]),
    "tokens_without_adapter": lambda: (random_slots(24, 3, none_share=0.4), [16, 16, 16]),
    "ranks_differ_per_slot": lambda: (random_slots(21, 4), [1, 7, 16, 3]),
    "single_token": lambda: ([1], [5, 16]),
    "adapters_with_no_tokens": lambda: ([4, 4, 0, 4, 0], [16, 8, 8, 16, 12, 16, 4, 2]),
    "no_adapter_at_all": lambda: ([-1] * 9, [16, 16]),
    "rank_zero_slot": lambda: ([0, 1, 1, 0, -1], [0, 16]),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_cases(name, dtype):
    slots, ranks = CASES[name]()
    check_both(make_case(slots, ranks, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_slices_of_different_widths_at_offsets(dtype):
    """qkv-like slices (wide q, narrow k/v) placed with gaps in a wider output; also a single slice."""
    check_both(make_case(random_slots(16, 3, 0.2), [16, 6, 11], widths=(40, 8, 16), gap=4, dtype=dtype))
    check_both(make_case(random_slots(10, 2), [3, 16], widths=(24,), dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_split_k_and_persistent_loop(dtype):
    """Small blocks force the paths real shapes take on a GPU: K split over programs (partial sums that
    the last split of each tile adds up), several tiles per program, rank and K longer than one block,
    four slices."""
    c = make_case(random_slots(24, 5, 0.2), [16, 3, 9, 16, 12], widths=(8, 16, 24, 8), in_features=40,
                  dtype=dtype)
    cfg = KernelConfig(16, 16, 16, split_k=4, programs_per_sm=1)
    # K = 40 in 16-wide blocks: 3 splits (the 4th would be empty), each with its part of every row.
    assert shrink_workspace(c.x, c.a, c.meta, cfg) == 3 * 24 * 4 * 16
    check_both(c, cfg, KernelConfig(16, 16, 16, programs_per_sm=1))
    # R = 32 over 16-wide rank blocks: the expand loop that stops at each slot's rank.
    c = make_case(random_slots(12, 3, 0.2), [32, 17, 5], r=32, widths=(16, 8), in_features=32, dtype=dtype)
    check_expand(c, lora_shrink_ref(*ref_inputs(c)[:2], c.ranks, c.token_slots).float(),
                 KernelConfig(16, 16, 16, programs_per_sm=1))


def test_expand_scale_and_odd_rank():
    """The per-slot scale argument, and R = 12 (not a power of two) with its own block padding."""
    c = make_case(random_slots(12, 3, 0.3), [12, 5, 0], r=12, widths=(16, 8))
    y = lora_shrink_ref(*ref_inputs(c)[:2], c.ranks, c.token_slots).float()
    check_expand(c, y, scale=torch.rand(3, device=DEVICE) + 0.5)
    check_shrink(c)


def test_token_order_does_not_matter():
    """Same tokens, shuffled: each token's output row is the same (ops are per token)."""
    slots = random_slots(18, 4, 0.2)
    c = make_case(slots, [16, 9, 4, 16])
    perm = torch.randperm(18, device=DEVICE)
    ts = c.token_slots[perm]
    meta = LoRAKernelMeta(64, 4, DEVICE, chunk=16)
    meta.prepare(ts)
    y1 = lora_shrink(c.x, c.a, c.ranks, c.meta)
    y2 = lora_shrink(c.x[perm], c.a, c.ranks, meta)
    has = c.token_slots[perm] >= 0
    torch.testing.assert_close(y2[has], y1[perm][has], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_distinct_hint_picks_taller_tiles_and_same_result(dtype):
    """With the count of slots present (the engine knows it), row tiles follow the tokens per adapter;
    results equal the unhinted ones. Tiles of 32 rows over 40 tokens of 2 adapters: partly masked tiles,
    a segment spanning two tiles, and a split of K into parts."""
    slots = [1] * 26 + [-1] * 3 + [3] * 14
    c = make_case(slots, [16, 9, 4, 12], in_features=64)
    ts = c.token_slots
    meta = LoRAKernelMeta(max_tokens=64, max_slots=4, device=DEVICE, chunk=16)
    meta.prepare(ts, distinct=2)
    assert meta.slots_bound() == 2 and meta.rows_per_slot() == 22
    assert shrink_config(43, meta.distinct, meta.rows_per_slot(), 64, 48, 16, 132).block_m == 32
    assert expand_config(1000, meta.rows_per_slot(), 16, 132).block_m == 32  # 43 tokens: decode tiles
    hinted = Case(c.x, c.a, c.b, c.ranks, ts, c.offsets, meta)
    # Expand: 3 column tiles (one per slice) over 2 column programs, each looping over its tiles.
    check_both(hinted, KernelConfig(32, 64, 16, split_k=2, num_warps=4, programs_per_sm=1),
               KernelConfig(32, 32, 16, programs_per_sm=1, col_programs=2))
    check_both(hinted)
    with pytest.raises(ValueError, match="distinct"):
        meta.prepare(ts, distinct=-1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_spread_steps_split_shrink_by_the_tiles_they_fill(dtype):
    """A decode step whose tokens are spread thin over adapters (meta.spread <= 2) sizes its shrink's splits by
    the T / spread row tiles those tokens fill, not by the fewest tiles they could (one adapter): fewer splits,
    two warps. The result is the reference's: 12 tokens over 6 adapters (and one row without), K split in 2."""
    slots = [0, 0, 1, 1, 2, 3, 3, -1, 4, 4, 5, 5]
    c = make_case(slots, [16, 9, 4, 12, 16, 7], in_features=256, dtype=dtype)
    c.meta.prepare(c.token_slots, spread=2)
    thin = shrink_config(12, None, c.meta.rows_per_slot(), 256, 48, 16, 4, c.meta.spread)
    few = shrink_config(12, None, c.meta.rows_per_slot(), 256, 48, 16, 4, None)
    assert (thin.split_k, thin.num_warps, few.split_k, few.num_warps) == (1, 2, 4, 4)  # 4 SMs: 8 programs
    check_shrink(c, thin.with_(split_k=2, block_k=64))
    check_shrink(c)  # the default: the thin config
    # Spread past SPREAD_MAX_ROWS, or one token a step: the few-adapter count again.
    assert shrink_config(12, None, 1, 256, 48, 16, 4, 3) == few
    assert shrink_config(1, None, 1, 256, 48, 16, 4, 1) == shrink_config(1, None, 1, 256, 48, 16, 4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_expand_fills_the_grid_with_column_programs(dtype):
    """Prefill expand (col_programs=FILL): column programs chosen from the grid, here 2 over 3 row tiles,
    so each program walks column tiles across slices of 2, 1 and 3 tiles (a slice's first tile falls on
    either program) with y's rows loaded once per row tile and slice."""
    slots = [0] * 17 + [2] * 7
    c = make_case(slots, [16, 9, 4], widths=(24, 8, 40), in_features=32, dtype=dtype)
    meta = LoRAKernelMeta(max_tokens=32, max_slots=3, device=DEVICE, chunk=16)
    meta.prepare(c.token_slots, distinct=2)
    hinted = Case(c.x, c.a, c.b, c.ranks, c.token_slots, c.offsets, meta)
    check_both(hinted, KernelConfig(16, 16, 16, programs_per_sm=1),
               KernelConfig(16, 16, 16, programs_per_sm=3, col_programs=FILL))
    assert expand_config(2048, 2048, 64, 132).col_programs == FILL  # prefill
    assert expand_config(64, 1, 64, 132).col_programs == 0  # decode: one program per column tile


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_expand_rows_cases(name, dtype):
    """The decode-sized expand (a sorted row a program) on the issue's cases, against the reference: its default
    tile and tiles narrower than the slices (a slice over several programs)."""
    slots, ranks = CASES[name]()
    c = make_case(slots, ranks, dtype=dtype)
    y = lora_shrink_ref(*ref_inputs(c)[:2], c.ranks, c.token_slots).float()
    for cfg in (None, KernelConfig(1, 16, 16), KernelConfig(1, 8, 16)):
        check_expand(c, y, cfg, expand=lora_expand_rows)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_expand_rows_slices_scale_and_slot_runs(dtype):
    """Four slices of 2, 1, 3 and 1 column tiles at offsets with gaps, a scale, runs of one slot, a rank-0 slot, odd
    ranks (B's vectors past the rank hold NaN), an R that is not a power of two; slots past the metadata's count as
    no adapter."""
    slots = [0] * 11 + [1] * 3 + [-1] * 3 + [2] * 5 + [3] * 2 + [5]
    c = make_case(slots, [16, 9, 0, 12, 3], r=16, widths=(24, 8, 40, 3), gap=3, dtype=dtype)
    y = lora_shrink_ref(*ref_inputs(c)[:2], c.ranks, c.token_slots.clamp(max=4)).float()
    scale = torch.rand(5, device=DEVICE) + 0.5
    out = torch.randn(len(slots), out_width(c), device=DEVICE).to(dtype)
    got = out.clone()
    lora_expand_rows(y, c.b, got, c.ranks, c.meta, c.offsets, scale, KernelConfig(1, 16, 16))
    has = (c.token_slots >= 0) & (c.token_slots < 5)
    ref = lora_expand_ref(y, ref_inputs(c)[2], out, c.ranks, torch.where(has, c.token_slots, -1), c.offsets, scale)
    assert torch.equal(got[~has], out[~has])
    assert rel_err(got[has], ref[has]) <= TOLERANCE[dtype]
    c = make_case(random_slots(20, 4, 0.2), [12, 5, 7, 1], r=12, widths=(20, 8), dtype=dtype)
    y = lora_shrink_ref(*ref_inputs(c)[:2], c.ranks, c.token_slots).float()
    check_expand(c, y, KernelConfig(1, 8, 16), scale=torch.rand(4, device=DEVICE) + 0.5, expand=lora_expand_rows)
    zeros = torch.zeros(20, out_width(c), device=DEVICE, dtype=dtype)
    for cfg, match in ((KernelConfig(1, 8, 8), "block_k"), (KernelConfig(4, 8, 16), "block_m")):
        with pytest.raises(ValueError, match=match):
            lora_expand_rows(y, c.b, zeros, c.ranks, c.meta, c.offsets, config=cfg)


def test_expand_picks_rows_for_small_launches():
    """lora_expand runs the rows kernel on a GPU where T x columns x R is small (decode), the segmented one past
    it, whenever a config is given, and in the interpreter."""
    assert expand_rows.fits(1, 28672, 64) and expand_rows.fits(64, 6144, 16)
    assert not expand_rows.fits(64, 28672, 16) and not expand_rows.fits(2048, 6144, 16)
    c = make_case([0, 1], [16, 16])
    y = torch.randn(2, 3, 16, device=DEVICE)
    out = torch.zeros(2, out_width(c), device=DEVICE)
    picked = lora_expand_launch(y, c.b, out, c.ranks, c.meta).__qualname__
    assert picked.startswith("expand_rows_launch" if DEVICE.type == "cuda" else "expand_launch")
    seg = lora_expand_launch(y, c.b, out, c.ranks, c.meta, config=KernelConfig(16, 16, 16))
    assert seg.__qualname__.startswith("expand_launch")


def test_expand_picks_rows_for_spread_steps(monkeypatch):
    """Past the rows kernel's bound, a step that says no adapter holds more than SPREAD_ROWS of its tokens (up to
    SPREAD_TOKENS tokens) runs the rows kernel too, on a GPU; any other step the segmented one. The result is the
    same either way."""
    monkeypatch.setattr(expand_rows, "MAX_WORK", 0)
    c = make_case([0, 1, 1, -1, 2], [16, 16, 8])
    y = lora_shrink_ref(*ref_inputs(c)[:2], c.ranks, c.token_slots).float()
    out = torch.zeros(5, out_width(c), device=DEVICE)
    rows = "expand_rows_launch" if DEVICE.type == "cuda" else "expand_launch"
    for spread, picked in ((None, "expand_launch"), (2, rows), (3, "expand_launch")):
        c.meta.prepare(c.token_slots, spread=spread)
        assert expand_rows.spread(5, c.meta) == (spread == 2)
        assert lora_expand_launch(y, c.b, out, c.ranks, c.meta).__qualname__.startswith(picked)
        check_expand(c, y)
    big = LoRAKernelMeta(max_tokens=300, max_slots=3, device=DEVICE)
    big.prepare(torch.arange(300, dtype=torch.int32, device=DEVICE) % 3 - 1, spread=1)
    assert not expand_rows.spread(300, big)  # past SPREAD_TOKENS
    with pytest.raises(ValueError, match="spread"):
        c.meta.prepare(c.token_slots, spread=0)


def test_input_checks():
    c = make_case([0, 1], [16, 16])
    with pytest.raises(ValueError, match="prepared for 2 tokens"):
        lora_shrink(c.x[:1], c.a, c.ranks, c.meta)
    with pytest.raises(ValueError, match="dtype"):
        lora_shrink(c.x.double(), c.a, c.ranks, c.meta)
    with pytest.raises(ValueError, match="do not fit"):
        lora_expand(torch.zeros(2, 3, 16, device=DEVICE), c.b, torch.zeros(2, 8, device=DEVICE), c.ranks, c.meta)
    with pytest.raises(ValueError, match="workspace"):
        lora_shrink(c.x, c.a, c.ranks, c.meta, config=KernelConfig(16, 16, 16, split_k=2),
                    workspace=torch.zeros(3, device=DEVICE))
    with pytest.raises(ValueError, match="max_tokens"):
        c.meta.prepare(torch.zeros(65, dtype=torch.int32, device=DEVICE))


# ------------------------------------------------------------------ metadata


@pytest.mark.parametrize("t,slots,chunk", [(24, 5, 16), (1, 1, 16), (17, 3, 16), (40, 8, 16), (23, 4, 1024)])
def test_metadata_matches_reference(t, slots, chunk):
    """Stable sort by slot over several programs (chunk < T), -1 tokens last, compacted active list."""
    meta = LoRAKernelMeta(max_tokens=64, max_slots=slots, device=DEVICE, chunk=chunk)
    for none_share in (0.0, 0.3, 1.0):
        ts = torch.tensor(random_slots(t, slots, none_share), dtype=torch.int32, device=DEVICE)
        meta.prepare(ts)
        for name, want in prepare_reference(ts.cpu(), slots).items():
            got = getattr(meta, name)[: want.numel()].cpu()
            assert torch.equal(got, want), (name, ts.tolist(), got.tolist(), want.tolist())


def test_metadata_refill_shrinks_cleanly():
    """A step with fewer slots than the one before leaves no stale active entries behind."""
    meta = LoRAKernelMeta(max_tokens=32, max_slots=6, device=DEVICE, chunk=16)
    meta.prepare(torch.arange(6, dtype=torch.int32, device=DEVICE).repeat(3))
    meta.prepare(torch.tensor([3, 3, -1], dtype=torch.int32, device=DEVICE))
    assert meta.num_active.item() == 1
    assert meta.active_slots.tolist() == [3, -1, -1, -1, -1, -1]
    assert meta.seg_len.tolist() == [2, 0, 0, 0, 0, 0]
    meta.prepare(torch.zeros(0, dtype=torch.int32, device=DEVICE))
    assert meta.num_active.item() == 0 and meta.seg_len.sum().item() == 0


# ------------------------------------------------------------------ engine paths


def _buffers(layers: int, shapes: dict[str, GroupShape], ranks: list[int], r: int, dtype) -> SimpleNamespace:
    """SlotBuffers' layout, built directly: zero-padded past each slot's rank."""
    slots = len(ranks)
    real = (torch.arange(r)[None, :] < torch.tensor(ranks)[:, None]).to(dtype)
    a, b = [], []
    for _ in range(layers):
        a.append({g: (torch.randn(slots, len(s.slice_widths), r, s.in_features) * s.in_features ** -0.5
                      * real[:, None, :, None]).to(DEVICE, dtype) for g, s in shapes.items()})
        b.append({g: [(torch.randn(slots, w, r) * real[:, None, :]).to(DEVICE, dtype) for w in s.slice_widths]
                  for g, s in shapes.items()})
    return SimpleNamespace(a=a, b=b, shapes=shapes, ranks=torch.tensor(ranks, dtype=torch.int32, device=DEVICE))


def _engine_case(shapes, ranks, runs, r, dtype, layers=1):
    buffers = _buffers(layers, shapes, ranks, r, dtype)
    batch = LoRABatch.from_runs(runs, DEVICE)
    return buffers, batch


TINY = {"qkv": GroupShape(32, (32, 8, 8)), "down": GroupShape(48, (32,))}


def test_torch_backend_matches_reference():
    """The engine's CPU path (TorchLoRA over SlotBuffers) computes the ops' semantics."""
    buffers, batch = _engine_case(TINY, [16, 4, 9], [(1, 3), (-1, 2), (0, 4), (2, 1), (1, 2)], 16, torch.float32)
    hook = TorchLoRA(buffers, batch)
    t = batch.token_slots.numel()
    for group, shape in TINY.items():
        x = torch.randn(t, shape.in_features, device=DEVICE)
        base = torch.randn(t, sum(shape.slice_widths), device=DEVICE)
        out = base.clone()
        hook.apply(0, group, x, out)
        ref = lora_ref(x, buffers.a[0][group], buffers.b[0][group], base, buffers.ranks, batch.token_slots,
                       shape.slice_offsets)
        assert rel_err(out, ref) <= TOLERANCE[torch.float32]


def test_torch_baselines_match_reference():
    c = make_case(random_slots(12, 3, 0.25), [16, 16, 16], pad=0.0)
    order = torch.sort(c.token_slots.long(), stable=True).indices  # lora_loop wants runs by slot
    x, ts = c.x[order], c.token_slots[order]
    segs, at = [], 0
    for slot, n in zip(*torch.unique_consecutive(ts, return_counts=True)):
        if slot >= 0:
            segs.append((int(slot), at, at + int(n)))
        at += int(n)
    base = torch.randn(12, out_width(c), device=DEVICE)
    ref = lora_ref(x, c.a, c.b, base, c.ranks, ts, c.offsets)
    for run in (lambda o: lora_loop(x, c.a, c.b, o, segs, c.offsets),
                lambda o: lora_gather_bmm(x, c.a, c.b, o, ts, c.offsets)):
        out = base.clone()
        run(out)
        assert rel_err(out, ref) <= TOLERANCE[torch.float32]


def test_triton_backend_matches_torch_backend_tiny():
    buffers, batch = _engine_case(TINY, [16, 0, 7, 12], [(2, 2), (0, 3), (-1, 1), (3, 2), (1, 1)], 16,
                                  torch.float32)
    meta = LoRAKernelMeta(max_tokens=16, max_slots=4, device=DEVICE)
    _compare_backends(buffers, batch, meta, TINY, torch.float32)


def test_one_triton_hook_across_steps_of_other_shapes():
    """The hook works out launch configs once per group and step: a later step with other tokens and other
    adapters gets its own, never the last step's."""
    buffers, _ = _engine_case(TINY, [16, 0, 7, 12], [(0, 1)], 16, torch.float32)
    meta = LoRAKernelMeta(max_tokens=64, max_slots=4, device=DEVICE)
    hook = TritonLoRA(buffers, meta)
    for runs in ([(2, 2), (0, 3), (-1, 1)], [(1, 30), (3, 20)], [(3, 1)], [(0, 5), (2, 9), (-1, 4), (1, 7)]):
        _compare_backends(buffers, LoRABatch.from_runs(runs, DEVICE), meta, TINY, torch.float32, hook)


def test_outgrown_buffers_stay_alive(monkeypatch):
    """A step larger than any before gets a larger y and split-K scratch; the old ones stay allocated (a CUDA
    graph captured with them keeps replaying into them), and buffers at least double, so they are replaced a
    few times only."""
    import weakref

    monkeypatch.setattr(engine_backend, "ROWS_MAX_TOKENS", 0)  # the segmented shrink: it has a scratch
    buffers, _ = _engine_case(TINY, [16, 0, 7, 12], [(0, 1)], 16, torch.float32)
    meta = LoRAKernelMeta(max_tokens=64, max_slots=4, device=DEVICE)
    hook = TritonLoRA(buffers, meta)
    seen = []
    for runs in ([(2, 2), (0, 1)], [(1, 30), (3, 20)], [(0, 5), (2, 9), (-1, 4), (1, 40)]):
        batch = LoRABatch.from_runs(runs, DEVICE)
        _compare_backends(buffers, batch, meta, TINY, torch.float32, hook)
        seen.append((weakref.ref(hook._y), hook._y.numel()))
    assert all(ref() is not None for ref, _ in seen)
    sizes = [n for _, n in seen]
    assert sizes[1] >= 2 * sizes[0] and sizes == sorted(sizes)


def test_one_step_plan_serves_every_layer_and_new_strides():
    """Within a step the hook plans each projection's launches once (checks, configs, grids) and reuses them
    for every layer: layers with other weights get their own results, and inputs with other strides (a
    strided view of x, a wider out) get a plan of their own, never the first call's strides."""
    buffers, batch = _engine_case(TINY, [16, 0, 7, 12], [(2, 2), (0, 3), (-1, 1), (3, 2)], 16, torch.float32,
                                  layers=2)
    meta = LoRAKernelMeta(max_tokens=16, max_slots=4, device=DEVICE)
    hook = TritonLoRA(buffers, meta)
    hook.prepare(batch.token_slots)
    torch_hook = TorchLoRA(buffers, batch)
    t = batch.token_slots.numel()
    has = batch.token_slots >= 0
    for layer in (0, 1, 0):
        for group, shape in TINY.items():
            n = sum(shape.slice_widths)
            for x, base in ((torch.randn(t, shape.in_features, device=DEVICE), torch.randn(t, n, device=DEVICE)),
                            (torch.randn(t, 2 * shape.in_features, device=DEVICE)[:, ::2],
                             torch.randn(t, n + 8, device=DEVICE)[:, 3:n + 3])):
                got, want = base.clone(), base.clone()
                hook.apply(layer, group, x, got)
                torch_hook.apply(layer, group, x, want)
                assert torch.equal(got[~has], base[~has]), (layer, group)
                assert rel_err(got, want.double()) <= TOLERANCE[torch.float32], (layer, group, x.stride())


def _compare_backends(buffers, batch, meta, shapes, dtype, hook=None):
    hook = hook or TritonLoRA(buffers, meta)
    hook.prepare(batch.token_slots)
    # The torch path in fp32 over the same (already rounded) weights and inputs.
    as_fp32 = SimpleNamespace(a=[{g: t.float() for g, t in layer.items()} for layer in buffers.a],
                              b=[{g: [t.float() for t in ts] for g, ts in layer.items()} for layer in buffers.b],
                              shapes=buffers.shapes, ranks=buffers.ranks)
    torch_hook = TorchLoRA(as_fp32, batch)
    t = batch.token_slots.numel()
    for group, shape in shapes.items():
        x = torch.randn(t, shape.in_features, device=DEVICE).to(dtype)
        base = torch.randn(t, sum(shape.slice_widths), device=DEVICE).to(dtype)
        got, want = base.clone(), base.float()
        hook.apply(0, group, x, got)
        torch_hook.apply(0, group, x.float(), want)
        has = batch.token_slots >= 0
        assert torch.equal(got[~has], base[~has]), group
        assert rel_err(got, want.double()) <= TOLERANCE[dtype], group


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tokens", [1, 37, 300, 2100])
def test_triton_backend_matches_torch_backend_llama8b(tokens):
    """Real Llama-3-8B projection shapes, bf16, 8 slots with mixed ranks up to 64, tokens grouped by slot."""
    shapes = {"qkv": GroupShape(4096, (4096, 1024, 1024)), "o": GroupShape(4096, (4096,)),
              "gate_up": GroupShape(4096, (14336, 14336)), "down": GroupShape(14336, (4096,))}
    ranks = [64, 8, 16, 0, 32, 64, 4, 16]
    g = torch.Generator().manual_seed(tokens)
    cuts = sorted(torch.randint(0, tokens + 1, (8,), generator=g).tolist())
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, tokens])]
    runs = list(zip([-1, 0, 1, 2, 3, 4, 5, 6, 7], sizes))  # slot 3 has rank 0: adds nothing
    buffers, batch = _engine_case(shapes, ranks, runs, 64, torch.bfloat16)
    meta = LoRAKernelMeta(max_tokens=4096, max_slots=8, device=DEVICE)
    _compare_backends(buffers, batch, meta, shapes, torch.bfloat16)


def test_hooks_run_lora_only_on_the_groups_of_the_step():
    """A step whose adapters target only qkv (groups={"qkv"}) leaves the other projections' outputs as the base
    computed them, bit for bit, with both hooks; qkv still gets the adapters' part."""
    buffers, batch = _engine_case(TINY, [16, 4, 9], [(1, 3), (-1, 2), (0, 4)], 16, torch.float32)
    meta = LoRAKernelMeta(max_tokens=16, max_slots=3, device=DEVICE)
    triton_hook = TritonLoRA(buffers, meta)
    triton_hook.prepare(batch.token_slots, groups=frozenset({"qkv"}))
    t = batch.token_slots.numel()
    for hook in (TorchLoRA(buffers, batch, frozenset({"qkv"})), triton_hook):
        for group, shape in TINY.items():
            x = torch.randn(t, shape.in_features, device=DEVICE)
            base = torch.randn(t, sum(shape.slice_widths), device=DEVICE)
            out = base.clone()
            hook.apply(0, group, x, out)
            if group == "qkv":
                ref = lora_ref(x, buffers.a[0][group], buffers.b[0][group], base, buffers.ranks, batch.token_slots,
                               shape.slice_offsets)
                assert rel_err(out, ref) <= TOLERANCE[torch.float32]
            else:
                assert torch.equal(out, base), (type(hook).__name__, group)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_expand_chunks_of_row_tiles_under_one_b(dtype):
    """Decode-sized row tiles walked in chunks (sub_tiles): segments longer than a chunk (two chunks, the second
    partial), exactly one row tile, shorter than one, a rank-0 slot, tokens without an adapter; against the
    reference and the same tiles one by one. B's ranks in one block or the launch refuses."""
    slots = [0] * 37 + [1] * 16 + [-1] * 3 + [2] * 5 + [3] * 2
    c = make_case(slots, [16, 9, 0, 12], widths=(24, 8, 40), in_features=32, dtype=dtype)
    meta = LoRAKernelMeta(max_tokens=64, max_slots=4, device=DEVICE, chunk=16)
    meta.prepare(c.token_slots)
    case = Case(c.x, c.a, c.b, c.ranks, c.token_slots, c.offsets, meta)
    for cfg in (KernelConfig(16, 16, 16, programs_per_sm=1, sub_tiles=2),
                KernelConfig(16, 32, 16, programs_per_sm=2, col_programs=2, sub_tiles=4)):
        check_both(case, None, cfg)
    y = lora_shrink(c.x, c.a, c.ranks, meta)
    with pytest.raises(ValueError, match="sub_tiles"):
        lora_expand(y, c.b, torch.zeros(len(slots), out_width(c), device=DEVICE, dtype=dtype), c.ranks, meta,
                    slice_offsets=c.offsets, config=KernelConfig(16, 16, 8, sub_tiles=2))


def test_decode_expand_config_chunks_row_tiles_past_rank_32():
    """Decode-sized tiles: chunks of row tiles under one B past rank 32 while every SM would still get a program
    (all tokens one adapter's), never at rank 16 nor when the segments are known to be short; 4 programs an SM
    over few column tiles, 16 over many; chunked, 128 columns a tile and 4 programs an SM whatever the width."""
    gate_up, qkv = 28672, 6144
    assert expand_config(256, 2, 64, 132, n_out=gate_up).sub_tiles == 8  # 112 column tiles x 2 chunks
    assert expand_config(256, 2, 64, 132, n_out=qkv).sub_tiles == 2  # 24 column tiles x 8 chunks
    assert expand_config(256, 2, 16, 132, n_out=gate_up).sub_tiles == 1
    assert expand_config(256, 2, 64, 132, n_out=gate_up, segments_known=True).sub_tiles == 1
    assert expand_config(16, 1, 64, 132, n_out=gate_up).sub_tiles == 1  # one row tile in all
    assert expand_config(256, 2, 64, 132).sub_tiles == 1  # widths unknown
    assert expand_config(64, 1, 16, 132, n_out=qkv).programs_per_sm == 4
    assert expand_config(64, 1, 16, 132, n_out=gate_up).programs_per_sm == 16
    chunked = expand_config(64, 1, 64, 132, n_out=gate_up)
    assert (chunked.block_n, chunked.programs_per_sm, chunked.sub_tiles) == (128, 4, 2)
    plain = expand_config(64, 1, 64, 132, n_out=gate_up, segments_known=True)
    assert (plain.block_n, plain.programs_per_sm, plain.sub_tiles) == (256, 16, 1)
