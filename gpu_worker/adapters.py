"""Where the worker finds an adapter by name: pre-loaded modules (vLLM's --lora-modules), else `<lora_root>/<name>`
(vLLM's filesystem resolver), else, when --adapter-store is set, the adapter store (StoreAdapterSource): the
store resolves the name, the worker fetches its verified files into `<adapter_cache_dir>/<name>/<hash>/`.

A name is a name, never a path: it is checked against a strict pattern before it goes near the filesystem.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import grpc

from gpu_worker.async_engine import UnavailableError
from gpu_worker.engine.errors import AdapterError, InvalidRequestError
from gpu_worker.engine.lora.peft_adapter import CONFIG_FILE, WEIGHTS_FILE
from gpu_worker.engine.lora_request import LoRARequest
from gpu_worker.store_client import StoreClient, StoreClientError
from service_kit.names import escape_from_root, name_problem, parse_lora_module


def check_adapter_name(name: str) -> str:
    """`name` if it is a valid adapter name; InvalidRequestError saying what is allowed otherwise."""
    problem = name_problem(name)
    if problem:
        raise InvalidRequestError(f"adapter.name: {problem}")
    return name


@dataclass(frozen=True)
class LoRAModule:
    """One pre-loaded adapter: `name=path`, or JSON {"name", "path", "base_model_name"} as in vLLM."""

    name: str
    path: str
    base_model_name: str | None = None

    @classmethod
    def parse(cls, spec: str | dict) -> LoRAModule:
        """Parse one --lora-modules entry; ValueError with the entry and the expected forms."""
        name, path, base = parse_lora_module(spec)
        return cls(name, path, base or None)


class LocalAdapterSource:
    """Adapters from the local filesystem. Used from the event loop thread only (not thread-safe)."""

    def __init__(self, modules: list[LoRAModule] | tuple[LoRAModule, ...] = (), lora_root: str | Path | None = None):
        self.modules = {m.name: m for m in modules}
        self.lora_root = Path(lora_root) if lora_root else None
        # LoRARequest wants a positive int id per adapter (vLLM compatibility); the engine keys on the hash.
        self._ids: dict[str, int] = {}

    def lookup(self, name: str) -> LoRARequest:
        """The LoRARequest for `name`. InvalidRequestError for a bad name, AdapterError(not_found) if unknown."""
        check_adapter_name(name)
        module = self.modules.get(name)
        if module is not None:
            return LoRARequest(name, self.adapter_id(name), module.path, module.base_model_name)
        if self.lora_root is not None:
            path = self.lora_root / name
            if path.is_dir():
                escape = escape_from_root(self.lora_root, path, (CONFIG_FILE, WEIGHTS_FILE))
                if escape:
                    raise AdapterError("invalid", f"adapter {name!r}: {escape}; put the adapter's files under "
                                       "--lora-root")
                return LoRARequest(name, self.adapter_id(name), str(path))
        where = ", ".join(sorted(self.modules)) or "none"
        root = f" and no directory {name!r} under {self.lora_root}" if self.lora_root else " (and no --lora-root)"
        raise AdapterError("not_found", f"adapter {name!r} is unknown to this worker: pre-loaded adapters are "
                           f"[{where}]{root}")

    def has(self, name: str) -> bool:
        """Whether `name` (already checked) is a pre-loaded module or a directory under lora_root."""
        return name in self.modules or (self.lora_root is not None and (self.lora_root / name).is_dir())

    async def resolve(self, name: str, content_hash: str = "") -> LoRARequest:
        """The request path's lookup (the same, as a coroutine, like StoreAdapterSource.resolve)."""
        return self.lookup(name)

    def adapter_id(self, name: str) -> int:
        return self._ids.setdefault(name, len(self._ids) + 1)


class StoreAdapterSource:
    """Adapters the worker holds locally (a LocalAdapterSource: pre-loaded modules, lora_root) first, then the
    adapter store. A name fetched once is kept (name -> version -> local directory); a request naming another
    content hash asks the store again, so a re-registered adapter is picked up. Concurrent requests for one
    cold name share one fetch. Used from the event loop thread only; the fetch runs on a thread."""

    def __init__(self, local: LocalAdapterSource, client: StoreClient, cache_dir: str | Path):
        self.local = local
        self.client = client
        self.cache_dir = Path(cache_dir)
        self._fetched: dict[str, tuple[str, str]] = {}  # name -> (content hash, local path)
        self._inflight: dict[str, asyncio.Future] = {}

    def lookup(self, name: str) -> LoRARequest:
        """Local adapters only (the pre-loaded modules at start-up)."""
        return self.local.lookup(name)

    async def resolve(self, name: str, content_hash: str = "") -> LoRARequest:
        check_adapter_name(name)
        if self.local.has(name):
            return self.local.lookup(name)
        known = self._fetched.get(name)
        if known is None or (content_hash and content_hash != known[0]):
            known = await self._fetch(name)
        return LoRARequest(name, self.local.adapter_id(name), known[1])

    async def _fetch(self, name: str) -> tuple[str, str]:
        future = self._inflight.get(name)
        if future is None:
            future = asyncio.ensure_future(asyncio.to_thread(self._download, name))
            self._inflight[name] = future
            future.add_done_callback(lambda done: self._fetch_done(name, done))
        # shield: one caller giving up (a cancelled request) does not cancel the fetch the others wait for
        known = await asyncio.shield(future)
        self._fetched[name] = known
        return known

    def _fetch_done(self, name: str, future: asyncio.Future) -> None:
        self._inflight.pop(name, None)
        if not future.cancelled():
            future.exception()  # retrieved: every waiter may have gone, the error is theirs to see, not the loop's

    def _download(self, name: str) -> tuple[str, str]:
        try:
            local = self.client.download(name, self.cache_dir)
        except StoreClientError as e:
            raise _engine_error(e) from None
        return local.adapter.content_hash, str(local.path)


def _engine_error(e: StoreClientError) -> Exception:
    """The store's status -> the worker's errors (so the worker's interceptor answers with the same code)."""
    if e.code is grpc.StatusCode.NOT_FOUND:
        return AdapterError("not_found", str(e))
    if e.code is grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequestError(str(e))
    if e.code is grpc.StatusCode.FAILED_PRECONDITION:
        return AdapterError("invalid", str(e))
    if e.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return UnavailableError(str(e))
    return e
