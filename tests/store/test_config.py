"""StoreConfig from flags and LORASERVE_STORE_* variables, kept consistent with docker-compose.yml."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from adapter_store.config import StoreConfig, parse_size
from adapter_store.registry import Registration

REPO = Path(__file__).resolve().parents[2]


def test_the_compose_environment_configures_the_store():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    env = {k: str(v) for k, v in compose["services"]["adapter-store"]["environment"].items()}
    env = {k: (v.split(":-", 1)[1].rstrip("}") if v.startswith("${") else v) for k, v in env.items()}  # defaults
    cfg = StoreConfig.from_args([], env)
    assert (cfg.port, cfg.cache_dir, cfg.s3_endpoint_url, cfg.s3_bucket) == (
        50052, "/var/cache/loraserve/adapters", "http://s3:5000", "adapters")
    assert not cfg.enable_admin and cfg.admin_token == ""


def test_flags_beat_environment_which_beats_defaults(tmp_path):
    env = {"LORASERVE_STORE_PORT": "6000", "LORASERVE_STORE_CACHE_MAX_BYTES": "512MiB",
           "LORASERVE_STORE_MAX_ADAPTER_BYTES": "64 MiB", "LORASERVE_STORE_MAX_LORA_RANK": "32",
           "LORASERVE_STORE_HF_REPO_ALLOWLIST": "org/a, org/b", "LORASERVE_STORE_RESOLVERS": "s3,registered",
           "LORASERVE_STORE_S3_PREFIX": "adapters/", "LORASERVE_STORE_LORA_ROOT": str(tmp_path),
           "LORASERVE_STORE_PLUGIN_OPTIONS": '{"x": {"root": "/r"}}', "LORASERVE_STORE_BASE_MODEL_NAME": "llama"}
    cfg = StoreConfig.from_args(["--port", "0", "--max-lora-rank", "16"], env)
    assert (cfg.port, cfg.max_lora_rank, cfg.cache_max_bytes, cfg.max_adapter_bytes) == (0, 16, 512 << 20, 64 << 20)
    assert cfg.hf_repo_allowlist == ("org/a", "org/b") and cfg.resolvers == ("s3", "registered")
    assert (cfg.s3_prefix, cfg.lora_root, cfg.plugin_options, cfg.base_model_name) == (
        "adapters/", str(tmp_path), {"x": {"root": "/r"}}, "llama")
    default = StoreConfig.from_args([], {})
    assert (default.port, default.max_lora_rank, default.enable_admin) == (50052, 64, False)
    assert default.cache_dir.endswith("loraserve/adapters")


def test_admin_switch_and_token_come_from_the_environment():
    shared = {"LORASERVE_ENABLE_RUNTIME_LORA_UPDATING": "true", "LORASERVE_ADMIN_TOKEN": "tok-8f3a"}
    cfg = StoreConfig.from_args([], shared)
    assert cfg.enable_admin and cfg.admin_token == "tok-8f3a" and "tok-8f3a" not in repr(cfg)
    assert not StoreConfig.from_args([], {**shared, "LORASERVE_STORE_ENABLE_ADMIN": "false"}).enable_admin
    assert not StoreConfig.from_args(["--no-enable-admin"], shared).enable_admin


def test_lora_modules_both_forms(tmp_path):
    spec = json.dumps({"name": "chat", "path": "s3://b/chat/", "base_model_name": "tiny"})
    cfg = StoreConfig.from_args(["--lora-modules", f"sql={tmp_path}", spec], {})
    assert cfg.lora_modules == (Registration("sql", str(tmp_path)), Registration("chat", "s3://b/chat/", "tiny"))
    env = {"LORASERVE_STORE_LORA_MODULES": json.dumps(["a=hf://org/a", json.loads(spec)])}
    assert [m.name for m in StoreConfig.from_args([], env).lora_modules] == ["a", "chat"]
    env = {"LORASERVE_STORE_LORA_MODULES": "a=hf://org/a org/b=s3://bucket/b/"}
    assert [m.uri for m in StoreConfig.from_args([], env).lora_modules] == ["hf://org/a", "s3://bucket/b/"]


@pytest.mark.parametrize("argv, env, words", [
    (["--port", "x"], {}, "--port: not an integer"),
    ([], {"LORASERVE_STORE_PORT": "abc"}, "LORASERVE_STORE_PORT='abc': not an integer"),
    ([], {"LORASERVE_STORE_CACHE_MAX_BYTES": "lots"}, "not a size"),
    (["--enable-admin"], {}, "LORASERVE_ADMIN_TOKEN is empty"),
    (["--resolvers", "registered,ftp"], {}, "resolver 'ftp' is unknown"),
    (["--resolvers", "s3,s3"], {}, "duplicates"),
    (["--hf-repo-allowlist", "just-a-name"], {}, "is not a Hub repo id"),
    (["--lora-modules", "../x=/tmp"], {}, "not a valid adapter name"),
    (["--lora-modules", "a=/x", "a=/y"], {}, "names must be unique"),
    (["--lora-modules", "nouri"], {}, "expected name=uri"),
    (["--lora-root", "/does/not/exist"], {}, "is not a directory"),
    (["--cache-max-bytes", "1MiB", "--max-adapter-bytes", "2MiB"], {}, "must be >= max_adapter_bytes"),
    (["--base-model-config", "/does/not/exist.json"], {}, "is not a file"),
    (["--plugin-options", "{"], {}, "not JSON"),
])
def test_bad_configuration_exits_with_a_message(capsys, argv, env, words):
    with pytest.raises(SystemExit) as info:
        StoreConfig.from_args(argv, env)
    assert info.value.code == 2
    assert words in capsys.readouterr().err


def test_sizes():
    assert [parse_size(s) for s in ["65536", "1KiB", "1kb", "2 MiB", "1.5GiB", "1e3"]] == [
        65536, 1024, 1000, 2 << 20, 3 << 29, 1000]
