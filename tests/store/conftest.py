"""Adapter stores in this process, on a free loopback port, driven by ordinary (sync) gRPC clients and by
the worker's StoreClient. Every server runs on one event loop in one background thread (grpc.aio wants
one loop per server; tests call it over real gRPC, as workers do)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from adapter_store.config import StoreConfig
from adapter_store.server import StoreServer
from loraserve.v1 import adapter_store_pb2, adapter_store_pb2_grpc
from tests.loop_thread import LoopThread


@pytest.fixture(scope="session")
def store_loop() -> Iterator[LoopThread]:
    lt = LoopThread("store-test-loop")
    yield lt
    lt.close()


def store_config(cache_dir: Path, **overrides) -> StoreConfig:
    values = dict(host="127.0.0.1", port=0, cache_dir=str(cache_dir), drain_timeout_s=0, download_threads=4,
                  io_threads=4, resolvers=("registered", "filesystem", "hub", "s3", "plugins"))
    values.update(overrides)
    return StoreConfig(**values)


@contextlib.contextmanager
def running_store(loop: LoopThread, config: StoreConfig) -> Iterator[StoreServer]:
    server = StoreServer(config)
    loop.run(server.start())
    try:
        yield server
    finally:
        loop.run(server.shutdown(0))


@contextlib.contextmanager
def store_stub(server: StoreServer) -> Iterator[adapter_store_pb2_grpc.AdapterStoreServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield adapter_store_pb2_grpc.AdapterStoreServiceStub(channel)


def resolve(stub, name: str):
    return stub.ResolveAdapter(adapter_store_pb2.ResolveAdapterRequest(name=name), timeout=30).manifest


def fetch_bytes(stub, manifest, path: str, offset: int = 0, chunk_size: int = 0) -> tuple[bytes, list]:
    """The file's bytes from `offset` as the store streams them, and the messages."""
    req = adapter_store_pb2.FetchAdapterRequest(ref=manifest.ref, path=path, offset=offset, chunk_size=chunk_size)
    messages = list(stub.FetchAdapter(req, timeout=30))
    return b"".join(m.data for m in messages), messages


def cache_entries(cache_dir: Path) -> list[str]:
    """`name@hash` for every entry directory in a store's cache (what a restart would find)."""
    return sorted(f"{p.parent.relative_to(cache_dir).parent}@{p.parent.name}"
                  for p in cache_dir.rglob("manifest.json") if not p.relative_to(cache_dir).parts[0].startswith("."))


@pytest.fixture(scope="session")
def adapters_root(tiny_adapters) -> Path:
    """The directory holding every fixture adapter as <root>/<name> (a filesystem resolver root)."""
    roots = {p.parent for p in tiny_adapters.values()}
    assert len(roots) == 1
    return roots.pop()


@pytest.fixture
def adapter_copy(tmp_path, tiny_adapters):
    """copy(name, new_name=None) -> a writable copy of a fixture adapter under tmp_path/lora/<new_name>."""

    def copy(name: str, new_name: str | None = None) -> Path:
        dst = tmp_path / "lora" / (new_name or name)
        shutil.copytree(tiny_adapters[name], dst)
        return dst

    return copy


def install_plugin(site: Path, package_dir: Path, dist: str, entry_point: str, monkeypatch) -> None:
    """A resolver plugin as `pip install` leaves it: its package importable (from `package_dir`) and a
    dist-info in `site` declaring `entry_point` ("name = module:factory") in the store's group."""
    info = site / f"{dist.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[loraserve.adapter_resolvers]\n{entry_point}\n")
    monkeypatch.syspath_prepend(str(package_dir))
    monkeypatch.syspath_prepend(str(site))
