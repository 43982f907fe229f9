"""Prometheus metrics, on a registry of their own (no global state): requests, latency, time to first token,
tokens, per-adapter requests, routing tiers (affinity hits, cold loads, spills), retries, and the workers'
load and resident adapters in the spirit of vLLM's `vllm:lora_requests_info`."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server
from prometheus_client.core import GaugeMetricFamily

from router import vllm_metrics
from router.domain import Residency, WorkerStatus
from router.policy import AFFINITY_HITS, Tier
from router.vllm_metrics import VllmMetrics

P = "loraserve_router_"
# Latency buckets: a CPU echo hop is ~1 ms, a cold adapter ~0.2-1 s, a long generation tens of seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class RouterMetrics:
    def __init__(self, statuses: Callable[[], tuple[WorkerStatus, ...]] = tuple):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(P + "requests", "Finished requests by RPC, model kind and status code",
                                ["rpc", "kind", "code"], registry=r)
        self.adapter_requests = Counter(P + "adapter_requests", "Requests per adapter", ["adapter"], registry=r)
        self.latency = Histogram(P + "request_latency_seconds", "Request latency, end to end in the router",
                                 ["rpc"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(P + "time_to_first_token_seconds", "Time to the first token", ["kind"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generated_tokens = Counter(P + "generated_tokens", "Tokens generated", registry=r)
        self.decisions = Counter(P + "routing_decisions", "Routing decisions by tier (gpu, host: affinity hits; "
                                 "cold, spill: the adapter is loaded on the chosen worker; base)", ["tier"], registry=r)
        self.cold_loads = Counter(P + "cold_loads", "Requests sent to a worker that did not hold their adapter",
                                  registry=r)
        self.retries = Counter(P + "retries", "Requests retried on another worker before their first token",
                               ["reason"], registry=r)
        self.prefetches = Counter(P + "prefetches", "Adapter prefetches sent to workers", ["outcome"], registry=r)
        # Label children looked up once (labels() takes a lock and hashes its arguments: ~3 us a call, several
        # calls a request on the hot path).
        self._children: dict[tuple, object] = {}
        # Plain ints: the scrape thread only reads them (a ratio one request stale is fine).
        self._hits = self._lookups = 0
        Gauge(P + "affinity_hit_ratio", "Adapter requests routed to a worker already holding the adapter "
              "(GPU slot or host memory), over all adapter requests", registry=r).set_function(self.hit_ratio)
        r.register(_WorkerCollector(statuses))
        self.vllm = VllmMetrics(r, statuses)  # vLLM's names for dashboards and gateways built for vLLM

    def _child(self, metric, *labels):
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def decided(self, tier: Tier) -> None:
        self._child(self.decisions, tier.value).inc()
        if tier is Tier.BASE:
            return
        hit = tier in AFFINITY_HITS
        if not hit:
            self.cold_loads.inc()
        self._lookups += 1
        self._hits += hit

    def hit_ratio(self) -> float:
        lookups = self._lookups
        return self._hits / lookups if lookups else 0.0

    def finished(self, rpc: str, adapter: str | None, code: str, seconds: float, prompt_tokens: int,
                 generated_tokens: int) -> None:
        self._child(self.requests, rpc, "base" if adapter is None else "adapter", code).inc()
        if adapter is not None:
            self._child(self.adapter_requests, adapter).inc()
        self._child(self.latency, rpc).observe(seconds)
        if prompt_tokens:
            self.prompt_tokens.inc(prompt_tokens)
        if generated_tokens:
            self.generated_tokens.inc(generated_tokens)
        if code == "OK":
            self.vllm.finished(seconds, prompt_tokens, generated_tokens)

    def first_token(self, adapter: str | None, seconds: float) -> None:
        self._child(self.ttft, "base" if adapter is None else "adapter").observe(seconds)
        self.vllm.first_token(seconds)

    def forget_adapter(self, adapter: str) -> None:
        """Drop an unloaded adapter's series (names come and go at runtime; their series should not pile up)."""
        child = self._children.pop((self.adapter_requests, adapter), None)
        if child is not None:
            self.adapter_requests.remove(adapter)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, port: int, host: str = "0.0.0.0"):
        """Serve /metrics on a thread; returns (server, thread) for shutdown."""
        return start_http_server(port, addr=host, registry=self.registry)


class _WorkerCollector:
    """The workers as of their last status, read at scrape time (so no series outlives its worker)."""

    def __init__(self, statuses: Callable[[], tuple[WorkerStatus, ...]]):
        self._statuses = statuses

    def describe(self):
        return []

    def collect(self):
        statuses = self._statuses()  # an immutable tuple the event loop publishes: safe on this thread
        up = GaugeMetricFamily(P + "workers", "Workers with an open status stream, by state", labels=["state"])
        states: dict[str, int] = {}
        for s in statuses:
            states[s.state.value] = states.get(s.state.value, 0) + 1
        for state, n in sorted(states.items()):
            up.add_metric([state], n)
        yield up
        load = GaugeMetricFamily(P + "worker_requests", "Requests on a worker, by queue", labels=["worker", "queue"])
        kv = GaugeMetricFamily(P + "worker_kv_free_ratio", "Free fraction of a worker's KV cache", labels=["worker"])
        info = GaugeMetricFamily(P + "worker_lora_info", "A worker's resident adapters (value: 1)",
                                 labels=["worker", "max_lora", "gpu_lora_adapters", "host_lora_adapters"])
        for s in statuses:
            load.add_metric([s.worker_id, "running"], s.running_requests)
            load.add_metric([s.worker_id, "waiting"], s.waiting_requests)
            kv.add_metric([s.worker_id], s.kv_blocks_free / s.kv_blocks_total if s.kv_blocks_total else 0.0)
            gpu = sorted(a.ref.name for a in s.adapters if a.residency is Residency.GPU_SLOT)
            host = sorted(a.ref.name for a in s.adapters if a.residency is not Residency.GPU_SLOT)
            info.add_metric([s.worker_id, str(s.max_loras), ",".join(gpu), ",".join(host)], 1)
        yield load
        yield kv
        yield info
        yield from vllm_metrics.gauges(statuses)  # the same seen through vLLM's names

