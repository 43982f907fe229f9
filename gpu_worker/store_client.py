"""StoreClient: the worker's side of the adapter store, through the protos only (loraserve.v1).

`download(name, cache_root)` resolves a name to its manifest, then fetches each file into
`<cache_root>/<name>/<content_hash>/`: chunks are checked against their sha256 as they arrive, every file
at the end, and a cut stream resumes from the last verified offset (also across restarts: partial files
wait in `<cache_root>/.partial/<content_hash>/`). The finished directory appears in one rename, so a
directory at the final path is always whole. Blocking; thread-safe.

A file is checked at the end in one of two ways. When the manifest gives its chunk root (FileInfo
chunk_size / chunk_root), the file is fetched in those chunks and the verified chunk digests, concatenated,
must hash to the root: every byte is hashed once. Otherwise the whole file is hashed a second time and
compared with the manifest's sha256 (one sha256 pass is ~1 GB/s on a core here, as fast as the stream).
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from loraserve.v1 import adapter_store_pb2, adapter_store_pb2_grpc, common_pb2

log = logging.getLogger(__name__)

# A stream cut by the network, or a store restarting: worth resuming.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
             grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# Received chunks not yet written (each up to 1 MiB).
MAX_CHUNKS_IN_FLIGHT = 8


class StoreClientError(Exception):
    """A failure from the store (its status code and message) or of the data it sent."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    sha256: str
    # The store's chunking of the file and the sha256 over its chunk digests (0 / "": not given).
    chunk_size: int = 0
    chunk_root: str = ""


@dataclass(frozen=True)
class ResolvedAdapter:
    name: str
    content_hash: str
    files: tuple[RemoteFile, ...]
    source_uri: str = ""
    base_model_name: str = ""
    max_rank: int = 0


@dataclass
class FetchStats:
    bytes_received: int = 0
    # Offsets at which a cut or corrupt stream was resumed.
    resumed_at: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class LocalAdapter:
    adapter: ResolvedAdapter
    path: Path
    # False: the directory was there already and nothing was fetched.
    fetched: bool
    stats: FetchStats


class _BadChunk(Exception):
    """A chunk whose digest, offset or path is wrong: dropped, and the stream resumed before it."""


class StoreClient:
    def __init__(self, address: str, timeout_s: float = 600.0, max_attempts: int = 5, backoff_s: float = 0.2):
        self.address = address
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self._channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length",
                                                                 MAX_MESSAGE_BYTES)])
        self._stub = adapter_store_pb2_grpc.AdapterStoreServiceStub(self._channel)
        # A chunk's digest is checked on one thread, the verified chunk written and added to the file's
        # digest on another, while the caller's thread receives the next ones: sha256 releases the GIL, so
        # the three overlap (each sha256 pass is ~0.7 ms per MiB on one core here).
        self._verifier = ThreadPoolExecutor(1, thread_name_prefix="store-client-verify")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="store-client-write")

    def close(self) -> None:
        self._channel.close()
        self._verifier.shutdown(wait=False)
        self._writer.shutdown(wait=False)

    def __enter__(self) -> StoreClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- resolve ----------------------------------------------------------------------------------

    def resolve(self, name: str) -> ResolvedAdapter:
        try:
            reply = self._stub.ResolveAdapter(adapter_store_pb2.ResolveAdapterRequest(name=name),
                                              timeout=self.timeout_s)
        except grpc.RpcError as e:
            raise StoreClientError(e.code(), f"adapter store {self.address}: {e.details()}") from None
        return _resolved(reply.manifest)

    # -- download ---------------------------------------------------------------------------------

    def download(self, name: str, cache_root: Path) -> LocalAdapter:
        """Resolve `name` and make sure `<cache_root>/<name>/<content_hash>/` holds its verified files."""
        adapter = self.resolve(name)
        cache_root = Path(cache_root)
        final = cache_root / adapter.name / adapter.content_hash
        stats = FetchStats()
        if _complete(final, adapter):
            return LocalAdapter(adapter, final, False, stats)
        partial = cache_root / ".partial" / adapter.content_hash
        partial.mkdir(parents=True, exist_ok=True)
        with _locked(cache_root / ".partial" / f"{adapter.content_hash}.lock"):  # one fetcher per version
            if _complete(final, adapter):
                return LocalAdapter(adapter, final, False, stats)
            t0 = time.perf_counter()
            for file in adapter.files:
                self.fetch_file(adapter, file, partial / file.path, stats)
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():  # a copy at the final path that is not whole: replace it
                shutil.rmtree(final)
            os.rename(partial, final)
        dt = time.perf_counter() - t0
        log.info("adapter %s@%s fetched from %s: %.1f MiB in %.2fs%s", name, adapter.content_hash[:12], self.address,
                 stats.bytes_received / 2**20, dt, f", resumed at {stats.resumed_at}" if stats.resumed_at else "")
        return LocalAdapter(adapter, final, True, stats)

    def fetch_file(self, adapter: ResolvedAdapter, file: RemoteFile, dest: Path, stats: FetchStats | None = None,
                   chunk_size: int = 0) -> None:
        """Fetch one file into `dest` (resuming a partial `dest` left by an earlier attempt) and verify it."""
        stats = stats if stats is not None else FetchStats()
        dest.parent.mkdir(parents=True, exist_ok=True)
        by_chunks = bool(file.chunk_root) and file.chunk_size > 0 and chunk_size in (0, file.chunk_size)
        if by_chunks:
            chunk_size = file.chunk_size
        for _ in range(2):  # a partial file that fails the final check is fetched once more from zero
            whole = _ChunkRoot(chunk_size) if by_chunks else _FileDigest()
            mode = "r+b" if dest.exists() else "w+b"
            with open(dest, mode) as out:
                offset = _hash_prefix(out, whole, file.size)
                if offset:
                    stats.resumed_at.append(offset)
                self._receive(adapter, file, out, whole, offset, stats, chunk_size)
                out.truncate(file.size)
            want, what = (file.chunk_root, "chunk root") if by_chunks else (file.sha256, "sha256")
            if whole.hexdigest() == want:
                return
            log.warning("adapter %s: %s has %s %s, the manifest says %s; fetching it again", adapter.name,
                        file.path, what, whole.hexdigest(), want)
            dest.unlink()
        raise StoreClientError(grpc.StatusCode.DATA_LOSS, f"adapter {adapter.name}: {file.path} does not match its "
                               "sha256 after two complete fetches")

    def _receive(self, adapter, file, out, whole, offset, stats, chunk_size) -> None:
        """Stream from `offset` to the end of the file, resuming after cuts and bad chunks."""
        failures = 0
        while offset < file.size:
            start = offset
            request = adapter_store_pb2.FetchAdapterRequest(
                ref=common_pb2.AdapterRef(name=adapter.name, content_hash=adapter.content_hash), path=file.path,
                offset=offset, chunk_size=chunk_size)
            call = self._stub.FetchAdapter(request, timeout=self.timeout_s)
            sink = _Sink(out, whole, offset)
            pending: collections.deque = collections.deque()
            error: Exception | None = None
            try:
                expected = offset
                for msg in call:
                    data = msg.data  # one copy out of the message
                    if msg.path != file.path or msg.offset != expected or msg.file_size != file.size or not data:
                        raise _BadChunk(f"chunk at {msg.offset} of {msg.path!r} ({msg.file_size} bytes), expected "
                                        f"{expected} of {file.path!r} ({file.size} bytes)")
                    expected += len(data)
                    digest = self._verifier.submit(_sha256, data)
                    pending.append(self._writer.submit(sink.settle, msg.offset, data, msg.sha256, digest))
                    if len(pending) > MAX_CHUNKS_IN_FLIGHT:  # bounds memory; raises on a bad chunk
                        pending.popleft().result()
            except (grpc.RpcError, _BadChunk) as e:
                error = e
            finally:
                call.cancel()
            for settled in pending:  # chunks that arrived before a cut are good if their digests say so
                try:
                    settled.result()
                except _BadChunk as e:
                    error = error or e
            offset = sink.end
            stats.bytes_received += offset - start
            if offset >= file.size:
                return
            if isinstance(error, grpc.RpcError) and error.code() not in RETRYABLE:
                raise StoreClientError(error.code(), f"adapter store {self.address}: {error.details()}")
            failures = 0 if offset > start else failures + 1
            if failures >= self.max_attempts:
                why = error.details() if isinstance(error, grpc.RpcError) else str(error or "the stream ended early")
                raise StoreClientError(grpc.StatusCode.UNAVAILABLE, f"adapter {adapter.name}: {file.path} stopped at "
                                       f"{offset} of {file.size} bytes after {failures} attempts: {why}")
            log.info("adapter %s: %s cut at %d of %d (%s); resuming", adapter.name, file.path, offset, file.size,
                     error.code().name if isinstance(error, grpc.RpcError) else error or "stream ended early")
            stats.resumed_at.append(offset)
            time.sleep(self.backoff_s * failures)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _FileDigest:
    """The end-of-file check without chunk digests: the file hashed again, as it is written."""

    def __init__(self):
        self._h = hashlib.sha256()

    # A partial file's bytes are taken as they are, of any length.
    piece = 1 << 20
    aligned = False

    def add(self, data: bytes, chunk_sha256: str) -> None:
        self._h.update(data)

    def add_prefix(self, data: bytes) -> None:
        self._h.update(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


class _ChunkRoot:
    """The end-of-file check from the chunk digests already verified: sha256 over their raw bytes. A
    partial file's bytes count in whole chunks only (the fetch resumes at a chunk boundary)."""

    aligned = True

    def __init__(self, piece: int):
        self._h = hashlib.sha256()
        self.piece = piece

    def add(self, data: bytes, chunk_sha256: str) -> None:
        self._h.update(bytes.fromhex(chunk_sha256))

    def add_prefix(self, data: bytes) -> None:
        self._h.update(hashlib.sha256(data).digest())

    def hexdigest(self) -> str:
        return self._h.hexdigest()


class _Sink:
    """The verified part of a file: chunks are appended in order, each only if it starts at the end of the
    verified bytes and matches its digest. Used from the writer thread only."""

    def __init__(self, out, whole, end: int):
        self.out, self.whole, self.end = out, whole, end
        out.seek(end)

    def settle(self, offset: int, data: bytes, sha256: str, digest) -> None:
        if offset != self.end:
            raise _BadChunk(f"chunk at {offset} does not follow the verified {self.end} bytes")
        if digest.result() != sha256:
            raise _BadChunk(f"chunk at {offset} has sha256 {digest.result()}, the store sent {sha256}")
        self.out.write(data)
        self.whole.add(data, sha256)
        self.end += len(data)


def _hash_prefix(f, whole, size: int) -> int:
    """Hash what a partial file already holds (up to `size`); return the offset to resume at. With an
    aligned check a short last piece that does not end the file is left out: it is fetched again."""
    f.seek(0)
    n = 0
    while n < size and (data := f.read(min(whole.piece, size - n))):
        if whole.aligned and len(data) < whole.piece and n + len(data) < size:
            break
        whole.add_prefix(data)
        n += len(data)
    return n


def _complete(path: Path, adapter: ResolvedAdapter) -> bool:
    try:
        return all((path / f.path).stat().st_size == f.size for f in adapter.files)
    except OSError:
        return False


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _resolved(m: common_pb2.AdapterManifest) -> ResolvedAdapter:
    files = tuple(RemoteFile(f.path, f.size, f.sha256, f.chunk_size, f.chunk_root) for f in m.files)
    for f in files:  # paths come from the store; still, never write outside the adapter's directory
        if not f.path or "/" in f.path or "\\" in f.path or f.path.startswith("."):
            raise StoreClientError(grpc.StatusCode.INTERNAL, f"adapter {m.ref.name}: the store sent file path "
                                   f"{f.path!r}, which is not a plain file name")
    return ResolvedAdapter(name=m.ref.name, content_hash=m.ref.content_hash, files=files, source_uri=m.source_uri,
                           base_model_name=m.base_model_name, max_rank=m.config.max_rank)
