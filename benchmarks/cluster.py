"""`make bench-cluster`: the adapter store, the router and GPU workers, each worker pinned to its own GPU
(CUDA_VISIBLE_DEVICES), on a random Llama-3.2-1B-shaped model with rank-16 adapters of Zipf popularity,
under open-loop load. One call does it all:

    python3 -m benchmarks.cluster [--rates 16,32,64] [--seconds 30] [--out DIR]
    python3 -m benchmarks.cluster --quick     # a tiny model on the CPU, a few seconds a rate (a smoke run)

Setups, each on freshly started workers (empty adapter caches) and one router, the same request schedule:
1. one worker;  2. two workers, round-robin routing;  3. two workers, our affinity routing.
Each rate runs `--seconds` of Poisson arrivals; every request streams (GenerateStream) 128 new tokens
(ignore_eos) after a 128-token prompt, for an adapter drawn from Zipf(`--zipf`) over `--adapters`. Reported
per setup and rate: requests sent / finished / failed, output tokens per second (tokens of finished requests
over the time from the first send to the last finish), time to first token p50 / p99, latency p50 / p99,
and from the router's metrics the cold loads (requests sent to a worker that held their adapter neither in a
GPU slot nor in host memory) and the affinity hit ratio.

Then the failover run, on setup 3's cluster: the lowest rate again (one worker copes with it alone), and
one worker is SIGKILLed a third of the way in. Requests lost before their first token must be 0 (the router
retries them on the other worker); streams cut mid-way end with UNAVAILABLE and are reported.

With fewer than two GPUs the two workers share GPU 0 (each with --shared-kv-blocks KV blocks); every
line of the output says so. Results: a table on stdout and `cluster.json` under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=512, max_position_embeddings=512)
# What the child processes inherit on the multi-GPU machines (their KINDS.md: NVLink multicast stays off).
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass(frozen=True)
class Setup:
    name: str
    workers: int
    routing: str


SETUPS = (Setup("1 worker", 1, "affinity"), Setup("2 workers, round-robin", 2, "round-robin"),
          Setup("2 workers, affinity", 2, "affinity"))


@dataclass
class Outcome:
    """One request as the client saw it."""

    sent: float
    adapter: str
    first: float | None = None
    done: float | None = None
    tokens: int = 0
    code: str = "OK"


@dataclass
class RunResult:
    setup: str
    rate: float
    sent: int
    finished: int
    failed: int
    lost_before_first_token: int
    cut_mid_stream: int
    out_tok_s: float
    req_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    latency_p50_ms: float
    latency_p99_ms: float
    cold_loads: int
    affinity_hit_ratio: float
    gpus: str
    errors: list[str] = field(default_factory=list)


# -- the workload -------------------------------------------------------------------------------------

def zipf_weights(n: int, s: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** s
    return w / w.sum()


def schedule(rate: float, seconds: float, adapters: list[str], s: float, prompt_len: int, vocab: int,
             seed: int) -> list[tuple[float, str, list[int]]]:
    """Poisson arrivals over `seconds`: (offset, adapter, prompt ids); the same seed gives the same list."""
    rng = np.random.default_rng(seed)
    weights = zipf_weights(len(adapters), s)
    out, t = [], 0.0
    while True:
        t += rng.exponential(1.0 / rate)
        if t >= seconds:
            return out
        name = adapters[rng.choice(len(adapters), p=weights)]
        out.append((t, name, rng.integers(10, vocab - 10, prompt_len).tolist()))


async def drive(router: str, plan: list[tuple[float, str, list[int]]], max_tokens: int, timeout_s: float,
                at: tuple[float, callable] | None = None) -> tuple[list[Outcome], float]:
    """Send `plan` open-loop through the router's GenerateStream; `at` = (offset, action) runs once mid-way.
    Returns every request's outcome and the start time."""
    import grpc

    from loraserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc

    channel = grpc.aio.insecure_channel(router, options=[("grpc.max_concurrent_streams", 10000)])
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    outcomes: list[Outcome] = []

    async def one(name: str, ids: list[int], o: Outcome) -> None:
        req = inference_pb2.GenerateStreamRequest(model=name, prompt=common_pb2.Prompt(
            token_ids=common_pb2.TokenIds(ids=ids)), sampling=sampling)
        try:
            async for m in stub.GenerateStream(req, timeout=timeout_s):
                if m.token_ids:
                    if o.first is None:
                        o.first = time.perf_counter()
                    o.tokens += len(m.token_ids)
            o.done = time.perf_counter()
        except grpc.aio.AioRpcError as e:
            o.code = f"{e.code().name}: {e.details()}"

    tasks = []
    start = time.perf_counter()
    pending_action = at
    for offset, name, ids in plan:
        if pending_action is not None and offset >= pending_action[0]:
            await asyncio.sleep(max(0.0, start + pending_action[0] - time.perf_counter()))
            pending_action[1]()
            pending_action = None
        await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
        o = Outcome(time.perf_counter(), name)
        outcomes.append(o)
        tasks.append(asyncio.create_task(one(name, ids, o)))
    await asyncio.gather(*tasks)
    await channel.close()
    return outcomes, start


def summarize(setup: str, rate: float, outcomes: list[Outcome], start: float, metrics: tuple[dict, dict],
              gpus: str) -> RunResult:
    ok = [o for o in outcomes if o.code == "OK"]
    bad = [o for o in outcomes if o.code != "OK"]
    end = max((o.done for o in ok), default=start)
    ttft = np.array([(o.first - o.sent) * 1e3 for o in ok if o.first is not None] or [np.nan])
    lat = np.array([(o.done - o.sent) * 1e3 for o in ok] or [np.nan])
    before, after = metrics
    lookups = after["lookups"] - before["lookups"]
    return RunResult(
        setup=setup, rate=rate, sent=len(outcomes), finished=len(ok), failed=len(bad),
        lost_before_first_token=sum(o.first is None for o in bad), cut_mid_stream=sum(o.first is not None for o in bad),
        out_tok_s=round(sum(o.tokens for o in ok) / max(end - start, 1e-9), 1),
        req_s=round(len(ok) / max(end - start, 1e-9), 2),
        ttft_p50_ms=round(float(np.percentile(ttft, 50)), 1), ttft_p99_ms=round(float(np.percentile(ttft, 99)), 1),
        latency_p50_ms=round(float(np.percentile(lat, 50)), 1), latency_p99_ms=round(float(np.percentile(lat, 99)), 1),
        cold_loads=int(after["cold"] - before["cold"]),
        affinity_hit_ratio=round((after["hits"] - before["hits"]) / lookups, 3) if lookups else 0.0,
        gpus=gpus, errors=sorted({o.code for o in bad})[:5])


# -- the processes ------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def router_counters(port: int) -> dict:
    """Cold loads, affinity hits and adapter lookups so far, from the router's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    tiers: dict[str, float] = {}
    cold = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "loraserve_router_routing_decisions_total":
                tiers[s.labels["tier"]] = s.value
            elif s.name == "loraserve_router_cold_loads_total":
                cold = s.value
    hits = tiers.get("gpu", 0) + tiers.get("host", 0)
    return {"cold": cold, "hits": hits, "lookups": hits + tiers.get("cold", 0) + tiers.get("spill", 0)}


class Cluster:
    """The store (shared by every setup), and per setup fresh workers and a router."""

    def __init__(self, args, work: Path, model_dir: Path, adapters_dir: Path, gpus: int):
        from stack.processes import Service

        self.Service = Service
        self.args, self.work, self.model_dir, self.adapters_dir, self.gpus = args, work, model_dir, adapters_dir, gpus
        self.logs = work / "logs"
        self.store = Service("adapter-store", [
            "adapter_store", "--host", "127.0.0.1", "--port", "0", "--cache-dir", str(work / "store-cache"),
            "--lora-root", str(adapters_dir), "--resolvers", "filesystem", "--log-level", "warning"],
            self.logs / "adapter-store.log", SAFE_ENV)
        self.store.start(ROOT)
        self.store.wait_ready(120)
        self.workers: list = []
        self.router = None
        self.metrics_port = 0

    def gpu_label(self, n: int) -> str:
        if self.args.quick:
            return "cpu"
        return f"{n} GPU(s), one per worker" if self.gpus >= n else f"{n} workers sharing GPU 0 (memory split)"

    def start(self, setup: Setup, tag: str) -> None:
        a = self.args
        for i in range(setup.workers):
            cache = self.work / f"worker-cache-{tag}-{i}"
            shutil.rmtree(cache, ignore_errors=True)
            env = dict(SAFE_ENV)
            extra = []
            if a.quick:
                extra = ["--device", "cpu", "--num-kv-blocks", "512"]
            else:
                env["CUDA_VISIBLE_DEVICES"] = str(i if self.gpus >= setup.workers else 0)
                extra = ["--device", "cuda"]
                if self.gpus < setup.workers:
                    extra += ["--num-kv-blocks", str(a.shared_kv_blocks)]
            svc = self.Service(f"worker-{i}", [
                "gpu_worker", "--host", "127.0.0.1", "--port", "0", "--model-dir", str(self.model_dir),
                "--worker-id", f"w{i}", "--adapter-store", self.store.address, "--adapter-cache-dir", str(cache),
                "--max-loras", str(a.max_loras), "--max-cpu-loras", str(a.max_cpu_loras), "--max-lora-rank",
                str(a.rank), "--drain-timeout-s", "0", "--log-level", "info", *extra],
                self.logs / f"worker-{tag}-{i}.log", env)
            svc.start(ROOT)
            self.workers.append(svc)
        for svc in self.workers:
            svc.wait_ready(600)
        self.metrics_port = free_port()
        self.router = self.Service("router", [
            "router", "--host", "127.0.0.1", "--port", "0", "--metrics-port", str(self.metrics_port),
            "--workers", ",".join(w.address for w in self.workers), "--store-address", self.store.address,
            "--routing", setup.routing, "--status-interval-ms", "20", "--log-level", "warning"],
            self.logs / f"router-{tag}.log", SAFE_ENV)
        self.router.start(ROOT)
        self.router.wait_ready(120)

    def stop(self) -> None:
        for svc in [self.router, *self.workers]:
            if svc is not None:
                svc.stop(10)
        self.workers, self.router = [], None

    def close(self) -> None:
        self.stop()
        self.store.stop(10)


# -- the benchmark ------------------------------------------------------------------------------------

def build_assets(args, work: Path) -> tuple[Path, Path, list[str], int]:
    from benchmarks.synthetic import LLAMA_3_2_1B, write_adapter, write_model

    cfg = TINY if args.quick else LLAMA_3_2_1B
    model_dir, adapters_dir = work / "model", work / "adapters"
    device = "cpu" if args.quick else "cuda"
    if not (model_dir / "config.json").exists():
        write_model(model_dir, cfg, device)
    names = [f"zipf-{i:03d}" for i in range(args.adapters)] + [f"warm-{i}" for i in range(4)]
    for i, name in enumerate(names):
        if not (adapters_dir / name / "adapter_config.json").exists():
            write_adapter(adapters_dir / name, cfg, args.rank, seed=1000 + i)
    # --adapters 0: base-model requests only (the serving path without LoRA)
    return model_dir, adapters_dir, names[:args.adapters] or [""], cfg["vocab_size"]


def run_rate(cluster: Cluster, setup: Setup, rate: float, plan, args, at=None) -> RunResult:
    before = router_counters(cluster.metrics_port)
    outcomes, start = asyncio.run(drive(cluster.router.address, plan, args.max_tokens, args.timeout_s, at))
    after = router_counters(cluster.metrics_port)
    return summarize(setup.name, rate, outcomes, start, (before, after), cluster.gpu_label(setup.workers))


def warm_up(cluster: Cluster, args, vocab: int) -> None:
    """Kernels compiled and the engine's first batches run, on adapters outside the measured set."""
    warm = [f"warm-{i}" for i in range(4)]
    plan = schedule(args.rates[0], args.warmup_s, warm, 0.0, args.prompt_len, vocab, seed=99)
    asyncio.run(drive(cluster.router.address, plan, args.max_tokens, args.timeout_s))


def print_row(r: RunResult) -> None:
    print(f"{r.setup:<24} {r.rate:>6.1f} {r.sent:>5} {r.finished:>5} {r.failed:>4} {r.out_tok_s:>9.0f} "
          f"{r.ttft_p50_ms:>8.0f} {r.ttft_p99_ms:>8.0f} {r.latency_p50_ms:>8.0f} {r.latency_p99_ms:>8.0f} "
          f"{r.cold_loads:>5} {r.affinity_hit_ratio:>5.2f}  {r.gpus}"
          + (f"  errors: {r.errors}" if r.errors else ""), flush=True)


HEADER = (f"{'setup':<24} {'rate':>6} {'sent':>5} {'done':>5} {'fail':>4} {'out tok/s':>9} {'ttft p50':>8} "
          f"{'ttft p99':>8} {'lat p50':>8} {'lat p99':>8} {'cold':>5} {'hit':>5}  gpus")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.cluster", description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", default="", help="requests per second, comma-separated (default 16,32,64; quick: 4)")
    p.add_argument("--seconds", type=float, default=0, help="seconds per rate (default 30; quick: 3)")
    p.add_argument("--adapters", type=int, default=64, help="0: base-model requests only")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of adapter popularity")
    p.add_argument("--prompt-len", type=int, default=0, help="prompt tokens (default 128; quick: 16)")
    p.add_argument("--max-tokens", type=int, default=0, help="new tokens a request (default 128; quick: 16)")
    p.add_argument("--max-loras", type=int, default=16, help="GPU adapter slots per worker")
    p.add_argument("--max-cpu-loras", type=int, default=32, help="adapters in host memory per worker")
    p.add_argument("--shared-kv-blocks", type=int, default=8192, help="KV blocks per worker when two share a GPU")
    p.add_argument("--warmup-s", type=float, default=0, help="warm-up seconds per setup (default 5; quick: 1)")
    p.add_argument("--timeout-s", type=float, default=120)
    p.add_argument("--setups", default="1,2,3", help="which setups to run (1-based), comma-separated")
    p.add_argument("--no-failover", action="store_true", help="skip the worker-kill run")
    p.add_argument("--quick", action="store_true", help="tiny model on the CPU, a few seconds a rate")
    p.add_argument("--work-dir", default="", help="assets and logs (default: a temporary directory)")
    p.add_argument("--out", default=os.environ.get("OUT", ""), help="write cluster.json here")
    args = p.parse_args(argv)
    args.rates = [float(r) for r in (args.rates or ("4" if args.quick else "16,32,64")).split(",")]
    args.seconds = args.seconds or (3.0 if args.quick else 30.0)
    args.warmup_s = args.warmup_s or (1.0 if args.quick else 5.0)
    args.prompt_len = args.prompt_len or (16 if args.quick else 128)
    args.max_tokens = args.max_tokens or (16 if args.quick else 128)
    args.setups = [SETUPS[int(i) - 1] for i in args.setups.split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    gpus = 0 if args.quick else torch.cuda.device_count()
    if not args.quick and gpus == 0:
        print("no GPU: run with --quick for the tiny CPU smoke run", file=sys.stderr)
        return 2
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="loraserve-cluster-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model_dir, adapters_dir, adapters, vocab = build_assets(args, work)
    card = "cpu" if args.quick else f"{gpus} x {torch.cuda.get_device_name(0)}"
    print(f"# cluster bench on {card}: {len(adapters)} rank-{args.rank} adapters, Zipf s={args.zipf}, prompt "
          f"{args.prompt_len}, {args.max_tokens} new tokens, max_loras {args.max_loras}, max_cpu_loras "
          f"{args.max_cpu_loras}; {args.seconds:.0f} s a rate; assets in {time.perf_counter() - t0:.0f} s "
          f"({work})", flush=True)
    plans = {rate: schedule(rate, args.seconds, adapters, args.zipf, args.prompt_len, vocab, seed=int(rate * 1000))
             for rate in args.rates}
    cluster = Cluster(args, work, model_dir, adapters_dir, gpus)
    results: list[RunResult] = []
    failover: RunResult | None = None
    print(HEADER, flush=True)
    try:
        for k, setup in enumerate(args.setups):
            cluster.start(setup, f"s{k}")
            warm_up(cluster, args, vocab)
            for rate in args.rates:
                results.append(run_rate(cluster, setup, rate, plans[rate], args))
                print_row(results[-1])
            if setup.workers == 2 and setup.routing == "affinity" and not args.no_failover:
                rate = args.rates[0]  # one worker alone must cope: what fails then is the failover's doing
                victim = cluster.workers[1]
                plan = schedule(rate, args.seconds, adapters, args.zipf, args.prompt_len, vocab, seed=4242)
                failover = run_rate(cluster, Setup("failover: kill w1", 2, "affinity"), rate, plan, args,
                                    at=(args.seconds / 3, victim.kill))
                print_row(failover)
            cluster.stop()
    finally:
        cluster.close()
    if failover is not None:
        print(f"# failover: worker w1 SIGKILLed at {args.seconds / 3:.0f} s; lost before the first token: "
              f"{failover.lost_before_first_token} (must be 0); streams cut mid-way: {failover.cut_mid_stream}")
    report = {"card": card, "args": {k: v for k, v in vars(args).items() if k != "setups"},
              "setups": [asdict(s) for s in args.setups], "results": [asdict(r) for r in results],
              "failover": asdict(failover) if failover else None}
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "cluster.json").write_text(json.dumps(report, indent=1))
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    bad = failover is not None and failover.lost_before_first_token > 0
    return 1 if bad or any(r.finished == 0 for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
