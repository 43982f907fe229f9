"""Where an engine step's time goes, on the GPU: a graphed decode step and a mixed step (one prompt
joining running decodes, as every arrival makes in serving), with and without adapters, timed and then
profiled with torch.profiler (host and device time per op, the top rows printed).

    python3 -m benchmarks.profile_step [--batch 32] [--prompt 128] [--rows 25] [--compare-piecewise]

Llama-3.2-1B shape, random bf16 weights, rank-16 adapters on all seven projections (benchmarks/synthetic.py).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import torch

from benchmarks.synthetic import llama_1b_with_adapters


@contextlib.contextmanager
def dense_mixed_attention(on: bool):
    """While on, mixed steps use the padded, masked attention over every row (the path MixedMetadata replaced),
    for a side-by-side timing."""
    from gpu_worker.engine import model_runner
    from gpu_worker.engine.model.attention import AttentionMetadata

    if not on:
        yield
        return
    split = model_runner.MixedMetadata

    class Dense:
        @staticmethod
        def build(starts, lengths, tables, block_size, device, sliding_window, fused_decode, fused_prefill=False):
            return AttentionMetadata.build(starts, lengths, tables, block_size, device, sliding_window)

    model_runner.MixedMetadata = Dense
    try:
        yield
    finally:
        model_runner.MixedMetadata = split


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m benchmarks.profile_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--compare-dense", action="store_true", help="time the mixed step with the padded, masked "
                   "attention (AttentionMetadata for every row, the path before MixedMetadata) too, side by side; "
                   "no profiles")
    p.add_argument("--compare-fused", action="store_true", help="time the steps with the torch elementwise ops "
                   "and with the fused Triton ones (EngineArgs.fused_elementwise), two engines side by side; "
                   "no profiles")
    p.add_argument("--compare-launch", action="store_true", help="time the steps with Triton launches straight to "
                   "the compiled kernels (kernels/launch.py, the default) and through Triton's dispatch, side by "
                   "side on one engine; no profiles")
    p.add_argument("--compare-piecewise", action="store_true", help="time the steps with the mixed step replayed "
                   "from graph pieces cut at attention (EngineArgs.piecewise_graphs, the default) and run eagerly, two "
                   "engines side by side; no profiles")
    p.add_argument("--trace", metavar="DIR", help="also write each profiled step as a Chrome trace (with Python "
                   "stacks) into DIR, for a timeline of where the host time goes between launches")
    args = p.parse_args(argv)
    import kernels.launch
    from gpu_worker.engine import EngineArgs, LLMEngine, SamplingParams

    model, loras = llama_1b_with_adapters("profile-step-", 8)
    # (fused elementwise, piecewise graphs): the engine's defaults (fused on CUDA, piecewise), or two side by side.
    # The padded, masked attention is not what the graph pieces call: compared with eager mixed steps.
    variants = [(False, True), (True, True)] if args.compare_fused else [(None, True), (None, False)] \
        if args.compare_piecewise else [(None, not args.compare_dense)]
    engines = {v: LLMEngine(EngineArgs(model=str(model), dtype="bfloat16", num_kv_blocks=4096, max_num_seqs=128,
                                       enable_lora=True, max_loras=16, max_lora_rank=16, max_cpu_loras=16,
                                       fused_elementwise=v[0], piecewise_graphs=v[1]))
               for v in variants}
    params = SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)
    g = torch.Generator().manual_seed(0)
    counter = iter(range(10**9))

    def prompt(n):
        return torch.randint(10, 128000, (n,), generator=g).tolist()

    def timed(engine) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        return 1e3 * (time.perf_counter() - t)

    def timings(engine, label: str, with_lora: bool) -> None:
        decode = sorted(timed(engine) for _ in range(20))[10]
        for path in (("dense", "split") if args.compare_dense else ("split",)):
            mixed = []
            with dense_mixed_attention(path == "dense"):
                for _ in range(7):
                    engine.add_request(f"m{next(counter)}", prompt(args.prompt), params,
                                       lora_request=loras[0] if with_lora else None)
                    mixed.append(timed(engine))
                    for _ in range(2):
                        engine.step()
            print(f"{label}: batch {args.batch}, decode step {decode:.2f} ms (median of 20); mixed step (one "
                  f"{args.prompt}-token prompt joins), {path} attention: {sorted(mixed)[3]:.2f} ms (median of 7: "
                  f"{[round(m, 1) for m in mixed]})", flush=True)

    for with_lora in (False, True):
        for (fused, piecewise), engine in engines.items():
            for i in range(args.batch):
                engine.add_request(f"d{next(counter)}", prompt(args.prompt), params,
                                   lora_request=loras[i % len(loras)] if with_lora else None)
            for _ in range(6):  # prefill, then decode steps
                engine.step()
            for direct in ((True, False, True, False) if args.compare_launch else (True,)):
                kernels.launch.DIRECT = direct
                label = ("8 adapters" if with_lora else "base") + (", fused elementwise" if fused else "") + (
                    "" if not args.compare_piecewise else ", mixed step from graph pieces" if piecewise
                    else ", mixed step eager") + (
                    "" if not args.compare_launch else ", launches direct" if direct else ", Triton's dispatch")
                timings(engine, label, with_lora)
            kernels.launch.DIRECT = True
            for kind in (() if args.compare_dense or args.compare_fused or args.compare_launch
                         or args.compare_piecewise else ("decode", "mixed")):
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                        torch.profiler.ProfilerActivity.CUDA],
                                            with_stack=bool(args.trace)) as prof:
                    if kind == "mixed":
                        engine.add_request(f"m{next(counter)}", prompt(args.prompt), params,
                                           lora_request=loras[0] if with_lora else None)
                    timed(engine)
                if args.trace:
                    Path(args.trace).mkdir(parents=True, exist_ok=True)
                    prof.export_chrome_trace(str(Path(args.trace) / f"{'lora' if with_lora else 'base'}-{kind}.json"))
                print(f"--- {label}, {kind} step: top ops by host time")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows,
                                                max_name_column_width=60))
                if kind == "mixed":
                    print(f"--- {label}, {kind} step: top ops by device time")
                    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12,
                                                    max_name_column_width=60))
            engine.abort_request([r for r in list(engine._seqs)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
