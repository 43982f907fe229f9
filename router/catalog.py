"""AdapterCatalog: which model names exist, and which version (content hash) new requests get.

With an adapter store, the store is the truth. A name the router has not seen is resolved there (the store
may fetch it from its sources: a cold adapter), and the store's list is re-read every catalog_refresh_s so a
reload made through another router replica reaches this one. Requests carry the store's content hash, so
after an in-place reload new requests name the new version while requests in flight finish on the old one.

Without a store, the names are those the workers report holding and those LoadAdapter registered here. A
name the router does not know still goes to a worker, which may find it under its --lora-root, and comes
back NOT_FOUND if it does not. Requests carry no hash (each worker serves the version it reads). A name
unloaded here is refused until it is loaded again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import replace

from router import errors
from router.domain import AdapterInfo, AdapterRef, AdapterState, ModelEntry, WorkerStatus
from router.registry import WorkerRegistry
from router.store_client import StoreClient
from service_kit.names import name_problem

log = logging.getLogger(__name__)

HINT_NAMES = 20


def check_name(name: str) -> str:
    """`name` if it is a valid adapter name (the rule the workers and the store apply), else INVALID_ARGUMENT."""
    problem = name_problem(name)
    if problem is not None:
        raise errors.InvalidArgumentError(problem)
    return name


class AdapterCatalog:
    def __init__(self, registry: WorkerRegistry, store: StoreClient | None = None, refresh_s: float = 5.0):
        self.registry = registry
        self.store = store
        self.refresh_s = refresh_s
        self._entries: dict[str, AdapterInfo] = {}
        self._unloaded: set[str] = set()
        self._first_seen: dict[str, int] = {}
        self._resolving: dict[str, asyncio.Future] = {}
        self._base: tuple[tuple, str] = ((), "")  # (the statuses it was computed from, the base model)

    # -- the base model ---------------------------------------------------------------------------

    def base_model(self) -> str:
        """The base model the live workers serve (the most common name, should they disagree)."""
        published = self.registry.published
        if self._base[0] is not published:  # recomputed only when a status changed, not per request
            names = Counter(s.base_model for s in published if s.base_model)
            base = names.most_common(1)[0][0] if names else ""
            if len(names) > 1 and base != self._base[1]:
                log.warning("workers serve different base models: %s; taking %s", dict(names), base)
            self._base = (published, base)
        return self._base[1]

    def max_model_len(self) -> int:
        lens = [s.max_model_len for s in self.registry.published if s.max_model_len]
        return min(lens) if lens else 0

    # -- requests ---------------------------------------------------------------------------------

    async def resolve(self, model: str) -> AdapterRef | None:
        """The adapter a request's `model` names (None: the base model). NotFoundError names what exists."""
        if not model or model == self.base_model():
            return None
        info = self._entries.get(model)
        if info is not None:
            return info.ref if self.store is not None else AdapterRef(model)
        if model in self._unloaded:
            raise self.not_found(model, "it was unloaded")
        check_name(model)
        if self.store is None:
            return AdapterRef(model)  # the workers may find it under their --lora-root
        try:
            info = await self._resolve_once(model)
        except errors.NotFoundError as e:
            raise self.not_found(model, str(e)) from None
        return info.ref

    async def _resolve_once(self, name: str) -> AdapterInfo:
        """Concurrent requests for one cold name share one ResolveAdapter call."""
        future = self._resolving.get(name)
        if future is None:
            future = asyncio.ensure_future(self.store.resolve(name))
            self._resolving[name] = future
            future.add_done_callback(lambda f: (self._resolving.pop(name, None), f.cancelled() or f.exception()))
        info = await asyncio.shield(future)
        self.put(info)
        return info

    def not_found(self, model: str, why: str = "") -> errors.NotFoundError:
        known = self.known_names()
        more = len(known) - HINT_NAMES
        shown = ", ".join(known[:HINT_NAMES]) + (f" and {more} more" if more > 0 else "")
        base = self.base_model() or "(no worker up yet)"
        return errors.NotFoundError(
            f"model {model!r} is neither the base model {base!r} nor a known adapter"
            f"{f' ({why})' if why else ''}; known adapters: [{shown}]")

    def known_names(self) -> list[str]:
        names = set(self._entries)
        if self.store is None:
            names |= {a.ref.name for s in self.registry.published for a in s.adapters}
        return sorted(names - self._unloaded)

    async def refresh_one(self, name: str) -> bool:
        """Ask the store again for `name` (a worker said our version is stale); whether the version changed."""
        if self.store is None:
            return False
        old = self._entries.get(name)
        info = await self.store.resolve(name)
        self.put(info)
        return old is None or old.content_hash != info.content_hash

    # -- registrations (admin) ------------------------------------------------------------------------

    def get(self, name: str) -> AdapterInfo | None:
        return self._entries.get(name)

    def knows(self, name: str) -> bool:
        return name in self.known_names()

    def put(self, info: AdapterInfo) -> AdapterInfo:
        created = self._first_seen.setdefault(info.name, info.created or int(time.time()))
        old = self._entries.get(info.name)
        if old is not None and old.content_hash != info.content_hash:
            log.info("adapter %s is now version %s (was %s)", info.name, info.content_hash[:12] or "-",
                     old.content_hash[:12] or "-")
        info = AdapterInfo(info.name, info.content_hash, info.source_uri, info.base_model, info.rank, info.state,
                           created)
        self._entries[info.name] = info
        self._unloaded.discard(info.name)
        return info

    def remove(self, name: str) -> None:
        self._entries.pop(name, None)
        self._first_seen.pop(name, None)
        if self.store is None:
            self._unloaded.add(name)

    # -- the store's list -----------------------------------------------------------------------------

    async def refresh(self) -> list[AdapterInfo]:
        """Re-read the store's list: new names and versions in, names it forgot out."""
        versions: dict[str, list[AdapterInfo]] = {}
        for info in await self.store.list():
            versions.setdefault(info.name, []).append(info)
        for name in list(self._entries):
            if name not in versions:
                log.info("adapter %s is no longer in the store", name)
                self._entries.pop(name)
        current = []
        for name, infos in versions.items():
            if len(infos) > 1:
                # ListAdapters lists every cached version and does not say which one the name resolves to
                # now: ask (a cached lookup at the store)
                try:
                    infos = [await self.store.resolve(name, timeout=10.0)]
                except errors.NotFoundError:
                    continue
            current.append(self.put(infos[0]))
        return current

    async def run(self) -> None:
        """Keep the store's list fresh (only with a store)."""
        failing = False
        while True:
            try:
                await self.refresh()
                failing = False
            except errors.RouterError as e:
                if not failing:
                    log.warning("cannot list the adapter store's adapters (%s); keeping the last list", e)
                failing = True
            await asyncio.sleep(self.refresh_s)

    async def list_models(self) -> list[ModelEntry]:
        base, max_len = self.base_model(), self.max_model_len()
        models = [ModelEntry(base, base, None, max_len)] if base else []
        if self.store is not None:
            try:
                await self.refresh()
            except errors.UnavailableError as e:
                log.warning("ListModels: the adapter store is unreachable (%s); listing what the router knows", e)
        adapters = dict(self._entries)
        learned = {info.name: info for info in _learned(self.registry.published)}
        if self.store is None:
            for info in learned.values():
                adapters.setdefault(info.name, self.put(info) if info.name not in self._unloaded else info)
        for name in sorted(adapters.keys() - self._unloaded):
            models.append(ModelEntry(name, base, self._listed(adapters[name], learned.get(name)), max_len))
        return models

    def _listed(self, info: AdapterInfo, held: AdapterInfo | None) -> AdapterInfo:
        """The entry as ListModels shows it: first-seen time; a name the store lists without a version (registered,
        not fetched through it) gets the version and rank of the copy a worker holds (pre-loaded from a path)."""
        info = replace(info, created=self._first_seen.get(info.name, info.created))
        if not info.content_hash and held is not None:
            info = replace(info, content_hash=held.content_hash, rank=held.rank)
        return info


def _learned(statuses: tuple[WorkerStatus, ...]) -> list[AdapterInfo]:
    """Adapters the workers hold, as catalogue entries (without a store, the router has nothing better)."""
    seen: dict[str, AdapterInfo] = {}
    for s in statuses:
        for a in s.adapters:
            seen.setdefault(a.ref.name, AdapterInfo(a.ref.name, a.ref.content_hash, rank=a.rank,
                                                    base_model=s.base_model, state=AdapterState.READY))
    return list(seen.values())
