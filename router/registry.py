"""WorkerRegistry: the workers this router knows, each one's latest status (kept fresh by its WatchStatus
stream) and this router's own requests in flight there; `snapshot()` turns that into the policy's view.

Membership comes from sources (the static list, the Redis registry), each giving the set of addresses it
knows; the registry dials the union. A worker is routable while its status stream is open and it reports
SERVING. A broken stream, or a request that finds the connection gone, marks it down at once; its watcher
keeps dialling (backoff 0.1 s to 2 s) so a restarted worker comes back. A worker no source names any more
(its Redis record expired) is dropped: channel closed, watcher stopped.

Event loop only (not thread-safe).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from router import errors
from router.domain import Residency, WorkerState, WorkerStatus
from router.policy import Snapshot, WorkerView
from router.worker_client import WorkerClient

log = logging.getLogger(__name__)

BACKOFF_S = (0.1, 2.0)


@dataclass(eq=False)
class WorkerEntry:
    address: str
    client: WorkerClient
    status: WorkerStatus | None = None
    up: bool = False
    down_reason: str = "not connected yet"
    # This router's requests in flight there, in total and per adapter name.
    inflight: int = 0
    demand: Counter = field(default_factory=Counter)
    # What the last status says, in the policy's terms (computed once per status).
    gpu: frozenset[str] = frozenset()
    host: frozenset[str] = frozenset()
    reported_demand: dict[str, int] = field(default_factory=dict)
    watcher: asyncio.Task | None = None

    @property
    def worker_id(self) -> str:
        return self.status.worker_id if self.status else ""

    @property
    def routable(self) -> bool:
        return self.up and self.status is not None and self.status.state is WorkerState.SERVING

    def view(self) -> WorkerView:
        st = self.status
        reported = st.waiting_requests + st.running_requests
        demand = self.reported_demand
        if self.demand:  # ours may not be in the last status yet
            demand = dict(demand)
            for name, n in self.demand.items():
                if n > demand.get(name, 0):
                    demand[name] = n
        kv_free = st.kv_blocks_free / st.kv_blocks_total if st.kv_blocks_total else 1.0
        return WorkerView(st.worker_id, load=max(reported, self.inflight), kv_free=kv_free, gpu=self.gpu,
                          host=self.host, demand=demand, max_loras=st.max_loras)


class WorkerRegistry:
    def __init__(self, client_factory: Callable[[str], WorkerClient] = WorkerClient, status_interval_ms: int = 50,
                 on_change: Callable[[], None] | None = None):
        self._factory = client_factory
        self._interval_ms = status_interval_ms
        self._on_change = on_change or (lambda: None)
        self._entries: dict[str, WorkerEntry] = {}  # by address
        self._sources: dict[str, frozenset[str]] = {}
        self._version = 0
        self._snapshot: tuple[int, Snapshot, dict[str, WorkerEntry]] | None = None
        self._closed = False
        # The live workers' statuses, republished on every change: an immutable tuple other threads (the
        # metrics scrape) may read.
        self.published: tuple[WorkerStatus, ...] = ()

    # -- membership -------------------------------------------------------------------------------

    def set_members(self, source: str, addresses: set[str] | frozenset[str]) -> None:
        """The addresses `source` knows now; workers no source knows any more are dropped."""
        if self._closed:
            return
        self._sources[source] = frozenset(addresses)
        wanted = frozenset().union(*self._sources.values())
        for address in wanted - self._entries.keys():
            entry = WorkerEntry(address, self._factory(address))
            self._entries[address] = entry
            entry.watcher = asyncio.get_running_loop().create_task(self._watch(entry), name=f"watch {address}")
            log.info("worker at %s added", address)
        for address in self._entries.keys() - wanted:
            self._drop(self._entries.pop(address))
        self._changed()

    def _drop(self, entry: WorkerEntry) -> None:
        log.info("worker %s at %s left the registry", entry.worker_id or "?", entry.address)
        if entry.watcher is not None:
            entry.watcher.cancel()
        # requests still running on it keep their channel until they end; close it afterwards
        asyncio.get_running_loop().create_task(self._close_later(entry))

    async def _close_later(self, entry: WorkerEntry) -> None:
        while entry.inflight:
            await asyncio.sleep(0.5)
        await entry.client.close()

    async def close(self) -> None:
        self._closed = True
        entries, self._entries = list(self._entries.values()), {}
        for entry in entries:
            if entry.watcher is not None:
                entry.watcher.cancel()
        for entry in entries:
            if entry.watcher is not None:
                await asyncio.gather(entry.watcher, return_exceptions=True)
            await entry.client.close()

    # -- status -----------------------------------------------------------------------------------

    async def _watch(self, entry: WorkerEntry) -> None:
        delay = BACKOFF_S[0]
        while True:
            try:
                async for status in entry.client.watch_status(self._interval_ms):
                    self._update(entry, status)
                    delay = BACKOFF_S[0]
                raise errors.WorkerLostError("its status stream ended (the worker stopped)")
            except errors.RouterError as e:
                self._set_down(entry, str(e))
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_S[1])

    def _update(self, entry: WorkerEntry, status: WorkerStatus) -> None:
        was = entry.routable
        if entry.status is not None and status.worker_id != entry.worker_id:
            log.warning("the worker at %s changed its id from %s to %s", entry.address, entry.worker_id,
                        status.worker_id)
        entry.status, entry.up, entry.down_reason = status, True, ""
        gpu, host, demand = set(), set(), {}
        for a in status.adapters:
            (gpu if a.residency is Residency.GPU_SLOT else host).add(a.ref.name)
            if a.active_requests:
                demand[a.ref.name] = demand.get(a.ref.name, 0) + a.active_requests
        entry.gpu, entry.host, entry.reported_demand = frozenset(gpu), frozenset(host - gpu), demand
        if entry.routable != was:
            log.info("worker %s at %s is %s", status.worker_id, entry.address,
                     "routable" if entry.routable else status.state.value)
        self._changed()

    def _set_down(self, entry: WorkerEntry, reason: str) -> None:
        if entry.up:
            log.warning("worker %s at %s is down: %s", entry.worker_id or "?", entry.address, reason)
        entry.up, entry.down_reason = False, reason
        self._changed()

    def mark_down(self, worker_id: str, reason: str) -> None:
        """A request found the worker gone: stop routing to it until its status stream is back."""
        for entry in self._entries.values():
            if entry.worker_id == worker_id:
                self._set_down(entry, reason)

    def _changed(self) -> None:
        self._version += 1
        self.published = tuple(self.live_statuses())
        self._on_change()

    # -- the policy's view and request accounting -------------------------------------------------

    def snapshot(self) -> Snapshot:
        """The routable workers as the policy sees them (rebuilt only when something changed)."""
        cached = self._snapshot
        if cached is not None and cached[0] == self._version:
            return cached[1]
        routable = {e.worker_id: e for e in self._entries.values() if e.routable}
        snap = Snapshot.of(e.view() for e in routable.values())
        self._snapshot = (self._version, snap, routable)
        return snap

    def entry(self, worker_id: str) -> WorkerEntry:
        self.snapshot()
        return self._snapshot[2][worker_id]

    def acquire(self, worker_id: str, adapter: str | None) -> WorkerEntry:
        entry = self.entry(worker_id)
        entry.inflight += 1
        if adapter is not None:
            entry.demand[adapter] += 1
        self._version += 1
        return entry

    def release(self, entry: WorkerEntry, adapter: str | None) -> None:
        entry.inflight -= 1
        if adapter is not None:
            entry.demand[adapter] -= 1
            if entry.demand[adapter] <= 0:
                del entry.demand[adapter]
        self._version += 1

    # -- reporting --------------------------------------------------------------------------------

    def routable(self) -> list[WorkerEntry]:
        return [e for e in self._entries.values() if e.routable]

    def live_statuses(self) -> list[WorkerStatus]:
        """Workers whose status stream is open (serving, starting or draining), by id."""
        return sorted((e.status for e in self._entries.values() if e.up and e.status), key=lambda s: s.worker_id)

    def by_worker_id(self, worker_id: str) -> WorkerEntry | None:
        return next((e for e in self._entries.values() if e.up and e.worker_id == worker_id), None)

    def entries(self) -> list[WorkerEntry]:
        return list(self._entries.values())
