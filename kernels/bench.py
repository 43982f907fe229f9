"""Benchmark of one layer's LoRA shrink + expand on Llama-3-8B shapes, against the bandwidth floor and torch.

    PYTHONPATH=. python3 -m kernels.bench            # the full grid (~108 cases)
    PYTHONPATH=. python3 -m kernels.bench --quick    # a short subset
    OUT=/some/dir python3 -m kernels.bench           # also writes $OUT/kernels_bench.csv
    PYTHONPATH=. python3 -m kernels.bench --sweep --groups qkv --ranks 64 --tokens 8192 --adapters 1
                                                     # times alternative launch configs instead
    PYTHONPATH=. python3 -m kernels.bench --sweep --cases qkv:16:2048:128,down:64:16:8
                                                     # the same for a list of group:rank:tokens:adapters
    PYTHONPATH=. python3 -m kernels.bench --shapes llama-3.2-1b --tokens 64 --ranks 16
                                                     # the worker benchmark's model (adds o_proj)

For every (projection, rank, tokens, distinct adapters):
  * correctness: the Triton result against a float64 reference, on this GPU, before any timing;
  * time: median over warm CUDA-graph replays. Each replay runs the op on `copies` rotated sets of
    inputs (x, out, and for few adapters different slots, so different weights), enough to exceed 4x
    the L2 size: weights and activations come from HBM, as they do in a model where 32 layers' adapters
    do not fit in L2;
  * layout: tokens grouped by slot, as the engine lays them out; past 256 tokens (eager prefill steps) the
    metadata gets the count of adapters present, as the engine passes it (`LoRAKernelMeta.prepare`'s
    `distinct`); decode sizes get none, as a CUDA graph replayed for any batch cannot, only the class of graph
    the engine replays for the batch (`spread`: no adapter holds more than SPREAD_ROWS tokens);
  * floor: bytes that must move (each distinct adapter's A and B once, x once, out read and written)
    over the device-to-device copy bandwidth measured in the same run; `floor%` = floor / time;
  * bare: the activations' traffic alone in two plain torch launches, as shrink and expand move it (x summed
    along its rows, then out += 1 in place, the same copies); `bare_frac` = floor / (bare + the adapters'
    weights at the copy bandwidth): the floor fraction of two launches that did nothing but move those bytes
    as torch's own kernels do (not a bound: a tuned kernel can beat torch.sum);
  * torch: the faster of a loop over adapters (TorchLoRA's algorithm) and a per-token gather + bmm,
    timed the same way (gather + bmm is skipped where its gathered weights would pass 4 GiB).
Targets (issue #4): >= 75% of the floor where the floor is >= 10 us; under 20 us otherwise; >= 3x torch
on decode shapes (<= 256 tokens) with >= 8 adapters.

Needs only torch and triton (and this package).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import triton

from . import (
    FILL,
    KernelConfig,
    LoRAKernelMeta,
    lora_expand,
    lora_shrink,
    shrink_config,
    shrink_workspace,
)
from . import lora_expand_rows as expand_rows
from ._common import sm_count
from .lora_expand import default_config as default_expand_config
from .lora_expand_rows import expand_rows_config, lora_expand_rows
from .lora_shrink import MAX_SPLIT
from .reference import gather_bmm_bytes, lora_gather_bmm, lora_loop, lora_ref

# Llama-3-8B: hidden 4096, 32 q heads / 8 kv heads of 128, intermediate 14336 (the shapes); and
# Llama-3.2-1B (the worker benchmark's model): hidden 2048, 32 q heads / 8 kv heads of 64, intermediate 8192.
SHAPES = {
    "llama-3-8b": {"qkv": (4096, (4096, 1024, 1024)), "gate_up": (4096, (14336, 14336)), "down": (14336, (4096,))},
    "llama-3.2-1b": {"qkv": (2048, (2048, 512, 512)), "o": (2048, (2048,)), "gate_up": (2048, (8192, 8192)),
                     "down": (8192, (2048,))},
}
GROUPS = SHAPES["llama-3-8b"]
RANKS = (16, 64)
TOKENS = (1, 16, 64, 256, 2048, 8192)
ADAPTERS = (1, 8, 32, 128)
NUM_SLOTS = 128  # max_loras: the metadata and the slot buffers are sized for it in every case
DTYPE = torch.bfloat16
TOLERANCE = 1e-2  # bf16, relative (Frobenius) error against float64
GATHER_LIMIT = 4 << 30
DECODE_TOKENS = 256
MAX_COPIES = 128  # enough, with one adapter per copy on its own slot, to cycle 75 MB of rank-16 weights
DEVICE = "cuda"


@dataclass
class Row:
    group: str
    rank: int
    tokens: int
    adapters: int
    copies: int = 1
    rel_err: float = math.nan
    ok: bool = False
    pair_us: float = math.nan
    shrink_us: float = math.nan
    expand_us: float = math.nan
    eager_us: float = math.nan
    floor_us: float = math.nan
    floor_frac: float = math.nan
    bare_us: float = math.nan
    bare_frac: float = math.nan
    loop_us: float = math.nan
    gather_us: float = math.nan
    torch_us: float = math.nan
    speedup: float = math.nan
    target: str = ""
    met: bool = False
    shrink_cfg: str = ""
    expand_cfg: str = ""
    notes: list[str] = field(default_factory=list)


def cfg_str(c: KernelConfig) -> str:
    cols = "/cfill" if c.col_programs == FILL else (f"/c{c.col_programs}" if c.col_programs else "")
    return (f"{c.block_m}x{c.block_n}x{c.block_k}/s{c.split_k}/w{c.num_warps}/p{c.programs_per_sm}"
            f"/st{c.num_stages}{cols}{f'/u{c.sub_tiles}' if c.sub_tiles > 1 else ''}")


def graph_time_us(fn: Callable[[], None], calls_per_replay: int, reps: int = 30, warm: int = 5) -> float:
    """Median microseconds per call: `fn` captured once in a CUDA graph, the graph replayed `reps` times."""
    fn()  # compile and warm outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        fn()
    for _ in range(warm):
        g.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls_per_replay)
    del g
    return statistics.median(times)


def eager_time_us(fn: Callable[[], None], calls_per_run: int, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls_per_run)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes/s of a device-to-device copy of 1 GiB (read + write counted), timed eagerly over 20 copies as
    benchmarks/worker.py and PEERS.md do: a copy replayed from a graph measured 2.41 TB/s, eager 3.01."""
    n = 1 << 28
    src = torch.randn(n, device=DEVICE, dtype=torch.float32)
    dst = torch.empty_like(src)
    us = eager_time_us(lambda: [dst.copy_(src) for _ in range(20)], 20, reps=5)
    return 2 * 4 * n / (us * 1e-6)


@dataclass
class Weights:
    a: torch.Tensor  # [slots, S, R, in]
    b: list[torch.Tensor]  # S x [slots, out_s, R]
    ranks: torch.Tensor
    offsets: list[int]

    @classmethod
    def make(cls, in_features: int, widths: tuple[int, ...], rank: int) -> Weights:
        a = torch.randn(NUM_SLOTS, len(widths), rank, in_features, device=DEVICE, dtype=DTYPE) * in_features ** -0.5
        b = [torch.randn(NUM_SLOTS, w, rank, device=DEVICE, dtype=DTYPE) * rank ** -0.5 for w in widths]
        offsets = [sum(widths[:k]) for k in range(len(widths))]
        ranks = torch.full((NUM_SLOTS,), rank, dtype=torch.int32, device=DEVICE)
        return cls(a, b, ranks, offsets)

    def bytes_per_adapter(self) -> int:
        return (self.a[0].numel() + sum(bs[0].numel() for bs in self.b)) * self.a.element_size()


@dataclass
class Inputs:
    """One rotated copy: tokens grouped by slot (as the engine lays them out), its own metadata."""

    x: torch.Tensor
    out: torch.Tensor
    token_slots: torch.Tensor
    segments: list[tuple[int, int, int]]
    meta: LoRAKernelMeta


def make_inputs(tokens: int, adapters: int, in_features: int, n_out: int, copy: int) -> Inputs:
    g = torch.Generator().manual_seed(1000 * copy + adapters)
    # Few adapters: each copy picks other slots, so rotating copies rotates weights too.
    first = (copy * adapters) % NUM_SLOTS
    slots = sorted({(first + k) % NUM_SLOTS for k in range(adapters)})
    sizes = [tokens // adapters + (k < tokens % adapters) for k in range(adapters)]
    segments, at, ids = [], 0, []
    for slot, n in zip(slots, sizes):
        segments.append((slot, at, at + n))
        ids += [slot] * n
        at += n
    token_slots = torch.tensor(ids, dtype=torch.int32, device=DEVICE)
    meta = LoRAKernelMeta(max_tokens=tokens, max_slots=NUM_SLOTS, device=DEVICE)
    # Decode sizes: what the engine's graphs know, the spread class (no adapter over SPREAD_ROWS tokens) or nothing.
    spread = expand_rows.SPREAD_ROWS if -(-tokens // adapters) <= expand_rows.SPREAD_ROWS else None
    meta.prepare(token_slots, *((adapters, None) if tokens > DECODE_TOKENS else (None, spread)))
    x = torch.randn(tokens, in_features, generator=g).to(DEVICE, DTYPE)
    out = torch.randn(tokens, n_out, generator=g).to(DEVICE, DTYPE)
    return Inputs(x, out, token_slots, segments, meta)


def rotated_copies(tokens: int, adapters: int, in_features: int, n_out: int, w: Weights, l2: int) -> list[Inputs]:
    """Enough copies of a case's inputs to pass 4x L2 when cycled (copies of few adapters use other slots, so other
    weights); the activations of big batches are past it already."""
    per_copy = min(adapters, NUM_SLOTS) * w.bytes_per_adapter() + tokens * (in_features + 2 * n_out) * 2
    n = max(1, min(MAX_COPIES, math.ceil(4 * l2 / per_copy)))
    return [make_inputs(tokens, adapters, in_features, n_out, c) for c in range(n)]


def run_case(group: str, rank: int, tokens: int, adapters: int, w: Weights, bw: float, l2: int,
             with_torch: bool, shapes: dict = GROUPS) -> Row:
    in_features, widths = shapes[group]
    n_out = sum(widths)
    row = Row(group, rank, tokens, adapters)

    act_bytes = tokens * (in_features + 2 * n_out) * 2
    weight_bytes = adapters * w.bytes_per_adapter()
    moved = weight_bytes + act_bytes
    row.floor_us = moved / bw * 1e6
    copies = rotated_copies(tokens, adapters, in_features, n_out, w, l2)
    row.copies = len(copies)
    sms = sm_count(torch.device(DEVICE))
    m = copies[0].meta
    row.shrink_cfg = cfg_str(shrink_config(tokens, m.distinct, m.rows_per_slot(), in_features,
                                           len(widths) * rank, rank, sms, m.spread))
    rows = expand_rows.fits(tokens, n_out, rank) or expand_rows.spread(tokens, m)
    row.expand_cfg = ("rows " + cfg_str(expand_rows_config(rank)) if rows else
                      cfg_str(default_expand_config(tokens, widths, rank, m, torch.device(DEVICE))))

    # Correctness first, on copy 0.
    c0 = copies[0]
    base = c0.out.clone()
    got = base.clone()
    lora_expand(lora_shrink(c0.x, w.a, w.ranks, c0.meta), w.b, got, w.ranks, c0.meta, w.offsets)
    ref = lora_ref(c0.x, w.a, w.b, base, w.ranks, c0.token_slots, w.offsets)
    row.rel_err = float((got.double() - ref).norm() / ref.norm())
    row.ok = row.rel_err <= TOLERANCE and bool(torch.isfinite(got).all())
    del ref, got, base

    def pair():
        for c in copies:
            y = lora_shrink(c.x, w.a, w.ranks, c.meta)
            lora_expand(y, w.b, c.out, w.ranks, c.meta, w.offsets)

    ys = [lora_shrink(c.x, w.a, w.ranks, c.meta) for c in copies]
    scratch = torch.empty(max(1, shrink_workspace(copies[0].x, w.a, copies[0].meta)), dtype=torch.float32,
                          device=DEVICE)

    def shrink_only():
        for c, y in zip(copies, ys):
            lora_shrink(c.x, w.a, w.ranks, c.meta, y=y, workspace=scratch)

    def expand_only():
        for c, y in zip(copies, ys):
            lora_expand(y, w.b, c.out, w.ranks, c.meta, w.offsets)

    n = len(copies)
    row.pair_us = graph_time_us(pair, n)
    row.shrink_us = graph_time_us(shrink_only, n)
    row.expand_us = graph_time_us(expand_only, n)
    row.eager_us = eager_time_us(pair, n)
    row.floor_frac = row.floor_us / row.pair_us
    sums = [torch.empty(tokens, device=DEVICE, dtype=DTYPE) for _ in copies]

    def bare():
        for c, total in zip(copies, sums):
            torch.sum(c.x, dim=1, out=total)
            c.out.add_(1.0)

    row.bare_us = graph_time_us(bare, n)
    row.bare_frac = row.floor_us / (row.bare_us + weight_bytes / bw * 1e6)

    if with_torch:
        def loop():
            for c in copies:
                lora_loop(c.x, w.a, w.b, c.out, c.segments, w.offsets)

        row.loop_us = graph_time_us(loop, n, reps=10, warm=2)
        if gather_bmm_bytes(tokens, w.a, w.b) <= GATHER_LIMIT:
            def gather():
                for c in copies:
                    lora_gather_bmm(c.x, w.a, w.b, c.out, c.token_slots, w.offsets)

            row.gather_us = graph_time_us(gather, n, reps=10, warm=2)
        else:
            row.notes.append("gather>4GiB")
        row.torch_us = min(t for t in (row.loop_us, row.gather_us) if not math.isnan(t))
        row.speedup = row.torch_us / row.pair_us

    targets = []
    if row.floor_us >= 10:
        targets.append((">=75% floor", row.floor_frac >= 0.75))
    else:
        targets.append(("<20us", row.pair_us < 20))
    if tokens <= DECODE_TOKENS and adapters >= 8 and with_torch:
        targets.append((">=3x torch", row.speedup >= 3))
    row.target = ", ".join(t for t, _ in targets)
    row.met = row.ok and all(m for _, m in targets)
    return row


def _sweep_candidates(meta: LoRAKernelMeta, in_features: int, widths: tuple[int, ...], rank: int, sms: int):
    """Launch configs around the defaults: row tiles from 16 to twice the default, column tiles, K blocks,
    splits of K, warps, programs per SM, and for expand the column programs per row tile (FILL too) and
    pipeline depth; where lora_expand runs the rows expand, its tiles too (and it is the default).
    ~30-150 per op; each new one compiles (~1 s)."""
    p2 = triton.next_power_of_2
    tokens, rows = meta.num_tokens, meta.rows_per_slot()
    n_total = len(widths) * rank
    ds = shrink_config(tokens, meta.distinct, rows, in_features, n_total, rank, sms, meta.spread)
    de = default_expand_config(tokens, widths, rank, meta, torch.device(DEVICE))
    # 64-row tiles even where the default is 16: with the adapters present unknown (decode graphs), a step whose
    # tokens belong to few adapters runs faster on them (README's results log, seventh session).
    bms = [m for m in (16, 32, 64, 128) if m <= max(64, 2 * max(ds.block_m, de.block_m))]
    bns = sorted({max(16, min(p2(rank), 64)), max(16, min(p2(n_total), 256))})
    splits = sorted({max(1, ds.split_k // 4), max(1, ds.split_k // 2), ds.split_k, min(MAX_SPLIT, ds.split_k * 4)})
    shrink = {ds}
    for bm in bms:
        for bn in bns:
            for bk in (64, 128, 256):
                if bk * (bm + bn) * 2 * 3 > 200 * 1024 or bm * bn > 128 * 256 or (bk == 256 and bm > 32):
                    continue
                for split in splits:
                    if in_features // split < bk:
                        continue
                    for pps in (2, 16) if bm <= 32 else (2,):
                        shrink.add(KernelConfig(bm, bn, bk, split, 8 if bm * bn >= 64 * 128 else 4, 3, pps))
    expand = {de}
    for bm in bms:
        for bn in (64, 128, 256):
            if bm * bn > 128 * 256:
                continue
            if bm <= 32:
                for warps in (4, 8):
                    for pps in (2, 16):
                        expand.add(KernelConfig(bm, bn, de.block_k, 1, warps, 2, pps))
                if de.block_k >= rank:  # chunks of row tiles under one B (lora_expand's config doc)
                    # Prefill too: a long chunk is a column tile streaming its rows under one B held in registers.
                    for sub in (1, 2, 4, 8) if tokens <= DECODE_TOKENS else (1, 4, 16, 64):
                        for pps in (4, 16):
                            expand.add(KernelConfig(bm, bn, de.block_k, 1, 4, 2, pps, sub_tiles=sub))
                continue
            for warps in (4, 8):  # 8 warps halve the accumulator's registers a thread (32 x 256 tiles: 85 vs 110 us)
                for cols in (0, FILL, 4, 8, 16):
                    for stages in (2, 3):
                        for pps in (2, 8) if cols == FILL else (2,):
                            expand.add(KernelConfig(bm, bn, de.block_k, 1, warps, stages, pps, cols))
    if expand_rows.fits(tokens, sum(widths), rank) or expand_rows.spread(tokens, meta):
        # lora_expand runs the rows kernel here (block_m 1): its default, and tiles of half and twice the columns.
        de = expand_rows_config(rank)
        for scale, warps in ((1, 2), (1, 8), (2, 4), (2, 8), (4, 8)):
            expand.add(de.with_(block_n=max(16, de.block_n * scale // 2), num_warps=warps))
        expand.add(de)
    return ds, sorted(shrink, key=cfg_str), de, sorted(expand, key=cfg_str)


def sweep_case(group: str, rank: int, tokens: int, adapters: int, w: Weights, l2: int, ops=("shrink", "expand"),
               shapes: dict = GROUPS) -> None:
    """Time alternative launch configs for one case, shrink and expand apart, on rotated copies as the table times
    them (a single copy keeps its adapters' weights in L2: its figures did not match the table's); print the
    default's time and the best few. For retuning `shrink_config` / `expand_config` / the rows expand on a new GPU
    (or a new Triton). Configs of one row a program are the rows expand's (lora_expand_rows.py)."""
    in_features, widths = shapes[group]
    copies = rotated_copies(tokens, adapters, in_features, sum(widths), w, l2)
    sms = sm_count(torch.device(DEVICE))
    ds, shrink_cands, de, expand_cands = _sweep_candidates(copies[0].meta, in_features, widths, rank, sms)
    ys = [lora_shrink(c.x, w.a, w.ranks, c.meta) for c in copies]
    ws = torch.empty(MAX_SPLIT * ys[0].numel(), dtype=torch.float32, device=DEVICE)

    def shrink(cfg):
        return lambda: [lora_shrink(c.x, w.a, w.ranks, c.meta, y=y, config=cfg, workspace=ws)
                        for c, y in zip(copies, ys)]

    def expand(cfg):
        op = lora_expand_rows if cfg.block_m == 1 else lora_expand
        return lambda: [op(y, w.b, c.out, w.ranks, c.meta, w.offsets, config=cfg) for c, y in zip(copies, ys)]

    for name, default, cands, fn in (("shrink", ds, shrink_cands, shrink), ("expand", de, expand_cands, expand)):
        if name not in ops:
            continue
        timed = {}
        for cfg in cands:
            try:
                timed[cfg] = graph_time_us(fn(cfg), len(copies), reps=10, warm=2)
            except Exception as e:  # out of shared memory or registers for this tile: skip it
                print(f"#   {name} {cfg_str(cfg)}: {type(e).__name__}", file=sys.stderr)
        best = sorted(timed.items(), key=lambda kv: kv[1])
        top = ", ".join(f"{cfg_str(cfg)} {us:.1f}us" for cfg, us in best[:4])
        print(f"# sweep {group} r{rank} T={tokens} n={adapters} {name} ({len(timed)} configs, {len(copies)} copies): "
              f"default {cfg_str(default)} {timed.get(default, math.nan):.1f}us; best {top}", flush=True)


def prepare_time_us(tokens: int) -> float:
    ts = torch.randint(-1, NUM_SLOTS, (tokens,), dtype=torch.int32, device=DEVICE)
    meta = LoRAKernelMeta(max_tokens=tokens, max_slots=NUM_SLOTS, device=DEVICE)
    return graph_time_us(lambda: meta.prepare(ts), 1)


def check_prepare_in_graph() -> bool:
    """prepare() captured in a graph, replayed on new slot ids written into the captured input."""
    from .metadata import prepare_reference

    ts = torch.zeros(300, dtype=torch.int32, device=DEVICE)
    meta = LoRAKernelMeta(max_tokens=512, max_slots=NUM_SLOTS, device=DEVICE, chunk=128)
    meta.prepare(ts)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        meta.prepare(ts)
    ok = True
    for seed in range(3):
        ts.copy_(torch.randint(-1, NUM_SLOTS, (300,), generator=torch.Generator().manual_seed(seed),
                               dtype=torch.int32))
        g.replay()
        torch.cuda.synchronize()
        for name, want in prepare_reference(ts.cpu(), NUM_SLOTS).items():
            ok &= torch.equal(getattr(meta, name)[: want.numel()].cpu(), want)
    return ok


COLUMNS = ["group", "rank", "tokens", "adapters", "ok", "rel_err", "pair_us", "shrink_us", "expand_us", "eager_us",
           "floor_us", "floor_frac", "bare_us", "bare_frac", "loop_us", "gather_us", "torch_us", "speedup", "target",
           "met", "copies", "shrink_cfg", "expand_cfg", "notes"]


def fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.2e}" if abs(v) < 0.01 and v != 0 else (f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}")
    if isinstance(v, list):
        return " ".join(v)
    return str(v)


def print_table(rows: list[Row]) -> None:
    cols = ["group", "rank", "tokens", "adapters", "pair_us", "shrink_us", "expand_us", "eager_us", "floor_us",
            "floor_frac", "bare_us", "bare_frac", "torch_us", "speedup", "rel_err", "target", "met", "shrink_cfg",
            "expand_cfg"]
    cells = [[fmt(getattr(r, c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for line in cells:
        print("  ".join(x.rjust(w) for x, w in zip(line, widths)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tokens 1/64/2048, adapters 1/8, rank 16")
    p.add_argument("--shapes", default="llama-3-8b", choices=list(SHAPES), help="the model whose layer is timed")
    p.add_argument("--groups", default=None, help="projections (default: all of the model's)")
    p.add_argument("--ranks", default=",".join(map(str, RANKS)))
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    p.add_argument("--adapters", default=",".join(map(str, ADAPTERS)))
    p.add_argument("--no-torch", action="store_true", help="skip the torch baselines")
    p.add_argument("--sweep", action="store_true",
                   help="instead of the table, time alternative launch configs per case (slow: filter cases)")
    p.add_argument("--sweep-ops", default="shrink,expand", help="which ops --sweep times (expand alone is quick)")
    p.add_argument("--cases", default="", help="group:rank:tokens:adapters,... instead of the grid")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernels.bench needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.quick:
        args.ranks, args.tokens, args.adapters = "16", "1,64,2048", "1,8"
    shapes = SHAPES[args.shapes]
    groups = args.groups.split(",") if args.groups else list(shapes)
    ranks = [int(v) for v in args.ranks.split(",")]
    tokens = [int(v) for v in args.tokens.split(",")]
    adapters = [int(v) for v in args.adapters.split(",")]
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    bw = copy_bandwidth()
    print(f"# {props.name}, {props.multi_processor_count} SMs, L2 {l2 >> 20} MiB; torch {torch.__version__}, "
          f"triton {triton.__version__}; device-to-device copy {bw / 1e12:.2f} TB/s", flush=True)
    graph_ok = check_prepare_in_graph()
    print(f"# metadata prepare() under CUDA graph capture: {'ok' if graph_ok else 'WRONG'}", flush=True)
    for t in tokens:
        print(f"# prepare() for {t} tokens, {NUM_SLOTS} slots: {prepare_time_us(t):.1f} us (graph)", flush=True)

    if args.cases:
        cases = [(g, int(r), int(t), int(n)) for g, r, t, n in (c.split(":") for c in args.cases.split(","))]
    else:
        cases = [(g, r, t, n) for g in groups for r in ranks for t in tokens for n in adapters if n <= t]
    rows: list[Row] = []
    for group in dict.fromkeys(g for g, *_ in cases):
        in_features, widths = shapes[group]
        for rank in dict.fromkeys(r for g, r, *_ in cases if g == group):
            w = Weights.make(in_features, widths, rank)
            for _, _, t, n in (c for c in cases if c[:2] == (group, rank)):
                if args.sweep:
                    sweep_case(group, rank, t, n, w, l2, ops=args.sweep_ops.split(","), shapes=shapes)
                    continue
                r = run_case(group, rank, t, n, w, bw, l2, not args.no_torch, shapes)
                rows.append(r)
                print(f"{group:8s} r{rank:<3d} T={t:<5d} n={n:<4d} pair {r.pair_us:8.1f} us  floor "
                      f"{r.floor_us:8.1f} us ({r.floor_frac:5.0%})  torch {fmt(r.torch_us):>8s} us  "
                      f"x{fmt(r.speedup):>6s}  err {r.rel_err:.1e}  {'met' if r.met else 'MISSED'}",
                      flush=True)
            del w
            torch.cuda.empty_cache()

    if args.sweep:
        return 0
    out_dir = os.environ.get("OUT")
    if out_dir:
        path = os.path.join(out_dir, "kernels_bench.csv")
        with open(path, "w", newline="") as f:
            wr = csv.writer(f)
            wr.writerow(COLUMNS)
            for r in rows:
                wr.writerow([fmt(getattr(r, c)) if c != "notes" else " ".join(r.notes) for c in COLUMNS])
        print(f"# wrote {path}")
    bad = [r for r in rows if not r.ok]
    missed = [r for r in rows if not r.met]
    print(f"\n# {len(rows)} cases: {len(rows) - len(bad)} correct, {len(rows) - len(missed)} meet their targets; "
          f"prepare in graph {'ok' if graph_ok else 'WRONG'}")
    print_table(rows)
    return 0 if not bad and graph_ok else 1


if __name__ == "__main__":
    sys.exit(main())
