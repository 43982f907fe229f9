"""`make bench-worker`: decode throughput of the engine on a Llama-3.2-1B-shaped model (random weights,
bf16) with rank-16 adapters on all seven projections (and 8 on q_proj + v_proj only, PEFT's default targets),
beside transformers + PEFT and the roofline.

    python3 -m benchmarks.worker [--quick] [--out DIR]

Workload per case: `batch` requests of 128 random prompt tokens, 128 new tokens each (greedy, ignore_eos),
all submitted at once. tok/s counts generated tokens over the wall time of the whole batch (prefill
included); "decode ms" is the median step time once every request is decoding.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.module_set import module_set
from benchmarks.step_breakdown import replay_ms
from benchmarks.synthetic import LLAMA_3_2_1B, PROJ, module_dims, write_adapter, write_model

PROMPT, NEW = 128, 128
QV = ("q_proj", "v_proj")  # PEFT's default LoRA targets for Llama


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    n = 1 << 28
    a, b = torch.empty(n, dtype=torch.float32, device="cuda"), torch.empty(n, dtype=torch.float32, device="cuda")
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * 4 * n * 20 / (time.perf_counter() - t)


def roofline(cfg: dict, batch: int, n_adapters: int, rank: int, bw: float, targets=PROJ) -> float:
    """Tokens/s if each decode step read the weights, the adapters present (on `targets`) and the KV cache once."""
    h, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    dims = module_dims(cfg)
    weights = 2 * (sum(fi * fo for fi, fo in dims.values()) * layers + cfg["vocab_size"] * h)
    adapter = 2 * layers * sum(rank * (dims[m][0] + dims[m][1]) for m in targets)
    kv_per_token = 2 * layers * dims["k_proj"][1] * 2
    kv = batch * (PROMPT + NEW // 2) * kv_per_token
    return batch / ((weights + n_adapters * adapter + kv) / bw)


def replay_us(engine, reps: int = 30) -> tuple[float, str]:
    """GPU time of the decode graph the engine's last step replayed, replayed alone `reps` times (its static
    inputs are that step's: the replays recompute the same K/V and logits), and the graph's key (bucket, LoRA
    variant, stacked P, spread). A host slower than the GPU shows in tok/s and decode ms, not here."""
    graphs = engine.runner.graphs
    if graphs is None or graphs.last is None:
        return math.nan, ""
    torch.cuda.synchronize()
    bucket, variant, stacked, spread, rank_class = graphs.last
    key = (f"{bucket}/{'+'.join(sorted(variant)) if variant else 'base'}/P={stacked}{'/spread' if spread else ''}"
           f"{f'/r={rank_class}' if rank_class else ''}")
    return 1e3 * replay_ms(graphs.graphs[graphs.last][0], reps), key


def run_case(engine, batch: int, loras: list, seed: int) -> tuple[float, float, float, str]:
    """(tok/s, median decode step ms, decode graph replay us, that graph's key) of `batch` requests over
    `loras`."""
    from gpu_worker.engine import SamplingParams

    g = torch.Generator().manual_seed(seed)
    # Streamed outputs, as the worker's gRPC streams hand them out (convert.py): each step's new tokens and text.
    # (The default, cumulative, copies every request's whole text and ids each step: work a token that grows with
    # the output, which neither the served path nor LLM.generate, whose outputs come once at the end, does.)
    params = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True, output_kind="delta")
    for i in range(batch):
        prompt = torch.randint(10, 128000, (PROMPT,), generator=g).tolist()
        engine.add_request(f"r{seed}-{i}", prompt, params, lora_request=loras[i % len(loras)] if loras else None)
    steps, generated, replay, graph = [], 0, math.nan, ""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    # No synchronize per step: with async scheduling a step launches the next batch and returns once the
    # previous one's tokens are out, so in steady state the time between returns is the time per step.
    while engine.has_unfinished_requests():
        s = time.perf_counter()
        outs = engine.step()
        decoding = not engine.scheduler.waiting and all(
            seq.num_computed_tokens >= seq.num_prompt_tokens for seq in engine.scheduler.running)
        if decoding and len(outs) == batch:
            steps.append(time.perf_counter() - s)
            if len(steps) == NEW // 2:  # mid-run, once: outside the timed steps' wall time
                paused = time.perf_counter()
                replay, graph = replay_us(engine)
                t0 += time.perf_counter() - paused
        generated += sum(len(o.outputs[0].delta_token_ids) for o in outs)
    wall = time.perf_counter() - t0
    assert generated == batch * NEW, (generated, batch * NEW)
    return generated / wall, 1000 * statistics.median(steps), replay, graph


def prefill(engine, loras: list, n: int = 8, length: int = 2048) -> tuple[float, int]:
    """(prompt tokens per second, engine steps taken) for n prompts of `length` tokens (one new token each). The
    adapters' prompts should take as many steps as base ones: more means some waited on a copy into a slot."""
    from gpu_worker.engine import SamplingParams

    g = torch.Generator().manual_seed(7)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    for i in range(n):
        prompt = torch.randint(10, 128000, (length,), generator=g).tolist()
        engine.add_request(f"p{len(loras)}-{i}", prompt, params, lora_request=loras[i % len(loras)] if loras else None)
    torch.cuda.synchronize()
    t, steps = time.perf_counter(), 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    torch.cuda.synchronize()
    return n * length / (time.perf_counter() - t), steps


def cold_load(engine, warm: list, colds: list, batch: int = 32) -> dict:
    """Decode step times of a batch over 8 resident adapters, before and while cold adapters are copied into
    slots, one after another (each copy overlaps about one step: several loads give several samples). As the
    worker does, an adapter is first read and packed off the step loop (stage), then added; its host-to-device
    copy runs on a side stream while the other requests keep stepping."""
    from gpu_worker.engine import SamplingParams

    params = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"cold-{i}", list(range(100, 100 + PROMPT)), params, lora_request=warm[i % len(warm)])

    def step_ms():  # (no synchronize: see run_case)
        t = time.perf_counter()
        engine.step()
        return 1000 * (time.perf_counter() - t)

    for _ in range(3):  # prefill
        step_ms()
    before, during, joins, stages, adds = [], [], [], [], []
    by_position: list[list[float]] = []  # [i]: the i-th steps after each cold request was added
    for k, cold in enumerate(colds):
        # The worker stages on another thread while the loop steps; here stage() runs between steps, which
        # leaves the GPU idle: the "before" steps come after it, so both samples are steps of a full pipeline.
        t = time.perf_counter()
        engine.lora.stage(cold)
        stages.append(1000 * (time.perf_counter() - t))
        before += [step_ms() for _ in range(8)][2:]
        t = time.perf_counter()
        engine.add_request(f"cold-new-{k}", list(range(100, 100 + PROMPT)), params, lora_request=cold)
        adds.append(1000 * (time.perf_counter() - t))
        cold_seq = engine._seqs[f"cold-new-{k}"]
        for i in range(50):
            ms = step_ms()  # the first of these starts the copy; the request waits until it is done
            if cold_seq in engine.scheduler.running or cold_seq.is_finished:
                joins.append(ms)  # the step the cold request's prefill joined
                break
            during.append(ms)
            if i == len(by_position):
                by_position.append([])
            by_position[i].append(ms)
    while engine.has_unfinished_requests():
        engine.step()
    return dict(before_ms=statistics.median(before), during_mean_ms=statistics.fmean(during) if during else 0.0,
                during_max_ms=max(during, default=0.0), during_steps=len(during), loads=len(colds),
                join_step_ms=statistics.median(joins) if joins else 0.0, stage_ms=statistics.median(stages),
                add_request_ms=statistics.median(adds),
                by_position_ms=[round(statistics.median(v), 3) for v in by_position],
                by_position_max_ms=[round(max(v), 3) for v in by_position])


def cold_line(cold: dict) -> str:
    positions = ", ".join(f"{m:.2f}/{x:.2f}" for m, x in zip(cold["by_position_ms"], cold["by_position_max_ms"],
                                                              strict=True))
    return (f"decode steps while cold adapters are copied in ({cold['loads']} loads, {cold['during_steps']} steps): "
            f"mean {cold['during_mean_ms']:.2f} ms, max {cold['during_max_ms']:.2f} ms, vs {cold['before_ms']:.2f} ms "
            f"before (median): {cold['during_mean_ms'] / cold['before_ms']:.2f}x mean, "
            f"{cold['during_max_ms'] / cold['before_ms']:.2f}x max; the step a cold request's prefill joins: "
            f"{cold['join_step_ms']:.2f} ms (median); off the step loop: stage (disk read + pack) "
            f"{cold['stage_ms']:.0f} ms, add_request {cold['add_request_ms']:.1f} ms; by step after the request "
            f"(median / max): {positions}")


def peft_mixed(model_dir: Path, adapters: list[Path], batch: int) -> float:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    model = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
    for i, path in enumerate(adapters[1:], 1):
        model.load_adapter(path, adapter_name=f"a{i}")
    ids = torch.randint(10, 128000, (batch, PROMPT), device="cuda")
    names = [f"a{i % len(adapters)}" for i in range(batch)]
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
              adapter_names=names, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids[:, :8], **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model.generate(ids, **kw)
        torch.cuda.synchronize()
    assert out.shape[1] == PROMPT + NEW
    del model
    torch.cuda.empty_cache()
    return batch * NEW / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="batch 32 only, no PEFT baseline")
    ap.add_argument("--cold-only", action="store_true", help="only the decode steps while cold adapters are copied "
                    "in, twice (a minute or two on one engine)")
    ap.add_argument("--set", action="append", default=[], metavar="MODULE.NAME=VALUE",
                    help="with --cold-only: rounds with a module constant set, alternating with the defaults' "
                    "(benchmarks/module_set.py)")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--lora-backend", default="auto", choices=["auto", "torch", "triton"])
    ap.add_argument("--fused-elementwise", action=argparse.BooleanOptionalAction, default=None,
                    help="EngineArgs.fused_elementwise (default: on with CUDA)")
    ap.add_argument("--max-lora-rank", type=int, default=16, help="the LoRA engine's max_lora_rank (the adapters are "
                    "rank 16 whatever it is: 64 shows what a larger ceiling costs them)")
    args = ap.parse_args()
    from gpu_worker.engine import EngineArgs, LLMEngine, LoRARequest

    cfg, rank = LLAMA_3_2_1B, 16
    root = Path(tempfile.mkdtemp(prefix="bench-worker-"))
    t = time.perf_counter()
    model_dir = write_model(root / "model", cfg, "cuda")
    adapters = [write_adapter(root / f"a{i}", cfg, rank, seed=i) for i in range(32)]
    # PEFT's default targets for Llama: LoRA on q_proj and v_proj only.
    qv_adapters = [write_adapter(root / f"qv{i}", cfg, rank, seed=100 + i, targets=QV) for i in range(8)]
    print(f"wrote model and 40 adapters in {time.perf_counter() - t:.0f}s", flush=True)
    bw = copy_bandwidth()
    common = dict(model=str(model_dir), dtype="bfloat16", num_kv_blocks=2400, max_num_seqs=64,
                  max_num_batched_tokens=8192, lora_backend=args.lora_backend,
                  fused_elementwise=args.fused_elementwise)
    lora_args = dict(enable_lora=True, max_loras=32, max_lora_rank=max(rank, args.max_lora_rank), max_cpu_loras=48)

    def colds(k0: int) -> list:  # adapters never loaded before, read from disk and copied into a free slot
        return [LoRARequest(f"cold{k}", 1000 + k, str(write_adapter(root / f"cold{k}", cfg, rank, seed=1000 + k)))
                for k in range(k0, k0 + 8)]

    if args.cold_only:
        engine = LLMEngine(EngineArgs(**common, **lora_args))
        reqs = [LoRARequest(f"a{i}", i + 1, str(p)) for i, p in enumerate(adapters[:8])]
        run_case(engine, 32, reqs, seed=98)
        variants = [None, *args.set]
        for k0 in range(0, 16 * len(variants), 8):  # each variant twice, alternating
            spec = variants[k0 // 8 % len(variants)]
            with module_set(spec):
                print(f"{spec or 'defaults'}: {cold_line(cold_load(engine, reqs, colds(k0)))}", flush=True)
        return
    batches = [32] if args.quick else [32, 64]
    rows = []

    def record(name, batch, n_adapters, tok_s, step_ms, replay, graph, targets=PROJ):
        roof = roofline(cfg, batch, n_adapters, rank, bw, targets)
        # tok/s counts the whole run, prefill included; the roofline is a decode step's. decode tok/s (batch over
        # the median decode step) is the like-for-like figure; both are reported.
        rows.append(dict(case=name, batch=batch, tok_s=round(tok_s), decode_ms=round(step_ms, 2),
                         roofline_tok_s=round(roof), pct_roofline=round(100 * tok_s / roof, 1),
                         decode_tok_s=round(1000 * batch / step_ms),
                         decode_pct_roofline=round(100 * 1000 * batch / step_ms / roof, 1),
                         replay_us=round(replay, 1), graph=graph))
        print(rows[-1], flush=True)

    # Both engines live side by side: base-only traffic is timed on each in turn, so "LoRA enabled, no
    # adapter" vs "LoRA disabled" is not an ordering artifact. Every case runs twice, interleaved with the
    # others, and keeps its better run: a shared host that slows a run (steps are host-bound then) slows one
    # of two, not one case's only run, which would skew the ratios between cases.
    base_engine = LLMEngine(EngineArgs(**common, enable_lora=False))
    engine = LLMEngine(EngineArgs(**common, **lora_args))
    reqs = [LoRARequest(f"a{i}", i + 1, str(p)) for i, p in enumerate(adapters)]
    qv_reqs = [LoRARequest(f"qv{i}", 100 + i, str(p)) for i, p in enumerate(qv_adapters)]
    for b in batches:
        run_case(base_engine, b, [], seed=99)  # warm-up: the same shapes as the timed runs
        run_case(engine, b, reqs, seed=98)  # ... all 32 adapters loaded
    for b in batches:
        cases = [("base, LoRA disabled", base_engine, 0), ("base, LoRA enabled", engine, 0)]
        cases += [(f"{n} adapter(s) mixed", engine, n) for n in (1, 8, 32)]
        runs: dict[str, list] = {name: [] for name, _, _ in cases}
        for rep in range(2):
            for k, (name, eng, n) in enumerate(cases):
                runs[name].append(run_case(eng, b, reqs[:n], seed=1 + k + 10 * rep))
        for name, _, n in cases:
            record(name, b, n, *max(runs[name]))
        # 8 q/v adapters (LoRA on the qkv projection alone): in slots before timing (the 32-adapter case holds
        # every slot), then the better of two runs.
        run_case(engine, b, qv_reqs, seed=97)
        record("8 q/v adapter(s) mixed", b, 8, *max(run_case(engine, b, qv_reqs, seed=50 + rep) for rep in range(2)),
               targets=QV)
    del base_engine
    torch.cuda.empty_cache()
    prefill(engine, [], n=8, length=2048)  # warm-up, at the measured shapes
    prefill(engine, reqs[:8], n=8, length=2048)
    # One 8 x 2048 prefill takes ~80 ms: single runs swung by 15% (H200); base and LoRA interleaved, medians.
    pairs = [(prefill(engine, []), prefill(engine, reqs[:8])) for _ in range(5)]
    prefill_base, prefill_lora = (statistics.median(p[k][0] for p in pairs) for k in (0, 1))
    prefill_steps = [max(p[k][1] for p in pairs) for k in (0, 1)]
    print("prefill runs (base, 8 adapters), k tok/s and steps:",
          [(round(b / 1e3), round(a / 1e3), bs, ls) for (b, bs), (a, ls) in pairs], flush=True)
    cold = cold_load(engine, reqs[:8], colds(0))
    del engine
    torch.cuda.empty_cache()

    peft = None
    if not args.quick:
        peft = peft_mixed(model_dir, adapters[:8], 32)
        rows.append(dict(case="transformers + PEFT, 8 mixed", batch=32, tok_s=round(peft)))

    def tok(case, b):
        return next(r["tok_s"] for r in rows if r["case"] == case and r["batch"] == b)

    print(f"\nH2D/D2D copy bandwidth (read + write): {bw / 1e9:.0f} GB/s on {torch.cuda.get_device_name()}")
    print(f"{'case':32} {'batch':>5} {'tok/s':>8} {'decode ms':>9} {'roofline':>9} {'%roof':>6} "
          f"{'decode tok/s':>12} {'%roof':>6} {'replay us':>9}")
    for r in rows:
        print(f"{r['case']:32} {r['batch']:>5} {r['tok_s']:>8} {r.get('decode_ms', ''):>9} "
              f"{r.get('roofline_tok_s', ''):>9} {r.get('pct_roofline', ''):>6} {r.get('decode_tok_s', ''):>12} "
              f"{r.get('decode_pct_roofline', ''):>6} {r.get('replay_us', ''):>9}")
    for b in batches:
        base = tok("base, LoRA disabled", b)
        print(f"batch {b}: LoRA-enabled base / disabled {tok('base, LoRA enabled', b) / base:.3f}; "
              f"8 mixed / base {tok('8 adapter(s) mixed', b) / base:.3f}; "
              f"32 mixed / base {tok('32 adapter(s) mixed', b) / base:.3f}; "
              f"8 q/v mixed / base {tok('8 q/v adapter(s) mixed', b) / base:.3f}")
        # The same ratios from the graphs' GPU time alone (base replay / case replay): what the engine reaches
        # when the host keeps up; tok/s ratios above fall below these when steps are host-bound.
        gpu = {r["case"]: r["replay_us"] for r in rows if r["batch"] == b and "replay_us" in r}
        print(f"batch {b}, decode graph replay alone: " + "; ".join(
            f"{case} {gpu['base, LoRA disabled'] / gpu[case]:.3f}" for case in
            ("base, LoRA enabled", "8 adapter(s) mixed", "32 adapter(s) mixed", "8 q/v adapter(s) mixed")))
    print(f"prefill 8 x 2048 tokens: base {prefill_base:.0f} tok/s, 8 adapters {prefill_lora:.0f} tok/s "
          f"({prefill_lora / prefill_base:.3f} of base); steps (most of 5 runs): base {prefill_steps[0]}, "
          f"8 adapters {prefill_steps[1]}")
    print(cold_line(cold))
    if peft:
        print(f"8 mixed, batch 32: {tok('8 adapter(s) mixed', 32) / peft:.1f}x transformers + PEFT ({peft:.0f} tok/s)")
    if args.out:
        rows.append(dict(case="prefill 8x2048", base_tok_s=round(prefill_base), lora8_tok_s=round(prefill_lora),
                         base_steps=prefill_steps[0], lora8_steps=prefill_steps[1]))
        rows.append(dict(case="cold load", **{k: round(v, 3) if isinstance(v, float) else v
                                               for k, v in cold.items()}))
        Path(args.out, "bench_worker.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
