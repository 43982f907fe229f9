"""Validation of a downloaded adapter directory before anything is cached: the files, their sizes, the
config, the safetensors header (never the tensors), and every tensor's name and shape against the config
(and against the base model when the store knows it). Each refusal says why (AdapterRejectedError)."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from adapter_store.adapter_config import MODULE_BLOCK, parse_adapter_config, pattern_value, targets_module
from adapter_store.base_model import BaseModelShapes, check_base_model
from adapter_store.errors import AdapterRejectedError
from adapter_store.hashing import CONFIG_FILE, WEIGHTS_FILE
from adapter_store.manifest import ConfigSummary
from adapter_store.safetensors_header import TensorInfo, read_header

# PEFT's saved names: base_model.model.model.layers.<n>.<block>.<module>.lora_<A|B>[.default].weight
_TENSOR = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?"
                     r"\.weight$")
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
MAX_CONFIG_BYTES = 1 << 20
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class Limits:
    max_adapter_bytes: int
    max_lora_rank: int


@dataclass(frozen=True)
class BaseModel:
    """What the store checks adapters against; both parts optional."""

    name: str = ""
    shapes: BaseModelShapes | None = None


def pickle_refusal(what: str, names: list[str]) -> AdapterRejectedError:
    return AdapterRejectedError(
        f"{what} has no {WEIGHTS_FILE}, only {names}: pickle checkpoints can run code when loaded and are "
        "never served; save the adapter with safe_serialization=True (PEFT's default)")


def check_size(what: str, size: int, limits: Limits) -> None:
    if size > limits.max_adapter_bytes:
        raise AdapterRejectedError(f"{what} is {size} bytes, over the store's limit of {limits.max_adapter_bytes} "
                                   "(max_adapter_bytes)")


def validate_adapter(root: Path, what: str, limits: Limits, base: BaseModel = BaseModel(), registered_base: str = "",
                     listing: tuple[str, ...] = ()) -> ConfigSummary:
    """The adapter's validated config summary (max_rank from its tensors); AdapterRejectedError otherwise.
    `listing`: the file names the source has (to explain a missing safetensors file)."""
    config, weights = root / CONFIG_FILE, root / WEIGHTS_FILE
    if not weights.is_file():
        pickles = sorted({n for n in [*listing, *(p.name for p in root.iterdir())] if n.endswith(PICKLE_SUFFIXES)})
        if pickles:
            raise pickle_refusal(what, pickles)
    if not config.is_file():
        raise AdapterRejectedError(f"{what} has no {CONFIG_FILE}: not a PEFT adapter")
    if not weights.is_file():
        raise AdapterRejectedError(f"{what} has no {WEIGHTS_FILE}")
    if config.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterRejectedError(f"{what}: {CONFIG_FILE} is over {MAX_CONFIG_BYTES} bytes")
    check_size(what, config.stat().st_size + weights.stat().st_size, limits)
    summary = parse_adapter_config(config.read_bytes(), what)
    check_base_model(base.name, registered_base, summary.base_model_name_or_path, what)
    tensors = read_header(weights, f"{what}: {WEIGHTS_FILE}")
    max_rank = check_tensors(tensors, summary, base.shapes, what)
    if max_rank > limits.max_lora_rank:
        raise AdapterRejectedError(f"{what} has rank {max_rank}, over the store's max_lora_rank of "
                                   f"{limits.max_lora_rank}")
    return replace(summary, max_rank=max_rank)


def check_tensors(tensors: dict[str, TensorInfo], cfg: ConfigSummary, base: BaseModelShapes | None, what: str) -> int:
    """Check every tensor's name and shape; return the largest rank. A is [r, in] and B is [out, r], r from
    rank_pattern else r; in/out agree across layers (and with the base model when given)."""
    pairs: dict[tuple[int, str], dict[str, TensorInfo]] = {}
    for name, info in tensors.items():
        m = _TENSOR.match(name)
        if m is None:
            raise AdapterRejectedError(f"{what} has tensor {name!r}, which is not a LoRA A/B weight of a "
                                       "decoder layer projection (embeddings, lm_head and norms are not served)")
        layer, block, module, half = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if MODULE_BLOCK.get(module) != block:
            raise AdapterRejectedError(f"{what} has tensor {name!r} for module {block}.{module}, which the engine "
                                       f"does not serve; supported: {', '.join(MODULE_BLOCK)}")
        if info.dtype not in FLOAT_DTYPES:
            raise AdapterRejectedError(f"{what}: tensor {name!r} is {info.dtype}; LoRA weights are F16, BF16, F32 or "
                                       "F64")
        if base is not None and layer >= base.num_layers:
            raise AdapterRejectedError(f"{what} targets layer {layer}; the base model has {base.num_layers} layers")
        if not targets_module(cfg, f"model.layers.{layer}.{block}.{module}"):
            raise AdapterRejectedError(f"{what} has tensor {name!r}, but target_modules {list(cfg.target_modules)} "
                                       f"does not select {module}")
        pairs.setdefault((layer, module), {})[half] = info
    if not pairs:
        raise AdapterRejectedError(f"{what}: {WEIGHTS_FILE} holds no LoRA tensors")

    dims: dict[str, tuple[int, int]] = {}
    max_rank = 0
    for (layer, module), pair in sorted(pairs.items()):
        where = f"layer {layer} {module}"
        if set(pair) != {"A", "B"}:
            raise AdapterRejectedError(f"{what}: {where} has lora_{''.join(pair)} but not lora_{'AB'['A' in pair]}")
        a, b = pair["A"].shape, pair["B"].shape
        path = f"model.layers.{layer}.{MODULE_BLOCK[module]}.{module}"
        r = pattern_value(cfg.rank_pattern, path, cfg.rank)
        if len(a) != 2 or len(b) != 2 or a[0] != r or b[1] != r:
            raise AdapterRejectedError(f"{what}: {where} has A {list(a)} and B {list(b)}; its config declares rank "
                                       f"{r}, so A must be [{r}, in] and B [out, {r}]")
        in_out = (a[1], b[0])
        expected = base.dims[module] if base is not None else dims.setdefault(module, in_out)
        if in_out != expected:
            against = "the base model's" if base is not None else "other layers'"
            raise AdapterRejectedError(f"{what}: {where} maps {in_out[0]} -> {in_out[1]} features; {against} "
                                       f"{module} maps {expected[0]} -> {expected[1]}")
        max_rank = max(max_rank, r)
    return max_rank
