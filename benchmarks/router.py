"""`make bench-router`: what the router adds to a request, with echo workers (no model), on this machine.

    python3 -m benchmarks.router [--requests 3000] [--concurrency 64] [--seconds 5]

Three processes besides this one: two echo workers (tests/router/fakes.py, a fake WorkerService streaming a
fixed 4-token reply, in one process) and `python -m router` over them. Everything shares the machine's
cores, the load generator included, as a deployment on one host would. For scale, the same is measured
through a bare pass-through proxy (`--serve-bare-proxy` below: one grpc.aio server relaying Generate to
StreamGenerate, round-robin, no routing, no metrics): the floor of any Python gRPC hop on this machine.

- latency: one request at a time, `--requests` of them after a warm-up; each through the router (Generate,
  and GenerateStream read to the end), and straight to the echo workers (StreamGenerate, alternating
  between the two) in the same run; added = router - direct, at p50 and p99;
- throughput: `--concurrency` requests kept in flight through the router for `--seconds`, from
  `--clients` load-generator processes; requests per second finished (all of them OK).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from loraserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
PROMPT = common_pb2.Prompt(text="hello")
SAMPLING = common_pb2.SamplingParams(max_tokens=4)


class BareProxy(inference_pb2_grpc.InferenceServiceServicer):
    """The floor: Generate -> a worker's StreamGenerate, round-robin, nothing else (benchmark only)."""

    def __init__(self, workers: list[str]):
        self.stubs = [worker_pb2_grpc.WorkerServiceStub(grpc.aio.insecure_channel(w)) for w in workers]
        self.turn = 0

    async def Generate(self, request, context):
        self.turn += 1
        call = self.stubs[self.turn % len(self.stubs)].StreamGenerate(worker_pb2.StreamGenerateRequest(
            request_id=request.request_id, prompt=request.prompt, sampling=request.sampling),
            timeout=context.time_remaining())
        text, tokens, last = [], [], None
        async for m in call:
            text.append(m.text_delta)
            tokens.extend(m.token_ids)
            last = m
        return inference_pb2.GenerateResponse(request_id=request.request_id, text="".join(text), token_ids=tokens,
                                              finish_reason=last.finish_reason, usage=last.usage)

    async def GenerateStream(self, request, context):
        self.turn += 1
        async for m in self.stubs[self.turn % len(self.stubs)].StreamGenerate(worker_pb2.StreamGenerateRequest(
                request_id=request.request_id, prompt=request.prompt, sampling=request.sampling),
                timeout=context.time_remaining()):
            yield inference_pb2.GenerateStreamResponse(request_id=m.request_id, text_delta=m.text_delta,
                                                       token_ids=m.token_ids, finish_reason=m.finish_reason,
                                                       usage=m.usage)


async def serve_bare_proxy(workers: list[str]) -> None:
    server = grpc.aio.server()
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(BareProxy(workers), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"bare proxy serving on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


def start(cmd: list[str], marker: str, count: int = 1) -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    addresses = []
    while len(addresses) < count:
        line = lines.get(timeout=60)
        if marker in line:
            addresses.append(line.strip().rsplit(" ", 1)[1])
    return proc, addresses


async def latencies(n: int, one) -> np.ndarray:
    for _ in range(min(200, n)):
        await one()
    out = np.empty(n)
    for i in range(n):
        t = time.perf_counter()
        await one()
        out[i] = time.perf_counter() - t
    return out


async def measure_latency(router: str, bare: str, workers: list[str], n: int) -> dict:
    async with grpc.aio.insecure_channel(router) as rch, grpc.aio.insecure_channel(bare) as bch:
        wchs = [grpc.aio.insecure_channel(w) for w in workers]
        r = inference_pb2_grpc.InferenceServiceStub(rch)
        b = inference_pb2_grpc.InferenceServiceStub(bch)
        ws = [worker_pb2_grpc.WorkerServiceStub(c) for c in wchs]
        unary = inference_pb2.GenerateRequest(prompt=PROMPT, sampling=SAMPLING)
        stream = inference_pb2.GenerateStreamRequest(prompt=PROMPT, sampling=SAMPLING)
        direct_req = worker_pb2.StreamGenerateRequest(request_id="bench", prompt=PROMPT, sampling=SAMPLING)
        turn = iter(range(1 << 62))

        async def direct():
            async for _ in ws[next(turn) % len(ws)].StreamGenerate(direct_req):
                pass

        async def via_stream():
            async for _ in r.GenerateStream(stream):
                pass

        async def via_unary():
            await r.Generate(unary)

        async def bare_unary():
            await b.Generate(unary)

        async def bare_stream():
            async for _ in b.GenerateStream(stream):
                pass

        # interleave them in rounds, so a noisy neighbour hits all of them alike
        paths = (("direct", direct), ("router Generate", via_unary), ("router GenerateStream", via_stream),
                 ("bare proxy Generate", bare_unary), ("bare proxy GenerateStream", bare_stream))
        parts = {name: [] for name, _ in paths}
        for _ in range(5):
            for name, fn in paths:
                parts[name].append(await latencies(n // 5, fn))
        for c in wchs:
            await c.close()
    return {k: np.concatenate(v) for k, v in parts.items()}


def load_client(router: str, concurrency: int, seconds: float, start_at: float, out) -> None:
    async def run():
        async with grpc.aio.insecure_channel(router) as ch:
            stub = inference_pb2_grpc.InferenceServiceStub(ch)
            req = inference_pb2.GenerateRequest(prompt=PROMPT, sampling=SAMPLING)
            await stub.Generate(req)
            while time.time() < start_at:
                await asyncio.sleep(0.001)
            end = time.perf_counter() + seconds
            done = errors = 0

            async def loop():
                nonlocal done, errors
                while time.perf_counter() < end:
                    try:
                        await stub.Generate(req)
                        done += 1
                    except grpc.RpcError:
                        errors += 1

            await asyncio.gather(*(loop() for _ in range(concurrency)))
            return done, errors

    out.put(asyncio.run(run()))


def measure_throughput(router: str, concurrency: int, seconds: float, clients: int) -> dict:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 3.0
    procs = [ctx.Process(target=load_client, args=(router, concurrency // clients, seconds, start_at, out))
             for _ in range(clients)]
    for p in procs:
        p.start()
    results = [out.get(timeout=seconds + 60) for _ in procs]
    for p in procs:
        p.join()
    done, errors = sum(r[0] for r in results), sum(r[1] for r in results)
    return {"requests_per_s": done / seconds, "errors": errors, "concurrency": concurrency, "clients": clients}


def ms(a: np.ndarray, q: float) -> float:
    return float(np.percentile(a, q) * 1e3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m benchmarks.router", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--clients", type=int, default=1, help="load-generator processes for the throughput run")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--tokens", type=int, default=4, help="tokens (stream messages) in the echo reply")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--serve-bare-proxy", metavar="WORKERS", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_bare_proxy:
        asyncio.run(serve_bare_proxy(args.serve_bare_proxy.split(",")))
        return 0
    echo, workers = start([sys.executable, "-m", "tests.router.fakes", "--workers", "2", "--tokens", str(args.tokens)],
                          "serving on", 2)
    router = bare = None
    try:
        router, (address,) = start([sys.executable, "-m", "router", "--host", "127.0.0.1", "--port", "0",
                                    "--workers", ",".join(workers), "--metrics-port", "0", "--log-level", "warning"],
                                   "router serving on")
        bare, (bare_address,) = start([sys.executable, "-m", "benchmarks.router", "--serve-bare-proxy",
                                       ",".join(workers)], "bare proxy serving on")
        lat = asyncio.run(measure_latency(address, bare_address, workers, args.requests))
        tput = measure_throughput(address, args.concurrency, args.seconds, args.clients)
        bare_tput = measure_throughput(bare_address, args.concurrency, args.seconds, args.clients)
    finally:
        for proc in (router, bare, echo):
            if proc is not None:
                proc.terminate()
                proc.wait(10)
    cpus = os.cpu_count()
    print(f"router overhead with echo workers, {cpus} CPUs, {args.requests} sequential requests each, interleaved\n")
    print("| path | p50 ms | p99 ms | added p50 ms | added p99 ms |\n|---|---|---|---|---|")
    base = lat["direct"]
    rows = {}
    for name, a in lat.items():
        added = "" if name == "direct" else f"{ms(a, 50) - ms(base, 50):.3f} | {ms(a, 99) - ms(base, 99):.3f}"
        print(f"| {name} | {ms(a, 50):.3f} | {ms(a, 99):.3f} | {added or ' | '} |")
        rows[name] = {"p50_ms": ms(a, 50), "p99_ms": ms(a, 99)}
    print(f"\nthroughput through the router: {tput['requests_per_s']:,.0f} requests/s (Generate, "
          f"{tput['concurrency']} in flight from {tput['clients']} client process(es), {args.seconds:.0f} s, "
          f"{tput['errors']} errors); through the bare proxy: {bare_tput['requests_per_s']:,.0f} requests/s")
    added = rows["router Generate"]["p50_ms"] - rows["direct"]["p50_ms"]
    print(f"targets: < 1 ms added at p50: {'met' if added < 1 else 'NOT met'} ({added:.3f} ms); >= 1,000 requests/s: "
          f"{'met' if tput['requests_per_s'] >= 1000 else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"latency": rows, "throughput": tput, "bare_proxy_throughput": bare_tput,
                                               "cpus": cpus, "tokens": args.tokens}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
