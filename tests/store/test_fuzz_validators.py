"""Bounded fuzzing (hypothesis) of what the store parses from an adapter before anything is cached: the
safetensors header and adapter_config.json. Whatever the bytes, the answer is a result or an
AdapterRejectedError with a message, never another exception (which would reach a client as INTERNAL)."""

from __future__ import annotations

import json
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapter_store.adapter_config import parse_adapter_config
from adapter_store.errors import AdapterRejectedError
from adapter_store.safetensors_header import read_header

FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
DTYPES = st.sampled_from(["F16", "BF16", "F32", "F64", "I8", "U8", "I64", "BOOL", "F8_E4M3", "Q4", "", "f16"])
ENTRY = st.one_of(
    JSON,
    st.fixed_dictionaries({"dtype": DTYPES, "shape": st.lists(st.integers(-2, 2**40), max_size=3),
                           "data_offsets": st.one_of(JSON, st.lists(st.integers(-5, 2**66), min_size=0, max_size=3))}),
)


def _check_header(tmp_path, blob: bytes) -> None:
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(blob)
    try:
        out = read_header(path, "fuzz")
    except AdapterRejectedError as e:
        assert str(e).startswith("fuzz")
        return
    assert isinstance(out, dict)


@FUZZ
@given(blob=st.binary(max_size=300))
def test_safetensors_header_random_bytes(tmp_path, blob):
    _check_header(tmp_path, blob)


@FUZZ
@given(header=st.dictionaries(st.text(max_size=10), ENTRY, max_size=4), data=st.binary(max_size=64),
       lie=st.integers(-3, 3))
def test_safetensors_header_structured(tmp_path, header, data, lie):
    raw = json.dumps(header).encode()
    _check_header(tmp_path, struct.pack("<Q", max(0, len(raw) + lie)) + raw + data)


@FUZZ
@given(raw=st.binary(max_size=200))
def test_adapter_config_random_bytes(raw):
    try:
        parse_adapter_config(raw, "fuzz")
    except AdapterRejectedError as e:
        assert str(e).startswith("fuzz")


CONFIG_KEYS = ["peft_type", "r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora",
               "use_dora", "modules_to_save", "bias", "lora_bias", "fan_in_fan_out", "base_model_name_or_path"]


@FUZZ
@given(cfg=st.dictionaries(st.sampled_from(CONFIG_KEYS), JSON, max_size=8), lora=st.booleans())
def test_adapter_config_structured(cfg, lora):
    if lora:
        cfg["peft_type"] = "LORA"
    try:
        summary = parse_adapter_config(json.dumps(cfg).encode(), "fuzz")
    except AdapterRejectedError as e:
        assert str(e).startswith("fuzz")
        return
    assert summary.rank >= 1 and summary.max_rank >= summary.rank and summary.target_modules


# -- the worker's own reader (the engine loads adapters from disk with it: a store-less worker, --lora-root)

@FUZZ
@given(cfg=st.dictionaries(st.sampled_from(CONFIG_KEYS), JSON, max_size=6),
       header=st.dictionaries(st.text(max_size=24), ENTRY, max_size=3), data=st.binary(max_size=64),
       lie=st.integers(-2, 2))
def test_the_engines_adapter_loader(tmp_path_factory, tiny_model_dir, cfg, header, data, lie):
    import torch

    from gpu_worker.engine.errors import AdapterError
    from gpu_worker.engine.lora.peft_adapter import load_adapter
    from gpu_worker.engine.model.config import ModelConfig

    root = tmp_path_factory.mktemp("fuzz-adapter")
    cfg.setdefault("peft_type", "LORA")
    (root / "adapter_config.json").write_text(json.dumps(cfg))
    raw = json.dumps(header).encode()
    (root / "adapter_model.safetensors").write_bytes(struct.pack("<Q", max(0, len(raw) + lie)) + raw + data)
    try:
        load_adapter(root, "fuzz", ModelConfig.from_dir(tiny_model_dir), 16, torch.float32, 1 << 20)
    except AdapterError as e:
        assert "fuzz" in str(e) and e.kind
