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
import pstats
import statistics
import time
from pathlib import Path

import torch

from gpu_worker.engine.config import EngineArgs
from gpu_worker.engine.decode_graphs import DecodeGraphs
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
        for with_lora in (False, True):
            graphs.graphs[(b, with_lora)] = (_NoReplay(), logits[:b])
    runner.graphs = graphs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m benchmarks.engine_host", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=200, help="decode steps timed (after the prefill)")
    p.add_argument("--adapters", type=int, default=8, help="requests cycle over base + this many adapter names")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--demo-dir", default=".demo/assets")
    p.add_argument("--profile", type=int, default=0, help="print the top N functions of cProfile over the steps")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # host work is single-threaded; intra-op threads on tiny ops only add noise

    from stack.assets import ensure_demo

    demo = ensure_demo(Path(args.demo_dir))
    adapters = sorted(d.name for d in demo.adapters_dir.iterdir() if d.is_dir())
    engine = LLMEngine(EngineArgs(model=str(demo.model_dir), device="cpu", dtype="float32", enable_lora=True,
                                  max_loras=max(1, min(args.adapters, len(adapters))), max_lora_rank=64,
                                  max_num_seqs=args.batch, max_model_len=2048))
    stub_gpu(engine, args.batch)
    names = adapters[: args.adapters]
    params = SamplingParams(max_tokens=args.steps + 10, ignore_eos=True, temperature=0.0, output_kind="delta")
    g = torch.Generator().manual_seed(0)
    for i in range(args.batch):
        prompt = torch.randint(10, 200, (args.prompt,), generator=g).tolist()
        k = i % (len(names) + 1)
        lora = LoRARequest(names[k - 1], k, str(demo.adapters_dir / names[k - 1])) if k else None
        engine.add_request(f"r{i}", prompt, params, lora_request=lora)
    while any(s.num_computed_tokens < len(s.prompt_token_ids) for s in engine._seqs.values()):
        engine.step()  # the prompts (eager steps, model stubbed)
    for _ in range(5):
        engine.step()

    prof = cProfile.Profile() if args.profile else None
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        if prof:
            prof.enable()
        outs = engine.step()
        if prof:
            prof.disable()
        times.append(time.perf_counter() - t0)
        assert len(outs) == args.batch, f"a step returned {len(outs)} outputs for {args.batch} requests"
    med = statistics.median(times) * 1e3
    print(f"engine host time per decode step, batch {args.batch}, {len(names)} adapters + base, "
          f"{args.prompt}-token prompts: median {med:.3f} ms, p90 {sorted(times)[int(0.9 * len(times))] * 1e3:.3f} ms "
          f"({args.steps} steps{', under cProfile' if prof else ''})")
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
