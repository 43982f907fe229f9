"""Each source end to end through the gRPC service and the worker's StoreClient: the filesystem (a resolver
root and registered directories), S3 (moto over real HTTP), the Hub (the pre-filled cache, offline), and a
resolver plugin found through its entry point."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import grpc
import pytest

from adapter_store.registry import Registration
from adapter_store.server import StartupError, StoreServer
from gpu_worker.engine.lora.peft_adapter import content_hash as engine_content_hash
from gpu_worker.store_client import StoreClient, StoreClientError
from loraserve.v1 import common_pb2
from tests import services

from .conftest import install_plugin, resolve, running_store, store_config, store_stub

PLUGIN_DIR = Path(__file__).parent / "example_plugin"


def download_matches(server, name: str, dest: Path, original: Path):
    """Fetch `name` through the worker's client; its files must be the original's, byte for byte."""
    with StoreClient(f"127.0.0.1:{server.port}") as client:
        local = client.download(name, dest)
    assert local.fetched and local.path == dest / name / local.adapter.content_hash
    assert local.adapter.content_hash == engine_content_hash(original) == engine_content_hash(local.path)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert (local.path / f).read_bytes() == (original / f).read_bytes()
    return local


def test_filesystem_resolver_root_and_registered_dirs(store_loop, tmp_path, adapters_root, tiny_adapters,
                                                     tiny_model_dir):
    modules = (Registration("pinned", str(tiny_adapters["chat-lora"])),
               Registration.parse(json.dumps({"name": "org/json", "path": tiny_adapters["math-lora"].as_uri(),
                                              "base_model_name": "tiny"})))
    config = store_config(tmp_path / "cache", lora_root=str(adapters_root), lora_modules=modules)
    with running_store(store_loop, config) as server, store_stub(server) as stub:
        local = download_matches(server, "sql-lora", tmp_path / "w", tiny_adapters["sql-lora"])
        download_matches(server, "pinned", tmp_path / "w", tiny_adapters["chat-lora"])
        download_matches(server, "org/json", tmp_path / "w", tiny_adapters["math-lora"])
        m = resolve(stub, "sql-lora")
        assert m.source_uri == tiny_adapters["sql-lora"].as_uri() and m.source_version.startswith("mtime-")
        assert m.state == common_pb2.ADAPTER_STATE_READY and not m.error
        assert (m.config.peft_type, m.config.rank, m.config.max_rank, list(m.config.target_modules)) == (
            "LORA", 4, 4, ["q_proj", "v_proj"])
        assert m.total_size == sum(f.size for f in m.files) and [f.path for f in m.files] == [
            "adapter_config.json", "adapter_model.safetensors"]
        assert {f.path: f.sha256 for f in m.files} == {f.path: f.sha256 for f in local.adapter.files}
        assert resolve(stub, "org/json").base_model_name == "tiny"
        # not registered with one: the config's base_model_name_or_path
        assert resolve(stub, "pinned").base_model_name == str(tiny_model_dir)
        with pytest.raises(grpc.RpcError) as info:
            resolve(stub, "no-such-adapter")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert "not in registered names, the filesystem resolver" in info.value.details()


def test_s3_through_moto_over_http(store_loop, tmp_path, s3_adapter_bucket, tiny_adapters, caplog):
    bucket = s3_adapter_bucket.bucket
    modules = (Registration("registered-s3", f"s3://{bucket}/{s3_adapter_bucket.prefixes['code-lora']}"),)
    config = store_config(tmp_path / "cache", s3_endpoint_url=s3_adapter_bucket.endpoint, s3_bucket=bucket,
                          s3_prefix="adapters/", lora_modules=modules)
    with running_store(store_loop, config) as server, store_stub(server) as stub, \
            caplog.at_level(logging.INFO, logger="adapter_store"):
        download_matches(server, "math-lora", tmp_path / "w", tiny_adapters["math-lora"])
        download_matches(server, "registered-s3", tmp_path / "w", tiny_adapters["code-lora"])
        progress = [r.getMessage() for r in caplog.records if r.name == "adapter_store.download"]
        assert any(m.startswith(f"adapter 'math-lora' (s3://{bucket}/adapters/math-lora/): downloaded 0.0 MiB in")
                   for m in progress), progress
        m = resolve(stub, "math-lora")
        assert m.source_uri == f"s3://{bucket}/adapters/math-lora/"
        assert "adapter_model.safetensors@" in m.source_version  # the objects' etags
        with pytest.raises(grpc.RpcError) as info:
            resolve(stub, "not-in-the-bucket")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_s3_unreachable_is_unavailable_unless_a_later_resolver_has_it(store_loop, tmp_path, s3_server,
                                                                       adapters_root):
    config = store_config(tmp_path / "cache", s3_endpoint_url=f"http://127.0.0.1:{services.free_port()}",
                          s3_bucket="nowhere", s3_max_attempts=1, lora_root=str(adapters_root),
                          resolvers=("registered", "s3", "filesystem"))
    with running_store(store_loop, config) as server, store_stub(server) as stub:
        with pytest.raises(grpc.RpcError) as info:
            resolve(stub, "not-anywhere")
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "S3 is unreachable" in info.value.details()
        assert resolve(stub, "sql-lora").source_uri.startswith("file://")  # S3 failed; the filesystem has it


def test_hub_through_the_offline_cache(store_loop, tmp_path, hub_cache, tiny_adapters):
    commit = (hub_cache.cache_dir / "models--demo-org--sql-lora" / "refs" / "main").read_text()
    modules = (Registration("code", f"hf://{hub_cache.subfolder_repo_id}/{hub_cache.subfolder}"),
               Registration("pinned-rev", f"hf://{hub_cache.repo_id}@{commit}"),
               Registration("bare", f"{hub_cache.subfolder_repo_id}/{hub_cache.subfolder}"),
               Registration("missing", "hf://demo-org/not-cached"))
    config = store_config(tmp_path / "cache", hf_cache_dir=str(hub_cache.cache_dir),
                          hf_repo_allowlist=(hub_cache.repo_id,), lora_modules=modules)
    with running_store(store_loop, config) as server, store_stub(server) as stub:
        download_matches(server, hub_cache.repo_id, tmp_path / "w", tiny_adapters[hub_cache.adapter_name])
        download_matches(server, "code", tmp_path / "w", tiny_adapters[hub_cache.subfolder_adapter_name])
        m = resolve(stub, "pinned-rev")
        assert (m.source_uri, m.source_version) == (f"hf://{hub_cache.repo_id}@{commit}", commit)
        assert resolve(stub, hub_cache.repo_id).source_version == commit  # main -> that commit
        assert resolve(stub, "bare").source_uri == f"hf://{hub_cache.subfolder_repo_id}/code@main"
        with pytest.raises(grpc.RpcError) as info:
            resolve(stub, hub_cache.subfolder_repo_id)  # in the cache, not on the allow-list
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as info:
            resolve(stub, "missing")
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "offline" in info.value.details()


@pytest.fixture
def example_plugin_installed(tmp_path, monkeypatch):
    """The example plugin as if pip-installed: its package on sys.path and a dist-info with its entry point."""
    install_plugin(tmp_path / "site", PLUGIN_DIR, "loraserve-example-resolver",
                   "versioned-dir = loraserve_example_resolver:make_resolver", monkeypatch)
    yield
    sys.modules.pop("loraserve_example_resolver", None)


def test_resolver_plugin_from_its_entry_point(store_loop, tmp_path, tiny_adapters, example_plugin_installed):
    root = tmp_path / "versions"
    shutil.copytree(tiny_adapters["sql-lora"], root / "house" / "2")
    shutil.copytree(tiny_adapters["chat-lora"], root / "house" / "10")  # 10 > 2: the newest
    options = {"versioned-dir": {"root": str(root)}}
    config = store_config(tmp_path / "cache", plugins=("versioned-dir",), plugin_options=options,
                          lora_modules=(Registration("by-uri", "plugin:versioned-dir/house"),))
    with running_store(store_loop, config) as server, store_stub(server) as stub:
        download_matches(server, "house", tmp_path / "w", tiny_adapters["chat-lora"])
        m = resolve(stub, "house")
        assert (m.source_uri, m.source_version) == ("plugin:versioned-dir/house@10", "10")
        assert resolve(stub, "by-uri").ref.content_hash == m.ref.content_hash
        with pytest.raises(grpc.RpcError) as info:
            resolve(stub, "nothing-here")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND and "the versioned-dir resolver" in info.value.details()

    with pytest.raises(StartupError, match="resolver plugin 'nope' is not installed"):
        store_loop.run(StoreServer(store_config(tmp_path / "cache2", plugins=("nope",))).start())
    with pytest.raises(StartupError, match="option 'root' must name a directory"):
        store_loop.run(StoreServer(store_config(tmp_path / "cache3", plugins=("versioned-dir",))).start())


def test_client_maps_store_errors(store_loop, tmp_path):
    with running_store(store_loop, store_config(tmp_path / "cache")) as server:
        with StoreClient(f"127.0.0.1:{server.port}") as client, pytest.raises(StoreClientError) as info:
            client.download("../escape", tmp_path / "w")
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
