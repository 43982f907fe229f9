"""Seeded random LoRA adapters in PEFT's on-disk format (adapter_config.json + adapter_model.safetensors).

Why: a server's adapter loader and its batched LoRA kernels must be checked against what PEFT really
writes, so adapters are made *by* PEFT (``LoraConfig`` + ``get_peft_model`` + ``save_pretrained``).
PEFT initialises ``lora_B`` to zero, which would make every adapter a no-op and hide bugs (wrong
scaling, swapped A/B, wrong slot), so both A and B are overwritten with seeded normals.  Their std is
chosen per module from its rank and scaling so that every adapter changes ``B @ A * scaling`` by about
``delta_std`` per weight entry: clearly visible in the logits, never exploding, whatever r/alpha/rslora.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

ALL_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class AdapterSpec:
    """What to build; ``build_lora_adapter(base, root / spec.name, **spec.kwargs())``."""

    name: str
    r: int
    lora_alpha: int
    target_modules: tuple[str, ...]
    seed: int
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, int] = field(default_factory=dict)
    use_rslora: bool = False

    def kwargs(self) -> dict:
        return {
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "target_modules": list(self.target_modules),
            "seed": self.seed,
            "rank_pattern": dict(self.rank_pattern) or None,
            "alpha_pattern": dict(self.alpha_pattern) or None,
            "use_rslora": self.use_rslora,
        }


# Module name overridden by the rank/alpha pattern of "code-lora" (one module of one layer only).
PATTERN_MODULE = "model.layers.1.mlp.down_proj"

DEFAULT_ADAPTERS: list[AdapterSpec] = [
    AdapterSpec("sql-lora", r=4, lora_alpha=8, target_modules=("q_proj", "v_proj"), seed=1),
    AdapterSpec("chat-lora", r=8, lora_alpha=16, target_modules=ALL_PROJ, seed=2),
    AdapterSpec(
        "code-lora",
        r=16,
        lora_alpha=32,
        target_modules=("o_proj", "gate_proj", "up_proj", "down_proj"),
        seed=3,
        rank_pattern={PATTERN_MODULE: 4},
        alpha_pattern={PATTERN_MODULE: 16},
    ),
    AdapterSpec(
        "math-lora",
        r=8,
        lora_alpha=16,
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
        seed=4,
        use_rslora=True,
    ),
]


def build_lora_adapter(
    base_dir: str | Path,
    out_dir: str | Path,
    *,
    r: int,
    lora_alpha: int,
    target_modules: list[str] | tuple[str, ...],
    seed: int,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, int] | None = None,
    use_rslora: bool = False,
    base_model_name_or_path: str | None = None,
    delta_std: float = 0.05,
) -> Path:
    """Wrap the base checkpoint with PEFT LoRA, fill A and B with seeded noise, save; return ``out_dir``.

    ``base_model_name_or_path`` defaults to ``str(base_dir)``; pass a Hub-style id to mimic a published
    adapter.  ``delta_std`` is the target std of each entry of ``scaling * B @ A``.
    """
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=list(target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
        use_rslora=use_rslora,
    )
    with warnings.catch_warnings():  # peft 0.21 calls an API transformers 5 deprecated
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in sorted(model.named_modules(), key=lambda kv: kv[0]):
            if not isinstance(module, LoraLayer):
                continue
            for name in sorted(module.lora_A):
                rank, scaling = module.r[name], module.scaling[name]
                # each entry of scaling * B @ A has std sqrt(rank) * std_a * std_b * scaling
                std = math.sqrt(delta_std / (math.sqrt(rank) * scaling))
                for layer in (module.lora_A[name], module.lora_B[name]):
                    w = layer.weight
                    w.copy_(torch.randn(w.shape, generator=gen) * std)
    model.peft_config["default"].base_model_name_or_path = base_model_name_or_path or str(base_dir)
    out = Path(out_dir)
    model.save_pretrained(str(out), safe_serialization=True)
    # PEFT writes target_modules from a set (order varies per process); sort it so files are reproducible.
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    # Drop PEFT's boilerplate model card: it embeds the local base path and is not needed to serve.
    (out / "README.md").unlink(missing_ok=True)
    return out


def build_default_adapters(base_dir: str | Path, root: str | Path, **kwargs) -> dict[str, Path]:
    """Build every spec of :data:`DEFAULT_ADAPTERS` into ``root/<name>/``; return name -> path.

    Extra ``kwargs`` (e.g. ``base_model_name_or_path``) are passed to :func:`build_lora_adapter`.
    """
    root = Path(root)
    return {
        spec.name: build_lora_adapter(base_dir, root / spec.name, **spec.kwargs(), **kwargs)
        for spec in DEFAULT_ADAPTERS
    }
