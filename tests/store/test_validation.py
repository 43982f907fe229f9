"""Validation before anything is cached: config, safetensors header (never the tensors), names and shapes,
limits, the base model. Plain function calls: no server."""

from __future__ import annotations

import json
import struct

import pytest

from adapter_store.base_model import BaseModelShapes
from adapter_store.errors import AdapterRejectedError
from adapter_store.safetensors_header import read_header
from adapter_store.validation import BaseModel, Limits, validate_adapter
from demo.adapters import PATTERN_MODULE

from .synthetic import write_adapter

LIMITS = Limits(max_adapter_bytes=1 << 30, max_lora_rank=64)


def edit_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def rejected(path, words: str, limits=LIMITS, **kw):
    with pytest.raises(AdapterRejectedError) as info:
        validate_adapter(path, "adapter 'x'", limits, **kw)
    assert words in str(info.value), str(info.value)
    return str(info.value)


def test_fixture_adapters_pass_with_their_config_summarised(tiny_adapters, tiny_model_dir):
    base = BaseModel(shapes=BaseModelShapes.from_config((tiny_model_dir / "config.json").read_text(), "cfg"))
    got = {name: validate_adapter(path, name, LIMITS, base) for name, path in tiny_adapters.items()}
    assert (got["sql-lora"].rank, got["sql-lora"].max_rank, got["sql-lora"].lora_alpha) == (4, 4, 8.0)
    assert got["sql-lora"].target_modules == ("q_proj", "v_proj")
    assert got["code-lora"].rank_pattern == {PATTERN_MODULE: 4} and got["code-lora"].alpha_pattern == {
        PATTERN_MODULE: 16.0}
    assert got["code-lora"].max_rank == 16
    assert got["math-lora"].use_rslora and not got["chat-lora"].use_rslora
    assert got["chat-lora"].base_model_name_or_path == str(tiny_model_dir)


@pytest.mark.parametrize("change, words", [
    ({"peft_type": "IA3"}, "only LORA"),
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "all"}, "trains biases"),
    ({"lora_bias": True}, "lora_bias"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, "['embed_tokens'], which the engine does not serve"),
    ({"target_modules": ["q_proj"]}, "does not select v_proj"),
    ({"r": 0}, "r must be a positive integer"),
    ({"r": 8}, "declares rank 8, so A must be [8, in]"),
    ({"rank_pattern": {"model.layers.1.self_attn.v_proj": 2}},
     "layer 1 v_proj has A [4, 64] and B [32, 4]; its config declares rank 2"),
    ({"lora_alpha": "big"}, "lora_alpha must be a positive number"),
    ({"rank_pattern": {"(": 2}}, "not a valid pattern"),
])
def test_config_refusals_say_why(adapter_copy, change, words):
    path = adapter_copy("sql-lora")
    edit_config(path, **change)
    rejected(path, words)


def test_missing_and_unreadable_files(adapter_copy):
    path = adapter_copy("sql-lora", "no-config")
    (path / "adapter_config.json").unlink()
    rejected(path, "has no adapter_config.json: not a PEFT adapter")
    path = adapter_copy("sql-lora", "bad-json")
    (path / "adapter_config.json").write_text("{not json")
    rejected(path, "adapter_config.json is not valid JSON")
    path = adapter_copy("sql-lora", "list-json")
    (path / "adapter_config.json").write_text("[]")
    rejected(path, "must hold a JSON object")


def test_pickle_only_adapter_is_refused_saying_why(adapter_copy):
    path = adapter_copy("sql-lora", "pickle")
    (path / "adapter_model.safetensors").rename(path / "adapter_model.bin")
    message = rejected(path, "only ['adapter_model.bin']: pickle checkpoints can run code")
    assert "safe_serialization=True" in message
    # the source's listing explains it too (remote sources download only the two adapter files)
    path = adapter_copy("sql-lora", "pickle-remote")
    (path / "adapter_model.safetensors").unlink()
    rejected(path, "pickle checkpoints", listing=("adapter_config.json", "adapter_model.bin"))


def test_limits_rank_and_size(tiny_adapters):
    rejected(tiny_adapters["code-lora"], "rank 16, over the store's max_lora_rank of 8",
             Limits(max_adapter_bytes=1 << 30, max_lora_rank=8))
    rejected(tiny_adapters["chat-lora"], "over the store's limit of 50000",
             Limits(max_adapter_bytes=50_000, max_lora_rank=64))


def test_base_model_shapes_and_name(tiny_adapters, tiny_model_dir):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    wider = BaseModelShapes.from_config(json.dumps({**cfg, "hidden_size": 128, "head_dim": 32}), "cfg")
    rejected(tiny_adapters["sql-lora"], "layer 0 q_proj maps 64 -> 64 features; the base model's q_proj maps "
             "128 -> 128", base=BaseModel(shapes=wider))
    shallow = BaseModelShapes.from_config(json.dumps({**cfg, "num_hidden_layers": 1}), "cfg")
    rejected(tiny_adapters["sql-lora"], "targets layer 1; the base model has 1 layers", base=BaseModel(shapes=shallow))
    rejected(tiny_adapters["sql-lora"], "trained on", base=BaseModel(name="meta-llama/Llama-3-8B"))
    rejected(tiny_adapters["sql-lora"], "registered for base model 'other'", base=BaseModel(name="tiny"),
             registered_base="other")
    # the same last path component is the same model ("/models/tiny-llama0" ~ "org/tiny-llama0")
    same = BaseModel(name="some-org/" + tiny_model_dir.name)
    assert validate_adapter(tiny_adapters["sql-lora"], "x", LIMITS, same).rank == 4
    with pytest.raises(ValueError, match="has no hidden_size"):
        BaseModelShapes.from_config("{}", "cfg.json")


def test_shapes_must_agree_across_layers(tmp_path):
    path = write_adapter(tmp_path / "a", layers=2, hidden=32)
    assert validate_adapter(path, "x", LIMITS).max_rank == 4
    from safetensors.numpy import load_file, save_file
    tensors = load_file(str(path / "adapter_model.safetensors"))
    name = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    tensors[name] = tensors[name][:, :16].copy()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    rejected(path, "layer 1 q_proj maps 16 -> 32 features; other layers' q_proj maps 32 -> 32")


def test_tensor_names_and_pairs(tmp_path):
    from safetensors.numpy import load_file, save_file
    path = write_adapter(tmp_path / "a")
    weights = path / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({**tensors, "base_model.model.lm_head.lora_A.weight": tensors[next(iter(tensors))]}, str(weights))
    rejected(path, "'base_model.model.lm_head.lora_A.weight', which is not a LoRA A/B weight")
    save_file({k: v for k, v in tensors.items() if "layers.0.self_attn.q_proj.lora_B" not in k}, str(weights))
    rejected(path, "layer 0 q_proj has lora_A but not lora_B")
    save_file({k: v.astype("int32") for k, v in tensors.items()}, str(weights))
    rejected(path, "is I32; LoRA weights are F16, BF16, F32 or F64")


@pytest.fixture
def weights(tmp_path, tiny_adapters):
    path = tmp_path / "w.safetensors"
    path.write_bytes((tiny_adapters["sql-lora"] / "adapter_model.safetensors").read_bytes())
    return path


def _rewrite(path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_safetensors_header_is_checked_against_the_file(weights):
    raw = weights.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    assert len(read_header(weights, "w")) == 8  # 2 layers x (q, v) x (A, B)

    weights.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(AdapterRejectedError, match="truncated"):
        read_header(weights, "w")
    weights.write_bytes(raw + b"junk")
    with pytest.raises(AdapterRejectedError, match="trailing bytes"):
        read_header(weights, "w")
    weights.write_bytes(struct.pack("<Q", 1 << 40) + raw[8:])
    with pytest.raises(AdapterRejectedError, match="its header claims"):
        read_header(weights, "w")
    weights.write_bytes(raw[:5])
    with pytest.raises(AdapterRejectedError, match="too short"):
        read_header(weights, "w")
    weights.write_bytes(struct.pack("<Q", 4) + b"{abc" + data)
    with pytest.raises(AdapterRejectedError, match="not valid JSON"):
        read_header(weights, "w")

    first = next(k for k in header if k != "__metadata__")
    for bad, words in [
        ({**header[first], "dtype": "Q4"}, "unknown dtype 'Q4'"),
        ({**header[first], "shape": [4, 65]}, "needs 1040 bytes, its offsets give 1024"),
        ({**header[first], "data_offsets": [8, 1032]}, "starts at byte"),
        ({**header[first], "shape": "4x64"}, "malformed header entry"),
    ]:
        _rewrite(weights, {**header, first: bad}, data)
        with pytest.raises(AdapterRejectedError, match=words):
            read_header(weights, "w")
