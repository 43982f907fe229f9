"""AdapterStore: the domain behind the gRPC service. Resolve a name (registered, or found by a resolver),
download it once into a temporary directory, validate it, hash it, commit it to the disk cache; serve its
files; register and delete names. Thread-safe and blocking: the service calls it from worker threads."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from dataclasses import dataclass

from adapter_store.cache import DiskCache, Entry
from adapter_store.errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    StoreError,
)
from adapter_store.hashing import ADAPTER_FILES, CHUNK_BYTES, chunk_root, content_hash, file_digests, is_content_hash
from adapter_store.manifest import FileEntry, Manifest, State
from adapter_store.names import check_name
from adapter_store.progress import Progress
from adapter_store.registry import Registration, Registry
from adapter_store.singleflight import SingleFlight
from adapter_store.sources.base import AdapterSource, DownloadTarget
from adapter_store.validation import BaseModel, Limits, validate_adapter

log = logging.getLogger(__name__)


class AdapterStore:
    def __init__(self, cache: DiskCache, registry: Registry, limits: Limits, base: BaseModel | None = None):
        self.cache = cache
        self.registry = registry
        self.limits = limits
        self.base = base or BaseModel()
        self._flight: SingleFlight[Manifest] = SingleFlight()
        # Names being downloaded or whose last attempt failed: what ListAdapters shows for them.
        self._status: dict[str, tuple[State, str]] = {}

    # -- resolve ----------------------------------------------------------------------------------

    def resolve(self, name: str) -> Manifest:
        """The manifest of `name`'s current version, downloading and validating it on first use.
        Concurrent calls for one name download it once."""
        manifest = self.cached(name)
        return manifest if manifest is not None else self._flight.do(name, lambda: self._resolve_cold(name))

    def cached(self, name: str) -> Manifest | None:
        """The manifest of `name`'s current version if it is cached, else None (never downloads)."""
        check_name(name)
        entry = self.cache.head(name)
        return entry.manifest if entry is not None else None

    def _resolve_cold(self, name: str) -> Manifest:
        entry = self.cache.head(name)  # a flight that just ended may have cached it
        if entry is not None:
            return entry.manifest
        source, reg = self.registry.find(name)
        return self._materialize(name, source, reg.base_model_name if reg else "").manifest

    def _materialize(self, name: str, source: AdapterSource, registered_base: str) -> Entry:
        """Download, validate, hash and commit one adapter; its name's status follows along (a failure is
        kept for registered names only: ListAdapters shows it; an unregistered name is simply not there)."""
        self._status[name] = (State.DOWNLOADING, "")
        try:
            entry = self._download(name, source, registered_base)
        except Exception as e:
            why = str(e) if isinstance(e, StoreError) else f"internal error: {type(e).__name__}: {e}"
            if self.registry.get(name) is not None:
                self._status[name] = (State.FAILED, why)
            else:
                self._status.pop(name, None)
            raise
        self._status.pop(name, None)
        return entry

    def _download(self, name: str, source: AdapterSource, registered_base: str) -> Entry:
        version = source.version()
        cached = self.cache.find_version(name, source.uri, version)
        if cached is not None:
            log.info("adapter %r: %s unchanged (%s); using the cached %s", name, source.uri, version,
                     cached.manifest.content_hash[:12])
            self.cache.set_head(cached)
            return cached
        what = f"adapter {name!r} ({source.uri})"
        tmp = self.cache.temp_dir()
        try:
            progress = Progress(what)
            fetched = source.download(DownloadTarget(tmp, what, self.limits.max_adapter_bytes, progress))
            progress.finish()
            summary = validate_adapter(tmp, what, self.limits, self.base, registered_base, fetched.listing)
            files, chunks = [], {}
            for path in ADAPTER_FILES:  # whatever else a source wrote is not part of the adapter
                sha, chunks[path] = fetched.digests.get(path) or file_digests(tmp / path)
                files.append(FileEntry(path, (tmp / path).stat().st_size, sha, chunk_root(chunks[path])))
            digest = content_hash({f.path: f.sha256 for f in files})
            manifest = Manifest(name=name, content_hash=digest, source_uri=source.uri, source_version=fetched.version,
                                base_model_name=registered_base or summary.base_model_name_or_path, config=summary,
                                files=tuple(files))
            entry = self.cache.commit(tmp, manifest, chunks)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("adapter %r ready: %s, %.1f MiB, rank %d, from %s", name, digest[:12], manifest.total_size / 2**20,
                 summary.max_rank, source.uri)
        return entry

    # -- files ------------------------------------------------------------------------------------

    def open_file(self, name: str, digest: str, path: str, download: bool = True) -> OpenFile | None:
        """One file of one version, pinned in the cache until closed. A version that was evicted is
        downloaded again if the name still resolves to it (download=False: return None instead)."""
        check_name(name)
        if not is_content_hash(digest):
            raise InvalidArgumentError(f"content_hash {digest[:80]!r} is not a hex sha256: Fetch needs the version "
                                       "from ResolveAdapter")
        entry = self.cache.get(name, digest)
        if entry is None and self.cache.head(name) is None:
            if not download:
                return None
            self.resolve(name)  # cold (never fetched, or evicted): bring the current version in
            entry = self.cache.get(name, digest)
        if entry is None:
            head = self.cache.head(name)
            now = f"its current version is {head.manifest.content_hash}" if head else "it has no cached version"
            raise NotFoundError(f"adapter {name!r} has no version {digest}: {now}; resolve it again")
        file = entry.manifest.file(path)
        if file is None:
            raise NotFoundError(f"adapter {name!r}@{digest[:12]} has no file {path!r}; its files are "
                                f"{[f.path for f in entry.manifest.files]}")
        return OpenFile(self.cache, entry, file)

    # -- names ------------------------------------------------------------------------------------

    def list(self) -> list[Manifest]:
        """Every cached version, plus registered or in-flight names that have none (with their state)."""
        out = self.cache.manifests()
        cached = {m.name for m in out}
        status = dict(self._status)
        for reg in self.registry.all():
            if reg.name not in cached:
                state, error = status.pop(reg.name, (State.REGISTERED, ""))
                out.append(Manifest(name=reg.name, source_uri=reg.uri, base_model_name=reg.base_model_name,
                                    state=state, error=error))
        for name, (state, _) in status.items():
            if state is State.DOWNLOADING and name not in cached:
                out.append(Manifest(name=name, state=state))
        return sorted(out, key=lambda m: (m.name, m.content_hash))

    def register(self, name: str, uri: str, base_model_name: str = "", replace: bool = False) -> Manifest:
        """Register `name` for `uri`, download and validate it now, and make it the name's current version."""
        check_name(name)
        if not uri:
            raise InvalidArgumentError("source_uri must not be empty")
        source = self.registry.sources.from_uri(uri)

        def run() -> Manifest:
            if not replace and (self.registry.get(name) is not None or self.cache.head(name) is not None):
                raise AlreadyExistsError(f"adapter {name!r} exists; pass replace=true to point it at {uri}")
            entry = self._materialize(name, source, base_model_name)
            self.registry.add(Registration(name, uri, base_model_name, runtime=True))
            return entry.manifest

        return self._flight.do(("register", name, uri, base_model_name, replace), run)

    def delete(self, name: str) -> None:
        """Forget `name` (its registration and every cached version)."""
        check_name(name)
        registered = self.registry.remove(name)
        dropped = self.cache.drop_name(name)
        self._status.pop(name, None)
        if not registered and not dropped:
            raise NotFoundError(f"adapter {name!r} is neither registered nor cached")
        log.info("adapter %r deleted (%d cached versions removed)", name, dropped)


@dataclass
class Chunk:
    offset: int
    data: bytes
    sha256: str


class OpenFile:
    """A cached file, open for reading at any offset; keeps its entry from eviction until closed."""

    def __init__(self, cache: DiskCache, entry: Entry, file: FileEntry):
        self.cache, self.entry, self.file = cache, entry, file
        self.path = file.path
        self.size = file.size
        cache.pin(entry)
        try:
            self._fd = os.open(entry.dir / file.path, os.O_RDONLY)
        except OSError:
            cache.unpin(entry)
            raise NotFoundError(f"adapter {entry.manifest.name!r}: {file.path} was removed") from None
        self._chunks = entry.chunks.get(file.path, [])

    def check_offset(self, offset: int) -> None:
        if offset > self.size:
            raise OutOfRangeError(f"offset {offset} is past the end of {self.path} ({self.size} bytes)")

    def read(self, offset: int, size: int) -> Chunk:
        """Up to `size` bytes at `offset`, with their sha256 (the one kept with the entry when aligned)."""
        data = os.pread(self._fd, size, offset)
        index, aligned = divmod(offset, CHUNK_BYTES)
        full = len(data) == CHUNK_BYTES or offset + len(data) == self.size
        if aligned == 0 and full and size >= CHUNK_BYTES and index < len(self._chunks):
            return Chunk(offset, data, self._chunks[index])
        return Chunk(offset, data, hashlib.sha256(data).hexdigest())

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self.cache.unpin(self.entry)

    def __enter__(self) -> OpenFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
