"""The routing policy: pure functions over a Snapshot of the cluster. No I/O, no clock, no randomness, no
grpc, no torch: the same snapshot gives the same decision in every router replica, and the tests run it in
microseconds.

What a request for an adapter costs on a worker, cheapest first (figures from the H100 worker bench):
the adapter is in a GPU slot, or already has requests there (they share its slot): nothing; it is in host
memory and a slot is free: one copy, ~1.5 ms of one step; it is nowhere and a slot is free: a cold load,
~173 ms; no slot is free (max_loras adapters already have requests there): the request waits until every
request of some adapter has finished, typically a whole generation (~0.6 s for 128 tokens). So an adapter
request goes, in order of these tiers, to
1. a worker where the adapter is in a GPU slot or has requests (GPU),
2. one holding it in host memory (or loading it), with a free slot (HOST),
3. the first worker of the adapter's preference order with a free slot (COLD, or SPILL when the adapter is
   resident elsewhere but its holders are full),
4. one holding it in host memory, slots full; 5. the first of its preference order, slots full,
taking only workers under the load bound, the least loaded first within a tier (ties: the preference order).

The preference order is rendezvous hashing on the adapter's name: every replica computes the same order, and
a worker joining or leaving moves only the adapters it owned; so an adapter keeps coming back to the worker
whose host memory holds it, and the cluster's host memory caches ~workers x max_cpu_loras distinct adapters
instead of every worker caching the same hot few. The bound is consistent hashing with bounded loads
(Mirrokni et al., 2016): a worker takes a request while its load is under max(spill_load,
ceil(load_factor * (total + 1) / workers)). A hot adapter whose holders are all at the bound spills to the
next worker of its order, which then holds it too (tier 1 spreads over both). When one adapter's own
requests bring a worker near the bound, the adapter is prefetched into the host memory of its next spill
target, so the spill finds it there instead of paying the cold load on the request path.

A base-model request goes to the least loaded worker (ties: the most free KV cache, then the id). Every
worker also has a hard cap (max_load): a worker at its cap takes nothing.

Two baselines stand beside it (the router's --routing flag; `make bench-cluster` compares them on real GPUs):
round-robin (the next live worker in turn, whatever it holds) and least-loaded (the least loaded live
worker). They honour the hard cap and the failover exclusions, and their decisions carry the tier the chosen
worker is in for the adapter, so the cold-load and affinity metrics mean the same under every routing.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


class Tier(enum.Enum):
    GPU = "gpu"  # in a GPU slot of the chosen worker, or sharing the slot of requests already there
    HOST = "host"  # in its host memory (or being loaded there)
    COLD = "cold"  # nowhere: placed by its preference order
    SPILL = "spill"  # resident elsewhere, but every holder was at the bound: a second home
    BASE = "base"  # a base-model request


AFFINITY_HITS = frozenset({Tier.GPU, Tier.HOST})


@dataclass(frozen=True, slots=True)
class WorkerView:
    """One routable worker as the policy sees it."""

    worker_id: str
    # Requests running or queued there, as well as the router knows (its own in flight, or the worker's report).
    load: int = 0
    # Fraction of the KV cache free, in [0, 1].
    kv_free: float = 1.0
    gpu: frozenset[str] = frozenset()  # adapter names in GPU slots
    host: frozenset[str] = frozenset()  # in host memory or loading
    # Adapter name -> requests running or queued there that use it.
    demand: Mapping[str, int] = field(default_factory=dict)
    # GPU adapter slots; 0: unknown (never full).
    max_loras: int = 0

    @property
    def slot_free(self) -> bool:
        """Whether another adapter could join the batch now (fewer than max_loras adapters have requests)."""
        return self.max_loras == 0 or len(self.demand) < self.max_loras


@dataclass(frozen=True)
class Snapshot:
    """The routable workers (serving, reachable), sorted by id."""

    workers: tuple[WorkerView, ...]

    @classmethod
    def of(cls, workers: Iterable[WorkerView]) -> Snapshot:
        return cls(tuple(sorted(workers, key=lambda w: w.worker_id)))

    @functools.cached_property
    def ids(self) -> tuple[str, ...]:
        return tuple(w.worker_id for w in self.workers)

    @functools.cached_property
    def total_load(self) -> int:
        return sum(w.load for w in self.workers)


@dataclass(frozen=True)
class PolicyParams:
    # Bounded-load slack: no worker takes more than this times the average load (plus one request).
    load_factor: float = 1.25
    # Below this load a worker keeps its adapters' requests whatever the average: batching a few requests of
    # one adapter costs a GPU next to nothing, while a spill costs a cold load elsewhere.
    spill_load: int = 32
    # Hard cap per worker: at max_load a worker takes nothing more (RESOURCE_EXHAUSTED when all are there).
    max_load: int = 256
    # Prefetch an adapter on its next spill target once its own requests on the chosen worker reach this
    # fraction of the bound.
    prefetch_fraction: float = 0.5

    def __post_init__(self):
        if self.load_factor < 1.0:
            raise ValueError(f"load_factor must be >= 1 (bounded loads need slack), not {self.load_factor}")
        if self.spill_load < 1 or self.max_load < 1:
            raise ValueError("spill_load and max_load must be >= 1")
        if not 0.0 < self.prefetch_fraction <= 1.0:
            raise ValueError(f"prefetch_fraction must be in (0, 1], not {self.prefetch_fraction}")


@dataclass(frozen=True)
class Decision:
    worker_id: str
    tier: Tier
    # Workers that should load the adapter into host memory now (the next spill target), off the request path.
    prefetch: tuple[str, ...] = ()


def bound(snapshot: Snapshot, params: PolicyParams) -> int:
    """The most requests a worker may hold before requests go to the next worker of their order."""
    n = len(snapshot.workers)
    if n == 0:
        return 0
    fair = math.ceil(params.load_factor * (snapshot.total_load + 1) / n)
    return min(params.max_load, max(params.spill_load, fair))


def choose(snapshot: Snapshot, adapter: str | None, params: PolicyParams,
           exclude: frozenset[str] = frozenset()) -> Decision | None:
    """Where a request for `adapter` (None: the base model) goes; None when no worker can take it (none
    routable, or every one at its hard cap). `exclude`: workers that already failed this request."""
    live = [w for w in snapshot.workers if w.worker_id not in exclude and w.load < params.max_load]
    if not live:
        return None
    if adapter is None:
        best = min(live, key=lambda w: (w.load, -w.kv_free, w.worker_id))
        return Decision(best.worker_id, Tier.BASE)

    limit = bound(snapshot, params)
    order = preference(adapter, snapshot.ids)
    rank = _ranks(adapter, snapshot.ids)
    under = [w for w in live if w.load < limit] or live  # live but none under: only when max_load < the bound

    # One pass: each worker's tier (0 GPU, 1 HOST, 2 a free slot, 3 any), then the least loaded within the
    # tier (tier 2: the first in the preference order; ties everywhere: the preference order).
    best, best_key = None, None
    for w in under:
        if adapter in w.gpu or adapter in w.demand:
            key = (0, w.load, rank[w.worker_id])
        elif adapter in w.host:
            key = (1, w.load, rank[w.worker_id])
        elif w.slot_free:
            key = (2, 0, rank[w.worker_id])
        else:
            key = (3, w.load, rank[w.worker_id])
        if best_key is None or key < best_key:
            best, best_key = w, key
    return Decision(best.worker_id, tier_on(snapshot, best, adapter),
                    _prefetch(adapter, best, under, order, limit, params))


def _prefetch(adapter: str, chosen: WorkerView, under: list[WorkerView], order: tuple[str, ...], limit: int,
              params: PolicyParams) -> tuple[str, ...]:
    """The next spill target of `adapter`, once its own requests on `chosen` near the bound."""
    if chosen.demand.get(adapter, 0) + 1 < params.prefetch_fraction * limit:
        return ()
    by_id = {w.worker_id: w for w in under}
    for wid in order:
        w = by_id.get(wid)
        if w is None or w is chosen or adapter in w.gpu or adapter in w.host or adapter in w.demand:
            continue
        return (wid,)
    return ()


ROUTINGS = ("affinity", "round-robin", "least-loaded")


def choose_baseline(routing: str, snapshot: Snapshot, adapter: str | None, turn: int, params: PolicyParams,
                    exclude: frozenset[str] = frozenset()) -> Decision | None:
    """A baseline routing's choice: "round-robin" takes live worker number `turn` (mod their count; the
    caller counts turns), "least-loaded" the least loaded (ties: the id). None when no worker can take it."""
    live = [w for w in snapshot.workers if w.worker_id not in exclude and w.load < params.max_load]
    if not live:
        return None
    if routing == "round-robin":
        chosen = live[turn % len(live)]
    elif routing == "least-loaded":
        chosen = min(live, key=lambda w: (w.load, w.worker_id))
    else:
        raise ValueError(f"unknown baseline routing {routing!r}; one of {ROUTINGS[1:]}")
    return Decision(chosen.worker_id, tier_on(snapshot, chosen, adapter))


def tier_on(snapshot: Snapshot, worker: WorkerView, adapter: str | None) -> Tier:
    """The tier a request for `adapter` lands in on `worker` (as choose() names its own decisions)."""
    if adapter is None:
        return Tier.BASE
    if adapter in worker.gpu or adapter in worker.demand:
        return Tier.GPU
    if adapter in worker.host:
        return Tier.HOST
    resident = any(adapter in w.gpu or adapter in w.host or adapter in w.demand for w in snapshot.workers)
    return Tier.SPILL if resident else Tier.COLD


@functools.lru_cache(maxsize=65536)
def preference(key: str, worker_ids: tuple[str, ...]) -> tuple[str, ...]:
    """Workers in `key`'s rendezvous-hashing order (highest random weight first). A stable hash (blake2b,
    not Python's salted hash()), so every process agrees. Memoized: a pure function of its arguments."""
    return tuple(sorted(worker_ids, key=lambda wid: _weight(key, wid), reverse=True))


@functools.lru_cache(maxsize=65536)
def _ranks(key: str, worker_ids: tuple[str, ...]) -> dict[str, int]:
    return {wid: i for i, wid in enumerate(preference(key, worker_ids))}


def _weight(key: str, worker_id: str) -> int:
    digest = hashlib.blake2b(f"{key}\x00{worker_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")
