"""The disk cache: validated adapters at `<root>/<name>/<content_hash>/` (the two adapter files plus
manifest.json), LRU by bytes under a cap, and the head of each name (the version a Resolve returns).

Writes are atomic: a download lands in `<root>/.tmp/<random>/`, is validated and hashed there, gets its
manifest.json, and is renamed into place in one step; anything left in .tmp is deleted at start. So a
failed or corrupted download never becomes an entry. Restarts keep everything: entries are found by
scanning for manifest.json files (each checked: name, hash, file sizes); `.state/index.json` keeps heads,
last-use times (LRU order) and which entries are known to be on disk for good between runs.

fsync runs on a background thread after the rename, off the request path (30 ms of a 64 MiB cold fetch
here); the index lists the entries whose fsync finished. An entry a crash caught before that is hashed
again at start and dropped if its bytes are not what its manifest says, so a machine crash cannot leave
a corrupt entry either. Names start with a letter or digit: the dot-directories never collide with one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from adapter_store.hashing import ADAPTER_FILES, chunk_root, file_digests, is_content_hash
from adapter_store.manifest import Manifest
from adapter_store.names import NAME_PATTERN

log = logging.getLogger(__name__)
MANIFEST_FILE = "manifest.json"
# Last-use times are saved at most this often (heads and entries are saved at once when they change).
INDEX_SAVE_INTERVAL_S = 5.0


@dataclass
class Entry:
    manifest: Manifest
    dir: Path
    # path -> sha256 of each 1 MiB chunk, so a warm Fetch sends digests without hashing again.
    chunks: dict[str, list[str]]
    created: float
    last_used: float
    pins: int = 0
    # fsynced (files and directory): survives a machine crash
    synced: bool = False
    size: int = field(init=False)

    def __post_init__(self):
        self.size = self.manifest.total_size

    @property
    def key(self) -> tuple[str, str]:
        return self.manifest.name, self.manifest.content_hash


class DiskCache:
    def __init__(self, root: Path, max_bytes: int, fsync: bool = True):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.fsync = fsync
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str], Entry] = {}
        self._heads: dict[str, str] = {}
        self._dirty_at = 0.0  # when last-use times changed and were not saved yet; 0: saved
        self._syncer = ThreadPoolExecutor(1, thread_name_prefix="cache-fsync")
        self.tmp_root = self.root / ".tmp"
        self.state_root = self.root / ".state"

    # -- start-up ---------------------------------------------------------------------------------

    def open(self) -> None:
        """Create the directories, drop leftovers of interrupted downloads, rebuild the index."""
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.tmp_root, ignore_errors=True)
        self.tmp_root.mkdir()
        self.state_root.mkdir(exist_ok=True)
        index = self._read_index()
        used, synced = index.get("last_used", {}), set(index.get("synced", []))
        found = [*self.root.glob(f"*/*/{MANIFEST_FILE}"), *self.root.glob(f"*/*/*/{MANIFEST_FILE}")]
        for manifest_path in sorted(found):
            rel = manifest_path.parent.relative_to(self.root)  # <name>/<hash>
            if rel.parts[0].startswith("."):
                continue
            entry = self._load_entry(manifest_path.parent, verify=f"{rel.parent.as_posix()}@{rel.name}" not in synced)
            if entry is None:
                continue
            entry.last_used = float(used.get(_index_key(entry), entry.created))
            self._entries[entry.key] = entry
        if index:
            self._heads = {n: d for n, d in index.get("heads", {}).items() if (n, d) in self._entries}
        else:  # no index (first start after a crash before it was written): each name's newest version
            for entry in sorted(self._entries.values(), key=lambda e: e.created):
                self._heads[entry.key[0]] = entry.key[1]
        with self._lock:
            self._save_locked()
        log.info("cache %s: %d entries, %.1f MiB of %.1f MiB", self.root, len(self._entries), self.total_bytes / 2**20,
                 self.max_bytes / 2**20)

    def _load_entry(self, path: Path, verify: bool) -> Entry | None:
        """The entry in `path` if it is whole and consistent (and, with `verify`, its bytes hash to what its
        manifest says: it was not known to be fsynced); else it is removed (and None)."""
        try:
            data = json.loads((path / MANIFEST_FILE).read_text())
            manifest = Manifest.from_json(data["manifest"])
            name, digest = manifest.name, manifest.content_hash
            ok = (NAME_PATTERN.match(name) and ".." not in name and is_content_hash(digest)
                  and path == self.root / name / digest
                  and sorted(f.path for f in manifest.files) == sorted(ADAPTER_FILES)
                  and all((path / f.path).stat().st_size == f.size for f in manifest.files))
            chunks = data["chunks"]
            if ok and verify:
                ok = all(file_digests(path / f.path) == (f.sha256, chunks[f.path]) for f in manifest.files)
                if ok:
                    self._sync_files(path)
            if ok:
                # Entries written before manifests carried chunk roots get theirs from the kept digests.
                manifest = replace(manifest, files=tuple(
                    f if f.chunk_root else replace(f, chunk_root=chunk_root(chunks[f.path])) for f in manifest.files))
                entry = Entry(manifest, path, chunks, float(data["created"]), float(data["created"]))
                entry.synced = True
                return entry
            why = "inconsistent with its path or files" + (" or their sha256" if verify else "")
        except (OSError, ValueError, KeyError, TypeError) as e:
            why = f"unreadable ({type(e).__name__}: {e})"
        log.warning("cache: dropping %s: %s", path, why)
        _remove_entry_dir(path)
        return None

    # -- reads ------------------------------------------------------------------------------------

    def head(self, name: str) -> Entry | None:
        """The current version of `name`, marked used."""
        with self._lock:
            digest = self._heads.get(name)
            return self._touch_locked(self._entries.get((name, digest))) if digest else None

    def get(self, name: str, digest: str) -> Entry | None:
        with self._lock:
            return self._touch_locked(self._entries.get((name, digest)))

    def find_version(self, name: str, source_uri: str, source_version: str) -> Entry | None:
        """An entry of `name` downloaded from that source at that version (so it need not be downloaded again)."""
        if not source_version:
            return None
        with self._lock:
            for entry in self._entries.values():
                m = entry.manifest
                if (m.name, m.source_uri, m.source_version) == (name, source_uri, source_version):
                    return self._touch_locked(entry)
        return None

    def manifests(self) -> list[Manifest]:
        with self._lock:
            return [e.manifest for e in sorted(self._entries.values(), key=lambda e: e.key)]

    def names(self) -> set[str]:
        with self._lock:
            return {name for name, _ in self._entries}

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self._entries.values())

    # -- writes -----------------------------------------------------------------------------------

    def temp_dir(self) -> Path:
        """A new empty directory for one download, on the cache's filesystem (so the commit is a rename)."""
        path = self.tmp_root / uuid.uuid4().hex
        path.mkdir()
        return path

    def commit(self, tmp: Path, manifest: Manifest, chunks: dict[str, list[str]]) -> Entry:
        """Move a validated download into place as the head of its name; evict LRU entries over the cap."""
        now = time.time()
        (tmp / MANIFEST_FILE).write_text(json.dumps({"manifest": manifest.to_json(), "chunks": chunks,
                                                     "created": now}))
        final = self.root / manifest.name / manifest.content_hash
        final.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            entry = self._entries.get((manifest.name, manifest.content_hash))
            if entry is None:  # else the same content is cached already: keep that one
                os.rename(tmp, final)
                entry = Entry(manifest, final, chunks, now, now)
                self._entries[entry.key] = entry
                if self.fsync:
                    self._syncer.submit(self._sync_entry, entry)
            self._heads[manifest.name] = manifest.content_hash
            self._touch_locked(entry)
            victims = self._evict_locked(keep=entry)
            self._save_locked()
        shutil.rmtree(tmp, ignore_errors=True)
        for victim in victims:
            _remove_entry_dir(victim.dir)
        return entry

    def set_head(self, entry: Entry) -> None:
        """Make a cached entry its name's current version again."""
        with self._lock:
            if self._entries.get(entry.key) is entry:
                self._heads[entry.key[0]] = entry.key[1]
                self._save_locked()

    def drop_name(self, name: str) -> int:
        """Forget every version of `name`; return how many entries were removed. Open files stay readable
        (a Fetch in progress finishes); resuming one afterwards gets NOT_FOUND."""
        with self._lock:
            victims = [e for key, e in self._entries.items() if key[0] == name]
            for e in victims:
                del self._entries[e.key]
            self._heads.pop(name, None)
            self._save_locked()
        for e in victims:
            _remove_entry_dir(e.dir)
        return len(victims)

    def pin(self, entry: Entry) -> None:
        """Keep `entry` from eviction while a Fetch streams it."""
        with self._lock:
            entry.pins += 1

    def unpin(self, entry: Entry) -> None:
        with self._lock:
            entry.pins -= 1

    def flush(self) -> None:
        """Finish the pending fsyncs and save the index (at shutdown)."""
        self._syncer.shutdown(wait=True)
        self._syncer = ThreadPoolExecutor(1, thread_name_prefix="cache-fsync")
        with self._lock:
            self._save_locked()

    def _sync_entry(self, entry: Entry) -> None:
        try:
            self._sync_files(entry.dir)
        except OSError as e:  # removed meanwhile (evicted, deleted): nothing to keep
            log.debug("cache: fsync of %s skipped (%s)", entry.dir, e)
            return
        with self._lock:
            entry.synced = True
            self._save_locked()

    def _sync_files(self, path: Path) -> None:
        if self.fsync:
            for name in [*ADAPTER_FILES, MANIFEST_FILE]:
                _fsync(path / name)
            _fsync(path, directory=True)
            _fsync(path.parent, directory=True)

    # -- internals (call with the lock held) -------------------------------------------------------

    def _touch_locked(self, entry: Entry | None) -> Entry | None:
        if entry is not None:
            entry.last_used = time.time()
            self._dirty_at = self._dirty_at or time.monotonic()
            if time.monotonic() - self._dirty_at > INDEX_SAVE_INTERVAL_S:
                self._save_locked()
        return entry

    def _evict_locked(self, keep: Entry) -> list[Entry]:
        """Drop least recently used, unpinned entries until the total fits the cap (never `keep`)."""
        victims = []
        total = self.total_bytes
        for entry in sorted(self._entries.values(), key=lambda e: e.last_used):
            if total <= self.max_bytes:
                break
            if entry is keep or entry.pins:
                continue
            del self._entries[entry.key]
            if self._heads.get(entry.key[0]) == entry.key[1]:
                del self._heads[entry.key[0]]
            total -= entry.size
            victims.append(entry)
            log.info("cache: evicted %s@%s (%.1f MiB, least recently used)", *entry.key, entry.size / 2**20)
        if total > self.max_bytes:
            log.warning("cache: %.1f MiB over the cap of %.1f MiB (entries in use are never evicted)",
                        (total - self.max_bytes) / 2**20, self.max_bytes / 2**20)
        return victims

    def _read_index(self) -> dict:
        path = self.state_root / "index.json"
        try:
            return json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError) as e:
            log.warning("cache: ignoring unreadable %s (%s); rebuilding from the entries", path, e)
            return {}

    def _save_locked(self) -> None:
        entries = sorted(self._entries.values(), key=lambda e: e.key)
        index = {"heads": dict(sorted(self._heads.items())),
                 "last_used": {_index_key(e): e.last_used for e in entries},
                 "synced": [_index_key(e) for e in entries if e.synced]}
        tmp = self.state_root / f"index.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(index, indent=1))
        os.replace(tmp, self.state_root / "index.json")
        self._dirty_at = 0.0


def _index_key(entry: Entry) -> str:
    return f"{entry.key[0]}@{entry.key[1]}"


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_entry_dir(path: Path) -> None:
    """Remove an entry's own files, then the directory if empty (never a whole subtree: a name's directory
    may hold another name's entries, e.g. "org" and "org/x")."""
    for name in [*ADAPTER_FILES, MANIFEST_FILE]:
        with contextlib.suppress(FileNotFoundError):
            (path / name).unlink()
    for d in (path, path.parent):
        try:
            d.rmdir()
        except OSError:
            break
