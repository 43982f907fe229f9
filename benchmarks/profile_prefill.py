"""Where a prefill's time goes, base against adapters: rounds of prompts through the engine as the worker benchmark
sends them, their wall time, the engine steps they took, the adapter copies they caused, and the GPU kernels' time
by name (torch.profiler over one more round each).

    python3 -m benchmarks.profile_prefill [--shapes 8x2048,64x128] [--adapters 8] [--rows 30] [--tiny] \\
        [--set MODULE.NAME=VALUE ...]

Llama-3.2-1B shape, random bf16 weights, rank-16 adapters on all seven projections (benchmarks/synthetic.py);
`--tiny` runs a small model on the CPU (a check of the script, not a measurement). An adapter round should take
the steps a base round takes and copy no adapter in: more steps mean requests waited on copies (the sixteenth
session found slot compaction evicting adapters the next round needed this way). Each `--set` adds adapter rounds
with a module constant set (read at each call: the eager steps' kernels), the kinds' rounds interleaved.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.module_set import module_set
from benchmarks.synthetic import LLAMA_3_2_1B, write_adapter, write_model
from benchmarks.triton_cache import compiled_kernels

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            vocab_size=128256, max_position_embeddings=4096)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m benchmarks.profile_prefill", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="8x2048,64x128", help="rounds of N prompts of L tokens: NxL,...")
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds of each kind, after two warm ones")
    p.add_argument("--rows", type=int, default=30, help="kernels listed, by time with adapters")
    p.add_argument("--tiny", action="store_true", help="a small model on the CPU: checks the script")
    p.add_argument("--set", action="append", default=[], metavar="MODULE.NAME=VALUE",
                   help="adapter rounds with this module constant set, beside the defaults' (may repeat)")
    args = p.parse_args(argv)
    from gpu_worker.engine import EngineArgs, LLMEngine, LoRARequest, SamplingParams

    cuda = torch.cuda.is_available() and not args.tiny
    cfg, device = (LLAMA_3_2_1B, "cuda") if cuda else (TINY, "cpu")
    root = Path(tempfile.mkdtemp(prefix="profile-prefill-"))
    model_dir = write_model(root / "model", cfg, device)
    loras = [LoRARequest(f"a{i}", i + 1, str(write_adapter(root / f"a{i}", cfg, 16, seed=i)))
             for i in range(args.adapters)]
    engine = LLMEngine(EngineArgs(model=str(model_dir), dtype="bfloat16" if cuda else "float32", num_kv_blocks=2400,
                                  max_num_seqs=64, max_num_batched_tokens=8192, enable_lora=True, max_loras=32,
                                  max_lora_rank=16, max_cpu_loras=48))
    warmed = compiled_kernels()  # after the engine's warm-up: a kernel compiled in the rounds was not warmed
    copies: list[tuple[int, str]] = []
    start_load = engine.lora.start_load

    def counted(slot, key):
        copies.append((slot, key[0]))
        return start_load(slot, key)

    engine.lora.start_load = counted  # the scheduler calls it through the engine's manager
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    ids = iter(range(1 << 30))

    def run(n: int, length: int, adapters: list) -> tuple[float, int]:
        g = torch.Generator().manual_seed(7)
        for i in range(n):
            prompt = torch.randint(10, 128000, (length,), generator=g).tolist()
            engine.add_request(f"r{next(ids)}", prompt, params, lora_request=adapters[i % len(adapters)] if adapters
                               else None)
        sync()
        t, steps = time.perf_counter(), 0
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
        sync()
        return time.perf_counter() - t, steps

    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    for shape in args.shapes.split(","):
        n, length = map(int, shape.split("x"))
        variants = [("base", [], None), (f"{args.adapters} adapters", loras, None),
                    *((f"{args.adapters} adapters, {spec}", loras, spec) for spec in args.set)]
        for _, kind, spec in variants + variants[:2]:  # warm: compiles, graphs, the adapters' first copies
            with module_set(spec):
                run(n, length, kind)
        timed: dict[str, list] = defaultdict(list)
        copied: dict[str, list] = defaultdict(list)
        for _ in range(args.rounds):  # the kinds' rounds interleaved
            for name, kind, spec in variants:
                copies.clear()
                with module_set(spec):
                    timed[name].append(run(n, length, kind))
                copied[name] += copies
        for name, _, _ in variants:
            print(f"{n} x {length}, {name}: wall ms {[round(1e3 * w, 1) for w, _ in timed[name]]}, steps "
                  f"{[s for _, s in timed[name]]}, adapter copies {len(copied[name])} {copied[name][:8]}", flush=True)
        kernels, counts = {}, {}
        for name, kind, _ in variants[:2]:
            with profile(activities=activities) as prof:
                run(n, length, kind)
            per, calls = defaultdict(float), defaultdict(int)
            for e in prof.events():
                if cuda and e.device_type != torch.autograd.DeviceType.CUDA:
                    continue
                per[e.name[:72]] += e.device_time_total if cuda else e.self_cpu_time_total
                calls[e.name[:72]] += 1
            kernels[name], counts[name] = per, calls
        base, lora = kernels["base"], kernels[f"{args.adapters} adapters"]
        print(f"{'GPU' if cuda else 'CPU'} us by kernel, base / {args.adapters} adapters (calls): "
              f"total {sum(base.values()):.0f} / {sum(lora.values()):.0f}")
        calls = counts[f"{args.adapters} adapters"]
        for k in sorted(set(base) | set(lora), key=lambda k: -max(lora.get(k, 0), base.get(k, 0)))[:args.rows]:
            print(f"{base.get(k, 0):10.0f} {lora.get(k, 0):10.0f} {calls.get(k, 0):6d}  {k}")
    late = sorted(p.stem for p in compiled_kernels() - warmed)
    print(f"kernels compiled after the engine's warm-up: {', '.join(late) or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
