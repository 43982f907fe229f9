"""The disk cache: single flight, LRU by bytes, restarts, and failed downloads that never become entries."""

from __future__ import annotations

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from adapter_store.errors import SourceUnavailableError
from adapter_store.registry import Registration
from adapter_store.sources.filesystem import LocalDirSource
from adapter_store.sources.s3 import S3Source
from gpu_worker.engine.lora.peft_adapter import content_hash as engine_content_hash
from loraserve.v1 import adapter_store_pb2, common_pb2

from .conftest import cache_entries, fetch_bytes, resolve, running_store, store_config, store_stub

WEIGHTS = "adapter_model.safetensors"


def test_twenty_concurrent_fetches_of_a_cold_adapter_download_it_once(store_loop, tmp_path, s3_adapter_bucket,
                                                                       tiny_adapters, monkeypatch):
    downloads = []
    original = S3Source.download

    def counted(self, target):
        downloads.append(self.uri)
        time.sleep(0.3)  # hold the download open so every request arrives while it runs
        return original(self, target)

    monkeypatch.setattr(S3Source, "download", counted)
    config = store_config(tmp_path / "cache", s3_endpoint_url=s3_adapter_bucket.endpoint,
                          s3_bucket=s3_adapter_bucket.bucket, s3_prefix="adapters/", download_threads=24)
    digest = engine_content_hash(tiny_adapters["chat-lora"])
    want = (tiny_adapters["chat-lora"] / WEIGHTS).read_bytes()
    ref = common_pb2.AdapterRef(name="chat-lora", content_hash=digest)
    with running_store(store_loop, config) as server, store_stub(server) as stub:
        start = threading.Barrier(20)

        def fetch(_):
            start.wait()
            req = adapter_store_pb2.FetchAdapterRequest(ref=ref, path=WEIGHTS)
            return b"".join(m.data for m in stub.FetchAdapter(req, timeout=30))

        with ThreadPoolExecutor(20) as pool:
            got = list(pool.map(fetch, range(20)))
        assert got == [want] * 20
        assert downloads == [f"s3://{s3_adapter_bucket.bucket}/adapters/chat-lora/"]
        assert resolve(stub, "chat-lora").ref.content_hash == digest
        assert len(downloads) == 1


def test_restart_keeps_the_cache(store_loop, tmp_path, adapter_copy):
    src = adapter_copy("code-lora", "kept")
    cache = tmp_path / "cache"
    config = store_config(cache, lora_root=str(src.parent))
    with running_store(store_loop, config) as server, store_stub(server) as stub:
        first = resolve(stub, "kept")
    shutil.rmtree(src)  # the source is gone: only the cache can answer now
    with running_store(store_loop, config) as server, store_stub(server) as stub:
        again = resolve(stub, "kept")
        assert again == first
        data, _ = fetch_bytes(stub, again, WEIGHTS)
        assert engine_content_hash(cache / "kept" / again.ref.content_hash) == again.ref.content_hash
        assert len(data) == again.files[1].size
        listed = stub.ListAdapters(adapter_store_pb2.ListAdaptersRequest()).adapters
        assert [(m.ref.name, m.state) for m in listed] == [("kept", common_pb2.ADAPTER_STATE_READY)]


def test_entries_from_before_chunk_roots_get_them_on_start(store_loop, tmp_path, adapter_copy):
    """A cache written before manifests carried chunk roots: the root comes from the kept chunk digests."""
    src = adapter_copy("code-lora", "older")
    cache = tmp_path / "cache"
    config = store_config(cache, lora_root=str(src.parent))
    with running_store(store_loop, config) as server, store_stub(server) as stub:
        first = resolve(stub, "older")
    assert all(f.chunk_root and f.chunk_size for f in first.files)
    manifest_file = cache / "older" / first.ref.content_hash / "manifest.json"
    data = json.loads(manifest_file.read_text())
    for f in data["manifest"]["files"]:
        del f["chunk_root"]
    manifest_file.write_text(json.dumps(data))
    with running_store(store_loop, config) as server, store_stub(server) as stub:
        assert resolve(stub, "older") == first


def test_lru_by_bytes_under_the_cap(store_loop, tmp_path, adapters_root, tiny_adapters):
    size = {n: sum(f.stat().st_size for f in p.iterdir()) for n, p in tiny_adapters.items()}
    cap = size["chat-lora"] + size["code-lora"]  # sql-lora joining them does not fit; math-lora fits for code-lora
    config = store_config(tmp_path / "cache", lora_root=str(adapters_root), cache_max_bytes=cap,
                          max_adapter_bytes=max(size.values()))
    names = lambda: sorted(e.split("@")[0] for e in cache_entries(tmp_path / "cache"))  # noqa: E731
    with running_store(store_loop, config) as server, store_stub(server) as stub:
        for name in ("sql-lora", "chat-lora", "code-lora"):
            resolve(stub, name)
            time.sleep(0.01)
        assert names() == ["chat-lora", "code-lora"]  # sql-lora, least recently used, made room
        resolve(stub, "chat-lora")  # used again: now code-lora is the oldest
        resolve(stub, "math-lora")
        assert names() == ["chat-lora", "math-lora"]
        # an evicted version can still be fetched: it is downloaded again
        code_hash = engine_content_hash(tiny_adapters["code-lora"])
        data, _ = fetch_bytes(stub, resolve(stub, "code-lora"), WEIGHTS)
        assert data == (tiny_adapters["code-lora"] / WEIGHTS).read_bytes()
        assert f"code-lora@{code_hash}" in cache_entries(tmp_path / "cache")
    with running_store(store_loop, config) as server:  # the LRU order survives a restart
        index = json.loads((tmp_path / "cache" / ".state" / "index.json").read_text())
        assert set(index["heads"]) == set(names())


def test_a_failed_download_never_becomes_an_entry(store_loop, tmp_path, adapter_copy, monkeypatch):
    src = adapter_copy("sql-lora", "flaky")
    original = LocalDirSource.download

    def half_then_fail(self, target):
        original(self, target)
        (target.dest / WEIGHTS).write_bytes((target.dest / WEIGHTS).read_bytes()[:100])
        raise SourceUnavailableError("connection reset mid-download")

    cache = tmp_path / "cache"
    with running_store(store_loop, store_config(cache, lora_root=str(src.parent))) as server, \
            store_stub(server) as stub:
        monkeypatch.setattr(LocalDirSource, "download", half_then_fail)
        with pytest.raises(grpc.RpcError) as info:
            resolve(stub, "flaky")
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "mid-download" in info.value.details()
        assert cache_entries(cache) == [] and list((cache / ".tmp").iterdir()) == []
        monkeypatch.setattr(LocalDirSource, "download", original)
        assert resolve(stub, "flaky").state == common_pb2.ADAPTER_STATE_READY  # the next attempt starts clean


def test_start_drops_damaged_entries_and_leftovers(store_loop, tmp_path, adapter_copy):
    src = adapter_copy("sql-lora", "a")
    adapter_copy("math-lora", "b")
    adapter_copy("chat-lora", "c")
    cache = tmp_path / "cache"
    config = store_config(cache, lora_root=str(src.parent))
    with running_store(store_loop, config) as server, store_stub(server) as stub:
        a, b, c = resolve(stub, "a"), resolve(stub, "b"), resolve(stub, "c")
    index = json.loads((cache / ".state" / "index.json").read_text())
    assert sorted(index["synced"]) == sorted(f"{m.ref.name}@{m.ref.content_hash}" for m in (a, b, c))
    (cache / "b" / b.ref.content_hash / WEIGHTS).write_bytes(b"short")  # damaged on disk
    (cache / ".tmp" / "interrupted").mkdir()  # a download cut by a crash
    weights = cache / "c" / c.ref.content_hash / WEIGHTS  # torn by a crash before its fsync: same size, other bytes
    weights.write_bytes(bytes(weights.stat().st_size))
    index["synced"] = [k for k in index["synced"] if not k.startswith("c@")]
    (cache / ".state" / "index.json").write_text(json.dumps(index))
    with running_store(store_loop, config) as server, store_stub(server) as stub:
        assert cache_entries(cache) == [f"a@{a.ref.content_hash}"]
        assert list((cache / ".tmp").iterdir()) == []
        assert resolve(stub, "a") == a
        assert resolve(stub, "b") == b  # downloaded again
        assert resolve(stub, "c") == c
    (cache / ".state" / "index.json").write_text("{not json")  # a lost index: every entry is verified
    with running_store(store_loop, config) as server, store_stub(server) as stub:
        assert len(cache_entries(cache)) == 3
        assert resolve(stub, "a") == a  # the head came back from the scan


def test_unchanged_source_version_is_not_downloaded_again(store_loop, tmp_path, adapter_copy, monkeypatch):
    src = adapter_copy("sql-lora", "same")
    calls = []
    original = LocalDirSource.download
    monkeypatch.setattr(LocalDirSource, "download", lambda self, t: calls.append(1) or original(self, t))
    config = store_config(tmp_path / "cache", enable_admin=True, admin_token="t",
                          lora_modules=(Registration("same", str(src)),))
    with running_store(store_loop, config) as server, store_stub(server) as stub:
        m = resolve(stub, "same")
        auth = (("authorization", "Bearer t"),)
        again = stub.RegisterAdapter(adapter_store_pb2.RegisterAdapterRequest(
            name="same", source_uri=str(src), replace=True), metadata=auth).manifest
        assert again == m and len(calls) == 1  # same mtime and size: the cached version is reused


def test_a_slow_download_does_not_hold_up_cached_adapters(store_loop, tmp_path, adapters_root, monkeypatch):
    gate, started = threading.Event(), threading.Event()
    original = LocalDirSource.download

    def slow_for_math(self, target):
        if self.root.name == "math-lora":
            started.set()
            gate.wait(10)
        return original(self, target)

    monkeypatch.setattr(LocalDirSource, "download", slow_for_math)
    config = store_config(tmp_path / "cache", lora_root=str(adapters_root), download_threads=1)
    with running_store(store_loop, config) as server, store_stub(server) as stub, ThreadPoolExecutor(1) as pool:
        cached = resolve(stub, "sql-lora")
        slow = pool.submit(resolve, stub, "math-lora")  # takes the only download thread
        assert started.wait(5)
        t = time.monotonic()
        assert resolve(stub, "sql-lora") == cached
        assert fetch_bytes(stub, cached, WEIGHTS)[0]
        assert time.monotonic() - t < 2 and not slow.done()
        gate.set()
        assert slow.result(10).state == common_pb2.ADAPTER_STATE_READY
