"""Valid PEFT LoRA adapters of any size, written straight to safetensors with numpy (no torch, no PEFT):
for tests that need many chunks (resume) or odd headers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

BLOCK = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
         "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def write_adapter(out: Path, *, layers: int = 2, hidden: int = 64, rank: int = 4,
                  modules: tuple[str, ...] = ("q_proj", "v_proj"), seed: int = 0, **config) -> Path:
    """An adapter for a square-projection model of width `hidden`; extra kwargs go into adapter_config.json."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(layers):
        for m in modules:
            base = f"base_model.model.model.layers.{layer}.{BLOCK[m]}.{m}"
            tensors[f"{base}.lora_A.weight"] = rng.standard_normal((rank, hidden), dtype=np.float32)
            tensors[f"{base}.lora_B.weight"] = rng.standard_normal((hidden, rank), dtype=np.float32)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(modules), "bias": "none",
           "task_type": "CAUSAL_LM", "base_model_name_or_path": "synthetic", **config}
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out
