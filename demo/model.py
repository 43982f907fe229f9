"""Tiny random-weight Llama/Qwen2/Mistral checkpoints, saved exactly as a Hub checkpoint would be.

Why: serving code must be tested against the real on-disk format (config.json + model.safetensors +
tokenizer files) and real transformers modelling code, but a real model is gigabytes and needs the
network.  These are a few hundred KB, built on CPU in well under a second, and deterministic given
``seed``.

Weights are re-initialised explicitly from a seeded generator (not via transformers' ``_init_weights``,
whose rules change between versions), with a large std (0.2 by default) so that logits are spread out
and greedy decoding produces varied tokens rather than one token repeated forever.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from demo.tokenizer import BOS, EOS, PAD, build_tokenizer

INIT_STD = 0.2

_ARCHS: dict[str, tuple[type, type[PreTrainedModel]]] = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}


def _init_weights(model: torch.nn.Module, seed: int, std: float) -> None:
    """Deterministically fill every parameter: norms to 1, everything else N(0, std)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32) * std)


def _build(
    arch: str,
    out_dir: str | Path,
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    vocab_size: int | None,
    max_position_embeddings: int,
    seed: int,
    tie_word_embeddings: bool,
    dtype: torch.dtype,
    rope_scaling: dict[str, Any] | None,
    init_std: float,
    extra: dict[str, Any],
    extra_specials: tuple[str, ...] = (),
) -> Path:
    out = Path(out_dir)
    build_tokenizer(out, model_max_length=max_position_embeddings, extra_special_tokens=extra_specials)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    n_tok = tok.get_vocab_size(with_added_tokens=True)
    if vocab_size is None:
        vocab_size = n_tok
    elif vocab_size < n_tok:
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer's {n_tok} tokens")

    config_cls, model_cls = _ARCHS[arch]
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        initializer_range=init_std,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tok.token_to_id(BOS),
        eos_token_id=tok.token_to_id(EOS),
        pad_token_id=tok.token_to_id(PAD),
        **extra,
    )
    if rope_scaling is not None:
        # transformers 5 stores RoPE settings (theta included) as `rope_parameters`.
        kwargs["rope_parameters"] = {"rope_theta": 10000.0, **rope_scaling}
    config = config_cls(**kwargs)
    config.dtype = dtype
    model = model_cls(config)
    _init_weights(model, seed, init_std)
    model = model.to(dtype).eval()
    model.generation_config.do_sample = False
    model.save_pretrained(out)  # transformers 5 always writes model.safetensors
    return out


def build_llama(
    out_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int | None = None,
    max_position_embeddings: int = 512,
    seed: int = 0,
    tie_word_embeddings: bool = False,
    dtype: torch.dtype = torch.float32,
    rope_scaling: dict[str, Any] | None = None,
    init_std: float = INIT_STD,
) -> Path:
    """Build tokenizer + random ``LlamaForCausalLM`` into ``out_dir`` (GQA by default); return the path.

    ``vocab_size=None`` uses the tokenizer's size; ``rope_scaling`` (e.g. ``{"rope_type": "linear",
    "factor": 2.0}``) goes into the config's ``rope_parameters``.
    """
    return _build("llama", **locals(), extra={})


def build_qwen2(
    out_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int | None = None,
    max_position_embeddings: int = 512,
    seed: int = 0,
    tie_word_embeddings: bool = False,
    dtype: torch.dtype = torch.float32,
    rope_scaling: dict[str, Any] | None = None,
    init_std: float = INIT_STD,
) -> Path:
    """Like :func:`build_llama` but ``Qwen2ForCausalLM``, whose q/k/v projections carry a bias.

    The tokenizer gains ``<|endoftext|>`` (id 3) because transformers 5 loads any ``qwen2`` checkpoint
    with ``Qwen2Tokenizer``, which would otherwise append it as an unk token beyond the vocabulary.
    """
    # transformers 5 always loads model_type "qwen2" with Qwen2Tokenizer, whose unk is <|endoftext|>.
    return _build("qwen2", **locals(), extra={"use_sliding_window": False}, extra_specials=("<|endoftext|>",))


def build_mistral(
    out_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int | None = None,
    max_position_embeddings: int = 512,
    seed: int = 0,
    tie_word_embeddings: bool = False,
    dtype: torch.dtype = torch.float32,
    rope_scaling: dict[str, Any] | None = None,
    init_std: float = INIT_STD,
) -> Path:
    """Like :func:`build_llama` but ``MistralForCausalLM`` (sliding window off: the context is tiny)."""
    return _build("mistral", **locals(), extra={"sliding_window": None})
