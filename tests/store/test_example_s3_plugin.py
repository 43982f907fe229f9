"""examples/s3_resolver_plugin: a custom resolver plugin, installed through its entry point, resolving names to
the highest s3://<bucket>/<name>/v<N>/ on moto's S3 server over real HTTP; publishing a higher version makes
the next registration of the name pick it."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import grpc
import pytest

from gpu_worker.engine.lora.peft_adapter import content_hash as engine_content_hash
from tests import services

from .conftest import install_plugin, resolve, running_store, store_config, store_stub

PLUGIN_DIR = Path(__file__).resolve().parents[2] / "examples" / "s3_resolver_plugin"


@pytest.fixture
def plugin_installed(tmp_path, monkeypatch):
    """The plugin as `pip install ./examples/s3_resolver_plugin` leaves it: the package importable and a
    dist-info declaring its entry point."""
    install_plugin(tmp_path / "site", PLUGIN_DIR, "loraserve-s3-versions",
                   "s3-versions = loraserve_s3_versions:make_resolver", monkeypatch)
    yield
    sys.modules.pop("loraserve_s3_versions", None)


def upload(client, bucket: str, prefix: str, adapter: Path) -> None:
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        client.upload_file(str(adapter / f), bucket, f"{prefix}{f}")


def test_the_s3_versions_plugin_serves_the_highest_version(store_loop, tmp_path, s3_server, tiny_adapters,
                                                          plugin_installed):
    client = services.s3_client(s3_server)
    bucket = f"plugin-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=bucket)
    upload(client, bucket, "team/house-lora/v2/", tiny_adapters["sql-lora"])
    upload(client, bucket, "team/house-lora/v10/", tiny_adapters["chat-lora"])  # 10 > 2
    options = {"s3-versions": {"bucket": bucket, "prefix": "team/", "endpoint_url": s3_server}}
    config = store_config(tmp_path / "cache", plugins=("s3-versions",), plugin_options=options,
                          resolvers=("registered", "plugin:s3-versions"))
    with running_store(store_loop, config) as server, store_stub(server) as stub:
        got = resolve(stub, "house-lora")
        assert got.ref.content_hash == engine_content_hash(tiny_adapters["chat-lora"])
        assert got.source_uri == f"s3://{bucket}/team/house-lora/v10/"
        with pytest.raises(grpc.RpcError) as info:
            resolve(stub, "other-lora")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND and "s3-versions resolver" in info.value.details()
