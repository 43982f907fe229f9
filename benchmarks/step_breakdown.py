"""Where a graphed decode step's wall time goes, on the GPU: the step as the engine runs it (async scheduling, CUDA
graphs, steps back to back), the GPU time of its graph replay alone, and the host time of each phase.

    python3 -m benchmarks.step_breakdown [--batches 32,64] [--adapters 8] [--steps 50] [--profile N] [--compare-overlap]
                                         [--compare-shrink] [--compare-stacked] [--compare-gate-up]
                                         [--compare-set MODULE.NAME=VALUE ...] [--compare-max-lora-rank R]

When the step takes about as long as its replay, the engine is GPU-bound; when it takes longer, the host's
phases (which with async scheduling overlap the replay) are the limit. Llama-3.2-1B shape, random bf16
weights, 128-token prompts, base-only and rank-16 adapters mixed, 8 by default (`--adapters 1,8,32`: each count in
turn; benchmarks/synthetic.py).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from collections import defaultdict

import torch

from benchmarks.module_set import constant, module_set
from benchmarks.synthetic import llama_1b_with_adapters

# (object attribute holding it, method name, label): the host phases timed per step.
PHASES = [
    ("scheduler", "schedule", "schedule"),
    ("runner", "run", "runner.run (inputs, launch, sampler launch)"),
    ("graphs", "run", "  DecodeGraphs.run (staging, replay launch)"),
    ("staging", "next", "    staging buffer (its copy two steps back)"),
    ("engine", "_hand_out", "hand-out (wait, detokenize, outputs)"),
]


def timed(fn, key: str, totals: dict):
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - t
    return wrapper


def replay_ms(graph, reps: int = 20) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m benchmarks.step_breakdown", description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="32,64")
    p.add_argument("--max-num-seqs", type=int, default=128, help="the engines' max_num_seqs (their largest graph)")
    p.add_argument("--adapters", default="8", help="distinct adapters mixed in the adapter batches (comma list)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--compare-overlap", action="store_true", help="also an engine with overlap_lora=False (LoRA in "
                   "place after each GEMM), the same adapter batches timed on both, side by side")
    p.add_argument("--compare-shrink", action="store_true", help="also an engine whose decode graphs run the "
                   "segmented LoRA shrink (kernels/lora_shrink.py) instead of the per-token one "
                   "(kernels/lora_shrink_rows.py), the same adapter batches timed on both, side by side")
    p.add_argument("--compare-gate-up", action="store_true", help="also an engine whose stacked decode graphs "
                   "leave gate_up's LoRA kernels beside its GEMM (engine_backend.STACKED_GATE_UP_MAX_SLOTS = 0)")
    p.add_argument("--compare-stacked", action="store_true", help="also an engine whose decode graphs run the LoRA "
                   "kernels beside the base GEMMs at every batch size instead of the stacked GEMMs "
                   "(decode_graphs.STACKED_MAX_BATCH = 0), the same adapter batches timed on both, side by side")
    p.add_argument("--compare-max-lora-rank", type=int, default=0, metavar="R",
                   help="also an engine with max_lora_rank R (the adapters stay rank 16), base and adapter batches")
    p.add_argument("--compare-set", action="append", default=[], metavar="MODULE.NAME=VALUE",
                   help="also an engine captured with a module constant set (a Python literal, e.g. "
                   "kernels.engine_backend.PREFETCH_B=''), base and adapter batches; may repeat")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="print the top N functions of cProfile over "
                   "each case's timed steps (the engine's host time on this machine's CPU, by function)")
    p.add_argument("--profile-sort", default="tottime", help="the profile's order: tottime or cumtime")
    args = p.parse_args(argv)
    import kernels.engine_backend
    from gpu_worker.engine import EngineArgs, LLMEngine, decode_graphs

    counts = [int(n) for n in args.adapters.split(",")]
    model, loras = llama_1b_with_adapters("step-breakdown-", max(counts))
    slots = max(16, max(counts))

    def make(overlap: bool, max_rank: int = 16):
        return LLMEngine(EngineArgs(model=str(model), dtype="bfloat16", num_kv_blocks=4096,
                                    max_num_seqs=args.max_num_seqs, enable_lora=True, max_loras=slots,
                                    max_lora_rank=max_rank, max_cpu_loras=slots, overlap_lora=overlap))

    def make_with(module, name: str, value):
        """An engine captured with module.<name> = value: the graphs keep what was planned while they were
        captured."""
        with constant(module, name, value):
            return make(True)

    engine = make(True)
    in_place = make(False) if args.compare_overlap else None
    variants = {}
    if args.compare_shrink:
        variants["segmented shrink in the decode graphs"] = make_with(kernels.engine_backend, "ROWS_MAX_TOKENS", 0)
    if args.compare_stacked:
        variants["LoRA kernels beside the GEMMs, not stacked"] = make_with(decode_graphs, "STACKED_MAX_BATCH", 0)
    if args.compare_gate_up:
        variants["gate_up's LoRA kernels beside its GEMM"] = make_with(kernels.engine_backend,
                                                                      "STACKED_GATE_UP_MAX_SLOTS", 0)
    both = set()
    if args.compare_max_lora_rank:
        name = f"max_lora_rank {args.compare_max_lora_rank}"
        variants[name] = make(True, args.compare_max_lora_rank)
        both.add(name)
    for spec in args.compare_set:
        with module_set(spec):
            variants[spec] = make(True)
        both.add(spec)
    totals: dict[str, float] = defaultdict(float)
    owners = {"scheduler": engine.scheduler, "runner": engine.runner, "graphs": engine.runner.graphs,
              "staging": engine.runner.graphs._staging, "engine": engine}
    for owner, name, label in PHASES:
        setattr(owners[owner], name, timed(getattr(owners[owner], name), label, totals))
    for graph, _ in engine.runner.graphs.graphs.values():  # the host's share of DecodeGraphs.run's launch
        graph.replay = timed(graph.replay, "    CUDAGraph.replay", totals)
    steps_totals: dict[str, float] = {}  # the phases over the timed steps (not the replays timed after them)
    print(f"{torch.cuda.get_device_name()}; async scheduling {engine.async_scheduling}, "
          f"elementwise {engine.model.ops.__name__}")
    for n, batch in enumerate(int(b) for b in args.batches.split(",")):
        for count in [0, *counts]:
            with_lora = count > 0
            adapters = loras[:count] if with_lora else None
            prof = cProfile.Profile() if args.profile else None

            def start(prof=prof) -> None:
                totals.clear()
                if prof is not None:
                    prof.enable()

            def end(prof=prof) -> None:
                if prof is not None:
                    prof.disable()
                steps_totals.clear()
                steps_totals.update(totals)

            step, gpu = run_batch(engine, batch, adapters, args.steps, seed=2 * n + with_lora, on_start=start,
                                  on_end=end)
            label = f"{count} adapter{'s' * (count > 1)}" if with_lora else "base"
            print(f"batch {batch}, {label}: step {step:.3f} ms, graph replay alone {gpu:.3f} ms on the GPU "
                  f"({'GPU' if step < 1.1 * gpu else 'host'}-bound)")
            for key, total in steps_totals.items():
                print(f"    {key:44s} {total / args.steps * 1e3:.3f} ms/step")
            if prof is not None:  # (these steps ran under the profiler: slower than without it)
                pstats.Stats(prof).sort_stats(args.profile_sort).print_stats(args.profile)
            if in_place is not None and with_lora:
                step, gpu = run_batch(in_place, batch, adapters, args.steps, seed=2 * n + with_lora)
                print(f"batch {batch}, {label}, LoRA in place after each GEMM (overlap_lora=False): "
                      f"step {step:.3f} ms, graph replay alone {gpu:.3f} ms")
            for name, other in variants.items():
                if not with_lora and name not in both:
                    continue
                step, gpu = run_batch(other, batch, adapters, args.steps, seed=2 * n + with_lora)
                print(f"batch {batch}, {label}, {name}: step {step:.3f} ms, graph replay alone {gpu:.3f} ms")
    return 0


def run_batch(engine, batch: int, loras: list | None, steps: int, seed: int, on_start=lambda: None,
              on_end=lambda: None) -> tuple[float, float]:
    """(step ms, graph replay ms) of `engine` decoding `batch` 128-token prompts, over `loras` in turn (None: base),
    `steps` steps in a row after the prompts; on_start runs just before the timed steps, on_end just after."""
    from gpu_worker.engine import SamplingParams

    g = torch.Generator().manual_seed(seed)
    params = SamplingParams(max_tokens=10**6, temperature=0.0, ignore_eos=True, output_kind="delta")  # as served
    for i in range(batch):
        engine.add_request(f"r{seed}-{i}", torch.randint(10, 128000, (128,), generator=g).tolist(), params,
                           lora_request=loras[i % len(loras)] if loras else None)
    for _ in range(8):  # the prompts, then a few decode steps
        engine.step()
    torch.cuda.synchronize()
    on_start()
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    step = (time.perf_counter() - t) / steps * 1e3
    on_end()
    graphs = engine.runner.graphs
    gpu = replay_ms(graphs.graphs[graphs.last][0])  # the graph the last step replayed
    engine.abort_request(list(engine._seqs))
    while engine.has_unfinished_requests():
        engine.step()
    return step, gpu


if __name__ == "__main__":
    raise SystemExit(main())
