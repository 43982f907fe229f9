"""FetchAdapter: chunks of at most 1 MiB with offsets and sha256, resumable; the worker's client resumes a
stream cut mid-way from the last verified offset, and a partial file left by an earlier run."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import socket
import threading
from pathlib import Path

import grpc
import pytest

from adapter_store.hashing import CHUNK_BYTES, chunk_root
from gpu_worker.store_client import StoreClient, StoreClientError
from loraserve.v1 import adapter_store_pb2, common_pb2

from .conftest import fetch_bytes, resolve, running_store, store_config, store_stub
from .synthetic import write_adapter

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """A valid ~3 MiB adapter: three full chunks and a short one."""
    root = tmp_path_factory.mktemp("big")
    write_adapter(root / "big", layers=3, hidden=1024, rank=64)
    return root / "big"


@pytest.fixture(scope="module")
def store(store_loop, tmp_path_factory, big):
    config = store_config(tmp_path_factory.mktemp("fetch-cache"), lora_root=str(big.parent))
    with running_store(store_loop, config) as server:
        yield server


@pytest.fixture
def stub(store):
    with store_stub(store) as s:
        yield s


def test_chunks_carry_offsets_and_digests(stub, big):
    m = resolve(stub, "big")
    want = (big / WEIGHTS).read_bytes()
    data, messages = fetch_bytes(stub, m, WEIGHTS)
    assert data == want and len(want) > 3 * CHUNK_BYTES
    assert [msg.offset for msg in messages] == list(range(0, len(want), CHUNK_BYTES))
    for msg in messages:
        assert len(msg.data) <= CHUNK_BYTES and msg.path == WEIGHTS and msg.file_size == len(want)
        assert msg.sha256 == hashlib.sha256(msg.data).hexdigest()
    # any offset and chunk size: the digests are of what is sent
    data, messages = fetch_bytes(stub, m, WEIGHTS, offset=12345, chunk_size=300_000)
    assert data == want[12345:] and messages[0].offset == 12345
    assert all(len(msg.data) <= 300_000 and msg.sha256 == hashlib.sha256(msg.data).hexdigest() for msg in messages)
    data, messages = fetch_bytes(stub, m, WEIGHTS, chunk_size=64 << 20)  # above 1 MiB means 1 MiB
    assert data == want and max(len(msg.data) for msg in messages) == CHUNK_BYTES
    assert fetch_bytes(stub, m, WEIGHTS, offset=len(want)) == (b"", [])  # at the end: nothing left


@pytest.mark.parametrize("change, code", [
    (dict(offset=1 << 40), grpc.StatusCode.OUT_OF_RANGE),
    (dict(path="README.md"), grpc.StatusCode.NOT_FOUND),
    (dict(path="../manifest.json"), grpc.StatusCode.NOT_FOUND),
    (dict(content_hash="ab" * 32), grpc.StatusCode.NOT_FOUND),
    (dict(content_hash="not-a-hash"), grpc.StatusCode.INVALID_ARGUMENT),
    (dict(name="no-such-adapter"), grpc.StatusCode.NOT_FOUND),
])
def test_fetch_errors(stub, change, code):
    m = resolve(stub, "big")
    ref = common_pb2.AdapterRef(name=change.get("name", "big"),
                                content_hash=change.get("content_hash", m.ref.content_hash))
    req = adapter_store_pb2.FetchAdapterRequest(ref=ref, path=change.get("path", WEIGHTS),
                                                offset=change.get("offset", 0))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.FetchAdapter(req, timeout=10))
    assert info.value.code() == code


class CuttingProxy:
    """A TCP proxy that cuts its first connection after `cut_after` bytes from the server (a network failure
    mid-stream); later connections pass through."""

    def __init__(self, upstream_port: int, cut_after: int):
        self.upstream, self.cut_after = upstream_port, cut_after
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.cut = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            limit = self.cut_after if self.connections == 0 else None
            self.connections += 1
            threading.Thread(target=self._pump, args=(client, server, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, limit), daemon=True).start()

    def _pump(self, src, dst, limit):
        sent = 0
        with contextlib.suppress(OSError):  # either side closing ends the pump
            while data := src.recv(65536):
                if limit is not None and sent + len(data) >= limit:
                    dst.sendall(data[: limit - sent])
                    self.cut.set()
                    break
                dst.sendall(data)
                sent += len(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self):
        self.listener.close()


def test_a_stream_cut_mid_way_resumes_from_its_offset(store, big, tmp_path, caplog):
    proxy = CuttingProxy(store.port, cut_after=int(1.5 * CHUNK_BYTES))
    try:
        with caplog.at_level(logging.INFO), StoreClient(f"127.0.0.1:{proxy.port}", backoff_s=0.05) as client:
            local = client.download("big", tmp_path / "w")
    finally:
        proxy.close()
    assert proxy.cut.is_set() and proxy.connections >= 2
    assert (local.path / WEIGHTS).read_bytes() == (big / WEIGHTS).read_bytes()
    resumed = [o for o in local.stats.resumed_at if o > 0]
    assert resumed and resumed[0] % CHUNK_BYTES == 0 and resumed[0] <= 1.5 * CHUNK_BYTES  # whole verified chunks
    assert local.stats.bytes_received == sum(f.size for f in local.adapter.files)  # nothing fetched twice
    assert any(f"resumes at offset {resumed[0]}" in r.getMessage() for r in caplog.records), "the store saw the resume"


def test_a_partial_file_from_an_earlier_run_is_resumed_and_verified(store, big, tmp_path):
    want = (big / WEIGHTS).read_bytes()
    with StoreClient(f"127.0.0.1:{store.port}") as client:
        adapter = client.resolve("big")
        partial = tmp_path / "w" / ".partial" / adapter.content_hash
        partial.mkdir(parents=True)
        (partial / WEIGHTS).write_bytes(want[: 2 * CHUNK_BYTES + 100])  # a good prefix
        local = client.download("big", tmp_path / "w")
        # Checked by chunks (the manifest has the chunk roots): the 100 bytes past the last whole chunk
        # are fetched again, so the fetch resumes on the store's chunk grid.
        assert local.stats.resumed_at == [2 * CHUNK_BYTES]
        assert local.stats.bytes_received == len(want) - 2 * CHUNK_BYTES + adapter.files[0].size
        assert (local.path / WEIGHTS).read_bytes() == want

        partial = tmp_path / "w2" / ".partial" / adapter.content_hash
        partial.mkdir(parents=True)
        # A corrupt first chunk: caught by the chunk root at the end, and the file fetched again from zero.
        (partial / WEIGHTS).write_bytes(b"\0" * (CHUNK_BYTES + 1000))
        local = client.download("big", tmp_path / "w2")
        assert local.stats.resumed_at == [CHUNK_BYTES]
        assert (local.path / WEIGHTS).read_bytes() == want
        assert not client.download("big", tmp_path / "w2").fetched  # whole already: nothing to fetch


def test_files_are_checked_by_chunk_root_or_by_sha256(store, big, tmp_path):
    """The manifest's chunk root is sha256 over the raw digests of the file's 1 MiB chunks; fetched in those
    chunks, a file is checked against it (each byte hashed once), in other chunk sizes against its sha256.
    A file that fails its check is fetched once more, then the fetch fails with DATA_LOSS."""
    want = (big / WEIGHTS).read_bytes()
    digests = [hashlib.sha256(want[i:i + CHUNK_BYTES]).hexdigest() for i in range(0, len(want), CHUNK_BYTES)]
    with StoreClient(f"127.0.0.1:{store.port}") as client:
        adapter = client.resolve("big")
        weights = next(f for f in adapter.files if f.path == WEIGHTS)
        assert (weights.chunk_size, weights.chunk_root) == (CHUNK_BYTES, chunk_root(digests))
        assert weights.sha256 == hashlib.sha256(want).hexdigest()

        for at, chunk_size in (("root", 0), ("sha", 300_000)):
            client.fetch_file(adapter, weights, tmp_path / at / WEIGHTS, chunk_size=chunk_size)
            assert (tmp_path / at / WEIGHTS).read_bytes() == want

        for field, chunk_size in (("chunk_root", 0), ("sha256", 300_000)):
            lying = dataclasses.replace(weights, **{field: "0" * 64})
            with pytest.raises(StoreClientError) as e:
                client.fetch_file(adapter, lying, tmp_path / f"bad-{field}" / WEIGHTS, chunk_size=chunk_size)
            assert e.value.code == grpc.StatusCode.DATA_LOSS and "after two complete fetches" in str(e.value)
