"""vLLM's metric names, beside our own, so dashboards and inference gateways built for vLLM read this router
unchanged: the Gateway API Inference Extension's endpoint picker scrapes `vllm:num_requests_waiting`,
`vllm:gpu_cache_usage_perc` and `vllm:lora_requests_info`; vLLM's Grafana dashboard plots time to first token,
end-to-end latency and token counters. Every series carries `model_name` (the base model), as vLLM's do.

The router fronts several workers, so the gauges are the cluster's: requests running and waiting summed, KV
cache usage over all workers' blocks, prefix-cache queries and hits summed, LoRA slots summed and the adapters
running or waiting in their union.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from router.domain import Residency, WorkerStatus

# vLLM's buckets for these histograms
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


class VllmMetrics:
    def __init__(self, registry: CollectorRegistry, statuses: Callable[[], tuple[WorkerStatus, ...]]):
        self._statuses = statuses
        label = ["model_name"]
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              label, buckets=TTFT_BUCKETS, registry=registry)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of end to end request latency in "
                             "seconds.", label, buckets=E2E_BUCKETS, registry=registry)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", label,
                                     registry=registry)
        self.generation_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.", label,
                                         registry=registry)
        self._model = ""
        self._children: tuple = ()

    def _labelled(self) -> tuple:
        """The four series of the current base model (looked up once per model, not per request)."""
        statuses = self._statuses()
        model = statuses[0].base_model if statuses else ""
        if model != self._model or not self._children:
            self._model = model
            self._children = tuple(m.labels(model) for m in (self.ttft, self.e2e, self.prompt_tokens,
                                                             self.generation_tokens))
        return self._children

    def first_token(self, seconds: float) -> None:
        self._labelled()[0].observe(seconds)

    def finished(self, seconds: float, prompt_tokens: int, generated_tokens: int) -> None:
        _, e2e, prompt, generated = self._labelled()
        e2e.observe(seconds)
        if prompt_tokens:
            prompt.inc(prompt_tokens)
        if generated_tokens:
            generated.inc(generated_tokens)


def gauges(statuses: tuple[WorkerStatus, ...]):
    """The gauges, from the workers' last statuses (called at scrape time by the router's worker collector)."""
    model = statuses[0].base_model if statuses else ""
    running = GaugeMetricFamily("vllm:num_requests_running", "Number of requests in model execution batches.",
                                labels=["model_name"])
    running.add_metric([model], sum(s.running_requests for s in statuses))
    waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                                labels=["model_name"])
    waiting.add_metric([model], sum(s.waiting_requests for s in statuses))
    total = sum(s.kv_blocks_total for s in statuses)
    used = total - sum(s.kv_blocks_free for s in statuses)
    cache = GaugeMetricFamily("vllm:gpu_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                              labels=["model_name"])
    cache.add_metric([model], used / total if total else 0.0)
    yield running
    yield waiting
    yield cache
    # Counters summed over the workers' own (each since it started), as vLLM names them.
    for name, doc, field in (
            ("vllm:prefix_cache_queries", "Prefix cache queries, in number of queried tokens.",
             "prefix_cache_queried_tokens"),
            ("vllm:prefix_cache_hits", "Prefix cache hits, in number of cached tokens.", "prefix_cache_hit_tokens")):
        counter = CounterMetricFamily(name, doc, labels=["model_name"])
        counter.add_metric([model], sum(getattr(s, field) for s in statuses))
        yield counter
    yield lora_requests_info(statuses)


def lora_requests_info(statuses: tuple[WorkerStatus, ...]) -> GaugeMetricFamily:
    """`vllm:lora_requests_info`: one series, value the scrape time, labels max_lora and the adapters with
    requests running (in a GPU slot) and waiting (not yet in one); max_lora is the workers' slots together and
    the lists are the union over them."""
    running = sorted({a.ref.name for s in statuses for a in s.adapters
                      if a.active_requests and a.residency is Residency.GPU_SLOT})
    waiting = sorted({a.ref.name for s in statuses for a in s.adapters
                      if a.active_requests and a.residency is not Residency.GPU_SLOT} - set(running))
    info = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on LoRA requests.",
                             labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
    info.add_metric([str(sum(s.max_loras for s in statuses)), ",".join(running), ",".join(waiting)], time.time())
    return info
