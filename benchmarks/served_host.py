"""Host time of serving through the worker's gRPC API, the GPU work taken out: the engine stubbed as
benchmarks.engine_host stubs it (fixed logits, decode steps through DecodeGraphs.run with no-op replays), a
WorkerServer in this process, and `--batch` streaming clients in others (`--client-procs`). The engine's decode
steps while it serves against the same engine stepping alone: what the event loop's per-token streaming costs the
step loop, with which it shares the GIL (the cluster benchmark on two H200s: a served worker moved 2-3.3k tokens/s
against 11.7k in the closed batch).

    python3 -m benchmarks.served_host [--batch 64] [--tokens 200] [--adapters 4] [--engine-process off,on]
    python3 -m benchmarks.served_host --gpu    # the real engine on CUDA, Llama-3.2-1B-shaped

Runs anywhere (CPU), on the demo checkpoint (stack.assets). Prints the step loop's steps a second and time a
step, alone and serving, and the tokens a second the clients received, with the engine's step loop on a thread
of the server's process and in a process of its own (--engine-process), side by side; and the Triton kernels
compiled after the worker was ready (on a fresh machine, a compile inside a step stalls every stream 1-4 s).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import math
import multiprocessing as mp
import os
import pstats
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from benchmarks.engine_host import stub_gpu, timed_steps
from benchmarks.triton_cache import compiled_kernels


def _client(port: int, streams: range, tokens: int, adapters: list[str], out: mp.Queue, go) -> None:
    """Concurrent streams (numbered `streams`), each `tokens` greedy tokens (EOS ignored), over base and the
    adapters in turn, started when `go` is set (every client process's at once); puts ("ready",) first, then
    ("done", start, end, tokens received, messages, each stream's first message's delay, the gaps between a
    stream's messages) on `out`."""
    import grpc

    from loraserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = worker_pb2_grpc.WorkerServiceStub(channel)
    batch = len(streams)
    received = [0] * batch
    messages = [0] * batch
    first: list[float] = [0.0] * batch  # seconds to each stream's first message
    gaps: list[float] = []  # seconds between a stream's messages (list.append is thread-safe)

    def stream(i: int) -> None:
        req = worker_pb2.StreamGenerateRequest(
            request_id=f"s{streams[i]}",
            prompt=common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=list(range(10, 10 + 128)))),
            sampling=common_pb2.SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True))
        k = streams[i] % (len(adapters) + 1)
        if k:
            req.adapter.name = adapters[k - 1]
        start = last = time.perf_counter()
        for msg in stub.StreamGenerate(req):
            now = time.perf_counter()
            if messages[i]:
                gaps.append(now - last)
            else:
                first[i] = now - start
            last = now
            received[i] += len(msg.token_ids)
            messages[i] += 1

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(batch)]
    out.put(("ready",))
    go.wait()
    t = time.time()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    out.put(("done", t, time.time(), sum(received), sum(messages), first, gaps))
    channel.close()


class TimedEngine:
    """The engine factory (it pickles: the engine may run in a process of its own): on the CPU engine_host's
    stubbed engine, on CUDA the real one; each step's end and length appended to `log_path` (a few at a time,
    and whenever the engine runs dry)."""

    def __init__(self, args, batch: int, log_path: str, profile_path: str = ""):
        self.args, self.batch, self.log_path, self.profile_path = args, batch, log_path, profile_path

    def __call__(self):
        from gpu_worker.engine.llm_engine import LLMEngine

        e = LLMEngine(self.args)
        if self.args.device == "cpu":
            torch.set_num_threads(1)
            stub_gpu(e, self.batch)
        step, held, path = e.step, [], self.log_path
        # Each step's phases (host time, and the wait for the device inside the hand-out), logged with the step.
        phases = dict.fromkeys(PHASES, 0.0)
        from benchmarks.step_breakdown import timed as phase
        from gpu_worker.engine import llm_engine

        e.scheduler.schedule = phase(e.scheduler.schedule, "schedule", phases)
        e.runner.run = phase(e.runner.run, "launch", phases)
        e._hand_out = phase(e._hand_out, "hand_out", phases)
        llm_engine.InFlightStep.wait = phase(llm_engine.InFlightStep.wait, "wait", phases)
        # The step loop's thread (this runs on it): steps and what the loop does between them, one busy period
        # a profile (started at its first step, written when the engine runs dry: the file ends up holding the
        # last one, the clients' streams, without the engine's start or warm-up).
        prof: list[cProfile.Profile] = []

        def timed():
            if self.profile_path and not prof:
                prof.append(cProfile.Profile())
                prof[0].enable()
            for k in phases:
                phases[k] = 0.0
            t = time.perf_counter()
            outs = step()
            end = time.perf_counter()
            held.append(f"{end} {end - t} {len(outs)} {' '.join(str(phases[k]) for k in PHASES)}\n")
            if len(held) >= 64 or not e.has_unfinished_requests():
                with open(path, "a") as f:
                    f.write("".join(held))
                held.clear()
                if prof and not e.has_unfinished_requests():
                    prof.pop().dump_stats(self.profile_path)  # (which stops the profiler)
            return outs

        e.step = timed
        return e


# What TimedEngine times inside each step: the scheduler, the launch (inputs, graph replay, sampler), the hand-out
# of the step before (its wait for the device included) and that wait alone.
PHASES = ("schedule", "launch", "hand_out", "wait")


async def _serve(args, model_dir: Path, adapters: dict[str, Path], engine_process: str, log_path: Path) -> dict:
    from gpu_worker.adapters import LoRAModule
    from gpu_worker.config import WorkerConfig
    from gpu_worker.server import WorkerServer

    names = sorted(adapters)
    device = "cuda" if args.gpu else "cpu"
    config = WorkerConfig(model_dir=str(model_dir), host="127.0.0.1", port=0, worker_id="served-host",
                          device=device, dtype="bfloat16" if args.gpu else "float32", max_loras=max(1, len(names)),
                          max_lora_rank=64, lora_modules=tuple(LoRAModule(n, str(adapters[n])) for n in names),
                          enable_lora=True, drain_timeout_s=0, stream_interval=args.stream_interval,
                          max_num_seqs=args.batch, max_model_len=2048, num_kv_blocks=2400 if args.gpu else None,
                          engine_process=engine_process, gil_switch_interval_ms=args.gil_switch_interval_ms)
    profile_path = log_path.with_name("engine.prof") if args.profile_engine else None
    engine = TimedEngine(config.engine_args(), args.batch, str(log_path), str(profile_path or ""))
    server = WorkerServer(config, engine_factory=engine)
    await server.start()
    compiled_before = compiled_kernels()
    cpus = os.sched_getaffinity(0)
    if args.pin_engine and server.engine.engine_pid != os.getpid() and len(cpus) > 1:
        # The engine's step loop (its process's main thread) alone on one CPU, this process's event loop and the
        # client process (spawned below) on the others: a 2-core VM run as a many-core host runs them.
        os.sched_setaffinity(server.engine.engine_pid, {min(cpus)})
        os.sched_setaffinity(0, cpus - {min(cpus)})
    try:
        ctx = mp.get_context("spawn")
        queue, go = ctx.Queue(), ctx.Event()
        n = max(1, min(args.client_procs, args.batch))
        procs = [ctx.Process(target=_client, args=(server.port, range(i, args.batch, n), args.tokens, names, queue,
                                                   go)) for i in range(n)]
        for proc in procs:
            proc.start()
        loop = asyncio.get_running_loop()
        for _ in procs:
            await loop.run_in_executor(None, queue.get)  # each client process ready
        go.set()  # the streams start
        start = time.perf_counter()
        done = []
        prof = cProfile.Profile() if args.profile else None
        if prof:
            prof.enable()  # this thread: the event loop's
        while len(done) < n:
            done.append(await loop.run_in_executor(None, queue.get))
        end = time.perf_counter()
        if prof:
            prof.disable()
            pstats.Stats(prof).sort_stats(args.profile_sort).print_stats(args.profile)
        for proc in procs:
            await loop.run_in_executor(None, proc.join)
        wall = max(d[2] for d in done) - min(d[1] for d in done)
        received, messages = sum(d[3] for d in done), sum(d[4] for d in done)
        ttft = statistics.median(f for d in done for f in d[5])
        gaps = [g for d in done for g in d[6]]
        q = statistics.quantiles(gaps, n=100) if len(gaps) > 1 else [math.nan] * 99
        gap_p50, gap_p99 = q[49], q[98]
    finally:
        os.sched_setaffinity(0, cpus)
        await server.shutdown(0)
    compiled = sorted(p.stem for p in compiled_kernels() - compiled_before)
    if profile_path is not None and profile_path.exists():
        print(f"the step loop's thread, engine process {engine_process}:")
        pstats.Stats(str(profile_path)).sort_stats(args.profile_sort).print_stats(args.profile_engine)
    lines = (list(map(float, line.split())) for line in log_path.read_text().splitlines())
    logged = [(t, dt, n, rest) for t, dt, n, *rest in lines if start <= t <= end]
    timed = [dt for _, dt, _, _ in logged]
    # The medians over the steps that handed out the most tokens (every stream's, once all have started): the
    # streams start and end over a while, and a step of a part of the batch costs less (before and after a
    # change, compare like with like; --tokens long enough that every stream runs at once).
    most = max((x[2] for x in logged), default=0)
    full = [x for x in logged if x[2] == most]
    phase_ms = {k: statistics.median(r[i] for *_, r in full) * 1e3 for i, k in enumerate(PHASES)} if full else {}
    # The loop's period: from one step's end to the next's (the step and what the loop does between steps).
    periods = [b[0] - a[0] for a, b in zip(logged, logged[1:]) if b[2] == most]
    step_ms = statistics.median(dt for _, dt, _, _ in full) * 1e3 if full else math.nan
    return dict(wall=wall, received=received, messages=messages, ttft=ttft, gap_p50=gap_p50, gap_p99=gap_p99,
                steps=len(timed), full_steps=len(full), full_batch=int(most), step_ms=step_ms,
                busy=sum(timed) / wall, compiled=compiled,
                period_ms=statistics.median(periods) * 1e3 if periods else math.nan, phase_ms=phase_ms)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m benchmarks.served_host", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64, help="concurrent streams (and the engine's max_num_seqs)")
    p.add_argument("--tokens", type=int, default=200, help="tokens each stream asks for")
    p.add_argument("--adapters", type=int, default=4, help="streams cycle over base + this many demo adapters")
    p.add_argument("--client-procs", type=int, default=1,
                   help="client processes the streams are spread over (one process's Python gRPC threads may "
                        "set the pace before the worker does)")
    p.add_argument("--stream-interval", type=int, default=1, help="the worker's --stream-interval")
    p.add_argument("--engine-process", default="off,on", help="the worker's --engine-process: off (the step loop "
                   "on a thread of the server's process), on (a process of its own), or both, side by side")
    p.add_argument("--gil-switch-interval-ms", type=float, default=0.5, help="the worker's --gil-switch-interval-ms "
                   "(the engine process takes it too)")
    p.add_argument("--demo-dir", default=".demo/assets")
    p.add_argument("--pin-engine", action="store_true",
                   help="the engine process's step loop alone on the first CPU, the server's event loop and the "
                        "clients on the others (engine process on only): on a small VM, the share of CPUs a "
                        "many-core host gives them")
    p.add_argument("--gpu", action="store_true", help="the real engine on CUDA, on the Llama-3.2-1B-shaped random "
                   "checkpoint (benchmarks.synthetic) with --adapters rank-16 adapters, instead of the stubbed one")
    p.add_argument("--profile-engine", type=int, default=0, help="print the top N functions of the step loop's "
                   "thread (cProfile, in the engine's process when it has one), from its first step on")
    p.add_argument("--profile-sort", default="tottime", help="the profiles' order: tottime or cumtime")
    p.add_argument("--profile", type=int, default=0, help="print the top N functions of the event loop's thread "
                   "(cProfile) while the clients stream")
    args = p.parse_args(argv)
    if args.gpu:
        from benchmarks.synthetic import llama_1b_with_adapters

        model_dir, loras = llama_1b_with_adapters("served-host-", args.adapters)
        adapters = {r.lora_name: Path(r.lora_path) for r in loras}
        alone = "the step loop alone: see benchmarks.worker"
    else:
        torch.set_num_threads(1)
        from benchmarks.engine_host import ready_engine
        from stack.assets import ensure_demo

        demo = ensure_demo(Path(args.demo_dir))
        model_dir = demo.model_dir
        names = sorted(d.name for d in demo.adapters_dir.iterdir() if d.is_dir())[: args.adapters]
        adapters = {n: demo.adapters_dir / n for n in names}
        engine = ready_engine(demo, names, True, args.batch, 128, args.tokens)
        alone_ms = statistics.median(timed_steps(engine, min(args.tokens, 200), args.batch)) * 1e3
        del engine
        alone = (f"the step loop alone {alone_ms:.3f} ms a step ({1e3 / alone_ms:.0f} steps/s, "
                 f"{args.batch * 1e3 / alone_ms:.0f} tokens/s)")
    for mode in args.engine_process.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            served = asyncio.run(_serve(args, model_dir, adapters, mode, Path(tmp, "steps.log")))
        got, msgs, wall = served["received"], served["messages"], served["wall"]
        print(f"batch {args.batch}, {len(adapters)} adapters + base, {args.tokens} tokens a stream, engine process "
              f"{mode}: {alone}; serving {served['step_ms']:.3f} ms a step (median of the {served['full_steps']} steps "
              f"with {served['full_batch']} streams' tokens; {served['period_ms']:.3f} from one step's end to the "
              f"next's), "
              f"{served['steps'] / wall:.0f} steps/s, the step loop busy {100 * served['busy']:.0f}% of the time; "
              f"the clients received {got} tokens ({got / wall:.0f} tokens/s) in {msgs} messages "
              f"({got / max(1, msgs):.2f} tokens a message) over {wall:.2f} s; first message after "
              f"{1e3 * served['ttft']:.1f} ms (median), then one every {1e3 * served['gap_p50']:.2f} ms (median; "
              f"p99 {1e3 * served['gap_p99']:.2f}); those steps' phases (median ms): "
              f"{', '.join(f'{k} {v:.3f}' for k, v in served['phase_ms'].items())}; kernels compiled while serving: "
              f"{', '.join(served['compiled']) or 'none'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
