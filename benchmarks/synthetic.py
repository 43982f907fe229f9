"""Random-initialised checkpoints and PEFT adapters written straight to safetensors, at real sizes,
without downloading anything (the GPU machine has no network)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

LLAMA_3_2_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                    intermediate_size=8192, vocab_size=128256, max_position_embeddings=4096)
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def module_dims(cfg: dict) -> dict[str, tuple[int, int]]:
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def write_model(out: Path, cfg: dict, device: str, seed: int = 0) -> Path:
    """A Llama checkpoint with N(0, 0.02) weights in bf16, plus the demo tokenizer (ids are fed directly)."""
    from demo.tokenizer import build_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * 0.02).to(torch.bfloat16).cpu()

    h, v = cfg["hidden_size"], cfg["vocab_size"]
    tensors = {"model.embed_tokens.weight": rnd(v, h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
               "lm_head.weight": rnd(v, h)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        for m, (fi, fo) in module_dims(cfg).items():
            block = "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            tensors[f"{p}{block}.{m}.weight"] = rnd(fo, fi)
        tensors[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    save_file(tensors, str(out / "model.safetensors"))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
              "bos_token_id": 0, "eos_token_id": 1, **cfg}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    build_tokenizer(out)
    return out


def write_adapter(out: Path, cfg: dict, rank: int, seed: int, targets=PROJ) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for m in targets:
            fi, fo = module_dims(cfg)[m]
            block = "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            base = f"base_model.model.model.layers.{layer}.{block}.{m}"
            tensors[f"{base}.lora_A.weight"] = (torch.randn(rank, fi, generator=g) * fi**-0.5).to(torch.bfloat16)
            tensors[f"{base}.lora_B.weight"] = (torch.randn(fo, rank, generator=g) * 0.01).to(torch.bfloat16)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(targets),
        "bias": "none", "task_type": "CAUSAL_LM", "base_model_name_or_path": "synthetic-llama"}))
    return out


def llama_1b_with_adapters(prefix: str, n_adapters: int, rank: int = 16) -> tuple[Path, list]:
    """The Llama-3.2-1B-shaped checkpoint (on CUDA) and `n_adapters` rank-`rank` adapters on all seven projections,
    in a fresh temporary directory: (model dir, LoRARequests a0 .. a{n-1} with ids 1 .. n)."""
    import tempfile

    from gpu_worker.engine import LoRARequest

    root = Path(tempfile.mkdtemp(prefix=prefix))
    model = write_model(root / "model", LLAMA_3_2_1B, "cuda")
    return model, [LoRARequest(f"a{i}", i + 1, str(write_adapter(root / f"a{i}", LLAMA_3_2_1B, rank, seed=i)))
                   for i in range(n_adapters)]
