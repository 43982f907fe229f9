"""What encoding and decoding a step's Batch costs (gpu_worker/ipc_codec.py, what the engine process and its server
exchange), against pickle's encoding of the same Batch, side by side on this machine's CPU.

    python3 -m benchmarks.ipc_codec [--streams 64] [--adapters 8]

Batches as a batch-64 decode step hands them out: a streamed delta a stream (outputs.DeltaOutput), alone, with the
engine's load (every LOAD_INTERVAL_S), and with two logprobs a token.
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import timeit

from gpu_worker import ipc_codec
from gpu_worker.engine.outputs import Logprob
from gpu_worker.engine_core import AdapterResidency, Batch, EngineLoad


def batches(streams: int, adapters: int) -> dict[str, Batch]:
    load = EngineLoad(0, streams, 1000, tuple(AdapterResidency(f"adapter-{i}", f"{i:064x}", "gpu_slot", 8, 16)
                                              for i in range(adapters)), 10, 5)

    def deltas(logprobs: bool) -> list:
        return [(f"req-{i}#{i}", " tok", [1000 + i],
                 [Logprob(1000 + i, -0.5, [(1000 + i, -0.5), (7, -1.5)])] if logprobs else []) for i in range(streams)]

    return {f"{streams} deltas": Batch(outputs=deltas(False)),
            f"{streams} deltas + load": Batch(load=load, outputs=deltas(False)),
            f"{streams} deltas, logprobs": Batch(outputs=deltas(True))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m benchmarks.ipc_codec", description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--number", type=int, default=2000, help="calls a timing")
    p.add_argument("--repeat", type=int, default=7, help="timings, the median printed")
    args = p.parse_args(argv)

    def us(fn) -> float:
        return statistics.median(timeit.repeat(fn, number=args.number, repeat=args.repeat)) / args.number * 1e6

    print(f"{'batch':<24} {'encode us':>10} {'decode us':>10} {'bytes':>7} {'pickle encode us':>17} {'bytes':>7}")
    for name, batch in batches(args.streams, args.adapters).items():
        data = ipc_codec.encode(batch)
        assert len(ipc_codec.decode(data).outputs) == len(batch.outputs)
        pickled = pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)
        print(f"{name:<24} {us(lambda b=batch: ipc_codec.encode(b)):>10.1f} "
              f"{us(lambda d=data: ipc_codec.decode(d)):>10.1f} {len(data):>7} "
              f"{us(lambda b=batch: pickle.dumps(b, protocol=pickle.HIGHEST_PROTOCOL)):>17.1f} {len(pickled):>7}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
