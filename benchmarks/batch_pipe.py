"""What handing each step's Batch to the server costs the engine process's step loop: one engine, its decode steps
timed in alternating blocks with the Batch (a) dropped, (b) written by the step loop itself
(gpu_worker/batch_pipe.BatchWriter, what the engine process runs) and (c) handed to a sender thread that pickles and
writes it (the design BatchWriter replaced, kept here as the baseline), (b) and (c) each to a process that reads and
unpickles them as the server does.

    python3 -m benchmarks.batch_pipe [--batch 64] [--steps 600] [--adapters 4]   # stubbed engine (host work), CPU
    python3 -m benchmarks.batch_pipe --gpu                                       # the real engine on CUDA

Stubbed: the demo checkpoint, the model's forward and graph replays stubbed as in benchmarks.engine_host. --gpu:
the Llama-3.2-1B-shaped random checkpoint (benchmarks.synthetic) with --adapters rank-16 adapters. Prints each
variant's step (step() and the hand-over) and its launch phase (ModelRunner.run, where the step loop makes most of
its torch calls, each of which lets a waiting thread take the GIL).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import select
import statistics
import threading
import time
from pathlib import Path

import torch

from benchmarks.step_breakdown import timed
from gpu_worker.batch_pipe import BatchReader, BatchWriter
from gpu_worker.engine_core import Batch


class ThreadSender:
    """The replaced design: a thread that wakes for each Batch, pickles and writes it (merging those that come
    while a write waits)."""

    def __init__(self, conn):
        self._conn, self._pending, self._ready = conn, None, threading.Condition()
        threading.Thread(target=self._run, daemon=True).start()

    def __call__(self, batch: Batch) -> None:
        with self._ready:
            self._pending = batch if self._pending is None else self._pending.merge(batch)
            self._ready.notify()

    def _run(self) -> None:
        while True:
            with self._ready:
                self._ready.wait_for(lambda: self._pending is not None)
                batch, self._pending = self._pending, None
            try:
                self._conn.send(batch)
            except OSError:
                return


def _others() -> None:
    cpus = os.sched_getaffinity(0)
    if len(cpus) > 1:
        os.sched_setaffinity(0, cpus - {min(cpus)})


def _read_frames(conn, pin: bool, counts) -> None:
    """As the server reads them; puts the outputs received when the stopped Batch comes."""
    if pin:
        _others()
    reader, got = BatchReader(conn.fileno()), 0
    while not reader.eof:
        select.select([conn.fileno()], [], [])
        for batch in reader.read():
            got += len(batch.outputs)
            if batch.stopped:
                counts.put(got)
                return


def _read_connection(conn, pin: bool, counts) -> None:
    if pin:
        _others()
    got = 0
    while True:
        batch = conn.recv()
        got += len(batch.outputs)
        if batch.stopped:
            counts.put(got)
            return


def _stub_engine(args):
    from benchmarks.engine_host import ready_engine
    from stack.assets import ensure_demo

    demo = ensure_demo(Path(args.demo_dir))
    names = sorted(d.name for d in demo.adapters_dir.iterdir() if d.is_dir())[: args.adapters]
    return ready_engine(demo, names, True, args.batch, 128, args.steps + 50)


def _gpu_engine(args):
    from benchmarks.synthetic import llama_1b_with_adapters
    from gpu_worker.engine import EngineArgs, LLMEngine, SamplingParams

    model, loras = llama_1b_with_adapters("batch-pipe-", args.adapters)
    engine = LLMEngine(EngineArgs(model=str(model), dtype="bfloat16", num_kv_blocks=4096, max_num_seqs=args.batch,
                                  enable_lora=True, max_loras=max(1, args.adapters), max_lora_rank=16))
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=args.steps + 50, temperature=0.0, ignore_eos=True, output_kind="delta")
    for i in range(args.batch):
        k = i % (len(loras) + 1)
        ids = torch.randint(10, engine.model_config.vocab_size, (128,), generator=g).tolist()
        engine.add_request(f"r{i}", ids, params, lora_request=loras[k - 1] if k else None)
    for _ in range(8):
        engine.step()
    return engine


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m benchmarks.batch_pipe", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=600, help="decode steps timed, over all variants")
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--block", type=int, default=10, help="steps a variant runs before the next takes over")
    p.add_argument("--demo-dir", default=".demo/assets")
    p.add_argument("--gpu", action="store_true", help="the real engine on CUDA instead of the stubbed one")
    p.add_argument("--pin", action="store_true", help="the step loop's thread alone on the first CPU, the readers "
                   "and the sender thread on the others (on a 2-core VM, as a many-core host runs them)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    engine = _gpu_engine(args) if args.gpu else _stub_engine(args)
    engine.wire_deltas = True  # streamed outputs in wire form, as the engine process's engine builds them
    phases = {"launch": 0.0}
    engine.runner.run = timed(engine.runner.run, "launch", phases)

    ctx = mp.get_context("spawn")
    readers, sends = {}, {"dropped": lambda batch: None}
    for name, target in (("step loop writes (BatchWriter)", _read_frames), ("sender thread", _read_connection)):
        rx, tx = ctx.Pipe(duplex=False)
        counts = ctx.Queue()
        proc = ctx.Process(target=target, args=(rx, args.pin, counts), daemon=True)
        proc.start()
        rx.close()
        readers[name] = (proc, tx, counts)
        sends[name] = BatchWriter(tx.fileno()) if target is _read_frames else ThreadSender(tx)
    sent = dict.fromkeys(sends, 0)

    if args.pin:  # the step loop's thread on a core of its own, as on a many-core host (its other threads: the rest)
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    steps = {k: [] for k in sends}
    launch = {k: [] for k in sends}
    cuda = args.gpu and torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(0, args.steps, args.block * len(sends)):
        for name, send in sends.items():
            sync()
            for _ in range(args.block):
                phases["launch"] = 0.0
                t = time.perf_counter()
                outs = engine.step()
                send(Batch(outputs=outs))
                sent[name] += len(outs)
                if isinstance(send, BatchWriter):
                    send.flush(force=False)
                steps[name].append(time.perf_counter() - t)
                launch[name].append(phases["launch"])
    device = torch.cuda.get_device_name() if cuda else "the real engine on the CPU" if args.gpu else \
        "stubbed engine on the CPU"
    print(f"{device}; batch {args.batch}, {args.adapters} adapters + base, {len(steps['dropped'])} steps a variant "
          f"in alternating blocks of {args.block}:")
    base = statistics.median(steps["dropped"])
    for name in sends:
        step, lau = statistics.median(steps[name]), statistics.median(launch[name])
        print(f"  {name:32s} step {step * 1e3:.3f} ms (x{step / base:.3f} of dropped), launch {lau * 1e3:.3f} ms")
    for name, (proc, tx, counts) in readers.items():  # every output reached its reader, in either design
        sends[name](Batch(stopped=True))
        got = counts.get(timeout=60)
        assert got == sent[name], f"{name}: {got} outputs read of {sent[name]} sent"
        proc.join(10)
        tx.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
