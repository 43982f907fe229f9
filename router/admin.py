"""Runtime adapter admin (LoadAdapter, UnloadAdapter), as vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING: off unless
enabled, and then only with `authorization: Bearer <LORASERVE_ADMIN_TOKEN>` (compared in constant time).

Load with a store: RegisterAdapter there (replace = load_inplace; the client's token goes along), then the
catalogue names the new version. In place, that is all it takes for new requests to get the new weights:
they carry the new content hash, and a worker keys adapters on (name, hash). The old version is evicted from
every worker once no request uses it (a worker never evicts an adapter in use; the router asks again every
RETIRE_POLL_S until the old version is gone), so requests in flight finish on it.
Load without a store: the workers cannot be told where an adapter lives (PrefetchAdapter takes a name and a
hash), so the adapter must be one they resolve themselves, <lora_root>/<name>; source_uri, if given, must be
that path. The router checks that its home worker (or the warm workers) can load it; in place, it retires
every version the workers hold, and they read the files again on the next request.
Unload: the store forgets the name (DeleteAdapter), or, without a store, the router refuses it from now on;
then every worker evicts it (in-use versions as soon as their requests finish).
"""

from __future__ import annotations

import asyncio
import logging

from router import errors, policy
from router.catalog import AdapterCatalog, check_name
from router.domain import AdapterInfo, AdapterRef, AdapterState, LoadRequest, Residency
from router.registry import WorkerRegistry
from service_kit import admin_guard

log = logging.getLogger(__name__)

RETIRE_POLL_S = 0.5
RETIRE_SWEEP_S = 2.0
RETIRE_GIVE_UP_S = 3600.0


class AdminGuard(admin_guard.AdminGuard):
    denied, unauthenticated = errors.PermissionDeniedError, errors.UnauthenticatedError
    disabled_message = ("runtime adapter updates are disabled on this router: start it with "
                        "--enable-runtime-lora-updating (LORASERVE_ROUTER_ENABLE_RUNTIME_LORA_UPDATING=true) and "
                        "LORASERVE_ADMIN_TOKEN")


class AdapterAdmin:
    def __init__(self, guard: AdminGuard, catalog: AdapterCatalog, registry: WorkerRegistry):
        self.guard = guard
        self.catalog = catalog
        self.registry = registry
        self._retiring: set[asyncio.Task] = set()

    async def load(self, req: LoadRequest, authorization: str | None) -> AdapterInfo:
        self.guard.check(authorization)
        check_name(req.name)
        base = self.catalog.base_model()
        if req.base_model_name and base and req.base_model_name != base:
            raise errors.FailedPreconditionError(
                f"adapter {req.name!r} is for base model {req.base_model_name!r}; the workers serve {base!r}")
        warm = self._warm_targets(req.warm_worker_ids)
        store = self.catalog.store
        if store is not None:
            old = self.catalog.get(req.name)
            info = self.catalog.put(await store.register(req.name, req.source_uri, req.base_model_name,
                                                         req.load_inplace, authorization))
            if old is not None and old.content_hash and old.content_hash != info.content_hash:
                self._retire(req.name, old.content_hash)
            await self._warm(info.ref, warm)
            return info
        return await self._load_local(req, warm)

    async def _load_local(self, req: LoadRequest, warm: list[str]) -> AdapterInfo:
        exists = self.catalog.knows(req.name)
        if exists and not req.load_inplace:
            raise errors.AlreadyExistsError(f"adapter {req.name!r} is already loaded; set load_inplace to replace it")
        uri = req.source_uri.removeprefix("file://").rstrip("/")
        if uri and uri.rsplit("/", 1)[-1] != req.name:
            raise errors.FailedPreconditionError(
                f"without an adapter store the router cannot hand a source to the workers: put the adapter at "
                f"<lora_root>/{req.name} on every worker and load it with that path (or none), or run the router "
                f"with --store-address")
        held = {a.ref.content_hash for s in self.registry.published for a in s.adapters if a.ref.name == req.name}
        if exists:
            for content_hash in held:
                self._retire(req.name, content_hash)
        ref = AdapterRef(req.name)
        # the workers are the only ones who can tell whether they find it: ask its home worker at least
        targets = warm or self._home(req.name)
        previous = self.catalog.get(req.name)
        info = self.catalog.put(AdapterInfo(req.name, source_uri=req.source_uri, base_model=self.catalog.base_model(),
                                            state=AdapterState.READY))
        try:
            await self._warm(ref, targets)
        except errors.RouterError:
            if previous is None:
                self.catalog.remove(req.name)
            raise
        return info

    async def unload(self, name: str, authorization: str | None) -> None:
        self.guard.check(authorization)
        check_name(name)
        store = self.catalog.store
        if store is not None:
            await store.delete(name, authorization)
        elif not self.catalog.knows(name):
            raise self.catalog.not_found(name)
        self.catalog.remove(name)
        self._retire(name, "")

    # -- helpers --------------------------------------------------------------------------------------

    def _warm_targets(self, worker_ids: tuple[str, ...]) -> list[str]:
        live = {s.worker_id for s in self.registry.published}
        unknown = [w for w in worker_ids if w not in live]
        if unknown:
            raise errors.InvalidArgumentError(f"warm_worker_ids {unknown} are not live workers; live: {sorted(live)}")
        return list(dict.fromkeys(worker_ids))

    def _home(self, name: str) -> list[str]:
        snap = self.registry.snapshot()
        if not snap.workers:
            raise errors.UnavailableError("no live worker to check the adapter on")
        return [policy.preference(name, snap.ids)[0]]

    async def _warm(self, ref: AdapterRef, worker_ids: list[str]) -> None:
        async def one(worker_id: str):
            entry = self.registry.by_worker_id(worker_id)
            if entry is None:
                raise errors.UnavailableError(f"worker {worker_id} went away")
            await entry.client.prefetch(ref, Residency.HOST_MEMORY)

        results = await asyncio.gather(*(one(w) for w in worker_ids), return_exceptions=True)
        for worker_id, result in zip(worker_ids, results):
            if isinstance(result, BaseException):
                if isinstance(result, errors.RouterError):
                    raise type(result)(f"loading {ref.name!r} on worker {worker_id}: {result}") from None
                raise result

    def _retire(self, name: str, content_hash: str) -> None:
        """Evict (name, content_hash) ("": every version) from every worker, as soon as no request uses it."""
        task = asyncio.get_running_loop().create_task(self._retire_loop(name, content_hash))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire_loop(self, name: str, content_hash: str) -> None:
        # Every live worker for the first RETIRE_SWEEP_S (a status may not show a fresh load yet), then the
        # workers whose status still lists the version, until none does.
        loop = asyncio.get_running_loop()
        start = loop.time()
        while loop.time() - start < RETIRE_GIVE_UP_S:
            sweep = loop.time() - start < RETIRE_SWEEP_S
            targets = [e for e in self.registry.entries() if e.up and e.status and (sweep or any(
                a.ref.name == name and (not content_hash or a.ref.content_hash == content_hash)
                for a in e.status.adapters))]
            if not targets and not sweep:
                return
            results = await asyncio.gather(*(e.client.evict(name, content_hash) for e in targets),
                                           return_exceptions=True)
            for e, r in zip(targets, results):
                if isinstance(r, BaseException):
                    log.info("evicting %s from %s: %s", name, e.worker_id, r)
            await asyncio.sleep(RETIRE_POLL_S)
        log.warning("gave up evicting %s@%s: still in use after %.0fs", name, content_hash[:12] or "*",
                    RETIRE_GIVE_UP_S)

    async def close(self) -> None:
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
