"""Where a graphed decode step's GPU time goes, kernel by kernel: torch.profiler over a few decode steps replayed
from the engine's CUDA graphs, per case (base only, 8 and 32 rank-16 adapters mixed), the kernels grouped by name
with their time per step, launches per step and time per launch.

    python3 -m benchmarks.decode_kernels [--batch 64] [--steps 5] [--rows 16] [--cases 0,8,32] \\
        [--set MODULE.NAME=VALUE]

Under Nsight Compute, `--ncu` runs the profiled steps inside cudaProfilerStart / Stop instead of torch.profiler,
so `ncu --profile-from-start off` reads the counters of those steps' kernels alone (not the prompts' or warm-up's):

    ncu --profile-from-start off --clock-control none --kernel-name regex:_add_rms_norm \\
        python3 -m benchmarks.decode_kernels --cases 8 --steps 1 --ncu

Llama-3.2-1B shape, random bf16 weights, 128-token prompts (benchmarks/synthetic.py); synchronous steps, so each
step's kernels are its own. The sum is the step's kernel time, not its wall time: with overlap_lora the LoRA
kernels run beside the GEMMs, and a kernel launched dependent on the one before it (kernels/launch.py's PDL: the
expanding norms, RoPE and SiLU) counts its wait beside that kernel as its own time; `--set kernels.launch.PDL=False`
captures the engine's graphs without it (benchmarks.step_breakdown times the replay).
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from benchmarks.module_set import module_set
from benchmarks.synthetic import llama_1b_with_adapters


def kernel_table(prof, steps: int) -> list[tuple[str, float, int]]:
    """(kernel name, us per step, launches per step), largest first."""
    total: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            total[e.name][0] += e.device_time_total
            total[e.name][1] += 1
    return sorted(((name, us / steps, n // steps) for name, (us, n) in total.items()), key=lambda r: -r[1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m benchmarks.decode_kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rows", type=int, default=16, help="kernels listed per case")
    p.add_argument("--cases", default="0,8,32", help="distinct adapters per case (0: base only)")
    p.add_argument("--ncu", action="store_true", help="profile through cudaProfilerStart / Stop (for ncu)")
    p.add_argument("--set", metavar="MODULE.NAME=VALUE", help="a module constant set while the engine's graphs are "
                   "captured (a Python literal, e.g. kernels.launch.PDL=False)")
    args = p.parse_args(argv)
    from gpu_worker.engine import EngineArgs, LLMEngine, SamplingParams

    model, loras = llama_1b_with_adapters("decode-kernels-", 32)
    with module_set(args.set):
        engine = LLMEngine(EngineArgs(model=str(model), dtype="bfloat16", num_kv_blocks=4096,
                                      max_num_seqs=max(128, args.batch), enable_lora=True, max_loras=32,
                                      max_lora_rank=16, max_cpu_loras=32, async_scheduling=False))
    params = SamplingParams(max_tokens=10**6, temperature=0.0, ignore_eos=True)
    g = torch.Generator().manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, batch {args.batch}, overlap_lora {engine.args.overlap_lora}")
    for n, distinct in enumerate(int(c) for c in args.cases.split(",")):
        for i in range(args.batch):
            engine.add_request(f"r{n}-{i}", torch.randint(10, 128000, (128,), generator=g).tolist(), params,
                               lora_request=loras[i % distinct] if distinct else None)
        for _ in range(8):  # the prompts, then decode steps
            engine.step()
        torch.cuda.synchronize()
        if args.ncu:
            torch.cuda.profiler.start()
            for _ in range(args.steps):
                engine.step()
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
            rows = []
        else:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(args.steps):
                    engine.step()
                torch.cuda.synchronize()
            rows = kernel_table(prof, args.steps)
        label = f"{distinct} adapters mixed" if distinct else "base only"
        print(f"--- {label}: kernel time {sum(r[1] for r in rows):.0f} us a step")
        for name, us, launches in rows[:args.rows]:
            print(f"  {us:8.1f} us  {launches:4d} x {us / max(1, launches):6.2f} us  {name[:80]}")
        engine.abort_request(list(engine._seqs))
        while engine.has_unfinished_requests():
            engine.step()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
