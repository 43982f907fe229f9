"""The decode step's elementwise kernels alone, with and without the LoRA expand they carry (consumer_expand.py):
residual add + RMSNorm, RoPE + cache write and SiLU-and-multiply at Llama-3.2-1B sizes, rank-16 adapters in the first
P slots, each row's slot drawn from `--adapters` of them, timed over a CUDA graph of back-to-back calls (inputs warm
in L2, as they are when the GEMM before wrote them; in a step the B tiles may come from memory).

    python3 -m benchmarks.consumer_kernels [--batches 64,32] [--adapters 8] [--slots 8] [--in-slot-order] \\
        [--set kernels.consumer_expand.RANK_BLOCK=16 ...]
    python3 -m benchmarks.consumer_kernels --batches 8192,2048 --prompt-rows 128   # an eager prompt step's SiLU

With `--prompt-rows L` the rows are prompts of L tokens, each of one adapter in turn, and SiLU-and-multiply is handed
gate_up's y as an eager step hands it (the segmented shrink's float32 [T, 2, R], one y a token for every slot).

Each `--set MODULE.NAME=VALUE` adds rows timed with that module constant set (the ops read their constants at each
call), side by side with the defaults in the same run.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.module_set import module_set

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, RANK = 2048, 32, 8, 64, 8192, 16


def graph_us(fn, calls: int = 50, reps: int = 20) -> float:
    """Microseconds per call: `calls` calls captured in one CUDA graph, replayed `reps` times."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (reps * calls)


def pending(out_widths: list[int], t: int, slots: int, adapters: int, g: torch.Generator,
            in_slot_order: bool = False):
    """(the projection's output [T, sum(widths)], PendingExpand) as a stacked decode GEMM leaves them: y in the
    output's columns past sum(widths), every slot of rank RANK, row i in slot i % adapters (in_slot_order: those
    slots sorted, as ModelRunner orders a step's rows)."""
    from kernels.consumer_expand import PendingExpand

    dev, dt = torch.device("cuda"), torch.bfloat16
    n, s = sum(out_widths), len(out_widths)
    cat = torch.randn(t, n + slots * s * RANK, generator=g).to(dev, dt)
    y = cat[:, n:].view(t, slots, s, RANK)
    b = (torch.randn(slots, n, RANK, generator=g) * 0.05).to(dev, dt).split(out_widths, dim=1)
    ranks = torch.full((slots,), RANK, dtype=torch.int32, device=dev)
    row_slots = torch.arange(t) % adapters
    if in_slot_order:
        row_slots = row_slots.sort().values
    row_slots = row_slots.to(dev, torch.int32)
    return cat[:, :n], PendingExpand(y, b, ranks, row_slots)


def cases(t: int, slots: int, adapters: int, in_slot_order: bool = False) -> dict:
    """{op: (base call, call with the pending expand)}."""
    from kernels.elementwise import add_rms_norm, rope_and_cache, silu_mul

    g = torch.Generator().manual_seed(0)
    dev, dt = torch.device("cuda"), torch.bfloat16
    h = torch.randn(t, HIDDEN, generator=g).to(dev, dt)
    w = (torch.rand(HIDDEN, generator=g) + 0.5).to(dev, dt)
    o_out, o_pending = pending([HIDDEN], t, slots, adapters, g, in_slot_order)
    qkv_widths = [HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM]
    qkv, qkv_pending = pending(qkv_widths, t, slots, adapters, g, in_slot_order)
    gate_up, gu_pending = pending([INTER, INTER], t, slots, adapters, g, in_slot_order)
    positions = torch.randint(0, 2048, (t,), generator=g).to(dev)
    cos = torch.randn(4096, HEAD_DIM, generator=g).to(dev, dt)
    sin = torch.randn(4096, HEAD_DIM, generator=g).to(dev, dt)
    k_cache = torch.zeros(256, 16, KV_HEADS, HEAD_DIM, device=dev, dtype=dt)
    v_cache = torch.zeros_like(k_cache)
    cache_slots = torch.randperm(256 * 16, generator=g)[:t].to(dev)

    def rope(delta):
        q, k, v = (x.view(t, -1, HEAD_DIM) for x in qkv.split(qkv_widths, dim=-1))
        return lambda: rope_and_cache(q, k, v, positions, cos, sin, k_cache, v_cache, cache_slots, delta)

    return {
        "add_rms_norm": (lambda: add_rms_norm(h, o_out, w, 1e-5), lambda: add_rms_norm(h, o_out, w, 1e-5, o_pending)),
        "rope_and_cache": (rope(None), rope(qkv_pending)),
        "silu_mul": (lambda: silu_mul(gate_up), lambda: silu_mul(gate_up, gu_pending)),
    }


def prompt_cases(t: int, slots: int, adapters: int, prompt_rows: int) -> dict:
    """{"silu_mul": (base call, call with the pending expand)} for an eager step of prompts of `prompt_rows`
    tokens, prompt i of adapter i % adapters."""
    from kernels.consumer_expand import PendingExpand
    from kernels.elementwise import silu_mul

    g = torch.Generator().manual_seed(0)
    dev, dt = torch.device("cuda"), torch.bfloat16
    gate_up = torch.randn(t, 2 * INTER, generator=g).to(dev, dt)
    y = torch.randn(t, 2, RANK, generator=g).to(dev)
    b = (torch.randn(slots, 2 * INTER, RANK, generator=g) * 0.05).to(dev, dt).split([INTER, INTER], dim=1)
    ranks = torch.full((slots,), RANK, dtype=torch.int32, device=dev)
    row_slots = ((torch.arange(t) // prompt_rows) % adapters).to(dev, torch.int32)
    pending = PendingExpand(y[:, None].expand(t, slots, 2, RANK), b, ranks, row_slots)
    return {"silu_mul": (lambda: silu_mul(gate_up), lambda: silu_mul(gate_up, pending))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m benchmarks.consumer_kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="64,32")
    p.add_argument("--adapters", type=int, default=8, help="distinct adapters among the rows")
    p.add_argument("--slots", type=int, default=8, help="P: the slots the stacked GEMM covers")
    p.add_argument("--set", action="append", default=[], metavar="MODULE.NAME=VALUE")
    p.add_argument("--in-slot-order", action="store_true", help="the rows sorted by slot, as the engine runs them "
                   "(default: row i in slot i %% adapters)")
    p.add_argument("--prompt-rows", type=int, default=0, help="rows as prompts of this many tokens (an eager step)")
    args = p.parse_args(argv)
    print(f"{torch.cuda.get_device_name()}; rank {RANK}, {args.adapters} adapters in P = {args.slots} slots; "
          "us per call (graph of 50 calls)")
    print(f"{'op':16} {'batch':>5} {'variant':44} {'base':>7} {'expand':>7} {'extra':>7}")
    for t in (int(b) for b in args.batches.split(",")):
        ops = (prompt_cases(t, args.slots, args.adapters, args.prompt_rows) if args.prompt_rows else
               cases(t, args.slots, args.adapters, args.in_slot_order))
        for op, (base, lora) in ops.items():
            base_us = graph_us(base)
            for spec in [None, *args.set]:
                with module_set(spec):
                    us = graph_us(lora)
                print(f"{op:16} {t:5d} {spec or 'defaults':44} {base_us:7.2f} {us:7.2f} {us - base_us:7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
