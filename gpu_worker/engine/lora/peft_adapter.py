"""Reading a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) and checking that every
part of it is something the engine applies. What it cannot apply is refused with a reason, never ignored:
DoRA, modules_to_save, LoRA biases, embedding or lm_head adapters, unknown module names, shapes that
disagree with the base model, ranks over max_lora_rank.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from service_kit.peft_config import ConfigSummary, PeftConfigError, parse_peft_config, pattern_value

from ..errors import AdapterError
from ..model.config import ModelConfig
from .layout import MODULE_GROUP, module_shape

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_TENSOR_NAME = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$"
)


@dataclass
class AdapterWeights:
    """One adapter's tensors in host memory, scaling folded into B."""

    name: str
    content_hash: str
    # (layer, module) -> (A [r, in], B * scale [out, r])
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    max_rank: int = 0
    nbytes: int = 0


def content_hash(adapter_dir: Path) -> str:
    """sha256 over "<file>:<sha256 of file>" lines of the two adapter files, sorted by file name."""
    lines = []
    for fname in sorted([CONFIG_FILE, WEIGHTS_FILE]):
        digest = hashlib.sha256()
        with open(adapter_dir / fname, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        lines.append(f"{fname}:{digest.hexdigest()}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def missing_weights(root: Path, name: str) -> AdapterError:
    pickles = sorted(p.name for p in root.glob("*.bin")) + sorted(p.name for p in root.glob("*.pt"))
    why = f" ({pickles} are pickle files, which are never loaded: save with safe_serialization)" if pickles else ""
    return AdapterError("not_found", f"adapter {name!r}: {WEIGHTS_FILE} is missing in {root}{why}")


def read_config(adapter_dir: Path, name: str) -> ConfigSummary:
    """adapter_config.json, parsed and checked as the adapter store checks it (service_kit.peft_config)."""
    path = adapter_dir / CONFIG_FILE
    if not path.is_file():
        raise AdapterError("not_found", f"adapter {name!r}: {CONFIG_FILE} is missing in {adapter_dir}")
    try:
        return parse_peft_config(path.read_bytes(), f"adapter {name!r}")
    except PeftConfigError as e:
        raise AdapterError(e.kind, str(e)) from None


def load_adapter(
    adapter_dir: str | Path,
    name: str,
    model_cfg: ModelConfig,
    max_lora_rank: int,
    dtype: torch.dtype,
    max_bytes: int,
    digest: str | None = None,
) -> AdapterWeights:
    root = Path(adapter_dir)
    if not root.is_dir():
        raise AdapterError("not_found", f"adapter {name!r}: {root} is not a directory")
    cfg = read_config(root, name)
    weights = root / WEIGHTS_FILE
    if not weights.is_file():
        raise missing_weights(root, name)
    size = weights.stat().st_size
    if size > max_bytes:
        raise AdapterError("too_large", f"adapter {name!r} is {size} bytes, over the limit of {max_bytes}")

    alpha, rslora = cfg.lora_alpha, cfg.use_rslora
    out = AdapterWeights(name=name, content_hash=digest or content_hash(root))
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(weights), framework="pt") as sf:
            for tname in sf.keys():  # noqa: SIM118
                m = _TENSOR_NAME.match(tname)
                if m is None or m.group(2) not in MODULE_GROUP:
                    raise AdapterError("unsupported", f"adapter {name!r} has tensor {tname!r}, which targets no "
                                       f"supported projection ({', '.join(MODULE_GROUP)})")
                layer, module, half = int(m.group(1)), m.group(2), m.group(3)
                if layer >= model_cfg.num_layers:
                    raise AdapterError("mismatch", f"adapter {name!r} targets layer {layer}; the base model has "
                                       f"{model_cfg.num_layers}: it was trained for another base model")
                halves.setdefault((layer, module), {})[half] = sf.get_tensor(tname)
    except AdapterError:
        raise
    except Exception as e:  # a truncated or lying header
        raise AdapterError(
            "invalid", f"adapter {name!r}: {WEIGHTS_FILE} is not a readable safetensors file ({e})") from None

    for (layer, module), pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterError("invalid", f"adapter {name!r}: layer {layer} {module} lacks lora_{'AB'[('A' in pair)]}")
        a, b = pair["A"], pair["B"]
        fan_in, fan_out = module_shape(model_cfg, module)
        r = a.shape[0] if a.dim() == 2 else -1
        if r < 1 or b.dim() != 2 or a.shape[1] != fan_in or tuple(b.shape) != (fan_out, r):
            raise AdapterError("mismatch", f"adapter {name!r}: layer {layer} {module} has A {tuple(a.shape)} and B "
                               f"{tuple(b.shape)}; the base model needs A (r, {fan_in}) and B ({fan_out}, r)")
        if r > max_lora_rank:
            raise AdapterError("rank", f"adapter {name!r} has rank {r} (layer {layer} {module}), over max_lora_rank="
                               f"{max_lora_rank}: start the worker with --max-lora-rank {r} or more")
        block = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
        path = f"model.layers.{layer}.{block}.{module}"
        declared = pattern_value(cfg.rank_pattern, path, cfg.rank)
        if declared != r:
            raise AdapterError("mismatch", f"adapter {name!r}: layer {layer} {module} has rank {r} but its config "
                               f"declares {declared}")
        mod_alpha = pattern_value(cfg.alpha_pattern, path, alpha)
        scale = mod_alpha / (math.sqrt(r) if rslora else r)
        out.modules[(layer, module)] = (a.to(dtype).contiguous(), (b.float() * scale).to(dtype).contiguous())
        out.max_rank = max(out.max_rank, r)
        out.nbytes += (a.numel() + b.numel()) * torch.finfo(dtype).bits // 8
    if not out.modules:
        raise AdapterError("invalid", f"adapter {name!r}: {WEIGHTS_FILE} holds no LoRA tensors")
    _check_finite(name, out)
    return out


def _check_finite(name: str, out: AdapterWeights) -> None:
    """NaN or infinity anywhere in the weights as served (conversion keeps a NaN or an infinity read from the
    file, and scaling or a narrower dtype can overflow) -> AdapterError naming the module. One pass over the
    bit patterns of every tensor at once: a check per tensor, or isfinite on bf16, cost more than the read."""
    tensors = [t.reshape(-1) for pair in out.modules.values() for t in pair]
    if not _any_nonfinite(torch.cat(tensors)):
        return
    for (layer, module), pair in sorted(out.modules.items()):
        if any(_any_nonfinite(t.reshape(-1)) for t in pair):
            raise AdapterError("invalid", f"adapter {name!r}: layer {layer} {module} holds NaN or infinite values")


# An IEEE float is NaN or infinite exactly when its exponent bits are all ones.
_EXPONENT = {torch.bfloat16: (torch.int16, 0x7F80), torch.float16: (torch.int16, 0x7C00),
             torch.float32: (torch.int32, 0x7F800000)}


def _any_nonfinite(t: torch.Tensor) -> bool:
    if t.dtype not in _EXPONENT:
        return not bool(torch.isfinite(t).all())
    int_dtype, mask = _EXPONENT[t.dtype]
    return bool(((t.view(int_dtype) & mask) == mask).any())
