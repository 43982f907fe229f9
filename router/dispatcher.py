"""Dispatcher: one generation request from model name to tokens. Resolve the model (catalog), ask the policy
for a worker over the registry's snapshot, stream from that worker, and fail over.

Failover: a worker that fails before the first token with UNAVAILABLE (dead, unreachable, draining) or
RESOURCE_EXHAUSTED (its queue is full) is left out and the request goes to the next choice, up to
max_attempts workers, invisibly to the client. A worker lost after the first token ends a stream with
UNAVAILABLE (nothing can be taken back from the client); the unary Generate has sent nothing yet, so it is
retried then too. Any other status (INVALID_ARGUMENT, NOT_FOUND, ...) is the request's own: it goes back
as is. The client's deadline goes to the worker as the call's timeout, and a cancelled client cancels the
worker's call (which aborts the request there).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from router import errors, policy
from router.catalog import AdapterCatalog
from router.domain import AdapterRef, Delta, GenerationRequest, Residency
from router.metrics import RouterMetrics
from router.registry import WorkerRegistry

log = logging.getLogger(__name__)

# A worker that was asked to prefetch an adapter is not asked again for that long.
PREFETCH_MEMORY_S = 10.0


class Prefetcher:
    """Fire-and-forget PrefetchAdapter calls, at most one per (worker, adapter version) per PREFETCH_MEMORY_S."""

    def __init__(self, registry: WorkerRegistry, metrics: RouterMetrics):
        self.registry = registry
        self.metrics = metrics
        self._recent: dict[tuple[str, AdapterRef], float] = {}
        self._tasks: set[asyncio.Task] = set()

    def request(self, worker_id: str, ref: AdapterRef) -> None:
        now = time.monotonic()
        key = (worker_id, ref)
        if now - self._recent.get(key, -PREFETCH_MEMORY_S) < PREFETCH_MEMORY_S:
            return
        if len(self._recent) > 4096:
            self._recent = {k: t for k, t in self._recent.items() if now - t < PREFETCH_MEMORY_S}
        self._recent[key] = now
        entry = self.registry.by_worker_id(worker_id)
        if entry is None:
            return
        task = asyncio.get_running_loop().create_task(self._prefetch(entry.client, worker_id, ref))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _prefetch(self, client, worker_id: str, ref: AdapterRef) -> None:
        try:
            await client.prefetch(ref, Residency.HOST_MEMORY)
            self.metrics.prefetches.labels("ok").inc()
        except errors.RouterError as e:
            self.metrics.prefetches.labels("failed").inc()
            log.info("prefetch of %s on %s failed: %s", ref.name, worker_id, e)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class Dispatcher:
    def __init__(self, registry: WorkerRegistry, catalog: AdapterCatalog, params: policy.PolicyParams,
                 metrics: RouterMetrics, max_attempts: int = 3, routing: str = "affinity"):
        if routing not in policy.ROUTINGS:
            raise ValueError(f"routing must be one of {policy.ROUTINGS}, not {routing!r}")
        self.routing = routing
        self._turn = 0  # round-robin's counter
        self.registry = registry
        self.catalog = catalog
        self.params = params
        self.metrics = metrics
        self.max_attempts = max_attempts
        self.prefetcher = Prefetcher(registry, metrics)

    def stream(self, req: GenerationRequest) -> AsyncIterator[Delta]:
        """The request's deltas as the worker produces them (GenerateStream)."""
        return self._run(req, "GenerateStream")

    async def generate(self, req: GenerationRequest) -> list[Delta]:
        """Every delta of the request, once it has finished (Generate)."""
        return [d async for d in self._run(req, "Generate")]

    async def _run(self, req: GenerationRequest, rpc: str) -> AsyncIterator[Delta]:
        started = time.monotonic()
        adapter: AdapterRef | None = None
        code, usage = "OK", None
        try:
            adapter = await self.catalog.resolve(req.model)
            deadline = started + req.timeout if req.timeout is not None else None
            async for d in self._attempts(req, adapter, deadline, started):
                usage = d.usage or usage
                yield d
        except errors.RouterError as e:
            code = e.code
            raise
        except (asyncio.CancelledError, GeneratorExit):
            code = "CANCELLED"
            raise
        finally:
            self.metrics.finished(rpc, adapter.name if adapter else None, code, time.monotonic() - started,
                                  usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0)

    async def _attempts(self, req: GenerationRequest, adapter: AdapterRef | None, deadline: float | None,
                        started: float) -> AsyncIterator[Delta]:
        name = adapter.name if adapter else None
        tried: set[str] = set()
        failures: list[str] = []
        stale_version_retried = False
        attempt = 0
        while attempt < self.max_attempts:
            attempt += 1
            snap = self.registry.snapshot()
            decision = self._decide(snap, name, frozenset(tried))
            if decision is None:
                raise self._no_worker(snap, failures)
            self.metrics.decided(decision.tier)
            for worker_id in decision.prefetch:
                self.prefetcher.request(worker_id, adapter)
            entry = self.registry.acquire(decision.worker_id, name)
            sent, buffered = 0, []
            try:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                async for d in entry.client.generate(req.request_id, req.payload, adapter, timeout):
                    if sent == 0:
                        self.metrics.first_token(name, time.monotonic() - started)
                    sent += 1
                    if req.buffered:
                        buffered.append(d)
                    else:
                        yield d
                for d in buffered:
                    yield d
                return
            except errors.RETRYABLE as e:
                if isinstance(e, errors.WorkerLostError):
                    self.registry.mark_down(decision.worker_id, str(e))
                if sent and not req.buffered:
                    raise errors.UnavailableError(
                        f"worker {decision.worker_id} was lost after {sent} messages of this stream ({e}); the "
                        "output above is incomplete: send the request again") from None
                reason = "worker_lost" if isinstance(e, errors.WorkerLostError) else e.code.lower()
                self.metrics.retries.labels(reason).inc()
                log.info("request %s: worker %s failed before its answer (%s); trying another", req.request_id,
                         decision.worker_id, e)
                tried.add(decision.worker_id)
                failures.append(f"{decision.worker_id}: {e}")
            except errors.FailedPreconditionError as e:
                # another router replica reloaded the adapter: our version is stale; learn the new one, once
                if (adapter is None or sent or stale_version_retried or "version mismatch" not in str(e)
                        or not await self.catalog.refresh_one(adapter.name)):
                    raise
                stale_version_retried = True
                adapter = await self.catalog.resolve(req.model)
                attempt -= 1
            except errors.NotFoundError as e:
                if adapter is not None and self.catalog.store is None:
                    raise self.catalog.not_found(req.model, f"worker {decision.worker_id}: {e}") from None
                raise
            finally:
                self.registry.release(entry, name)
        raise errors.UnavailableError(f"no worker could serve the request after {len(failures)} attempts: "
                                      + "; ".join(failures))

    def _decide(self, snap: policy.Snapshot, name: str | None, tried: frozenset[str]) -> policy.Decision | None:
        if self.routing == "affinity":
            return policy.choose(snap, name, self.params, tried)
        self._turn += 1
        return policy.choose_baseline(self.routing, snap, name, self._turn, self.params, tried)

    def _no_worker(self, snap: policy.Snapshot, failures: list[str]) -> errors.RouterError:
        if failures:
            return errors.UnavailableError("no other worker to try: " + "; ".join(failures))
        if not snap.workers:
            down = [f"{e.address} ({e.down_reason})" for e in self.registry.entries() if not e.routable]
            return errors.UnavailableError("no live worker" + (f": {', '.join(down)}" if down else " registered"))
        return errors.ResourceExhaustedError(
            f"every worker is at its load cap ({self.params.max_load} requests each); retry with backoff")

    async def close(self) -> None:
        await self.prefetcher.close()
