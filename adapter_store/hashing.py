"""An adapter's identity: sha256 per file and the content hash over both files, computed exactly as the
engine does (gpu_worker/engine/lora/peft_adapter.py `content_hash`), so the store, the worker and the
router agree on a version without sharing code. tests/store/test_hashing.py checks that they agree."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# The files an adapter is made of, and the only ones the store caches and serves (README, tokenizer: ignored).
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
# Fetch chunks are at most this big (the proto's limit); digests of aligned chunks are kept with each entry.
CHUNK_BYTES = 1 << 20


def content_hash(file_sha256: Mapping[str, str]) -> str:
    """sha256 over the lines "<file>:<sha256 of file>" of the adapter files, sorted by name, joined by "\\n"."""
    lines = [f"{name}:{file_sha256[name]}" for name in sorted(ADAPTER_FILES)]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


class Digester:
    """sha256 of a stream and of each CHUNK_BYTES chunk of it, fed in order, in pieces of any size."""

    def __init__(self):
        self.whole = hashlib.sha256()
        self.chunks: list[str] = []
        self._chunk = hashlib.sha256()
        self._in_chunk = 0

    def update(self, data: bytes | memoryview) -> None:
        self.whole.update(data)
        view = memoryview(data)
        while view:
            take = min(len(view), CHUNK_BYTES - self._in_chunk)
            self._chunk.update(view[:take])
            self._in_chunk += take
            view = view[take:]
            if self._in_chunk == CHUNK_BYTES:
                self.chunks.append(self._chunk.hexdigest())
                self._chunk, self._in_chunk = hashlib.sha256(), 0

    def result(self) -> tuple[str, list[str]]:
        """(sha256 of everything, sha256 of each chunk, the last one short)."""
        chunks = self.chunks + ([self._chunk.hexdigest()] if self._in_chunk else [])
        return self.whole.hexdigest(), chunks


class DigestingWriter:
    """A write-only file object that hashes what goes through it. It has no seek(), so boto3's transfer
    manager writes to it in order (its ranged GETs still run in parallel): the hashing rides along with
    the download instead of re-reading the file after it (95 ms of a 64 MiB cold fetch here)."""

    def __init__(self, f):
        self._f = f
        self.digester = Digester()

    def write(self, data) -> int:
        self.digester.update(data)
        return self._f.write(data)


def chunk_root(chunk_digests: list[str]) -> str:
    """sha256 over the concatenated raw digests of a file's chunks: what a manifest's FileInfo.chunk_root
    holds, so a client can check a whole file from the chunk digests it verified on the way in."""
    return hashlib.sha256(b"".join(bytes.fromhex(d) for d in chunk_digests)).hexdigest()


def file_digests(path: Path) -> tuple[str, list[str]]:
    """(sha256 of the file, sha256 of each CHUNK_BYTES chunk) in one read pass."""
    digester = Digester()
    with open(path, "rb") as f:
        while data := f.read(CHUNK_BYTES):
            digester.update(data)
    return digester.result()


def is_content_hash(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)
