"""`make bench-routing`: four routing policies on one simulated multi-LoRA cluster, in one run, same requests.

    python3 -m benchmarks.routing [--workers 8] [--adapters 1000] [--rate 400] [--duration 60] [--seed 0]

A discrete-event simulation (no GPU, no gRPC): 8 workers, each with 4 GPU adapter slots, 16 adapters of host
memory and continuous batching (64 requests a step at most); 1,000 adapters with Zipf popularity (s = 1).
A request needs its adapter in a GPU slot of its worker to join the batch: from host memory that is one
copy (added to one step), from storage a cold load (the worker keeps stepping meanwhile; the request waits).
A slot is taken back only from an adapter no running request uses (LRU), host memory is an LRU too.
Step and load times come from the H100 worker benchmark (benchmarks/results/*-h100-worker.json):
decode step of "8 adapters mixed" at batch 32 and 64 (a line through both), prefill tokens/s, the
cold-load staging time and the extra time of the step that copies an adapter in.

The policies see the cluster as a router does: residency and queues as of each worker's last status (every
50 ms); least-loaded and ours also count what they sent and has not finished, per worker (and ours per
adapter), exactly, as our router does; the endpoint picker works from the scraped status alone, as it does.
- round-robin;
- least-loaded (fewest requests in flight, ties at random);
- LoRA affinity as the Kubernetes Gateway API Inference Extension's endpoint picker decides by default:
  low-queue filter (waiting <= 128), then LoRA affinity (with probability 0.999 the workers where the adapter
  is active or waiting, else those with room for another adapter), least queue, least KV cache, random pick;
- ours: router.policy (GPU slot > host memory > bounded-load rendezvous hashing; spill; prefetch).

Reported per policy: cold loads (storage -> host memory, prefetches included), throughput (requests finished
per second of the measured window, after a warm-up), p50 / p99 latency and p99 time to first token.
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from router import policy as ours

RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Timing:
    """Seconds, from the worker benchmark; defaults are the 2026-11-25 H100 figures."""

    step_at_32: float = 4.90e-3
    step_at_64: float = 5.54e-3
    prefill_tok_s: float = 29697.0
    cold_load: float = 0.173
    swap: float = 1.5e-3  # the step that copies an adapter into a slot, over a normal step

    def step(self, batch: int) -> float:
        slope = (self.step_at_64 - self.step_at_32) / 32
        return self.step_at_32 + slope * (batch - 32)

    @classmethod
    def from_results(cls, directory: Path = RESULTS) -> tuple[Timing, str]:
        files = sorted(directory.glob("*-worker.json"))
        if not files:
            return cls(), "defaults (no worker results found)"
        rows = json.loads(files[-1].read_text())
        step = {r["batch"]: r["decode_ms"] / 1e3 for r in rows if r.get("case", "").startswith("8 adapter")}
        prefill = next((r for r in rows if r.get("case", "").startswith("prefill")), {})
        cold = next((r for r in rows if r.get("case") == "cold load"), {})
        d = cls()
        timing = cls(step_at_32=step.get(32, d.step_at_32), step_at_64=step.get(64, d.step_at_64),
                     prefill_tok_s=prefill.get("lora8_tok_s", d.prefill_tok_s),
                     cold_load=cold.get("stage_ms", d.cold_load * 1e3) / 1e3,
                     swap=max(0.0, cold.get("during_max_ms", 0) - cold.get("before_ms", 0)) / 1e3 or d.swap)
        return timing, files[-1].name


@dataclass(frozen=True)
class Workload:
    workers: int = 8
    gpu_slots: int = 4
    host_slots: int = 16
    max_batch: int = 64
    adapters: int = 1000
    zipf_s: float = 1.0
    rate: float = 70.0  # requests per second, Poisson: ~80% of what the best policy here sustains
    duration: float = 60.0
    warmup: float = 10.0
    prompt_tokens: int = 256
    mean_output_tokens: int = 128
    status_interval: float = 0.05
    seed: int = 0


@dataclass(eq=False)
class Request:
    arrival: float
    adapter: str
    tokens: int
    first_token: float = -1.0
    done: float = -1.0


@dataclass(eq=False)
class Worker:
    wid: str
    running: list = field(default_factory=list)  # heap of (finish step, seq, request)
    waiting: deque = field(default_factory=deque)
    gpu: OrderedDict = field(default_factory=OrderedDict)
    host: OrderedDict = field(default_factory=OrderedDict)
    loading: set = field(default_factory=set)
    active: Counter = field(default_factory=Counter)  # adapter -> running requests
    needed: Counter = field(default_factory=Counter)  # adapter -> running or waiting requests
    busy: bool = False
    step: int = 0

    @property
    def load(self) -> int:
        return len(self.running) + len(self.waiting)


@dataclass(frozen=True)
class View:
    """A worker as of its last status."""

    wid: str
    gpu: frozenset
    host: frozenset
    active: frozenset
    waiting_models: frozenset
    waiting: int
    kv_used: float


class Cluster:
    def __init__(self, wl: Workload, timing: Timing, route, requests: list[Request]):
        self.wl, self.t, self.route = wl, timing, route
        self.workers = [Worker(f"worker-{i}") for i in range(wl.workers)]
        self.requests = requests
        self.events: list = []
        self.seq = 0
        self.cold_loads = 0
        self.prefetch_loads = 0
        self.views: list[View] = []

    def push(self, time: float, kind: str, obj) -> None:
        self.seq += 1
        heapq.heappush(self.events, (time, self.seq, kind, obj))

    def run(self) -> None:
        for r in self.requests:
            self.push(r.arrival, "arrive", r)
        self.push(0.0, "status", None)
        end = self.wl.duration + 120.0  # drain what is left, within reason
        while self.events:
            now, _, kind, obj = heapq.heappop(self.events)
            if now > end:
                break
            if kind == "arrive":
                w = self.workers[self.route(self, obj)]
                w.waiting.append(obj)
                w.needed[obj.adapter] += 1
                self.kick(w, now)
            elif kind == "step":
                self.step(obj, now)
            elif kind == "loaded":
                w, name = obj
                w.loading.discard(name)
                w.host[name] = None
                self.kick(w, now)
            elif kind == "status":
                self.views = [self.view(w) for w in self.workers]
                if now < self.wl.duration:
                    self.push(now + self.wl.status_interval, "status", None)

    def view(self, w: Worker) -> View:
        return View(w.wid, frozenset(w.gpu), frozenset(w.host) | frozenset(w.loading),
                    frozenset(a for a, n in w.active.items() if n > 0),
                    frozenset(r.adapter for r in w.waiting), len(w.waiting), len(w.running) / self.wl.max_batch)

    def load_adapter(self, w: Worker, name: str, now: float, prefetch: bool = False) -> None:
        """Start reading `name` into host memory, if there is room once unneeded adapters are dropped."""
        if name in w.host or name in w.loading:
            return
        while len(w.host) + len(w.loading) >= self.wl.host_slots:
            victim = next((a for a in w.host if w.needed[a] == 0), None)
            if victim is None:
                return  # every adapter in host memory has requests here: the request waits
            del w.host[victim]
            w.gpu.pop(victim, None)
        w.loading.add(name)
        self.cold_loads += 1
        self.prefetch_loads += prefetch
        self.push(now + self.t.cold_load, "loaded", (w, name))

    def kick(self, w: Worker, now: float) -> None:
        if not w.busy:
            w.busy = True
            self.push(now, "step", w)

    def take_slot(self, w: Worker, name: str) -> bool:
        if len(w.gpu) >= self.wl.gpu_slots:
            victim = next((a for a in w.gpu if w.active[a] == 0), None)
            if victim is None:
                return False
            del w.gpu[victim]
        w.gpu[name] = None
        return True

    def step(self, w: Worker, now: float) -> None:
        # requests whose last token came out of the step that just ended
        while w.running and w.running[0][0] <= w.step:
            _, _, r = heapq.heappop(w.running)
            r.done = now
            if r.adapter:
                w.active[r.adapter] -= 1
            w.needed[r.adapter] -= 1
        w.step += 1
        admitted, swaps, skipped = [], 0, deque()
        while w.waiting and len(w.running) + len(admitted) < self.wl.max_batch:
            r = w.waiting.popleft()
            a = r.adapter
            if a and a in w.gpu:
                w.gpu.move_to_end(a)
            elif a and a in w.host:
                if not self.take_slot(w, a):
                    skipped.append(r)
                    continue
                swaps += 1
            elif a:
                self.load_adapter(w, a, now)
                skipped.append(r)
                continue
            if a:
                w.active[a] += 1
                w.host.move_to_end(a)
            admitted.append(r)
        skipped.extend(w.waiting)
        w.waiting = skipped
        batch = len(w.running) + len(admitted)
        if batch == 0:
            w.busy = False
            return
        duration = (self.t.step(batch) + swaps * self.t.swap
                    + len(admitted) * self.wl.prompt_tokens / self.t.prefill_tok_s)
        for r in admitted:
            r.first_token = now + duration
            self.seq += 1
            heapq.heappush(w.running, (w.step + r.tokens - 1, self.seq, r))
        self.push(now + duration, "step", w)


# -- the policies ---------------------------------------------------------------------------------


def round_robin():
    counter = iter(range(1 << 62))
    return lambda c, r: next(counter) % len(c.workers)


def least_loaded(rng: random.Random):
    def route(c: Cluster, r: Request) -> int:
        loads = [w.load for w in c.workers]
        low = min(loads)
        return rng.choice([i for i, v in enumerate(loads) if v == low])
    return route


def gateway_lora_affinity(rng: random.Random, queue_threshold: int = 128, affinity_threshold: float = 0.999):
    """The endpoint picker's default decision tree, over the last status of each worker."""

    def least(pods, key):
        values = [key(p) for p in pods]
        lo, hi = min(values), max(values)
        return [p for p, v in zip(pods, values) if lo <= v <= lo + (hi - lo) / len(pods)]

    def affinity(pods, adapter, gpu_slots):
        near = [p for p in pods if adapter in p.active or adapter in p.waiting_models]
        room = [p for p in pods if adapter not in p.active and adapter not in p.waiting_models
                and len(p.active | p.waiting_models) < gpu_slots]
        if near and room:
            return near if rng.random() < affinity_threshold else room
        return near or room or pods  # an empty filter passes its input on

    def route(c: Cluster, r: Request) -> int:
        pods = c.views
        low = [p for p in pods if p.waiting <= queue_threshold]
        if r.adapter is None:
            chosen = least(least(low or pods, lambda p: p.waiting), lambda p: p.kv_used)
        elif low:
            chosen = least(least(affinity(low, r.adapter, c.wl.gpu_slots), lambda p: p.waiting), lambda p: p.kv_used)
        else:
            chosen = least(affinity(least(pods, lambda p: p.waiting), r.adapter, c.wl.gpu_slots), lambda p: p.kv_used)
        pick = rng.choice(chosen)
        return int(pick.wid.rsplit("-", 1)[1])

    return route


def ours_policy(params: ours.PolicyParams | None = None):
    # No hard cap here: the other policies refuse nothing either (the router answers RESOURCE_EXHAUSTED).
    params = params or ours.PolicyParams(max_load=1 << 30)

    def route(c: Cluster, r: Request) -> int:
        # load and per-adapter demand: what this router sent and has not seen finish (exact, one router);
        # residency: as of the last status
        views = [ours.WorkerView(v.wid, load=w.load, kv_free=1.0 - v.kv_used, gpu=v.gpu, host=v.host,
                                 demand={a: n for a, n in w.needed.items() if n > 0 and a is not None},
                                 max_loras=c.wl.gpu_slots)
                 for v, w in zip(c.views, c.workers)]
        decision = ours.choose(ours.Snapshot.of(views), r.adapter, params)
        now = r.arrival
        for wid in decision.prefetch:
            c.load_adapter(c.workers[int(wid.rsplit("-", 1)[1])], r.adapter, now, prefetch=True)
        return int(decision.worker_id.rsplit("-", 1)[1])

    return route


# -- the run --------------------------------------------------------------------------------------


def workload(wl: Workload) -> list[Request]:
    rng = np.random.default_rng(wl.seed)
    n = int(wl.rate * wl.duration)
    arrivals = np.cumsum(rng.exponential(1.0 / wl.rate, n))
    weights = 1.0 / np.arange(1, wl.adapters + 1) ** wl.zipf_s
    names = [f"adapter-{i:04d}-{rng.integers(1 << 30):x}" for i in range(wl.adapters)]
    ranks = rng.choice(wl.adapters, size=n, p=weights / weights.sum())
    # uniform in [mean/4, 7 mean/4]: long enough to batch, without a tail that would set p99 whatever the routing
    tokens = rng.integers(wl.mean_output_tokens // 4, 7 * wl.mean_output_tokens // 4 + 1, n)
    return [Request(float(t), names[k], int(m)) for t, k, m in zip(arrivals, ranks, tokens)]


def simulate(wl: Workload, timing: Timing, name: str, route) -> dict:
    requests = workload(wl)
    cluster = Cluster(wl, timing, route, requests)
    cluster.run()
    measured = [r for r in requests if wl.warmup <= r.arrival < wl.duration]
    done = [r for r in measured if r.done >= 0]
    latency = np.array([r.done - r.arrival for r in done]) if done else np.array([np.inf])
    ttft = np.array([r.first_token - r.arrival for r in done]) if done else np.array([np.inf])
    finished_in_window = sum(1 for r in requests if wl.warmup <= r.done < wl.duration)
    unfinished = len(measured) - len(done)
    return {
        "policy": name,
        "cold_loads": cluster.cold_loads,
        "prefetch_loads": cluster.prefetch_loads,
        "throughput_rps": finished_in_window / (wl.duration - wl.warmup),
        "p50_s": float(np.percentile(latency, 50)),
        "p99_s": float(np.percentile(latency, 99)) if not unfinished else float("inf"),
        "ttft_p99_s": float(np.percentile(ttft, 99)) if not unfinished else float("inf"),
        "unfinished": unfinished,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m benchmarks.routing", description=__doc__.split("\n\n")[0])
    d = Workload()
    for f in ("workers", "gpu_slots", "host_slots", "adapters", "rate", "duration", "warmup", "zipf_s",
              "mean_output_tokens", "seed", "max_batch"):
        p.add_argument("--" + f.replace("_", "-"), type=type(getattr(d, f)), default=getattr(d, f))
    p.add_argument("--policies", default="round-robin,least-loaded,gateway-lora-affinity,ours")
    p.add_argument("--json", help="also write the results here")
    args = vars(p.parse_args(argv))
    policies, out = args.pop("policies").split(","), args.pop("json")
    wl = Workload(**args)
    timing, source = Timing.from_results()
    print(f"workload: {wl}\ntiming ({source}): {timing}")
    rng = random.Random(wl.seed)
    makers = {"round-robin": round_robin, "least-loaded": lambda: least_loaded(rng),
              "gateway-lora-affinity": lambda: gateway_lora_affinity(rng), "ours": ours_policy}
    rows = []
    for name in policies:
        t0 = time.perf_counter()
        rows.append(simulate(wl, timing, name, makers[name]()))
        print(f"  {name}: simulated in {time.perf_counter() - t0:.1f}s", flush=True)
    print("\n| policy | cold loads | of which prefetch | throughput req/s | p50 s | p99 s | TTFT p99 s | unfinished |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['policy']} | {r['cold_loads']:,} | {r['prefetch_loads']:,} | {r['throughput_rps']:.1f} | "
              f"{r['p50_s']:.3f} | {r['p99_s']:.3f} | {r['ttft_p99_s']:.3f} | {r['unfinished']} |")
    if "ours" in policies:
        mine = next(r for r in rows if r["policy"] == "ours")
        others = [r for r in rows if r["policy"] != "ours"]
        wins = all(mine["cold_loads"] < r["cold_loads"] and mine["p99_s"] < r["p99_s"] for r in others)
        print(f"\nours beats every other policy on cold loads and p99: {'yes' if wins else 'NO'}")
    if out:
        Path(out).write_text(json.dumps({"workload": wl.__dict__, "timing": timing.__dict__, "results": rows},
                                        indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
