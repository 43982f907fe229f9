"""The shared fixtures and demo builders produce real, loadable, offline assets."""

from __future__ import annotations

import hashlib
import json
import os
import urllib.request

import pytest
import torch

from demo.adapters import DEFAULT_ADAPTERS, PATTERN_MODULE
from tests import services

SPECS = {spec.name: spec for spec in DEFAULT_ADAPTERS}
PROMPT = "def forward(self, hidden_states):"


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read(*parts) -> bytes:
    with open(os.path.join(*parts), "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    input_ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids).logits
    return model, tok, input_ids, logits


# ---------------------------------------------------------------- base checkpoint + tokenizer


def test_checkpoint_layout_and_config(tiny_model_dir, base):
    model, tok, _, _ = base
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    expected = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        dtype="float32",
    )
    assert {k: cfg[k] for k in expected} == expected
    assert model.config.num_key_value_heads == 2 and len(model.model.layers) == 2
    assert model.lm_head.weight.shape == (len(tok), 64)


def test_tokenizer_loads_fast_with_specials(base):
    _, tok, _, _ = base
    assert tok.is_fast and len(tok) == 512
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    assert tok("hi").input_ids[0] == tok.bos_token_id  # bos prepended like Llama
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<s><|user|>\nhi</s>\n<|assistant|>\n"


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world!",
        "  leading and trailing spaces \n\ttabs\r\n",
        "café naïve Straße русский 日本語のテキスト 中文",
        "emoji 🙂🚀✨ 👩‍👩‍👧 flags 🇫🇷 and a lone combining e\u0301",
        "SELECT * FROM t WHERE x > 1;\n    return {'a': [1, 2.5e-3]}",
        "",
    ],
)
def test_tokenizer_round_trips_any_text(base, text):
    _, tok, _, _ = base
    ids = tok(text, add_special_tokens=False).input_ids
    assert all(0 <= i < len(tok) for i in ids)
    assert tok.decode(ids) == text


def test_tokenizer_splits_multibyte_characters_across_tokens(base):
    _, tok, _, _ = base
    ids = tok("🙂日本語", add_special_tokens=False).input_ids
    pieces = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces), "expected some token to hold a partial UTF-8 sequence"
    assert tok.decode(ids) == "🙂日本語"


def test_greedy_generation_is_not_degenerate(base):
    model, tok, input_ids, _ = base
    out = model.generate(
        input_ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id
    )
    new = out[0, input_ids.shape[1] :].tolist()
    assert len(new) == 8
    assert len(set(new)) >= 3, new


def test_model_build_is_deterministic(tiny_model_dir, tmp_path):
    from demo.model import build_llama

    same = build_llama(tmp_path / "same", seed=0)
    other = build_llama(tmp_path / "other", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert _sha256(same / name) == _sha256(tiny_model_dir / name)
    assert _sha256(other / "model.safetensors") != _sha256(tiny_model_dir / "model.safetensors")


@pytest.mark.parametrize(
    "builder,arch", [("build_qwen2", "Qwen2ForCausalLM"), ("build_mistral", "MistralForCausalLM")]
)
def test_other_architectures_load(tmp_path, builder, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import demo

    path = getattr(demo, builder)(tmp_path / arch, seed=3)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == arch
    assert len(tok) == model.config.vocab_size  # no token id beyond the embedding table
    attn = model.model.layers[0].self_attn
    assert (attn.q_proj.bias is not None) == (arch == "Qwen2ForCausalLM")
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()


# ---------------------------------------------------------------- LoRA adapters


def test_default_adapters_built(tiny_adapters):
    assert set(tiny_adapters) == set(SPECS) and len(SPECS) == 4
    for path in tiny_adapters.values():
        assert {p.name for p in path.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft 0.21
@pytest.mark.parametrize("name", sorted(SPECS))
def test_adapter_loads_and_changes_logits(tiny_model_dir, tiny_adapters, base, name):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    spec, path = SPECS[name], tiny_adapters[name]
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", spec.r, spec.lora_alpha)
    assert cfg["target_modules"] == sorted(spec.target_modules)
    assert cfg["use_rslora"] is spec.use_rslora
    assert cfg["rank_pattern"] == spec.rank_pattern and cfg["alpha_pattern"] == spec.alpha_pattern

    tensors = load_file(path / "adapter_model.safetensors")
    b_keys = [k for k in tensors if ".lora_B." in k]
    assert b_keys and all(tensors[k].abs().max() > 0 for k in b_keys), "lora_B must not be zero"
    n_layers = 2
    assert len(b_keys) == n_layers * len(spec.target_modules)

    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(fresh, str(path)).eval()
    _, _, input_ids, base_logits = base
    with torch.no_grad():
        logits = model(input_ids).logits
    diff = (logits - base_logits).abs()
    assert torch.isfinite(logits).all()
    assert diff.max() > 0.5, f"{name} barely changes the logits: {diff.max():.4f}"
    assert diff.max() < 50.0, f"{name} blows up the logits: {diff.max():.4f}"


def test_rank_pattern_adapter_has_per_module_rank(tiny_adapters):
    from safetensors.torch import load_file

    spec = SPECS["code-lora"]
    assert spec.rank_pattern == {PATTERN_MODULE: 4}
    tensors = load_file(tiny_adapters["code-lora"] / "adapter_model.safetensors")
    a_key = "base_model.model.{}.lora_A.weight"
    assert tensors[a_key.format(PATTERN_MODULE)].shape[0] == 4
    assert tensors[a_key.format("model.layers.0.mlp.down_proj")].shape[0] == spec.r


def test_rslora_adapter_flag(tiny_adapters):
    cfg = json.loads((tiny_adapters["math-lora"] / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is True


# ---------------------------------------------------------------- S3


def test_s3_bucket_serves_adapters_over_http(s3_adapter_bucket, tiny_adapters):
    endpoint, bucket, prefixes = s3_adapter_bucket
    assert endpoint.startswith("http://127.0.0.1:")
    client = services.s3_client(endpoint)
    for name, path in tiny_adapters.items():
        listed = client.list_objects_v2(Bucket=bucket, Prefix=prefixes[name])["Contents"]
        assert sorted(o["Key"] for o in listed) == sorted(prefixes[name] + p.name for p in path.iterdir())
    key = prefixes["sql-lora"] + "adapter_model.safetensors"
    local = (tiny_adapters["sql-lora"] / "adapter_model.safetensors").read_bytes()
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == local
    # and it really is an HTTP server: a presigned URL works with a plain HTTP client
    url = client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=60)
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200 and resp.read() == local


def test_s3_server_env_has_dummy_credentials(s3_server):
    import boto3

    assert os.environ["AWS_ACCESS_KEY_ID"] == "testing"
    client = boto3.client("s3", endpoint_url=s3_server)  # creds/region from env only
    assert "Buckets" in client.list_buckets()


# ---------------------------------------------------------------- Hugging Face Hub cache (offline)


def test_hub_offline_for_session():
    from huggingface_hub import constants

    assert os.environ["HF_HUB_OFFLINE"] == "1" and constants.HF_HUB_OFFLINE is True


def test_hub_cache_resolves_offline(hub_cache, tiny_adapters):
    from huggingface_hub import hf_hub_download, snapshot_download

    src = tiny_adapters[hub_cache.adapter_name]
    snap = snapshot_download(hub_cache.repo_id, cache_dir=hub_cache.cache_dir, local_files_only=True)
    assert os.path.isdir(snap) and str(snap).startswith(str(hub_cache.cache_dir))
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert _read(snap, name) == (src / name).read_bytes()
    file = hf_hub_download(
        hub_cache.repo_id, "adapter_model.safetensors", cache_dir=hub_cache.cache_dir, local_files_only=True
    )
    assert os.path.islink(file) and _read(file) == (src / "adapter_model.safetensors").read_bytes()
    blob = os.path.basename(os.path.realpath(file))
    assert blob == _sha256(src / "adapter_model.safetensors")  # LFS blobs are named by sha256


def test_hub_cache_subfolder_resolves_offline(hub_cache, tiny_adapters):
    from huggingface_hub import hf_hub_download, snapshot_download
    from peft import PeftConfig

    src = tiny_adapters[hub_cache.subfolder_adapter_name]
    snap = snapshot_download(
        hub_cache.subfolder_repo_id, cache_dir=hub_cache.cache_dir, local_files_only=True
    )
    got = _read(snap, hub_cache.subfolder, "adapter_model.safetensors")
    assert got == (src / "adapter_model.safetensors").read_bytes()
    file = hf_hub_download(
        hub_cache.subfolder_repo_id,
        "adapter_config.json",
        subfolder=hub_cache.subfolder,
        cache_dir=hub_cache.cache_dir,
    )  # no local_files_only: HF_HUB_OFFLINE covers it
    assert _read(file) == (src / "adapter_config.json").read_bytes()
    cfg = PeftConfig.from_pretrained(
        hub_cache.subfolder_repo_id, subfolder=hub_cache.subfolder, cache_dir=hub_cache.cache_dir
    )
    assert cfg.r == SPECS[hub_cache.subfolder_adapter_name].r


def test_hub_cache_scan_is_clean(hub_cache):
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(hub_cache.cache_dir)
    assert not info.warnings
    assert {r.repo_id for r in info.repos} == {hub_cache.repo_id, hub_cache.subfolder_repo_id}


# ---------------------------------------------------------------- Redis

_seen_prefixes: list[str] = []


def test_redis_set_get_under_prefix(redis_client, redis_prefix):
    key = redis_prefix + "greeting"
    redis_client.set(key, b"hello")
    redis_client.hset(redis_prefix + "h", mapping={"a": "1"})
    assert redis_client.get(key) == b"hello"
    assert sorted(redis_client.scan_iter(match=redis_prefix + "*")) == sorted(
        [key.encode(), (redis_prefix + "h").encode()]
    )
    _seen_prefixes.append(redis_prefix)


def test_redis_keys_gone_after_previous_test(redis_client, redis_prefix):
    if not _seen_prefixes:
        pytest.skip("runs after test_redis_set_get_under_prefix")
    assert redis_prefix not in _seen_prefixes  # each test gets its own prefix
    assert list(redis_client.scan_iter(match=_seen_prefixes[-1] + "*")) == []


def test_redis_delete_prefix_leaves_other_keys(redis_client, redis_prefix):
    redis_client.set(redis_prefix + "inner:x", 1)
    redis_client.set(redis_prefix + "keep", 1)
    assert services.delete_prefix(redis_client, redis_prefix + "inner:") == 1
    assert redis_client.exists(redis_prefix + "keep") == 1
