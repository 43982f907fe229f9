"""Bad inputs through the gRPC service: each gets a clear status, and none leaves a cache entry (or a
temporary directory) behind."""

from __future__ import annotations

import json
import shutil

import grpc
import pytest

from loraserve.v1 import adapter_store_pb2, common_pb2

from .conftest import cache_entries, resolve, running_store, store_config, store_stub
from .synthetic import write_adapter


def _edit(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


# name -> (how to break a copy of sql-lora, words the status must carry)
BROKEN = {
    "missing-config": (lambda p: (p / "adapter_config.json").unlink(), "has no adapter_config.json"),
    "malformed-json": (lambda p: (p / "adapter_config.json").write_text('{"peft_type": "LORA",'), "not valid JSON"),
    "truncated-weights": (lambda p: (p / "adapter_model.safetensors").write_bytes(
        (p / "adapter_model.safetensors").read_bytes()[:5000]), "truncated"),
    "shape-mismatch": (lambda p: _edit(p, r=8), "declares rank 8, so A must be [8, in]"),
    "pickle-only": (lambda p: (p / "adapter_model.safetensors").rename(p / "adapter_model.bin"),
                    "pickle checkpoints can run code"),
    "dora": (lambda p: _edit(p, use_dora=True), "DoRA"),
    "modules-to-save": (lambda p: _edit(p, modules_to_save=["lm_head"]), "modules_to_save"),
    "with-bias": (lambda p: _edit(p, bias="lora_only"), "trains biases"),
    "unknown-module": (lambda p: _edit(p, target_modules=["q_proj", "v_proj", "wte"]), "['wte'], which the engine"),
    "not-lora": (lambda p: _edit(p, peft_type="PREFIX_TUNING"), "only LORA"),
}
MAX_BYTES, MAX_RANK = 100_000, 8


@pytest.fixture(scope="module")
def bad_store(store_loop, tmp_path_factory, tiny_adapters, tiny_model_dir):
    root = tmp_path_factory.mktemp("bad-adapters")
    for name, (breaks, _) in BROKEN.items():
        shutil.copytree(tiny_adapters["sql-lora"], root / name)
        breaks(root / name)
    shutil.copytree(tiny_adapters["code-lora"], root / "rank-16")  # over max_lora_rank
    write_adapter(root / "oversized", layers=2, hidden=256, rank=32, modules=("q_proj",))  # 131 KB
    shutil.copytree(tiny_adapters["sql-lora"], root / "fine")
    # symlinks out of the root: the directory itself, and one file of a directory inside it
    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(tiny_adapters["sql-lora"], outside / "elsewhere")
    (root / "link-out").symlink_to(outside / "elsewhere", target_is_directory=True)
    shutil.copytree(tiny_adapters["sql-lora"], root / "file-out")
    (root / "file-out" / "adapter_model.safetensors").unlink()
    (root / "file-out" / "adapter_model.safetensors").symlink_to(outside / "elsewhere" / "adapter_model.safetensors")
    # a symlink that stays inside the root is followed (an operator's alias)
    (root / "alias").symlink_to(root / "fine", target_is_directory=True)
    cache = tmp_path_factory.mktemp("bad-cache")
    config = store_config(cache, lora_root=str(root), max_adapter_bytes=MAX_BYTES, max_lora_rank=MAX_RANK,
                          base_model_config=str(tiny_model_dir / "config.json"))
    with running_store(store_loop, config) as server, store_stub(server) as stub:
        yield stub, cache


def _no_cache_entry(cache, name):
    assert not any(e.startswith(f"{name}@") for e in cache_entries(cache))
    assert list((cache / ".tmp").iterdir()) == [], "a failed download left its temporary directory"


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_adapter_is_refused_and_not_cached(bad_store, name):
    stub, cache = bad_store
    with pytest.raises(grpc.RpcError) as info:
        resolve(stub, name)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert BROKEN[name][1] in info.value.details() and repr(name) in info.value.details()
    _no_cache_entry(cache, name)


@pytest.mark.parametrize("name, words", [
    ("rank-16", f"has rank 16, over the store's max_lora_rank of {MAX_RANK}"),
    ("oversized", f"over the store's limit of {MAX_BYTES} (max_adapter_bytes)"),
])
def test_limits_are_refused_and_not_cached(bad_store, name, words):
    stub, cache = bad_store
    with pytest.raises(grpc.RpcError) as info:
        resolve(stub, name)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and words in info.value.details()
    _no_cache_entry(cache, name)


@pytest.mark.parametrize("name", ["../etc", "../../etc/passwd", "a/../b", "/abs", "org/x/y", ".hidden", "a b",
                                  "a\\b", "a\x00b", "%2e%2e", "", "x" * 129, "fine/", "~root"])
def test_names_that_are_not_names(bad_store, name):
    stub, cache = bad_store
    with pytest.raises(grpc.RpcError) as info:
        resolve(stub, name)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid adapter name" in info.value.details() or "must not be empty" in info.value.details()
    ref = common_pb2.AdapterRef(name=name, content_hash="0" * 64)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.FetchAdapter(adapter_store_pb2.FetchAdapterRequest(ref=ref, path="adapter_config.json")))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("name", ["link-out", "file-out"])
def test_symlinks_out_of_the_root_are_refused(bad_store, name):
    stub, cache = bad_store
    with pytest.raises(grpc.RpcError) as info:
        resolve(stub, name)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "outside the adapters root" in info.value.details()
    _no_cache_entry(cache, name)


def test_a_symlink_inside_the_root_is_followed(bad_store):
    stub, _ = bad_store
    assert resolve(stub, "alias").ref.content_hash == resolve(stub, "fine").ref.content_hash


def test_a_good_adapter_next_to_them_is_served(bad_store):
    stub, cache = bad_store
    m = resolve(stub, "fine")
    assert m.state == common_pb2.ADAPTER_STATE_READY
    # only the good ones ever became entries (and "alias", the same adapter through a symlink in the root)
    assert f"fine@{m.ref.content_hash}" in cache_entries(cache)
    assert set(cache_entries(cache)) <= {f"fine@{m.ref.content_hash}", f"alias@{m.ref.content_hash}"}


def test_failures_of_registered_names_show_in_list(store_loop, tmp_path, adapter_copy):
    path = adapter_copy("sql-lora", "broken")
    (path / "adapter_config.json").write_text("nope")
    from adapter_store.registry import Registration

    config = store_config(tmp_path / "cache", lora_modules=(Registration("broken", str(path)),))
    with running_store(store_loop, config) as server, store_stub(server) as stub:
        listed = stub.ListAdapters(adapter_store_pb2.ListAdaptersRequest()).adapters
        assert [(m.ref.name, m.state) for m in listed] == [("broken", common_pb2.ADAPTER_STATE_REGISTERED)]
        with pytest.raises(grpc.RpcError):
            resolve(stub, "broken")
        (m,) = stub.ListAdapters(adapter_store_pb2.ListAdaptersRequest()).adapters
        assert m.state == common_pb2.ADAPTER_STATE_FAILED and "not valid JSON" in m.error and not m.ref.content_hash
