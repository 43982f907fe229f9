"""Host time of one engine decode step with the GPU work taken out: scheduling, the graphed decode path's
input staging, sampling-batch building, the sampler on [batch, vocab] logits, detokenization, stop checks and
RequestOutputs, i.e. what the CPU does per step while (on a GPU) one CUDA graph replays.

    python3 -m benchmarks.engine_host [--batch 64] [--steps 200] [--adapters 8] [--profile 25]

Runs anywhere (CPU): the demo checkpoint (stack.assets, built once into .demo/), LoRA on, `batch` requests
of which a share use the demo adapters, decoding with `ignore_eos`. The model's forward is replaced by a
function returning fixed logits, and the decode step takes the graphed path (`DecodeGraphs.run`) with the
replay itself a no-op, so the figure is the engine's Python and torch host work, not the model's. On a GPU
this host time adds to every step unless it overlaps the replay; benchmarks.profile_step measures both there.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import pstats
import statistics
import time
from pathlib import Path

import torch

from gpu_worker.engine.config import EngineArgs
from gpu_worker.engine.decode_graphs import LORA_VARIANTS, DecodeGraphs
from gpu_worker.engine.llm_engine import LLMEngine
from gpu_worker.engine.lora_request import LoRARequest
from gpu_worker.engine.sampling_params import SamplingParams


class _NoReplay:
    def replay(self) -> None:
        pass


def stub_gpu(engine: LLMEngine, max_batch: int) -> None:
    """The model returns fixed logits; decode steps go through DecodeGraphs.run with no-op graphs."""
    vocab = engine.model_config.vocab_size
    logits = torch.randn(max(max_batch, engine.args.max_num_batched_tokens), vocab)

    def forward(ids, positions, meta, kv_caches, logits_rows, lora):
        return logits[: logits_rows.shape[0]]

    engine.model.forward = forward
    runner = engine.runner
    runner.fused_decode = True
    graphs = DecodeGraphs(engine.model, engine.kv_caches, engine.args.block_size, max_batch,
                          engine.max_model_len, scratch_block=engine.blocks.num_blocks, lora=runner.lora)
    for b in graphs.buckets:
        for lora in (None, *LORA_VARIANTS) if runner.lora is not None else (None,):
            for rank_class in runner.lora.buffers.classes if lora else [None]:
                for stacked in graphs._prefixes(b) if lora else [None]:
                    graphs.graphs[(b, lora, stacked, False, rank_class)] = (_NoReplay(), logits[:b])
    runner.graphs = graphs


def ready_engine(demo, names: list[str], enable_lora: bool, batch: int, prompt: int, steps: int) -> LLMEngine:
    """An engine with `batch` requests (cycling over base and `names`) past their prompts, decoding."""
    engine = LLMEngine(EngineArgs(model=str(demo.model_dir), device="cpu", dtype="float32", enable_lora=enable_lora,
                                  max_loras=max(1, len(names)), max_lora_rank=64, max_num_seqs=batch,
                                  max_model_len=2048))
    stub_gpu(engine, batch)
    params = SamplingParams(max_tokens=steps + 10, ignore_eos=True, temperature=0.0, output_kind="delta")
    g = torch.Generator().manual_seed(0)
    for i in range(batch):
        ids = torch.randint(10, 200, (prompt,), generator=g).tolist()
        k = i % (len(names) + 1)
        lora = LoRARequest(names[k - 1], k, str(demo.adapters_dir / names[k - 1])) if k else None
        engine.add_request(f"r{i}", ids, params, lora_request=lora)
    while any(s.num_computed_tokens < len(s.prompt_token_ids) for s in engine._seqs.values()):
        engine.step()  # the prompts (eager steps, model stubbed)
    for _ in range(5):
        engine.step()
    return engine


def timed_steps(engine: LLMEngine, n: int, batch: int, prof: cProfile.Profile | None = None) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        if prof:
            prof.enable()
        outs = engine.step()
        if prof:
            prof.disable()
        times.append(time.perf_counter() - t0)
        assert len(outs) == batch, f"a step returned {len(outs)} outputs for {batch} requests"
    return times


def best_block_ms(times: list[float], block: int = 10) -> float:
    """Mean of the fastest block of consecutive steps: on a shared VM, other tenants only ever add time."""
    return min(statistics.fmean(times[i:i + block]) for i in range(0, max(1, len(times) - block + 1), block)) * 1e3


BLOCK = 10  # steps a variant runs before the next one's turn (alternating)


def alternating(steps: int, runs: dict) -> dict:
    """Each of `runs` (key -> a function timing n steps, returning their seconds) in turn, BLOCK steps at a time,
    `steps` steps each: key -> (median ms, the best block's mean ms, steps timed)."""
    times: dict = {k: [] for k in runs}
    for _ in range(0, steps, BLOCK):
        for k, run in runs.items():
            times[k] += run(BLOCK)
    return {k: (statistics.median(t) * 1e3, best_block_ms(t, BLOCK), len(t)) for k, t in times.items()}


def ab_line(head: str, got: dict, labels: tuple[str, str]) -> str:
    """`alternating`'s two variants on one line: each one's median and best block, the first over the second."""
    (a_ms, a_best, n), (b_ms, b_best, _) = got.values()
    return (f"{head}, {n} steps each in alternating blocks of {BLOCK}: {labels[0]} {a_ms:.3f} ms, {labels[1]} "
            f"{b_ms:.3f} ms (median; {a_ms / b_ms:.3f}); best blocks {a_best:.3f} / {b_best:.3f} ms "
            f"({a_best / b_best:.3f})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m benchmarks.engine_host", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=200, help="decode steps timed (after the prefill)")
    p.add_argument("--adapters", type=int, default=8, help="requests cycle over base + this many adapter names")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--demo-dir", default=".demo/assets")
    p.add_argument("--profile", type=int, default=0, help="print the top N functions of cProfile over the steps")
    p.add_argument("--profile-sort", default="tottime", help="the profile's order: tottime or cumtime")
    p.add_argument("--compare-lora-off", action="store_true",
                   help="base-only requests on an engine with LoRA enabled and one with it disabled, timed in "
                        "alternating blocks of steps in one process")
    p.add_argument("--compare-wire-deltas", action="store_true",
                   help="streamed outputs built as the engine process's wire tuples (LLMEngine.wire_deltas) and as "
                        "RequestOutputs, in alternating blocks of steps on one engine")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # host work is single-threaded; intra-op threads on tiny ops only add noise

    from stack.assets import ensure_demo

    demo = ensure_demo(Path(args.demo_dir))
    adapters = sorted(d.name for d in demo.adapters_dir.iterdir() if d.is_dir())
    if args.compare_lora_off:
        engines = {on: ready_engine(demo, [], on, args.batch, args.prompt, args.steps) for on in (True, False)}
        got = alternating(args.steps, {on: functools.partial(timed_steps, e, batch=args.batch)
                                       for on, e in engines.items()})
        print(ab_line(f"engine host time per decode step, {args.batch} base-only requests, {args.prompt}-token "
                      "prompts", got, ("LoRA enabled", "disabled")))
        return 0
    names = adapters[: args.adapters]
    steps = args.steps * (2 if args.compare_wire_deltas else 1)  # (each variant's steps, on one engine)
    engine = ready_engine(demo, names, True, args.batch, args.prompt, steps)
    if args.compare_wire_deltas:
        def steps_with(wire: bool, n: int) -> list[float]:
            engine.wire_deltas = wire
            return timed_steps(engine, n, args.batch)

        got = alternating(args.steps, {wire: functools.partial(steps_with, wire) for wire in (True, False)})
        print(ab_line(f"engine host time per decode step, batch {args.batch}, streamed (delta) outputs", got,
                      ("as wire tuples", "as RequestOutputs")))
        return 0
    prof = cProfile.Profile() if args.profile else None
    times = timed_steps(engine, args.steps, args.batch, prof)
    med = statistics.median(times) * 1e3
    print(f"engine host time per decode step, batch {args.batch}, {len(names)} adapters + base, "
          f"{args.prompt}-token prompts: median {med:.3f} ms, p90 {sorted(times)[int(0.9 * len(times))] * 1e3:.3f} ms, "
          f"best block of 10 {best_block_ms(times):.3f} ms ({args.steps} steps{', under cProfile' if prof else ''})")
    if prof:
        pstats.Stats(prof).sort_stats(args.profile_sort).print_stats(args.profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
